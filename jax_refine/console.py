"""The lines a training run prints for its user (``[train] resumed from ...``): ``log``, one logger whose handler
writes them to standard output on the main process only."""
from __future__ import annotations

import logging
import sys

from jax_refine import distributed

PREFIX = "[train] "


class _MainProcessStdout(logging.Handler):
    """``[train] message`` (``[train] warning: message`` from ``log.warning``) on process 0's standard output."""

    def emit(self, record: logging.LogRecord) -> None:
        if not distributed.is_main():  # every process of a multi-process run runs the trainer; one speaks
            return
        try:
            warning = "warning: " if record.levelno >= logging.WARNING else ""
            # sys.stdout looked up at each line, not kept: pytest's capsys and redirect_stdout replace it later
            sys.stdout.write(f"{PREFIX}{warning}{record.getMessage()}\n")
            sys.stdout.flush()
        except Exception:  # noqa: BLE001 - logging's rule: a handler reports its own failure, never raises
            self.handleError(record)


log = logging.getLogger("jax_refine.train")
log.setLevel(logging.INFO)
log.propagate = False  # printed here once, not again by a root handler an application may add
log.addHandler(_MainProcessStdout())
