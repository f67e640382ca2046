"""A console a person reads: every log line once, no third-party advertisements."""

from __future__ import annotations

import logging

# libraries that give their loggers a stderr handler of their own at import
_OWN_HANDLERS = (
    "lightning",
    "pytorch_lightning",
    "lightning_fabric",
    "torchmetrics",
    "huggingface_hub",
)
_NOISE = ("litlogger",)  # Lightning's "Tip: ... try installing litlogger" on every Trainer


class _DropNoise(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(word in message for word in _NOISE)


def tidy() -> None:
    """Where the root logger has handlers (Hydra's console and job-log file), Lightning's
    loggers stop printing through their own extra stream handler and propagate to them
    instead, so each message appears once, in Hydra's format and in the job's log file; and
    Lightning's advertisement is dropped. Safe to call more than once."""
    if logging.getLogger().handlers:
        for name, logger in list(logging.root.manager.loggerDict.items()):
            if not isinstance(logger, logging.Logger) or name.split(".")[0] not in _OWN_HANDLERS:
                continue
            own = [h for h in logger.handlers if type(h) is logging.StreamHandler]
            for handler in own:
                logger.removeHandler(handler)
            if own:
                logger.propagate = True
    rank_zero = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    if not any(isinstance(f, _DropNoise) for f in rank_zero.filters):
        rank_zero.addFilter(_DropNoise())
