"""cluster.yaml: valid for the Ray cluster launcher, and keeps the promises docs/cluster.md makes.

Validity is checked with the launcher's own code, offline (no AWS call, no ray.init): the steps of
``ray up`` before it talks to AWS (``prepare_config``: defaults, merged setup commands, per-type
worker counts; then ``validate_config``: ray-schema.json and the node-type checks), and every
``node_config`` against botocore's model of EC2 RunInstances, which the AWS node provider calls
with it. Tests with broken copies show each check rejects a typo, so none can pass vacuously.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
CLUSTER_YAML = REPO / "cluster.yaml"
RAY_PORTS = {6379, 8265, 8076, 10001}  # GCS, dashboard / job API, object manager, Ray Client


@pytest.fixture(scope="module")
def raw() -> dict:
    return yaml.safe_load(CLUSTER_YAML.read_text())


def launcher_validate(config: dict) -> dict:
    """What `ray up` does with the YAML before contacting AWS; raises on an invalid config."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    return prepared


def run_instances_errors(node_config: dict) -> str:
    """botocore's validation of a node_config as RunInstances parameters ('' when valid)."""
    import botocore.session
    from botocore.validate import ParamValidator

    shape = botocore.session.get_session().get_service_model("ec2").operation_model("RunInstances").input_shape
    params = dict(node_config, MinCount=1, MaxCount=1)  # added by Ray's AWS node provider
    params.pop("SubnetIds", None)  # Ray's own key, turned into SubnetId before the call
    report = ParamValidator().validate(params, shape)
    return report.generate_report() if report.has_errors() else ""


@pytest.fixture(scope="module")
def prepared(raw) -> dict:
    return launcher_validate(raw)


# --- the launcher accepts it, and rejects broken copies -----------------------------------------


def test_the_launcher_validation_accepts_cluster_yaml(prepared):
    assert prepared["head_node_type"] in prepared["available_node_types"]


@pytest.mark.parametrize(
    "mutate, match",
    [
        pytest.param(lambda c: c.update(max_worker=c.pop("max_workers")), "'max_worker' was unexpected",
                     id="top-level max_worker"),
        pytest.param(lambda c: c["available_node_types"]["raypipe.gpu"].update(
            max_worker=c["available_node_types"]["raypipe.gpu"].pop("max_workers")), "'max_worker' was unexpected",
            id="node-type max_worker"),
        pytest.param(lambda c: c["available_node_types"]["raypipe.gpu"]["resources"].update(GPU="1"),
                     "'1' is not of type 'integer'", id="resource count as a string"),
        pytest.param(lambda c: c.update(idle_timeout_minutes="ten"), "'ten' is not of type 'number'",
                     id="idle_timeout_minutes not a number"),
        pytest.param(lambda c: c["provider"]["security_group"].update(IpPermission=[]),
                     "'IpPermission' was unexpected", id="security_group typo"),
        pytest.param(lambda c: c["auth"].update(ssh_usr="ubuntu"), "'ssh_usr' was unexpected", id="auth typo"),
        pytest.param(lambda c: c.update(worker_start_ray_commands="ray start"), "'ray start' is not of type 'array'",
                     id="commands not a list"),
        pytest.param(lambda c: c.update(head_node_type="raypipe.headd"),
                     "`head_node_type` must be one of `available_node_types`", id="unknown head node type"),
    ],
)
def test_the_launcher_validation_rejects_a_broken_copy(raw, mutate, match):
    import jsonschema

    broken = copy.deepcopy(raw)
    mutate(broken)
    with pytest.raises((jsonschema.ValidationError, ValueError), match=re.escape(match)):
        launcher_validate(broken)


def test_every_node_config_is_valid_for_ec2_run_instances(raw):
    for name, node_type in raw["available_node_types"].items():
        assert run_instances_errors(node_type["node_config"]) == "", name


@pytest.mark.parametrize(
    "mutate",
    [
        pytest.param(lambda n: n.update(InstanceTyp=n.pop("InstanceType")), id="InstanceTyp"),
        pytest.param(lambda n: n.update(IamInstanceProfile={"Nme": "raypipe-worker"}), id="IamInstanceProfile.Nme"),
        pytest.param(lambda n: n["BlockDeviceMappings"][0]["Ebs"].update(VolumeSize="150"), id="VolumeSize string"),
    ],
)
def test_ec2_validation_rejects_a_broken_node_config(raw, mutate):
    node_config = copy.deepcopy(raw["available_node_types"]["raypipe.gpu"]["node_config"])
    mutate(node_config)
    assert run_instances_errors(node_config) != ""


# --- our own promises (docs/cluster.md) ----------------------------------------------------------


def test_no_credentials_anywhere(raw):
    text = CLUSTER_YAML.read_text()
    for secret in ("aws_access_key_id", "aws_secret_access_key", "aws_session_token", "RAY_AUTH_TOKEN="):
        assert secret.lower() not in text.lower(), secret
    assert not re.search(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b", text), "something that looks like an AWS access key id"
    assert "aws_credentials" not in raw["provider"]  # the AWS provider would accept keys there


def test_every_node_type_gets_an_iam_instance_profile(raw):
    for name, node_type in raw["available_node_types"].items():
        profile = node_type["node_config"].get("IamInstanceProfile", {})
        assert profile.get("Name") or profile.get("Arn"), f"{name} has no IamInstanceProfile"


def _start_commands(prepared: dict, key: str) -> list[str]:
    return [c for c in prepared[key] if re.search(r"\bray start\b", c)]


def test_token_auth_on_every_ray_start_and_the_token_is_mounted(prepared):
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        starts = _start_commands(prepared, key)
        assert starts, f"no `ray start` in {key}"
        for command in starts:
            assert "RAY_AUTH_MODE=token" in command, command
    # Ray's default token path on every node, from the token generated locally.
    assert prepared["file_mounts"].get("~/.ray/auth_token") == "~/.ray/auth_token"


def test_file_mounts_bring_what_the_setup_commands_use(raw):
    """`ray up` runs from the repository root and stops at a missing local path; the setup commands
    run `pip install -e .`, read .ci/constraints.txt and run scripts/install_wordnet.sh in ~/raypipe."""
    import posixpath

    code = {}  # path under ~/raypipe -> local path relative to the repository
    for remote, local in raw["file_mounts"].items():
        if remote.startswith("~/raypipe/"):
            assert not local.startswith(("~", "/")), f"{local}: not part of the checkout"
            code[remote.removeprefix("~/raypipe/").rstrip("/")] = posixpath.normpath(local)
    for local in code.values():
        assert (REPO / local).exists(), local

    def source(path: str):
        for remote, local in code.items():
            if path == remote or path.startswith(remote + "/"):
                return REPO / local / path[len(remote) + 1:]
        return None

    needed = ["pyproject.toml", "README.md", ".ci/constraints.txt", "raypipe/__init__.py", "raypipe/config.py",
              "jobs/train.py", "scripts/install_wordnet.sh", "scripts/wordnet/lexnames"]
    for path in needed:  # README.md is the package's readme: pip needs it to build
        found = source(path)
        assert found is not None and found.exists() and found == REPO / path, f"{path} is not mounted at ~/raypipe/{path}"


def test_no_ingress_from_the_internet_except_ssh(raw):
    """The rules the launcher itself creates (Ray's own function), plus any we would add."""
    from ray.autoscaler._private.aws.config import _create_default_inbound_rules

    node_configs = {name: t["node_config"] for name, t in raw["available_node_types"].items()}
    assert not [n for n, c in node_configs.items() if "NetworkInterfaces" in c]  # would bypass the groups
    own = sorted(n for n, c in node_configs.items() if "SecurityGroupIds" in c)
    if own:  # docs/cluster.md: a group of one's own to restrict SSH; the launcher leaves it alone
        pytest.skip(f"{own} use their own security groups, whose rules are not in cluster.yaml")
    extra = raw["provider"].get("security_group", {}).get("IpPermissions", [])
    rules = _create_default_inbound_rules(["sg-cluster"], extra)
    for rule in rules:
        world = [r.get("CidrIp") for r in rule.get("IpRanges", [])] + [r.get("CidrIpv6") for r in rule.get("Ipv6Ranges", [])]
        if not any(cidr in ("0.0.0.0/0", "::/0") for cidr in world):
            assert [g["GroupId"] for g in rule.get("UserIdGroupPairs", [])] == ["sg-cluster"], rule
            continue
        ports = range(rule["FromPort"], rule["ToPort"] + 1) if rule["FromPort"] != -1 else range(0, 65536)
        assert rule["IpProtocol"] == "tcp" and list(ports) == [22], f"opens {rule} to the internet"
        assert not RAY_PORTS & set(ports)


def _effective_setup(prepared: dict) -> dict[str, list[str]]:
    """The setup commands each node type really runs (a node type may replace the global ones)."""
    out = {prepared["head_node_type"]: prepared["head_setup_commands"]}
    for name, node_type in prepared["available_node_types"].items():
        if name != prepared["head_node_type"]:
            out[name] = node_type.get("worker_setup_commands", prepared["worker_setup_commands"])
    return out


def _index(commands: list[str], pattern: str) -> int:
    hits = [i for i, c in enumerate(commands) if re.search(pattern, c)]
    assert hits, f"no setup command matches {pattern!r}"
    return hits[0]


def test_setup_installs_torch_then_the_project_then_wordnet_on_every_node(prepared):
    makefile_torch = re.search(r"^TORCH \?= (\S+)", (REPO / "Makefile").read_text(), re.M).group(1)
    import ray

    for name, commands in _effective_setup(prepared).items():
        torch = _index(commands, r"pip install .*\btorch==")
        project = _index(commands, r"pip install .*-e \.")
        wordnet = _index(commands, r"scripts/install_wordnet\.sh")
        assert torch < project < wordnet, name
        # GPU nodes get the CUDA build from PyPI, the others the CPU build; the Makefile's pin.
        assert "nvidia-smi" in commands[torch] and "download.pytorch.org/whl/cpu" in commands[torch]
        assert makefile_torch in commands[torch]
        # The cluster runs the launcher's Ray version.
        assert f"ray[default,train,data]=={ray.__version__}" in commands[project], name


def test_head_runs_no_tasks_and_the_worker_types_fit_their_jobs(prepared):
    types = prepared["available_node_types"]
    head = types[prepared["head_node_type"]]
    assert head["resources"].get("CPU") == 0 and not head["resources"].get("GPU")

    gpu = [t for n, t in types.items() if t["resources"].get("GPU", 0) >= 1]
    assert gpu, "no worker type with a GPU resource"
    for node_type in gpu:
        assert re.match(r"(g|p)\d", node_type["node_config"]["InstanceType"]), "GPU resource on a non-GPU instance"
        assert node_type["min_workers"] == 0 and node_type["max_workers"] >= 1  # autoscaled from zero

    cpu = [t for n, t in types.items() if n != prepared["head_node_type"] and not t["resources"].get("GPU")]
    assert cpu, "no CPU worker type for preprocessing"
    for node_type in cpu:
        assert node_type["resources"]["CPU"] >= 8 and node_type["min_workers"] == 0
    assert prepared["idle_timeout_minutes"] > 0 and prepared["upscaling_speed"] > 0
