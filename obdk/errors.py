"""One exception base for everything a user's input or data can cause.

Every error obdk raises because of what it was given (a flag, a config field, a
file, a dataset, a checkpoint, a tensor) derives from :class:`ObdkError`, and its
message names the thing at fault. The CLI turns any ``ObdkError`` into exit
status 2 and one line; anything else is a bug and keeps its traceback.

Each class also derives from the built-in exception it replaced (``ValueError``,
``FileNotFoundError``, ``RuntimeError``), so ``except ValueError`` written
against earlier versions keeps working.
"""
from __future__ import annotations

__all__ = [
    "ObdkError", "ConfigError", "DataError", "NonFiniteError", "MissingFileError", "WrongTypeError", "UnknownNameError", "NotCollectedError", "CheckpointError", "OutputPathError",
    "ModelNotFoundError", "DatasetNotFoundError", "UnsupportedModelError", "NonFiniteLossError",
    "SharedInputMismatch", "BackendUnavailable",
]


class ObdkError(Exception):
    """Base of every error caused by user input or data (the message names flag, file, module or tensor)."""


class ConfigError(ObdkError, ValueError):
    """An option has a value obdk cannot use (a ``LowRankConfig`` field, a function argument, a CLI flag)."""


class DataError(ObdkError, ValueError):
    """Data obdk was given is unusable: calibration text, windows, statistics, a weight or covariance."""


class NonFiniteError(DataError, FloatingPointError):
    """A tensor that must be finite holds NaN/inf (the message names the tensor and where it first appears)."""


class MissingFileError(ObdkError, FileNotFoundError):
    """A file or directory obdk was pointed at does not exist (the message names it)."""


class WrongTypeError(ObdkError, TypeError):
    """An argument has a type obdk cannot use (the message names the argument and the type)."""


class UnknownNameError(ObdkError, KeyError):
    """A name (model alias, module, statistic) is not one obdk knows; the message lists what is."""

    def __str__(self) -> str:  # KeyError quotes its argument; the message reads better plain
        return str(self.args[0]) if self.args else ""


class NotCollectedError(UnknownNameError):
    """A statistic or module was asked for that the calibration did not collect (named in the message)."""


class CheckpointError(ObdkError, ValueError):
    """A checkpoint directory is missing, truncated or inconsistent (the message names file and tensor)."""


class OutputPathError(ObdkError, ValueError):
    """An output path cannot be written without destroying something (or cannot be written at all)."""


class ModelNotFoundError(ObdkError, FileNotFoundError):
    """A model spec is neither an alias, a directory, a file, nor a loadable hub id."""


class DatasetNotFoundError(ObdkError, FileNotFoundError):
    """A named dataset split is neither in the local data directory nor reachable on the hub."""


class UnsupportedModelError(ObdkError, ValueError):
    """The model has no layers obdk can target (e.g. GPT-2's ``Conv1D``), named in the message."""


class StreamingUnsupportedError(UnsupportedModelError):
    """The layer-streamed passes cannot run this model exactly (the message says why and what to use)."""


class NonFiniteLossError(ObdkError, RuntimeError):
    """A forward pass produced a NaN/inf loss (evaluation, calibration or a correction step)."""


class SharedInputMismatch(ObdkError, RuntimeError):
    """Modules declared as sharing an input (one ``C_x``) did not receive the same tensor."""


class BackendUnavailable(ObdkError, RuntimeError):
    """A backend forced by ``OBDK_BACKEND`` (or by argument) cannot run this call."""
