"""What the command line shows: one line per message, progress bars only on a terminal, warnings that mean something.

- Logging goes through one handler on the root logger. Lightning's own handler (added when it is imported before
  logging is set up) is removed, so no line shows twice; Lightning's INFO chatter (accelerators found, the litlogger
  tip, "`Trainer.fit` stopped") shows with ``--verbose`` only.
- "`weights_only` was not set, defaulting to `False`" is dropped: Lightning logs it whenever a full checkpoint
  (weights, optimizer, loops) is written without the flag, as semid's resume points are; semid reads checkpoints
  back with its own safe loader (``generator.models.checkpoint.safe_load``), so the line says nothing true here.
- Lightning's deprecation warning about its own internals (``LeafSpec``) is dropped; other warnings show.
- Progress bars default to on only when stderr is a terminal (:func:`progress_default`); off a terminal, training
  prints one line per epoch (:class:`EpochLines`) instead of a bar redrawn as hundreds of lines.
"""

from __future__ import annotations

import logging
import sys
import warnings
from typing import Any

WEIGHTS_ONLY_NOTE = "`weights_only` was not set, defaulting to `False`."
CHATTY = ("lightning", "pytorch_lightning", "lightning_fabric")  # loggers whose INFO is detail


class _Quiet(logging.Filter):
    """Drop Lightning's INFO (unless verbose) and its false `weights_only` note (always)."""

    def __init__(self, verbose: bool) -> None:
        super().__init__()
        self.verbose = verbose

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name.startswith(CHATTY) and record.getMessage() == WEIGHTS_ONLY_NOTE:
            return False
        return self.verbose or record.levelno >= logging.WARNING or not record.name.startswith(CHATTY)


def setup(verbose: bool) -> None:
    """Logging and warnings for one command (``verbose``: INFO and Lightning's detail too)."""
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    for handler in logging.getLogger().handlers:
        handler.addFilter(_Quiet(verbose))
    quiet_lightning()
    if not verbose:
        warnings.showwarning = _show_warning  # one line, without Python's source line (--verbose: Python's format)
        warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*")
        # the causal system plans each training batch on the host in this hook, by design (CausalSystem.plan)
        warnings.filterwarnings("ignore", message=r".*overridden `on_before_batch_transfer` in `LightningModule` but.*")
    progress = logging.getLogger("semid.progress")
    if not progress.handlers:  # epoch lines, plain, whatever the level of the rest
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(message)s"))
        progress.addHandler(handler)
        progress.setLevel(logging.INFO)
        progress.propagate = False


def _show_warning(message: Warning | str, category: type[Warning], filename: str, lineno: int, file=None, line=None) -> None:  # noqa: ANN001
    print(f"warning: {message}", file=sys.stderr if file is None else file)


def quiet_lightning() -> None:
    """Remove the handlers Lightning's packages add to their loggers when imported (``lightning`` prints "INFO: ..."
    lines of its own, past the root handler's filter): their records go to the root handler alone. Called by
    :func:`setup`, and again once the training code (and with it Lightning) is imported, where that comes later."""
    names = [n for n in logging.root.manager.loggerDict if n.startswith(CHATTY)]  # those made so far
    for name in names:
        logger = logging.getLogger(name)
        for handler in list(logger.handlers):
            logger.removeHandler(handler)
        logger.propagate = True


def progress_default(given: bool | None) -> bool:
    """``given``, or (None) whether stderr is a terminal: a bar drawn into a file or a pipe is hundreds of lines."""
    return given if given is not None else sys.stderr.isatty()


def epoch_lines() -> Any:
    """A Lightning callback that logs one line per epoch to ``semid.progress`` (its module imports lightning: read late)."""
    from semid_cli.epoch_lines import EpochLines

    return EpochLines()
