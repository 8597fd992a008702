"""What a run prints: library chatter off, short console lines, the details in the job's log file.

``quiet_libraries`` turns off what transformers, diffusers, huggingface_hub and W&B print on every load (weight
loading bars, load reports, W&B's banner and run summary) unless asked (``quiet=false``). Hydra writes each job's
log to ``<output_dir>/<job>.log`` (``run.log``); `ConsoleFormatter` keeps the console lines bare (warnings and
errors say their level), and `details` logs to that file alone, for tables too long for a sweep's console.
"""

from __future__ import annotations

import logging
import os


def quiet_libraries(quiet: bool = True) -> None:
    """Silence the libraries' loading reports, progress bars and W&B's console output (``quiet=False``: keep)."""
    if not quiet:
        return
    import diffusers
    import huggingface_hub
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()
    huggingface_hub.utils.disable_progress_bars()
    os.environ.setdefault("WANDB_SILENT", "true")
    for name in ("lightning.pytorch.utilities.rank_zero", "pytorch_lightning.utilities.rank_zero"):
        logging.getLogger(name).setLevel(logging.WARNING)  # "GPU available: False ..." on every fit


class ConsoleFormatter(logging.Formatter):
    """``message`` for INFO and below, ``LEVEL: message`` above (Hydra's job_logging console formatter)."""

    def format(self, record: logging.LogRecord) -> str:
        message = super().format(record)
        return message if record.levelno <= logging.INFO else f"{record.levelname}: {message}"


def details() -> logging.Logger:
    """A logger that writes only to the job's log file(s), not the console: for per-type tables in a sweep."""
    logger = logging.getLogger("editlab.details")
    logger.propagate = False
    logger.setLevel(logging.INFO)
    files = [h for h in logging.getLogger().handlers if isinstance(h, logging.FileHandler)]
    logger.handlers = files  # Hydra reconfigures logging per job: follow its current file
    return logger
