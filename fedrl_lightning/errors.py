"""Exceptions shared across modules (a leaf module: imports nothing of the project)."""


class StopFederation(RuntimeError):
    """Raised by a component to end the run cleanly: the trainer keeps the last checkpoint and stops."""
