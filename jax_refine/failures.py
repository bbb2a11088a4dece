"""Errors that stop a run for a reason that is not a bug, each with the lines the user sees and an exit status.

The command line (``jax_refine.cli``) prints each line of such an error as ``error: LINE`` (no traceback)
and exits with its ``exit_code``. Kept free of JAX/TensorFlow imports: ``cli`` imports it before any
command runs.
"""
from __future__ import annotations

from collections.abc import Sequence


class RunStopped(Exception):
    """A run stopped cleanly on a fault of its inputs or of its training (divergence, a full disk, an
    evaluation set that cannot be read). ``str(err)``: one line per fault; ``exit_code``: the process status."""

    exit_code = 1

    def lines(self) -> list[str]:
        """The message, one fault per line (empty lines dropped)."""
        return [line for line in str(self).splitlines() if line.strip()] or [type(self).__name__]


class MissingInputs(RunStopped, ValueError):
    """Inputs a run would read that are missing or unreadable, all found before the first step."""

    exit_code = 2

    def __init__(self, problems: Sequence[str]):
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))


class EvaluationFailed(RunStopped):
    """An evaluation during training failed; the step's checkpoint was saved before it."""


class DiskFull(RunStopped, OSError):
    """No space left to write a checkpoint; the message names the path and the bytes needed."""


def first_line(err: BaseException) -> str:
    """The first non-empty line of ``err``'s message (its type name when it has none)."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return lines[0] if lines else type(err).__name__
