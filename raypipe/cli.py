"""What every job script shares: ``--config FILE`` plus ``section.field=value`` overrides, and
errors that end the run with one clear message instead of a stack trace."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable
from typing import TypeVar

from pydantic import BaseModel

from raypipe.config import load_config, mask_url_credentials, shown_name
from raypipe.errors import UserError

C = TypeVar("C", bound=BaseModel)


def parse_job_config(model: type[C], argv: list[str] | None, description: str) -> C:
    parser = argparse.ArgumentParser(
        description=description,
        epilog="Overrides are section.field=value, e.g. data.input=s3://bucket/shards ray.num_cpus=4. "
        "See docs/configuration.md for every field.",
    )
    parser.add_argument("--config", help="YAML file with the job's configuration (jobs/configs/*.yaml).")
    parser.add_argument("overrides", nargs="*", help="section.field=value pairs applied after the YAML file.")
    args, unknown = parser.parse_known_args(argv)
    if unknown:  # argparse's own message would echo them whole, values (maybe secrets) included
        shown = " ".join(map(shown_name, unknown))
        parser.error(f"unrecognized arguments: {shown} (overrides are section.field=value, no dashes)")
    return load_config(model, args.config, args.overrides)


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
