"""A console a person reads: every log line once, no third-party advertisements."""

from __future__ import annotations

import logging
import os
import warnings

# libraries that give their loggers a stderr handler of their own at import
_OWN_HANDLERS = (
    "lightning",
    "pytorch_lightning",
    "lightning_fabric",
    "torchmetrics",
    "huggingface_hub",
)
_NOISE = (
    "litlogger",  # Lightning's "Tip: ... try installing litlogger" on every Trainer
    "Skipping setting a default `ModelSummary`",  # the configured RichModelSummary is meant
)
# deprecations inside third-party code, printed on every run, that no setting of ours avoids
_THIRD_PARTY_WARNINGS = (
    "'set_vital' is deprecated",  # torchdata's StatefulDataLoader
    r"`isinstance\(treespec, LeafSpec\)` is deprecated",  # Lightning's pytree helper
)


class _DropNoise(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(word in message for word in _NOISE)


def tidy() -> None:
    """Where the root logger has handlers (Hydra's console and job-log file), Lightning's
    loggers stop printing through their own extra stream handler and propagate to them
    instead, so each message appears once, in Hydra's format and in the job's log file;
    Lightning's advertisement and third-party deprecation notices are dropped. Safe to call
    more than once."""
    if logging.getLogger().handlers:
        for name, logger in list(logging.root.manager.loggerDict.items()):
            if not isinstance(logger, logging.Logger) or name.split(".")[0] not in _OWN_HANDLERS:
                continue
            own = [h for h in logger.handlers if type(h) is logging.StreamHandler]
            for handler in own:
                logger.removeHandler(handler)
            if own:
                logger.propagate = True
    for pattern in _THIRD_PARTY_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)
    # mlflow's per-file download bars while a model is logged say nothing a person needs
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    rank_zero = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    if not any(isinstance(f, _DropNoise) for f in rank_zero.filters):
        rank_zero.addFilter(_DropNoise())
