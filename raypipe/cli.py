"""The `raypipe` command: one subcommand per job (``raypipe prepare|train|evaluate|ablation|label|ingest``)
with ``--config FILE`` plus ``section.field=value`` overrides, ``raypipe config <job>`` for the resolved
configuration, and errors that end the run with one clear message instead of a stack trace. The
scripts in jobs/ run the same commands (``python jobs/train.py ...``, e.g. under ``ray job submit``)."""

from __future__ import annotations

import argparse
import logging
import sys
import textwrap
from collections.abc import Callable

import yaml

import raypipe
from raypipe.commands import COMMANDS, Command
from raypipe.config import dump_config, load_config, mask_url_credentials, shown_name
from raypipe.tools.configdoc import walk
from raypipe.errors import UserError

OVERRIDES_HELP = "Overrides are section.field=value, e.g. data.input=s3://bucket/shards ray.num_cpus=4."


def fields_help(command: Command) -> str:
    """Every field of the job's config: dotted name, type, default, description (from the models)."""
    rows, sections = walk(command.config)
    lines = []
    for row in [*rows, *(row for section in sections for row in section.rows)]:
        lines.append(f"  {row.key}  ({row.type}, default {row.default.strip('`')})")
        lines += textwrap.wrap(row.description.replace("`", ""), width=96, initial_indent="      ",
                               subsequent_indent="      ")
    return "\n".join(lines)


def _job_parser(subparsers, command: Command) -> None:
    parser = subparsers.add_parser(
        command.name,
        help=command.summary,
        description=f"{command.summary}\n\nexamples:\n{command.examples}",
        epilog=f"{OVERRIDES_HELP}\n\nfields (docs/configuration.md has the same, by section):\n{fields_help(command)}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _config_arguments(parser)
    parser.set_defaults(command=command)


def _config_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="YAML file with the job's configuration (jobs/configs/*.yaml).")
    parser.add_argument("overrides", nargs="*", help="section.field=value pairs applied after the YAML file.")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="raypipe",
        description="Distributed batch classification of image-text pairs on Ray. `raypipe <job> --help` lists "
        "the job's examples and every field.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"raypipe {raypipe.__version__}")
    subparsers = parser.add_subparsers(title="jobs", metavar="<job>", required=True)
    for command in COMMANDS.values():
        _job_parser(subparsers, command)
    show = subparsers.add_parser(
        "config", help="Print a job's full configuration (defaults, YAML file and overrides applied) as YAML.",
        description="Print a job's full configuration as YAML, secrets masked: a starting point for --config.",
    )
    show.add_argument("job", choices=list(COMMANDS))
    _config_arguments(show)
    show.set_defaults(command=None)
    return parser


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:  # argparse's own message would echo them whole, values (maybe secrets) included
        shown = " ".join(map(shown_name, unknown))
        parser.error(f"unrecognized arguments: {shown} (overrides are section.field=value, no dashes)")
    return args


def main(argv: list[str] | None = None) -> None:
    """The `raypipe` command."""

    def run() -> None:
        args = _parse(sys.argv[1:] if argv is None else argv)
        if args.command is None:  # raypipe config <job>
            config = load_config(COMMANDS[args.job].config, args.config, args.overrides)
            print(yaml.safe_dump(dump_config(config), sort_keys=False), end="")
            return
        args.command.run(load_config(args.command.config, args.config, args.overrides))

    run_job(run)


def user_error(error: BaseException) -> BaseException | None:
    """The user error behind ``error``: itself, or one raised in a Ray task or actor. Ray wraps those
    (keeping the original as ``cause``) in an error whose text is the remote stack trace."""
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        cause = getattr(error, "cause", None)
        if isinstance(cause, BaseException):
            error = cause
        elif isinstance(error, UserError):
            return error
        else:
            error = error.__cause__ or error.__context__
    return None


def run_job(main: Callable[[], object]) -> None:
    """Runs a job; an error that says what to fix ends it with that one message and exit status 2."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        main()
    except Exception as e:
        error = user_error(e)
        if error is None:
            raise
        # A message may quote a URL from the data (an image or manifest URL), with credentials in it.
        print(f"error: {mask_url_credentials(str(error))}", file=sys.stderr)
        sys.exit(2)
