"""Exceptions and exit codes shared across modules (a leaf module: imports nothing of the project)."""

EXIT_USAGE = 2
"""``fedrl`` exit code for input the user can fix (a config value, a data file, a model path, the output directory)."""
EXIT_STOPPED = 3
"""``fedrl`` exit code for a federation that stopped before its last round (its last checkpoint stays)."""


class StopFederation(RuntimeError):
    """Raised by a component to end the run cleanly: the trainer keeps the last checkpoint and stops."""


class RunDirectoryError(ValueError):
    """The output directory cannot be used as asked: held by another run, or holding a different run."""
