"""docs/configuration.md, generated from the pydantic models of raypipe/config.py.

    python -m raypipe.tools.configdoc            # (re)write docs/configuration.md
    python -m raypipe.tools.configdoc --check    # exit 1 when docs/configuration.md is stale

The jobs are those of ``raypipe.commands`` (the `raypipe` command's and jobs/*.py's); every model is walked
generically (``model_fields``, annotations, ``FieldInfo``): a field whose annotation is a pydantic model
is a section (``data``, ``optim`` ...), every other field is a row of its section's table. A field
without a description stops the rendering: the project promises a description on every field.

Sections used by several jobs are rendered once when they are identical (same fields, descriptions and
defaults) and linked from each job; a section that differs between jobs (e.g. ``labels`` of the label
job, whose default source is ``none``) is rendered once per variant.
"""

from __future__ import annotations

import argparse
import inspect
import re
import sys
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

import annotated_types
import yaml
from pydantic import BaseModel, TypeAdapter
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

REPO_ROOT = Path(__file__).resolve().parents[2]
DOC_PATH = REPO_ROOT / "docs" / "configuration.md"
JOBS_DIR = REPO_ROOT / "jobs"
DOC_NAME = "docs/configuration.md"
COMMAND = "python -m raypipe.tools.configdoc"
STALE_MESSAGE = f"{DOC_NAME} is stale; run: {COMMAND}"


class ConfigDocError(ValueError):
    """A config model that cannot be documented (e.g. a field without a description)."""


# --------------------------------------------------------------------------------------------- jobs


@dataclass(frozen=True)
class Job:
    script: str  # "jobs/prepare.py"
    model: type[BaseModel]


def discover_jobs() -> list[Job]:
    """Every job (raypipe.commands) with its config model, in the order the models are defined in config.py."""
    from raypipe import config as config_module
    from raypipe.commands import COMMANDS

    order = list(vars(config_module))
    jobs = [Job(command.script, command.config) for command in COMMANDS.values()]
    return sorted(jobs, key=lambda job: (order.index(job.model.__name__), job.script))


# ------------------------------------------------------------------------------------------- fields


@dataclass
class Row:
    key: str  # full dotted path: data.input
    type: str
    default: str
    description: str  # with constraints appended


@dataclass
class SectionDoc:
    path: str  # data, or data.sub for deeper nesting
    description: str
    rows: list[Row] = field(default_factory=list)

    def body(self) -> str:
        """What makes two jobs' sections the same section (everything but the jobs using it)."""
        return f"{cell(self.description)}\n\n{table(self.rows)}"


def _description(model: type[BaseModel], name: str, info: FieldInfo, key: str) -> str:
    text = " ".join((info.description or "").split())
    if not text:
        raise ConfigDocError(
            f"{model.__name__}.{name} (config key {key!r}) has no description; every config field needs "
            "Field(..., description=...) (docs/configuration.md is generated from them)"
        )
    return text


def is_section(annotation: Any) -> bool:
    return isinstance(annotation, type) and issubclass(annotation, BaseModel)


def type_name(annotation: Any) -> str:
    """A readable type: str, list[int], "a" | "b", str | None."""
    if annotation is None or annotation is type(None):
        return "None"
    origin = get_origin(annotation)
    args = get_args(annotation)
    if origin is Literal:
        return " | ".join(_literal(value) for value in args)
    if origin in (Union, types.UnionType):
        return " | ".join(type_name(arg) for arg in args)
    if origin is not None and hasattr(annotation, "__metadata__"):  # Annotated[X, ...]
        return type_name(args[0])
    if origin is not None:
        name = getattr(origin, "__name__", str(origin))
        return f"{name}[{', '.join(type_name(arg) for arg in args)}]" if args else name
    if isinstance(annotation, type):
        return annotation.__name__
    return str(annotation).replace("typing.", "")


def _literal(value: Any) -> str:
    return f'"{value}"' if isinstance(value, str) else yaml_value(value)


def yaml_value(value: Any) -> str:
    """A value as it would be written in a YAML config (flow style, one line)."""
    text = yaml.safe_dump(value, default_flow_style=True, width=float("inf"), allow_unicode=True, sort_keys=False)
    text = text.strip()
    if text.endswith("\n..."):
        text = text[: -len("\n...")]
    return text.strip()


def _default(info: FieldInfo) -> Any:
    if info.default_factory is not None:
        if getattr(info, "default_factory_takes_data", False):
            raise ConfigDocError("a default_factory that reads other fields cannot be documented as one value")
        return info.default_factory()
    return info.default


def _shown_default(annotation: Any, value: Any) -> str:
    if value is PydanticUndefined:
        return "required"
    return yaml_value(TypeAdapter(annotation).dump_python(value, mode="json"))


_BOUNDS = (
    (annotated_types.Gt, "gt", ">"),
    (annotated_types.Ge, "ge", ">="),
    (annotated_types.Lt, "lt", "<"),
    (annotated_types.Le, "le", "<="),
)


def constraints(info: FieldInfo, key: str) -> list[str]:
    """Human-readable constraints from the field metadata: ">= 1", "min length 1", "matches `^...$`"."""
    out = []
    for meta in info.metadata:
        bound = next(((attr, op) for kind, attr, op in _BOUNDS if isinstance(meta, kind)), None)
        if bound is not None:
            out.append(f"{bound[1]} {yaml_value(getattr(meta, bound[0]))}")
        elif isinstance(meta, annotated_types.Interval):
            out.extend(f"{op} {yaml_value(getattr(meta, attr))}" for _, attr, op in _BOUNDS
                       if getattr(meta, attr, None) is not None)
        elif isinstance(meta, annotated_types.MultipleOf):
            out.append(f"multiple of {yaml_value(meta.multiple_of)}")
        elif isinstance(meta, annotated_types.MinLen):
            out.append(f"min length {meta.min_length}")
        elif isinstance(meta, annotated_types.MaxLen):
            out.append(f"max length {meta.max_length}")
        elif type(meta).__name__ == "_PydanticGeneralMetadata":  # pattern=..., strict=..., ...
            for name, value in sorted(vars(meta).items()):
                out.append(f"matches `{value}`" if name == "pattern" else f"{name}: {yaml_value(value)}")
        else:
            raise ConfigDocError(f"{key}: cannot document the constraint {type(meta).__name__}; extend "
                                 "raypipe/tools/configdoc.py:constraints()")
    return out


def walk(
    model: type[BaseModel], defaults: BaseModel | None = None, prefix: str = ""
) -> tuple[list[Row], list[SectionDoc]]:
    """(rows at this level, sections below it, depth-first) of ``model``.

    ``defaults`` is the section's default instance when the section is nested: its values are the
    defaults in this job (a job may give a shared section other defaults, as label does with labels).
    """
    rows: list[Row] = []
    sections: list[SectionDoc] = []
    for name, info in model.model_fields.items():
        key = f"{prefix}{name}"
        description = _description(model, name, info, key)
        value = getattr(defaults, name) if defaults is not None else _default(info)
        if is_section(info.annotation):
            sub_rows, sub_sections = walk(info.annotation, value if isinstance(value, BaseModel) else None, f"{key}.")
            sections.append(SectionDoc(key, description, sub_rows))
            sections.extend(sub_sections)
            continue
        extra = constraints(info, key)
        if extra:
            description += f" ({', '.join(extra)})"
        rows.append(Row(key, type_name(info.annotation), _shown_default(info.annotation, value), description))
    return rows, sections


# ----------------------------------------------------------------------------------------- markdown


def cell(text: str) -> str:
    """Text for one table cell: one line, pipes escaped, and outside code spans a '<' that would open
    an HTML tag (``<bundle>``) escaped, so that Markdown shows it."""
    parts = " ".join(text.split()).replace("|", "\\|").split("`")
    return "`".join(part if i % 2 else re.sub(r"<(?=[A-Za-z/!?])", r"\\<", part) for i, part in enumerate(parts))


def code(text: str) -> str:
    return f"`{text.replace('|', chr(92) + '|')}`"


def table(rows: list[Row]) -> str:
    lines = ["| key | type | default | description |", "| --- | --- | --- | --- |"]
    lines += [f"| {code(r.key)} | {code(r.type)} | {code(r.default)} | {cell(r.description)} |" for r in rows]
    return "\n".join(lines)


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces -> '-'."""
    return re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-")


INTRO = f"""\
# Configuration

<!-- Generated from raypipe/config.py by `{COMMAND}`; do not edit by hand. -->

Every field of every job, generated from the pydantic models in `raypipe/config.py`. Do not edit
this file: change the field in `raypipe/config.py`, then run `{COMMAND}`
(a unit test fails while this file is stale).

## Setting values

Every job takes an optional YAML file and then `key=value` overrides, applied in that order:

```bash
python jobs/train.py --config jobs/configs/train.yaml optim.epochs=30 scaling.num_workers=2 run.name=r1
```

- The YAML file (`--config FILE`) is a mapping of sections (`data:`, `optim:`, ...) and top-level
  keys; examples in `jobs/configs/`. Keys you leave out keep their defaults.
- An override is `key=value`, the key as in the tables below (`section.field`, or just `field` at
  the top level). The value is read as YAML: `3`, `0.5`, `true`, `null`, `[id, url]`, `s3://bucket/x`;
  a value that YAML would read as a mapping is kept as text, and `key=` (empty) means `null`.
- An unknown key or a bad value stops the job before Ray starts, with the dotted key, what is wrong,
  and for an unknown key the keys allowed there (and the closest one). `--help` lists the overrides.
- Types: `a | b` is either; `"x" | "y"` one of these strings; `list[int]` a YAML list such as `[1, 2]`.
  Defaults are written as in YAML; `null` means unset, and the description says what is used then
  (several such defaults depend on the machine or the environment, so they are decided at run time).
  Constraints on a value follow its description in parentheses, e.g. `(>= 1)`.
"""


def render(jobs: list[Job] | None = None) -> str:
    """The whole of docs/configuration.md."""
    jobs = discover_jobs() if jobs is None else jobs
    walked = [(job, *walk(job.model)) for job in jobs]

    # One entry per distinct (section path, body); the jobs that use it, in job order.
    variants: dict[tuple[str, str], tuple[SectionDoc, list[Job]]] = {}
    for job, _, sections in walked:
        for section in sections:
            variants.setdefault((section.path, section.body()), (section, []))[1].append(job)
    per_path: dict[str, int] = {}
    for path, _ in variants:
        per_path[path] = per_path.get(path, 0) + 1
    headings: dict[tuple[str, str], str] = {}
    for (path, body), (_, users) in variants.items():
        headings[(path, body)] = f"`{path}`" + (
            f" ({', '.join(job.script for job in users)})" if per_path[path] > 1 else ""
        )

    out = [INTRO, "## Jobs\n"]
    for job, rows, sections in walked:
        doc = inspect.cleandoc(job.model.__dict__.get("__doc__") or "")
        example = JOBS_DIR / "configs" / f"{Path(job.script).stem}.yaml"
        how = f"`raypipe {Path(job.script).stem} [--config FILE.yaml] [key=value ...]` (or `python {job.script} ...`)"
        if example.is_file():
            how += f" (example: [jobs/configs/{example.name}](../jobs/configs/{example.name}))"
        out.append(f"### `{job.script}`\n")
        if doc:
            out.append(" ".join(doc.split()) + "\n")
        out.append(f"Set with {how}; config model `raypipe.config.{job.model.__name__}`.\n")
        if rows:
            out.append("Top-level keys:\n")
            out.append(table(rows) + "\n")
        if sections:
            out.append("Sections:\n")
            lines = ["| section | description |", "| --- | --- |"]
            for section in sections:
                heading = headings[(section.path, section.body())]
                lines.append(f"| [`{section.path}`](#{slug(heading)}) | {cell(section.description)} |")
            out.append("\n".join(lines) + "\n")

    out.append("## Sections\n")
    for (path, body), (section, users) in variants.items():
        out.append(f"### {headings[(path, body)]}\n")
        out.append(f"{cell(section.description)} Used by {', '.join(f'`{job.script}`' for job in users)}.\n")
        out.append(table(section.rows) + "\n")

    text = "\n".join(out)
    anchors = [slug(line.lstrip("#").strip()) for line in text.splitlines() if line.startswith("#")]
    duplicates = sorted({a for a in anchors if anchors.count(a) > 1})
    if duplicates:
        raise ConfigDocError(f"headings with the same anchor: {duplicates}")
    return text


# --------------------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=COMMAND, description=f"Write {DOC_NAME} from raypipe/config.py.")
    parser.add_argument("--check", action="store_true", help=f"exit 1 if {DOC_NAME} differs from a fresh render")
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        current = DOC_PATH.read_text(encoding="utf-8") if DOC_PATH.is_file() else None
        if current != text:
            print(STALE_MESSAGE, file=sys.stderr)
            return 1
        print(f"{DOC_NAME} is up to date")
        return 0
    DOC_PATH.parent.mkdir(parents=True, exist_ok=True)
    DOC_PATH.write_text(text, encoding="utf-8", newline="\n")
    print(f"wrote {DOC_NAME}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
