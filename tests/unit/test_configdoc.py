"""docs/configuration.md: up to date, complete, and generated only from described fields."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
from pydantic import BaseModel, Field

from raypipe import config as config_module
from raypipe.tools import configdoc
from raypipe.tools.configdoc import ConfigDocError, Job, cell, render

REPO = Path(__file__).resolve().parents[2]
DOC = REPO / "docs" / "configuration.md"


# ------------------------------------------------------------------------------ independent helpers


def job_models() -> dict[str, type[BaseModel]]:
    """jobs/*.py -> the config model of the command each runs (read independently of configdoc): every
    script is a command's wrapper, and every command has its script."""
    from raypipe.commands import COMMANDS

    found = {}
    for path in sorted((REPO / "jobs").glob("*.py")):
        match = re.search(r'main\(\["(\w+)", \*sys.argv\[1:\]\]\)', path.read_text())
        assert match, f"{path.name} does not run a raypipe command"
        found[f"jobs/{path.name}"] = COMMANDS[match.group(1)].config
    assert len(found) == len(COMMANDS), f"commands without a script: {set(COMMANDS) - {Path(s).stem for s in found}}"
    return found


def leaf_fields(model: type[BaseModel], prefix: str = "") -> dict[str, str]:
    """Every non-section field of ``model``, at any depth: dotted key -> description."""
    out = {}
    for name, info in model.model_fields.items():
        annotation = info.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            out.update(leaf_fields(annotation, f"{prefix}{name}."))
        else:
            out[f"{prefix}{name}"] = info.description
    return out


def github_slug(heading: str) -> str:
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def blocks(text: str) -> dict[str, str]:
    """Anchor of every ### heading -> the text up to the next heading."""
    out = {}
    for chunk in re.split(r"^(?=#{2,3} )", text, flags=re.M):
        if chunk.startswith("### "):
            heading, _, body = chunk.partition("\n")
            out[github_slug(heading[4:])] = body
    return out


def rows_of(text: str) -> dict[str, list[str]]:
    """Table rows whose first cell is a code span: key -> [type, default, description]."""
    rows = {}
    for line in text.splitlines():
        match = re.match(r"^\| `([^`]+)` \| (.*) \|$", line)
        if match and not match.group(2).startswith("["):
            cells = re.split(r"(?<!\\) \| ", match.group(2))
            assert len(cells) == 3, f"malformed row: {line}"
            rows[match.group(1)] = cells
    return rows


def rows_for_job(text: str, script: str) -> dict[str, list[str]]:
    """The rows a reader of one job sees: its own block plus every section block it links to."""
    by_anchor = blocks(text)
    own = by_anchor[github_slug(f"`{script}`")]
    rows = rows_of(own)
    for anchor in re.findall(r"\]\(#([^)]+)\)", own):
        assert anchor in by_anchor, f"{script} links to #{anchor}, which is no heading"
        section_rows = rows_of(by_anchor[anchor])
        assert not set(section_rows) & set(rows), f"{script}: keys listed twice via #{anchor}"
        rows.update(section_rows)
    return rows


# ----------------------------------------------------------------------------------------- tests


def test_configuration_md_is_up_to_date():
    assert DOC.is_file(), "docs/configuration.md is missing; run: python -m raypipe.tools.configdoc"
    assert DOC.read_text(encoding="utf-8") == render(), (
        "docs/configuration.md is stale; run: python -m raypipe.tools.configdoc"
    )


def test_every_job_and_every_field_is_documented_with_its_description():
    text = render()
    jobs = job_models()
    assert {"jobs/prepare.py", "jobs/train.py", "jobs/ablation.py", "jobs/evaluate.py", "jobs/label.py"} <= set(jobs)
    assert [job.script for job in configdoc.discover_jobs()] == [
        script for script, _ in sorted(jobs.items(), key=lambda kv: list(vars(config_module)).index(kv[1].__name__))
    ]
    for script, model in jobs.items():
        expected = leaf_fields(model)
        rows = rows_for_job(text, script)
        assert set(rows) == set(expected), (
            f"{script}: missing {sorted(set(expected) - set(rows))}, unexpected {sorted(set(rows) - set(expected))}"
        )
        for key, description in expected.items():
            type_cell, default_cell, description_cell = rows[key]
            assert type_cell.strip("`") and default_cell.strip("`"), f"{script} {key}: empty type or default"
            assert description_cell.startswith(cell(description)), f"{script} {key}: description missing or altered"


def test_defaults_are_the_jobs_own_and_constraints_are_shown():
    text = render()
    # The label job gives the shared `labels` section another default source.
    assert rows_for_job(text, "jobs/label.py")["labels.source"][1] == "`none`"
    assert rows_for_job(text, "jobs/prepare.py")["labels.source"][1] == "`column`"
    train = rows_for_job(text, "jobs/train.py")
    assert train["model.mode"][:2] == ['`"fusion" \\| "image" \\| "text"`', "`fusion`"]
    assert train["model.conv_channels"][:2] == ["`list[int]`", "`[32, 64, 128]`"]
    assert train["prepared"][:2] == ["`str \\| None`", "`null`"]
    assert train["storage.retries"][2].endswith("(>= 0, <= 20)")
    assert train["data.input"][1] == "`[~/.cache/raypipe/sample-v1/webdataset]`"  # default_factory evaluated


def test_rendering_does_not_depend_on_the_machine(monkeypatch, tmp_path):
    first = render()
    monkeypatch.setenv("HOME", str(tmp_path))
    for name in ("AWS_ENDPOINT_URL", "AWS_DEFAULT_REGION", "AWS_REGION", "RAY_ADDRESS"):
        monkeypatch.setenv(name, "http://elsewhere.invalid:1")
    monkeypatch.setattr(os, "cpu_count", lambda: 97)
    assert render() == first
    assert str(REPO) not in first and "elsewhere.invalid" not in first


class _Undescribed(BaseModel):
    size: int = Field(1, ge=1)


class _WithUndescribedSection(BaseModel):
    inner: _Undescribed = Field(default_factory=_Undescribed, description="A section.")


class _UndescribedTop(BaseModel):
    name: str = "x"


@pytest.mark.parametrize("model, key", [(_WithUndescribedSection, "inner.size"), (_UndescribedTop, "name")])
def test_a_field_without_description_makes_the_renderer_raise(model, key):
    with pytest.raises(ConfigDocError, match=re.escape(repr(key))):
        render([Job("jobs/fake.py", model)])


def test_cells_keep_tables_and_text_intact():
    assert cell("a | b") == "a \\| b"
    assert cell("Default: <bundle>/x, `<kept>` and <= 3") == "Default: \\<bundle>/x, `<kept>` and <= 3"
    assert cell("two\n  lines") == "two lines"


def test_main_writes_and_check_reports_staleness(monkeypatch, tmp_path, capsys):
    target = tmp_path / "configuration.md"
    monkeypatch.setattr(configdoc, "DOC_PATH", target)
    assert configdoc.main(["--check"]) == 1  # missing
    assert configdoc.main([]) == 0 and target.read_text(encoding="utf-8") == render()
    assert configdoc.main(["--check"]) == 0
    target.write_text(target.read_text(encoding="utf-8") + "edited\n", encoding="utf-8")
    assert configdoc.main(["--check"]) == 1
    assert "docs/configuration.md is stale; run: python -m raypipe.tools.configdoc" in capsys.readouterr().err
