"""What can stop `xc-train` and `xc-merge`, and the one table from it to an exit status.

The trainer's own exception types live here, free of torch, so that the command line can map
them to `schemas.cli.ExitCode` before anything heavy is imported. `exit_code` reads the table by
the error's type (its most specific listed base class wins), never by the order of `except`
clauses; an error of no listed type is a bug and keeps its traceback.
"""

from __future__ import annotations

from schemas.cli import ExitCode


class ShardDataError(ValueError):
    """The shards cannot serve this plan: damaged, or a sample that fits no packed row."""


class LoaderConfigError(ValueError):
    """A loader setting that cannot work (world size, global batch, a resumed plan's settings)."""


class ModelFolderError(ValueError):
    """A model folder that cannot be loaded as IXC2.5 (or written): says what, where, and what to do."""


class CheckpointError(RuntimeError):
    """A training checkpoint could not be written or is damaged; the message names the file and the way out."""


class TrainingHalted(RuntimeError):
    """A numeric fault stopped the run; the message names the samples; the last checkpoint is intact."""


class Stopped(Exception):
    """A stop signal (SIGINT, SIGTERM) ended the run after a checkpoint; the message says which and
    how to resume (empty on ranks other than 0, which print nothing)."""


EXIT_CODES: dict[type[BaseException], ExitCode] = {
    ShardDataError: ExitCode.INVALID_DATA,
    LoaderConfigError: ExitCode.USAGE,
    ModelFolderError: ExitCode.USAGE,
    CheckpointError: ExitCode.INVALID_DATA,
    TrainingHalted: ExitCode.INVALID_DATA,
    OSError: ExitCode.INVALID_DATA,  # a missing file, a full disk, no permission
    ValueError: ExitCode.USAGE,  # a flag, config value or --model that cannot work
    IndexError: ExitCode.USAGE,  # a --sample beyond the shards
    KeyboardInterrupt: ExitCode.INTERRUPTED,
    Stopped: ExitCode.INTERRUPTED,
}
"""Exit status by exception type; `exit_code` takes the entry of the most specific base class."""

HANDLED = tuple(EXIT_CODES)
"""The types a command turns into a one-line message and an exit status."""

HALTS = (CheckpointError, TrainingHalted)
"""Errors that stop a run that had started: reported as 'stopped', the last checkpoint kept."""


def exit_code(error: BaseException) -> ExitCode:
    """The exit status for `error`: the table entry of the first listed class in its MRO."""
    for cls in type(error).__mro__:
        if cls in EXIT_CODES:
            return EXIT_CODES[cls]
    raise error
