"""k8s/rayjob.yaml: a RayJob that KubeRay's CRD accepts, and that keeps the promises of docs/kubernetes.md.

No Kubernetes cluster is reachable here, so the manifest is checked offline:

- **Schema**: against the openAPIV3Schema of KubeRay's RayJob CRD (v1.7.0, served + storage version v1),
  read from $KUBERAY_RAYJOB_CRD or ../shared/kuberay/ray.io_rayjobs.yaml (not in the repository, see
  k8s/crd/README.md; these tests are skipped, saying so, where it is absent): `jsonschema` checks types,
  enums, required fields and patterns (an `x-kubernetes-int-or-string` node takes either), and a walk
  over the manifest names every key the schema does not define: the API server would drop such a key
  silently (pruning), or refuse it with field validation Strict (`unknown field "..."`).
- **Promises**: token authentication on every Ray container, the autoscaler and the submitter, the
  token from a Secret; in-tree autoscaling; a head with `num-cpus: "0"`; worker groups scaling from 0;
  an entrypoint that runs `raypipe train`, then `raypipe label` on the cluster, with settings the jobs
  accept and object-storage paths; no credential or token written into the file.

Broken copies of the manifest show that each check fails, so none can pass vacuously.
"""

from __future__ import annotations

import copy
import os
import re
import shlex
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
MANIFEST = REPO / "k8s" / "rayjob.yaml"
SHARED_CRD = REPO.parent / "shared" / "kuberay" / "ray.io_rayjobs.yaml"  # where CI finds it, if anywhere
DOCKERFILE = REPO / "k8s" / "Dockerfile"
IMAGE_ROOT = "/home/ray/raypipe"  # WORKDIR of k8s/Dockerfile: the checkout inside the image
FULL_CRD_ENV = "KUBERAY_RAYJOB_CRD"
TOKEN_KEY = "auth_token"  # the Secret key KubeRay's authOptions.secretName reads
MIN_TOKEN_RAY = (2, 52)  # KubeRay refuses authOptions.mode=token below this rayVersion
# ObjectMeta fields a manifest may set (the API server validates metadata itself; the CRD only says object).
OBJECT_META = {"name", "generateName", "namespace", "labels", "annotations", "finalizers", "ownerReferences"}


class ManifestError(AssertionError):
    """What is wrong with a manifest, one problem per line."""


# --- the CRD's schema ------------------------------------------------------------------------------


def served_schema(crd: dict) -> dict:
    """The openAPIV3Schema of the version the API server serves and stores."""
    (version,) = [v for v in crd["spec"]["versions"] if v.get("served") and v.get("storage")]
    return version["schema"]["openAPIV3Schema"]


def for_jsonschema(schema: dict) -> dict:
    """An OpenAPI node as JSON Schema: int-or-string takes an integer or a string."""
    out = {k: for_jsonschema(v) if isinstance(v, dict) else v for k, v in schema.items() if k != "properties"}
    if "properties" in schema:
        out["properties"] = {k: for_jsonschema(v) for k, v in schema["properties"].items()}
    if isinstance(schema.get("items"), dict):
        out["items"] = for_jsonschema(schema["items"])
    if schema.get("x-kubernetes-int-or-string") and "anyOf" not in schema:
        out.pop("type", None)
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    return out


def _where(path) -> str:
    return "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in path).lstrip(".") or "(top)"


def type_problems(manifest: dict, schema: dict) -> list[str]:
    from jsonschema import Draft7Validator

    errors = Draft7Validator(for_jsonschema(schema)).iter_errors(manifest)
    return sorted(f"{_where(e.absolute_path)}: {e.message}" for e in errors)


def unknown_fields(value, schema: dict, path: str = "") -> list[str]:
    """Every key of `value` that `schema` does not define, by its path, as the API server names them."""
    if schema.get("x-kubernetes-preserve-unknown-fields"):
        return []
    problems = []
    if isinstance(value, dict):
        if "properties" in schema:
            for key, sub in value.items():
                where = f"{path}.{key}" if path else key
                if key in schema["properties"]:
                    problems += unknown_fields(sub, schema["properties"][key], where)
                else:
                    problems.append(f'unknown field "{where}"')
        elif isinstance(schema.get("additionalProperties"), dict):
            for key, sub in value.items():
                problems += unknown_fields(sub, schema["additionalProperties"], f"{path}.{key}")
        elif path == "metadata":
            problems += [f'unknown field "metadata.{key}"' for key in value if key not in OBJECT_META]
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        for i, item in enumerate(value):
            problems += unknown_fields(item, schema["items"], f"{path}[{i}]")
    return problems


def schema_problems(manifest: dict, schema: dict) -> list[str]:
    return type_problems(manifest, schema) + unknown_fields(manifest, schema)


# --- the promises ----------------------------------------------------------------------------------


def ray_containers(manifest: dict) -> dict[str, dict]:
    """The Ray container (index 0, as KubeRay requires) of the head and of each worker group."""
    cluster = manifest["spec"]["rayClusterSpec"]
    out = {"head": cluster["headGroupSpec"]["template"]["spec"]["containers"][0]}
    for group in cluster.get("workerGroupSpecs", []):
        out[f"worker group {group['groupName']}"] = group["template"]["spec"]["containers"][0]
    return out


def token_problems(manifest: dict) -> list[str]:
    cluster = manifest["spec"]["rayClusterSpec"]
    auth = cluster.get("authOptions") or {}
    secret = auth.get("secretName")
    problems = []
    if auth.get("mode") != "token" or not secret:
        problems.append("rayClusterSpec.authOptions: mode must be token, with the token's Secret in secretName "
                        "(KubeRay then authenticates its own calls to the dashboard)")
    version = tuple(int(p) for p in re.findall(r"\d+", str(cluster.get("rayVersion", "")))[:2])
    if version < MIN_TOKEN_RAY:
        problems.append(f"rayClusterSpec.rayVersion {cluster.get('rayVersion')!r}: token auth needs Ray >= 2.52")
    holders = dict(ray_containers(manifest))
    holders["autoscaler"] = cluster.get("autoscalerOptions") or {}
    submitter = ((manifest["spec"].get("submitterPodTemplate") or {}).get("spec") or {}).get("containers") or [{}]
    holders["submitter"] = submitter[0]
    for who, container in holders.items():
        env = {e.get("name"): e for e in container.get("env") or []}
        if env.get("RAY_AUTH_MODE", {}).get("value") != "token":
            problems.append(f"{who}: no RAY_AUTH_MODE=token in env")
        ref = (env.get("RAY_AUTH_TOKEN", {}).get("valueFrom") or {}).get("secretKeyRef") or {}
        if "value" in env.get("RAY_AUTH_TOKEN", {}) or ref.get("name") != secret or ref.get("key") != TOKEN_KEY:
            problems.append(f"{who}: RAY_AUTH_TOKEN must come from secretKeyRef {{name: {secret}, key: {TOKEN_KEY}}}")
    return problems


def scaling_problems(manifest: dict) -> list[str]:
    cluster = manifest["spec"]["rayClusterSpec"]
    problems = []
    if cluster.get("enableInTreeAutoscaling") is not True:
        problems.append("rayClusterSpec.enableInTreeAutoscaling must be true (worker groups scale from 0)")
    if cluster["headGroupSpec"].get("rayStartParams", {}).get("num-cpus") != "0":
        problems.append('headGroupSpec.rayStartParams: num-cpus must be "0" (the head runs no tasks, as in cluster.yaml)')
    groups = cluster.get("workerGroupSpecs") or []
    if not groups:
        problems.append("rayClusterSpec.workerGroupSpecs: no worker group")
    for group in groups:
        low, high = group.get("minReplicas"), group.get("maxReplicas")
        if low != 0 or not isinstance(high, int) or high < max(low or 0, 1):
            problems.append(f"worker group {group['groupName']}: minReplicas {low}, maxReplicas {high}: "
                            "want minReplicas 0 <= maxReplicas, maxReplicas >= 1")
        resources = group["template"]["spec"]["containers"][0].get("resources", {})
        gpus = resources.get("limits", {}).get("nvidia.com/gpu")
        if "nvidia.com/gpu" in resources.get("requests", {}) and gpus != resources["requests"]["nvidia.com/gpu"]:
            problems.append(f"worker group {group['groupName']}: nvidia.com/gpu must be in limits, equal to requests")
    return problems


def entrypoint_jobs(manifest: dict) -> list[tuple[str, object]]:
    """The raypipe commands of the entrypoint, in order, as (job, validated config); raises ManifestError."""
    from raypipe.cli import build_parser
    from raypipe.commands import COMMANDS
    from raypipe.config import ConfigError, load_config

    words = shlex.split(manifest["spec"]["entrypoint"])
    if len(words) != 3 or words[:2] != ["bash", "-c"]:
        raise ManifestError("entrypoint: must be bash -c '<commands>': KubeRay's submitter puts the entrypoint "
                            "into a shell script of its own, where a bare && runs the second command in the "
                            "submitter pod instead of the Ray job")
    jobs = []
    for part in words[2].split("&&"):
        argv = shlex.split(part)
        if len(argv) < 2 or argv[0] != "raypipe" or argv[1] not in COMMANDS:
            raise ManifestError(f"entrypoint: {part.strip()!r} is not a raypipe <job> command")
        try:
            args = build_parser().parse_args(argv[1:])
        except SystemExit:
            raise ManifestError(f"entrypoint: raypipe {argv[1]}: arguments not accepted") from None
        config = args.config
        if config is not None:
            if not config.startswith(IMAGE_ROOT + "/"):
                raise ManifestError(f"entrypoint: --config {config} is not under {IMAGE_ROOT} (k8s/Dockerfile)")
            config = REPO / config.removeprefix(IMAGE_ROOT + "/")
        try:
            jobs.append((argv[1], load_config(COMMANDS[argv[1]].config, config, args.overrides)))
        except ConfigError as e:
            raise ManifestError(f"entrypoint: raypipe {argv[1]}: {e}") from None
    return jobs


def entrypoint_problems(manifest: dict) -> list[str]:
    from raypipe.pipeline.capacity import is_local_path

    try:
        jobs = entrypoint_jobs(manifest)
    except ManifestError as e:
        return [str(e)]
    names = [name for name, _ in jobs]
    if names != ["train", "label"]:
        return [f"entrypoint: runs {names}; want raypipe train, then raypipe label"]
    (_, train), (_, label) = jobs
    problems = []
    inputs = label.data.input if isinstance(label.data.input, list) else [label.data.input]
    paths = {"train prepared": train.prepared, "train run.storage_path": train.run.storage_path,
             "label bundle": label.bundle, "label output": label.output,
             **{f"label data.input {u}": u for u in inputs}}
    problems += [f"entrypoint: {setting}={url} is a local path: each pod has its own disk (use s3://)"
                 for setting, url in paths.items() if url and is_local_path(str(url))]
    made = f"{str(train.run.storage_path).rstrip('/')}/{train.run.name}/bundle"
    if str(label.bundle) != made:
        problems.append(f"entrypoint: label bundle={label.bundle}, but train writes its bundle to {made}")
    return problems


AWS_KEY_ID = re.compile(r"\b(AKIA|ASIA)[A-Z0-9]{16}\b")
HEX_TOKEN = re.compile(r"\b[0-9a-fA-F]{32,}\b")
AWS_SECRET = re.compile(r"(?<![A-Za-z0-9/+])[A-Za-z0-9/+]{40}(?![A-Za-z0-9/+])")
SECRET_NAME = re.compile(r"KEY|SECRET|TOKEN|PASSWORD|CREDENTIAL", re.IGNORECASE)


def _strings(value, path=""):
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _strings(v, f"{path}.{k}" if path else k)
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from _strings(v, f"{path}[{i}]")
    elif isinstance(value, str):
        yield path, value


def _env_lists(value):
    if isinstance(value, dict):
        for k, v in value.items():
            if k == "env" and isinstance(v, list):
                yield v
            yield from _env_lists(v)
    elif isinstance(value, list):
        for v in value:
            yield from _env_lists(v)


def secret_problems(manifest: dict) -> list[str]:
    problems = [f"{path}: looks like a credential or token written into the manifest"
                for path, text in _strings(manifest)
                if AWS_KEY_ID.search(text) or HEX_TOKEN.search(text) or AWS_SECRET.search(text)]
    for env in _env_lists(manifest):
        problems += [f"env {e['name']}: a secret given as a value; use valueFrom.secretKeyRef"
                     for e in env if SECRET_NAME.search(e.get("name", "")) and "value" in e]
    return sorted(set(problems))


def check_manifest(manifest: dict, schema: dict | None) -> None:
    """Raises ManifestError listing every problem of `manifest` (against the CRD's `schema` when given)."""
    problems = schema_problems(manifest, schema) if schema is not None else []
    if manifest.get("apiVersion") != "ray.io/v1" or manifest.get("kind") != "RayJob":
        problems.append(f"apiVersion/kind {manifest.get('apiVersion')}/{manifest.get('kind')}: want ray.io/v1 RayJob")
    if not problems:  # the checks below read the structure the schema has confirmed
        problems += token_problems(manifest) + scaling_problems(manifest) + entrypoint_problems(manifest)
        problems += secret_problems(manifest)
    if problems:
        raise ManifestError("\n".join(problems))


# --- tests -----------------------------------------------------------------------------------------


def crd_path() -> Path | None:
    path = os.environ.get(FULL_CRD_ENV) or (SHARED_CRD if SHARED_CRD.is_file() else None)
    return Path(path) if path else None


@pytest.fixture(scope="module")
def schema() -> dict:
    path = crd_path()
    if path is None:
        pytest.skip(f"KubeRay's RayJob CRD is not here: set {FULL_CRD_ENV} or put it at {SHARED_CRD} "
                    "(k8s/crd/README.md); the manifest's promises are still checked")
    crd = load_crd(str(path))
    assert crd["spec"]["names"]["kind"] == "RayJob" and crd["spec"]["group"] == "ray.io"
    return served_schema(crd)


@pytest.fixture
def manifest() -> dict:
    return yaml.safe_load(MANIFEST.read_text())


def test_the_manifest_keeps_every_promise(manifest):
    check_manifest(manifest, None)


def test_the_manifest_fits_the_crd(manifest, schema):
    check_manifest(manifest, schema)
    spec = schema["properties"]["spec"]["properties"]
    # Fields of this KubeRay version that the manifest relies on.
    assert {"entrypoint", "submissionMode", "shutdownAfterJobFinishes", "ttlSecondsAfterFinished",
            "submitterPodTemplate", "rayClusterSpec"} <= set(spec)
    cluster = spec["rayClusterSpec"]["properties"]
    assert {"authOptions", "enableInTreeAutoscaling", "autoscalerOptions", "rayVersion"} <= set(cluster)
    assert cluster["authOptions"]["properties"]["mode"]["enum"] == ["disabled", "token"]


def test_the_image_and_ray_versions_match(manifest):
    import ray

    cluster = manifest["spec"]["rayClusterSpec"]
    assert cluster["rayVersion"] == ray.__version__  # the Ray the project pins and tests with
    assert f"FROM rayproject/ray:{ray.__version__}-py311-${{VARIANT}}" in DOCKERFILE.read_text()
    assert f"WORKDIR {IMAGE_ROOT}" in DOCKERFILE.read_text()
    submitter = manifest["spec"]["submitterPodTemplate"]["spec"]["containers"][0]
    assert submitter["image"] == f"rayproject/ray:{ray.__version__}-py311-cpu"
    images = {who: c["image"] for who, c in ray_containers(manifest).items()}
    assert images["worker group gpu"].endswith("-gpu") and images["head"] == images["worker group cpu"]


def _worker(m: dict, name: str) -> dict:
    (group,) = [g for g in m["spec"]["rayClusterSpec"]["workerGroupSpecs"] if g["groupName"] == name]
    return group


def _container(m: dict, name: str) -> dict:
    return _worker(m, name)["template"]["spec"]["containers"][0]


def _drop_env(container: dict, name: str) -> None:
    container["env"] = [e for e in container["env"] if e["name"] != name]  # a new list: the YAML shares one


def _set_entrypoint(m: dict, old: str, new: str) -> None:
    assert old in m["spec"]["entrypoint"]
    m["spec"]["entrypoint"] = m["spec"]["entrypoint"].replace(old, new)


BROKEN = [
    pytest.param(lambda m: _container(m, "cpu").update(envv=_container(m, "cpu")["env"]),
                 r'unknown field "spec\.rayClusterSpec\.workerGroupSpecs\[0\]\.template\.spec\.containers\[0\]\.envv"',
                 id="unknown field in a container"),
    pytest.param(lambda m: m["spec"].update(shutdownAfterJobFinish=True), r'unknown field "spec\.shutdownAfterJobFinish"',
                 id="unknown field in the RayJob spec"),
    pytest.param(lambda m: m["metadata"].update(label={}), r'unknown field "metadata\.label"', id="unknown metadata field"),
    pytest.param(lambda m: m["spec"]["rayClusterSpec"]["headGroupSpec"]["rayStartParams"].update({"num-cpus": 0}),
                 r"rayClusterSpec\.headGroupSpec\.rayStartParams\.num-cpus: 0 is not of type 'string'",
                 id="wrong type: num-cpus as a number"),
    pytest.param(lambda m: _worker(m, "cpu").update(maxReplicas="8"), r"maxReplicas: '8' is not of type 'integer'",
                 id="wrong type: maxReplicas as a string"),
    pytest.param(lambda m: m["spec"]["rayClusterSpec"]["authOptions"].update(mode="tokens"),
                 r"authOptions\.mode: 'tokens' is not one of \['disabled', 'token'\]", id="auth mode not in the enum"),
    pytest.param(lambda m: _container(m, "gpu")["resources"]["limits"].update(memory="16GB"),
                 r"limits\.memory: .* does not match", id="memory quantity typo"),
    pytest.param(lambda m: _container(m, "gpu").pop("name"), r"containers\[0\]: 'name' is a required property",
                 id="container without a name"),
    pytest.param(lambda m: _drop_env(_container(m, "gpu"), "RAY_AUTH_TOKEN"),
                 r"worker group gpu: RAY_AUTH_TOKEN must come from secretKeyRef", id="missing token env"),
    pytest.param(lambda m: _drop_env(m["spec"]["submitterPodTemplate"]["spec"]["containers"][0], "RAY_AUTH_MODE"),
                 r"submitter: no RAY_AUTH_MODE=token in env", id="submitter without token mode"),
    pytest.param(lambda m: _drop_env(m["spec"]["rayClusterSpec"]["autoscalerOptions"], "RAY_AUTH_MODE"),
                 r"autoscaler: no RAY_AUTH_MODE=token in env", id="autoscaler without token mode"),
    pytest.param(lambda m: m["spec"]["rayClusterSpec"].pop("authOptions"),
                 r"authOptions: mode must be token", id="no authOptions"),
    pytest.param(lambda m: m["spec"]["rayClusterSpec"].update(rayVersion="2.51.0"),
                 r"rayVersion '2\.51\.0': token auth needs Ray >= 2\.52", id="Ray too old for token auth"),
    pytest.param(lambda m: _worker(m, "cpu").update(minReplicas=9),
                 r"worker group cpu: minReplicas 9, maxReplicas 8", id="minReplicas above maxReplicas"),
    pytest.param(lambda m: _worker(m, "gpu").update(minReplicas=1),
                 r"worker group gpu: minReplicas 1, maxReplicas 4", id="a GPU worker kept up"),
    pytest.param(lambda m: m["spec"]["rayClusterSpec"].update(enableInTreeAutoscaling=False),
                 r"enableInTreeAutoscaling must be true", id="autoscaling off"),
    pytest.param(lambda m: m["spec"]["rayClusterSpec"]["headGroupSpec"]["rayStartParams"].update({"num-cpus": "4"}),
                 r'num-cpus must be "0"', id="head takes work"),
    pytest.param(lambda m: _container(m, "gpu")["resources"]["limits"].pop("nvidia.com/gpu"),
                 r"worker group gpu: nvidia.com/gpu must be in limits", id="GPU requested but not limited"),
    pytest.param(lambda m: m["spec"].update(entrypoint="raypipe train && raypipe label"),
                 r"entrypoint: must be bash -c", id="&& left to the submitter's shell"),
    pytest.param(lambda m: m["spec"].update(entrypoint="bash -c 'raypipe label && raypipe train'"),
                 r"entrypoint: runs \['label', 'train'\]; want raypipe train, then raypipe label", id="label first"),
    pytest.param(lambda m: _set_entrypoint(m, "data.input=", "data.inptu="),
                 r"(?s)entrypoint: raypipe label: .*data\.inptu: unknown key", id="a setting the job does not have"),
    pytest.param(lambda m: _set_entrypoint(m, "output=s3://my-bucket/labels", "output=/data/labels"),
                 r"label output=/data/labels is a local path", id="local output path"),
    pytest.param(lambda m: _set_entrypoint(m, "run.name=coyo-fusion", "run.name=other"),
                 r"label bundle=s3://my-bucket/runs/coyo-fusion/bundle, but train writes its bundle to "
                 r"s3://my-bucket/runs/other/bundle", id="label reads another bundle"),
    pytest.param(lambda m: _set_entrypoint(m, "/home/ray/raypipe/jobs/configs/train.yaml", "jobs/configs/train.yaml"),
                 r"--config jobs/configs/train\.yaml is not under /home/ray/raypipe", id="config path outside the image"),
    pytest.param(lambda m: _container(m, "cpu").update(env=[*_container(m, "cpu")["env"],
                                                            {"name": "AWS_SECRET_ACCESS_KEY", "value": "x"}]),
                 r"env AWS_SECRET_ACCESS_KEY: a secret given as a value", id="secret as a plain env value"),
    pytest.param(lambda m: m["metadata"]["labels"].update(key="AKIA" + "Q" * 16),
                 r"metadata\.labels\.key: looks like a credential", id="AWS key id in the file"),
    pytest.param(lambda m: m["metadata"]["labels"].update(t="0123456789abcdef" * 4),
                 r"metadata\.labels\.t: looks like a credential", id="hex token in the file"),
    pytest.param(lambda m: m.update(apiVersion="ray.io/v1alpha1"), r"apiVersion/kind ray\.io/v1alpha1/RayJob",
                 id="old API version"),
]


# Broken copies only the CRD's schema can refuse (the others break a promise).
SCHEMA_CASES = {"unknown field in a container", "unknown field in the RayJob spec", "unknown metadata field",
                "wrong type: num-cpus as a number", "wrong type: maxReplicas as a string", "auth mode not in the enum",
                "memory quantity typo", "container without a name"}


@pytest.mark.parametrize("mutate, match", BROKEN)
def test_a_broken_copy_is_refused(manifest, mutate, match, request):
    needs_schema = request.node.callspec.id in SCHEMA_CASES
    schema = request.getfixturevalue("schema") if needs_schema else None
    broken = copy.deepcopy(manifest)
    mutate(broken)
    with pytest.raises(ManifestError, match=match):
        check_manifest(broken, schema)


def load_crd(path: str) -> dict:
    return yaml.load(Path(path).read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))  # 1.4 MB: the C loader where there is one
