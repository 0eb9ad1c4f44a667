"""Secrets are never echoed: a URL holding credentials is refused in every text field of every job
config, no error or dumped config shows a secret, and the secret fields of ``storage`` are the
credentials the object store sees."""

from __future__ import annotations

import json
import pickle
import re
import uuid
from typing import get_args

import pyarrow.fs as pafs
import pytest
import yaml
from jobscript import run_script
from test_storage_errors import checked_store  # noqa: F401 (a fixture: a moto server that checks credentials)

from raypipe.cli import run_job
from raypipe.config import (
    ConfigError, IngestConfig, PrepareConfig, TrainConfig, dump_config, load_config, mask_url_credentials,
)
from raypipe.tools.configdoc import discover_jobs, is_section
from raypipe.io import fs as rfs
from raypipe.io.fs import StorageError

USER, PASSWORD = "admin", "topsecret"
REQUIRED = {IngestConfig: ["manifest=pairs.csv", "output=shards"]}  # fields without a default
WHERE_CREDENTIALS_BELONG = ("AWS_SECRET_ACCESS_KEY", "~/.aws/credentials", "AWS_PROFILE", "storage.secret_access_key")


def text_fields(model, prefix: str = "") -> dict[str, bool]:
    """The fields of a config that hold text (str or list[str], optional or not): dotted name -> is a list."""
    fields = {}
    for name, field in model.model_fields.items():
        types = {field.annotation, *get_args(field.annotation)}
        if is_section(field.annotation):
            fields.update(text_fields(field.annotation, f"{prefix}{name}."))
        elif {str, list[str]} & types:
            fields[prefix + name] = list[str] in types
    return fields


def refusal(model, dotted: str, url: str) -> str:
    """The error text of a config whose field ``dotted`` holds ``url``."""
    value = f"[{url}]" if text_fields(model)[dotted] else url
    with pytest.raises(ConfigError, match=rf"(?m)^  {re.escape(dotted)}: ") as e:
        load_config(model, None, [*REQUIRED.get(model, []), f"{dotted}={value}"])
    return str(e.value)


@pytest.mark.parametrize("job", discover_jobs(), ids=lambda job: job.script)
def test_every_text_field_of_every_job_refuses_a_url_with_credentials_without_echoing_them(job):
    fields = text_fields(job.model)
    assert {"storage.endpoint_url", "ray.address"} <= set(fields)
    without_advice = []
    for dotted in fields:
        message = refusal(job.model, dotted, f"http://{USER}:{PASSWORD}@127.0.0.1:9000/x")
        assert PASSWORD not in message and USER not in message, message
        if not all(text in message for text in WHERE_CREDENTIALS_BELONG):
            without_advice.append(dotted)
    # run.name is refused first for not being a folder name; run.mlflow_tracking_uri says where MLflow
    # takes credentials from (ablation, train).
    assert without_advice == [dotted for dotted in ("run.name", "run.mlflow_tracking_uri") if dotted in fields]


def test_an_mlflow_uri_with_credentials_is_refused_saying_where_mlflow_takes_them_from():
    message = refusal(TrainConfig, "run.mlflow_tracking_uri", f"https://{USER}:{PASSWORD}@mlflow.example:5000")
    assert "MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD or MLFLOW_TRACKING_TOKEN" in message
    assert PASSWORD not in message and USER not in message
    assert load_config(TrainConfig, None, ["run.mlflow_tracking_uri=https://mlflow.example:5000"]).run.mlflow_tracking_uri


@pytest.mark.parametrize(
    ("model", "dotted"),
    [(PrepareConfig, "storage.endpoint_url"), (PrepareConfig, "data.input"), (PrepareConfig, "output"),
     (PrepareConfig, "labels.sidecar"), (IngestConfig, "manifest"), (IngestConfig, "base_dir")],
)
@pytest.mark.parametrize(
    ("url", "masked"),
    [(f"http://{USER}:{PASSWORD}@127.0.0.1:9000", "http://***@127.0.0.1:9000"),
     (f"s3://AKIAEXAMPLE:{PASSWORD}@bucket/x", "s3://***@bucket/x"),
     (f"s3://AKIAEXAMPLE:{PASSWORD}/with+slash@bucket/x", "s3://***@bucket/x"),  # as AWS secret keys may be
     (f"s3://{USER}@bucket/x", "s3://***@bucket/x")],
)
def test_the_refusal_names_the_setting_says_where_credentials_belong_and_masks_the_url(model, dotted, url, masked):
    message = refusal(model, dotted, url)
    assert f"{dotted}: Value error, a URL must not hold a user name or password" in message
    assert all(text in message for text in WHERE_CREDENTIALS_BELONG)
    assert masked in message
    assert PASSWORD not in message and USER not in message and "AKIAEXAMPLE" not in message


@pytest.mark.parametrize("url", ["https://host:8443/img/me@2x.png", "s3://bucket/by/me@example.com/x", "gs://b/p:q",
                                 "/data/a@b:c"])
def test_urls_without_credentials_are_kept(url):
    assert load_config(PrepareConfig, None, [f"data.input=[{url}]"]).data.input == [url]
    assert mask_url_credentials(url) == url


def test_credentials_in_any_url_of_a_text_are_masked():
    text = f"cannot read s3://{USER}:{PASSWORD}@b/x.jpg nor http://u:p@ss@host/y (rows 3, 4)"
    assert mask_url_credentials(text) == "cannot read s3://***@b/x.jpg nor http://***@host/y (rows 3, 4)"


@pytest.mark.parametrize(
    ("argv", "expected"),
    [(["storage.endpoint_url=http://admin:topsecret@127.0.0.1:9000"], ("storage.endpoint_url", "http://***@127.0.0.1")),
     (["data.input=s3://AKIAEXAMPLE:topsecret@bucket/x"], ("data.input", "s3://***@bucket/x")),
     (["storage.secret_access_key:topsecret"], ("override 'storage.secret_access_key...'",)),
     (["data.input=*topsecret"], ("data.input: the value is not valid YAML",))],
    ids=["endpoint", "input", "no-equals-sign", "bad-yaml"],
)
def test_the_job_script_refuses_and_leaves_the_secret_nowhere(argv, expected, tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    done, _ = run_script("prepare", *argv, env={"HOME": str(home)})
    assert done.returncode == 2 and done.stderr.startswith("error: ") and "Traceback" not in done.stderr, done.stderr
    assert all(text in done.stderr for text in expected), done.stderr
    assert PASSWORD not in done.stdout + done.stderr and "AKIAEXAMPLE" not in done.stderr
    assert not [p for p in home.rglob("*") if p.is_file() and PASSWORD.encode() in p.read_bytes()]


def test_an_unknown_option_is_named_without_its_value(tmp_path):
    done, _ = run_script("prepare", f"--storage.secret_access_key={PASSWORD}", env={"HOME": str(tmp_path)})
    assert done.returncode == 2
    assert "unrecognized arguments: --storage.secret_access_key..." in done.stderr
    assert PASSWORD not in done.stdout + done.stderr


def test_a_job_error_quoting_a_url_with_credentials_is_printed_masked(capsys):
    def main():
        raise ConfigError(f"cannot read s3://{USER}:{PASSWORD}@bucket/pairs.csv")

    with pytest.raises(SystemExit, match="2"):
        run_job(main)
    assert capsys.readouterr().err == "error: cannot read s3://***@bucket/pairs.csv\n"


# --- the secret fields of storage ----------------------------------------------------------------

@pytest.fixture
def planted() -> dict[str, str]:
    return {name: f"planted-{name}-{uuid.uuid4().hex}" for name in ("access_key_id", "secret_access_key", "session_token")}


def assert_hidden(planted: dict[str, str], text: str) -> None:
    assert not [name for name, secret in planted.items() if secret in text], text


def test_secret_fields_are_kept_but_never_dumped_printed_or_echoed(planted, tmp_path):
    overrides = [f"storage.{name}={secret}" for name, secret in planted.items()]
    cfg = load_config(PrepareConfig, None, overrides)
    assert {name: getattr(cfg.storage, name).get_secret_value() for name in planted} == planted
    dumped = dump_config(cfg)
    assert {name: dumped["storage"][name] for name in planted} == dict.fromkeys(planted, "**********")
    assert_hidden(planted, json.dumps(dumped) + repr(cfg) + str(cfg) + f"{cfg.storage}")
    with pytest.raises(ConfigError, match="image.size") as e:
        load_config(PrepareConfig, None, [*overrides, "image.size=3"])
    assert_hidden(planted, str(e.value))
    # A section-level error would echo the whole section, secret fields included.
    with pytest.raises(ConfigError, match="storage: Value error, anonymous=true sends no credentials") as e:
        load_config(PrepareConfig, None, [*overrides, "storage.anonymous=true"])
    assert_hidden(planted, str(e.value))
    with pytest.raises(ConfigError, match="storage: Value error, access_key_id and secret_access_key are set together") as e:
        load_config(PrepareConfig, None, [f"storage.secret_access_key={planted['secret_access_key']}"])
    assert_hidden(planted, str(e.value))


def test_a_secret_override_is_taken_as_the_text_it_is():
    """Read as YAML, these would be an alias (an error quoting it), a number and a boolean."""
    for secret in ("*Ab/c+d", "0123", "true"):
        cfg = load_config(PrepareConfig, None, ["storage.access_key_id=AKIA", f"storage.secret_access_key={secret}"])
        assert cfg.storage.secret_access_key.get_secret_value() == secret


def test_a_config_file_error_never_shows_a_secret(planted, tmp_path):
    path = tmp_path / "job.yaml"
    sections = {"storage": {"access_key_id": planted["access_key_id"], "secret_access_key": [planted["secret_access_key"]]}}
    path.write_text(yaml.safe_dump(sections))
    with pytest.raises(ConfigError, match="storage.secret_access_key: Input should be a valid string") as e:
        load_config(PrepareConfig, path)
    assert_hidden(planted, str(e.value))
    # YAML's own message quotes the line it stopped at.
    path.write_text(f"storage:\n  secret_access_key: {planted['secret_access_key']}: [\n")
    with pytest.raises(ConfigError, match=r"not valid YAML \(mapping values are not allowed here at line 2") as e:
        load_config(PrepareConfig, path)
    assert_hidden(planted, str(e.value))


def test_the_secret_fields_are_the_credentials_the_object_store_sees(checked_store, monkeypatch, tmp_path):  # noqa: F811
    endpoint, key_id, secret = checked_store
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    for name in ("AWS_SHARED_CREDENTIALS_FILE", "AWS_CONFIG_FILE"):
        monkeypatch.setenv(name, str(tmp_path / "none"))

    def storage(secret_access_key: str):
        overrides = [f"storage.endpoint_url={endpoint}", f"storage.access_key_id={key_id}",
                     f"storage.secret_access_key={secret_access_key}"]
        return load_config(PrepareConfig, None, overrides).storage

    loc = rfs.resolve("s3://checked/secret-fields/note.txt", storage(secret))
    rfs.write_text(loc, "written with the config's keys")
    in_worker = rfs.Location(pickle.loads(pickle.dumps(loc.fs)), loc.path, loc.url)  # as Ray sends it to workers
    assert rfs.read_text(in_worker) == "written with the config's keys"
    with pytest.raises(StorageError, match="access denied") as e:
        rfs.read_text(rfs.resolve(loc.url, storage("not-the-secret")))
    assert "not-the-secret" not in str(e.value)


def test_a_session_token_reaches_the_filesystem(planted, checked_store):  # noqa: F811
    overrides = [f"storage.endpoint_url={checked_store[0]}", *(f"storage.{name}={secret}" for name, secret in planted.items())]
    fs = rfs.resolve("s3://checked/x", load_config(PrepareConfig, None, overrides).storage).fs
    options = pafs.S3FileSystem.__reduce__(fs)[1][0]  # pyarrow's own view of the options it was built with
    assert (options["access_key"], options["secret_key"], options["session_token"]) == tuple(planted.values())
