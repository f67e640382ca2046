"""A console a person reads: every log line once, no third-party advertisements."""

from __future__ import annotations

import logging
import os
import warnings
from typing import Any

from lightning.pytorch.callbacks import RichModelSummary, RichProgressBar
from lightning.pytorch.callbacks.progress.rich_progress import RichProgressBarTheme

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
    # mlflow, inferring a logged model's output schema: about missing values in inputs, which
    # the zoo's models (no input schema; their own checks) do not meet
    "Hint: Inferred schema contains integer column",
)

# mlflow's INFO lines on every job that say nothing a person acts on
_QUIET_INFO = (
    "mlflow.store.db.utils",  # "Creating initial MLflow database tables...", "Updating ..."
    "mlflow.pyfunc",  # "Validating input example against model signature"
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
    for name in _QUIET_INFO:
        logging.getLogger(name).setLevel(logging.WARNING)
    rank_zero = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    if not any(isinstance(f, _DropNoise) for f in rank_zero.filters):
        rank_zero.addFilter(_DropNoise())


class ProgressBar(RichProgressBar):
    """Lightning's rich progress bar, with room for the metrics in an 80-column terminal: a
    10-character bar and no it/s column (the time left says as much), one metric per line,
    and no ``v_num`` (the run id's tail, which the job's summary prints whole). With rich's
    40-character bar the metrics got some 17 columns, and their names wrapped mid-name."""

    def __init__(self, bar_width: int = 10, **kwargs: Any):
        kwargs.setdefault("theme", RichProgressBarTheme(metrics_text_delimiter="\n"))
        super().__init__(**kwargs)
        self.bar_width = bar_width

    def configure_columns(self, trainer) -> list:
        from lightning.pytorch.callbacks.progress.rich_progress import ProcessingSpeedColumn
        from rich.progress import BarColumn

        columns = []
        for column in super().configure_columns(trainer):
            if isinstance(column, ProcessingSpeedColumn):
                continue
            if isinstance(column, BarColumn):
                column.bar_width = self.bar_width
            columns.append(column)
        return columns

    def get_metrics(self, trainer, pl_module) -> dict[str, Any]:
        items = super().get_metrics(trainer, pl_module)
        items.pop("v_num", None)
        return items


class ModelSummary(RichModelSummary):
    """Lightning's rich model summary without its FLOPs column and total where nothing was
    counted (Lightning counts FLOPs only for a module with an ``example_input_array``, and
    otherwise prints 0 for every layer)."""

    @staticmethod
    def summarize(
        summary_data: list[tuple[str, list[str]]],
        total_parameters: int,
        trainable_parameters: int,
        model_size: float,
        total_training_modes: dict[str, int],
        total_flops: int,
        **summarize_kwargs: Any,
    ) -> None:
        if total_flops:
            RichModelSummary.summarize(
                summary_data,
                total_parameters,
                trainable_parameters,
                model_size,
                total_training_modes,
                total_flops,
                **summarize_kwargs,
            )
            return
        from lightning.pytorch.utilities.model_summary import get_human_readable_count
        from lightning.pytorch.utilities.model_summary.model_summary import (
            get_formatted_model_size,
        )
        from rich import get_console
        from rich.table import Table

        columns = [(name, values) for name, values in summary_data if name != "FLOPs"]
        table = Table(header_style=summarize_kwargs.get("header_style", "bold magenta"))
        right = {"Params", "Params per Device", "In sizes", "Out sizes"}
        for name, _ in columns:  # the first, " ", numbers the layers
            table.add_column(
                name,
                justify="right" if name in right else "left",
                no_wrap=name == "Name",
                style="dim" if not name.strip() else None,
            )
        for row in zip(*(values for _, values in columns)):
            table.add_row(*row)
        console = get_console()
        console.print(table)
        grid = Table.grid(expand=True)
        grid.add_column()
        frozen = total_parameters - trainable_parameters
        for label, value in (
            ("Trainable params", get_human_readable_count(int(trainable_parameters))),
            ("Non-trainable params", get_human_readable_count(int(frozen))),
            ("Total params", get_human_readable_count(int(total_parameters))),
            ("Total estimated model params size (MB)", get_formatted_model_size(model_size)),
            ("Modules in train mode", total_training_modes["train"]),
            ("Modules in eval mode", total_training_modes["eval"]),
        ):
            grid.add_row(f"[bold]{label}[/]: {value}")
        console.print(grid)
