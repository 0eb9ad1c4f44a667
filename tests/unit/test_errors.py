"""Every error a user can cause derives from one base, and the command line ends such an error with its
message alone (exit status 2), also when Ray wrapped it on its way from a task; any other error keeps
its stack trace."""

from __future__ import annotations

import pytest

from raypipe.bundle import BundleError
from raypipe.cli import run_job
from raypipe.config import ConfigError
from raypipe.errors import UserError
from raypipe.ingest import IngestError
from raypipe.io.errors import InputError
from raypipe.io.fs import StorageError
from raypipe.pipeline.capacity import CapacityError
from raypipe.pipeline.evaluate import EvaluateError
from raypipe.pipeline.label_writer import LabelError
from raypipe.pipeline.prepare import PrepareError
from raypipe.pipeline.train import TrainError
from raypipe.transforms.text import WordNetMissingError

USER_ERRORS = [BundleError, CapacityError, ConfigError, EvaluateError, IngestError, InputError, LabelError,
               PrepareError, StorageError, TrainError]


class RayTaskErrorLike(Exception):
    """How Ray hands on an error raised in a task: its own type, the original as ``cause``."""

    def __init__(self, cause: BaseException):
        super().__init__("ray::MapBatches() (pid=1) Traceback ...")
        self.cause = cause


@pytest.mark.parametrize("kind", USER_ERRORS, ids=lambda k: k.__name__)
def test_a_user_error_ends_the_job_with_its_message_alone(kind, capsys):
    def fail():
        raise kind("data.input=/nowhere: no such file; check the path")

    with pytest.raises(SystemExit, match="2"):
        run_job(fail)
    assert capsys.readouterr().err.strip() == "error: data.input=/nowhere: no such file; check the path"


def test_a_user_error_raised_in_a_ray_task_is_found_behind_the_wrapper(capsys):
    def fail():
        raise RayTaskErrorLike(CapacityError("a CPU predictor actor needs {CPU: 8} on one node"))

    with pytest.raises(SystemExit, match="2"):
        run_job(fail)
    assert "needs {CPU: 8} on one node" in capsys.readouterr().err


def test_the_wordnet_error_is_a_user_error_and_other_errors_keep_their_trace():
    assert issubclass(WordNetMissingError, UserError)
    with pytest.raises(ZeroDivisionError, match="division by zero"):
        run_job(lambda: 1 / 0)
