"""README.md and docs/*.md name only files, tests and config keys that exist.

Extraction rules (narrow on purpose, so that prose is never mistaken for a reference):

- Code is the text of inline code spans (`...`) and fenced blocks; a *word* is a whitespace-separated
  piece of code with surrounding quotes, brackets and trailing punctuation stripped.
- A **path** is a word that starts with one of the repository's top-level directories and a slash
  (`raypipe/pipeline/capacity.py`, `jobs/train.py`, `tests/unit/test_docs.py::test_name`), or a link
  target `[..](target)` that is not a URL (resolved from the document's folder). Words holding a
  template or glob (`<name>`, `*`, `$`, `{`) are skipped, and so are git-ignored outputs
  (`benchmarks/results/`). `path::name` also needs `def name` in that file.
- A **config key** is a word of lowercase dotted names, alone or as the key of `key=value`
  (`ray.node_wait_s`, `optim.epochs=8`), whose first part is a section of some job's config model;
  the whole name must be a field of at least one job config. In fenced blocks only `key=value` words
  count (the rest is often a command's printed output). A name ending in a file suffix
  (`vocab.json`) is a file, and one that is an attribute of an importable module of that name
  (`ray.init`, `ray.data.read_parquet`) is Python, not a key.
"""

from __future__ import annotations

import importlib
import re
from functools import cache
from pathlib import Path

import pytest
from pydantic import BaseModel

from raypipe.tools.configdoc import discover_jobs

REPO = Path(__file__).resolve().parents[2]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
TOP_DIRS = ("benchmarks", "docs", "jobs", "raypipe", "scripts", "tests")  # where a doc's paths start
IGNORED_OUTPUTS = ("benchmarks/results/",)

FENCE = re.compile(r"^```.*?^```", re.DOTALL | re.MULTILINE)
INLINE = re.compile(r"`([^`\n]+)`")
LINK = re.compile(r"\]\(([^)\s]+)\)")
FILE_SUFFIXES = {"json", "pt", "py", "md", "yaml", "txt", "parquet", "tar", "csv", "jpg", "png"}  # vocab.json
KEY = re.compile(r"[a-z][a-z0-9_]*(\.[a-z][a-z0-9_]*)+")


def _words(pieces: list[str]) -> list[str]:
    return [w.strip("'\"()[],;:.") for piece in pieces for w in piece.split()]


def code_words(text: str, fenced: bool = True) -> list[str]:
    """Words of the inline code spans, and of the fenced blocks unless `fenced` is False."""
    return _words(INLINE.findall(FENCE.sub("", text))) + (_words(FENCE.findall(text)) if fenced else [])


def paths_in(doc: Path) -> set[str]:
    """Repository paths named by `doc`, relative to the repository root (with any ::name kept)."""
    text = doc.read_text()
    found = {w for w in code_words(text) if w.split("/")[0] in TOP_DIRS and "/" in w}
    for target in LINK.findall(text):
        if re.match(r"[a-z]+:", target) or target.startswith("#"):
            continue
        resolved = (doc.parent / target.split("#")[0]).resolve()
        found.add(str(resolved.relative_to(REPO)) if resolved.is_relative_to(REPO) else target)
    return {p for p in found if not re.search(r"[<>*${}]", p) and not p.startswith(IGNORED_OUTPUTS)}


def missing_paths(path: str) -> str | None:
    """Why `path` (maybe `file::name`) does not exist, or None."""
    file, _, name = path.partition("::")
    if not (REPO / file).exists():
        return f"{file} does not exist"
    if name and not re.search(rf"^\s*(async )?def {re.escape(name.split('::')[-1])}\(", (REPO / file).read_text(), re.MULTILINE):
        return f"{file} has no {name}"
    return None


def fields(model: type[BaseModel], prefix: str = "") -> set[str]:
    """Every field of `model` at any depth, sections included, as dotted names."""
    out = set()
    for name, info in model.model_fields.items():
        out.add(prefix + name)
        if isinstance(info.annotation, type) and issubclass(info.annotation, BaseModel):
            out |= fields(info.annotation, f"{prefix}{name}.")
    return out


@cache
def config_keys() -> frozenset[str]:
    return frozenset(key for job in discover_jobs() for key in fields(job.model))


@cache
def sections() -> frozenset[str]:
    return frozenset(key.split(".")[0] for key in config_keys() if "." in key)


def is_python(name: str) -> bool:
    """`ray.init` or `ray.data.read_parquet`: an attribute path of an importable module."""
    first, *rest = name.split(".")
    try:
        obj = importlib.import_module(first)
    except ImportError:
        return False
    for part in rest:
        try:
            obj = getattr(obj, part) if hasattr(obj, part) else importlib.import_module(f"{obj.__name__}.{part}")
        except (ImportError, AttributeError):
            return False
    return True


def keys_in(doc: Path) -> set[str]:
    text = doc.read_text()
    fenced_args = [w for w in _words(FENCE.findall(text)) if "=" in w]  # not a block's printed output
    words = (w.split("=")[0] for w in [*code_words(text, fenced=False), *fenced_args])
    return {w for w in words if KEY.fullmatch(w) and w.split(".")[-1] not in FILE_SUFFIXES
            and w.split(".")[0] in sections() and not is_python(w)}


@pytest.mark.parametrize("doc", DOCS, ids=lambda d: str(d.relative_to(REPO)))
def test_named_paths_exist(doc):
    problems = sorted(filter(None, map(missing_paths, paths_in(doc))))
    assert not problems, f"{doc.relative_to(REPO)} names what is not in the repository: {problems}"


@pytest.mark.parametrize("doc", DOCS, ids=lambda d: str(d.relative_to(REPO)))
def test_named_config_keys_exist(doc):
    unknown = sorted(keys_in(doc) - config_keys())
    assert not unknown, f"{doc.relative_to(REPO)} names config keys no job has: {unknown}"


def test_the_extraction_finds_what_it_should(tmp_path):
    doc = tmp_path / "x.md"
    doc.write_text("Run `python jobs/train.py optim.epochs=2 ray.nope=1` and see [c](../docs/cluster.md#x);\n"
                   "`ray.init` is Python, `benchmarks/results/<name>.json` a template, prose jobs/a.py ignored.\n"
                   "`run.storage_path` and `vocab.json`\n```\npython jobs/none.py data.x=1\n  data.inptu: unknown\n```\n")
    assert keys_in(doc) == {"optim.epochs", "ray.nope", "run.storage_path", "data.x"}
    assert {"jobs/train.py", "jobs/none.py"} <= paths_in(doc) and "jobs/a.py" not in paths_in(doc)
    assert missing_paths("jobs/none.py") == "jobs/none.py does not exist"
    assert missing_paths("tests/unit/test_docs.py::test_no_such_test") == "tests/unit/test_docs.py has no test_no_such_test"
    assert missing_paths("tests/unit/test_docs.py::test_named_paths_exist") is None
