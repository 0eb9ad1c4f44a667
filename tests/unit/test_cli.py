"""The `raypipe` command: a subcommand per job whose --help gives the examples as written and every
field of the job's config, --version, `raypipe config <job>`, and jobs/*.py as the same commands."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import raypipe
from raypipe.commands import COMMANDS
from raypipe.config import TrainConfig, dump_config, load_config
from raypipe.tools.configdoc import walk

REPO = Path(__file__).parents[2]
RAYPIPE = Path(sys.executable).with_name("raypipe")  # the console script `pip install -e .` made


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(RAYPIPE), *args], capture_output=True, text=True, timeout=120, cwd=REPO)


def leaf_keys(model) -> list[str]:
    rows, sections = walk(model)
    return [row.key for row in [*rows, *(row for section in sections for row in section.rows)]]


def test_version():
    done = run("--version")
    assert done.returncode == 0 and done.stdout.strip() == f"raypipe {raypipe.__version__}"


@pytest.mark.parametrize("name", list(COMMANDS))
def test_a_jobs_help_gives_its_examples_as_written_and_every_field(name):
    command = COMMANDS[name]
    done = run(name, "--help")
    assert done.returncode == 0, done.stderr
    for line in command.examples.splitlines():
        assert line.rstrip() in done.stdout.splitlines(), f"example line reflowed or missing: {line!r}"
    listed = {line.split()[0] for line in done.stdout.splitlines() if line.startswith("  ") and "(" in line}
    missing = [key for key in leaf_keys(command.config) if key not in listed]
    assert not missing, f"raypipe {name} --help does not list {missing}"


def test_the_job_script_is_the_same_command():
    script = subprocess.run([sys.executable, "jobs/label.py", "--help"], capture_output=True, text=True,
                            timeout=120, cwd=REPO)
    assert script.returncode == 0 and script.stdout == run("label", "--help").stdout


def test_config_prints_the_resolved_configuration_with_secrets_masked():
    done = run("config", "train", "optim.epochs=3", "storage.access_key_id=AKIDEXAMPLE",
               "storage.secret_access_key=planted-secret-value")
    assert done.returncode == 0, done.stderr
    assert "planted-secret-value" not in done.stdout + done.stderr and "AKIDEXAMPLE" not in done.stdout
    printed = yaml.safe_load(done.stdout)
    expected = dump_config(load_config(TrainConfig, None, ["optim.epochs=3", "storage.access_key_id=AKIDEXAMPLE",
                                                            "storage.secret_access_key=planted-secret-value"]))
    assert printed == expected and printed["optim"]["epochs"] == 3


def test_a_wrong_key_is_one_clear_line_and_status_2():
    done = run("prepare", "data.inptu=x")
    assert done.returncode == 2 and "data.inptu: unknown key (did you mean 'input'?)" in done.stderr
    assert "Traceback" not in done.stderr
