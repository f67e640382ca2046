"""What a model produces besides its loss and metrics, as typed records.

Models *emit* these into their :class:`Outbox`; they never import mlflow or look for a logger.
:class:`zoo.tracking.lightning.TrackOutputs` drains the outbox on rank 0 and logs each record to the
run (figures, files, tags, counts); report sections go to ``evaluate.py``'s report. A new model
family therefore needs no edit in tracking, reports or the pipeline.

Figures and files are built lazily: the callables run only where the record is logged (rank 0,
with a tracking logger), so an untracked or non-zero-rank job never renders a figure.

This module is a leaf: it imports nothing from the zoo.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable


@dataclass(frozen=True)
class Figure:
    """A matplotlib figure for the run, e.g. ``figures/val/confusion_matrix_epoch003.png``."""

    path: str
    build: Callable[[], Any]


@dataclass(frozen=True)
class File:
    """A file for the run at artifact path ``path`` (e.g. ``masks/attention_mask.pt``): an
    existing local file (``source``) or one that ``write(local_path)`` creates on demand."""

    path: str
    source: Path | None = None
    write: Callable[[Path], None] | None = None

    def __post_init__(self) -> None:
        if (self.source is None) == (self.write is None):
            raise ValueError(f"File({self.path!r}): give exactly one of source= or write=")


@dataclass(frozen=True)
class Tag:
    key: str
    value: str


@dataclass(frozen=True)
class Count:
    """A number about the run rather than about training progress (logged once, step 0), e.g.
    ``data/skipped/<source>``."""

    key: str
    value: float


@dataclass(frozen=True)
class Table:
    """A table for the run, logged with ``mlflow.log_table`` at artifact path ``path`` (a
    ``.json`` file the mlflow UI shows as a table, e.g. ``samples/step_0010.json``):
    ``build()`` returns its columns, ``{name: [values]}``."""

    path: str
    build: Callable[[], dict[str, list[Any]]]


@dataclass
class Section:
    """A report section: a title, then paragraphs, tables and images, in order; ``metrics`` are
    extra flat numbers for the report's ``metrics.json`` (e.g. ``test/f1/<class>``)."""

    title: str
    blocks: list[tuple[str, Any]] = field(default_factory=list)
    metrics: dict[str, float] = field(default_factory=dict)

    def paragraph(self, text: str) -> Section:
        self.blocks.append(("paragraph", text))
        return self

    def table(self, headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> Section:
        self.blocks.append(("table", (list(headers), [list(r) for r in rows])))
        return self

    def image(self, name: str, caption: str, build: Callable[[], Any]) -> Section:
        """``build()`` returns a matplotlib figure (or PNG bytes), rendered when written."""
        self.blocks.append(("image", (name, caption, build)))
        return self


Output = Figure | File | Tag | Count | Table | Section


class Outbox:
    """Records a model emitted and nobody has taken yet."""

    def __init__(self) -> None:
        self._items: list[Output] = []

    def emit(self, *items: Output) -> None:
        for item in items:
            if not isinstance(item, Output.__args__):  # type: ignore[attr-defined]
                raise TypeError(f"cannot emit {type(item).__name__}: expected one of {Output}")
        self._items.extend(items)

    def drain(self) -> list[Output]:
        items, self._items = self._items, []
        return items

    def __len__(self) -> int:
        return len(self._items)


@runtime_checkable
class EmitsOutputs(Protocol):
    """A Lightning module with an outbox (``zoo.models.base.ZooModule`` provides one)."""

    outbox: Outbox


@runtime_checkable
class Servable(Protocol):
    """A model that can be logged as an mlflow Model (``zoo.tracking.serving``).

    ``serving_input(batch)`` picks the model's input out of one data-module batch as numpy
    (an array, or a dict of named arrays); ``serve(inputs)`` runs inference on such inputs and
    returns numpy arrays (or a dict of them, or a pandas DataFrame). Both run in eval mode on
    CPU inside ``mlflow.pyfunc``'s ``predict``.
    """

    def serving_input(self, batch: Any) -> Any: ...

    def serve(self, inputs: Any) -> Any: ...


@runtime_checkable
class Exportable(Protocol):
    """A model whose inference network can be exported (``python -m zoo.export``).

    ``export_network()`` returns (network, input names, output names, dynamic dims): an
    ``nn.Module`` whose ``forward`` takes the serving input as tensors (a dict's arrays in
    input-name order) and returns what ``serve`` returns, as tensors; ``dynamic dims`` maps an
    input name to its dimensions that may change size ({0: "batch"}, or {1: ("length", 512)}
    with the largest size). A family that cannot
    be exported raises ``zoo.errors.ConfigError`` saying why.
    """

    def export_network(self) -> tuple[Any, list[str], list[str], dict[str, dict[int, str]]]: ...


@dataclass(frozen=True)
class DatasetInfo:
    """One split a data module serves, as an mlflow run input (``mlflow.data``): ``context``
    is the split (train / val / test), ``source`` a path or URI, ``digest`` a short hash that
    changes when the data does."""

    context: str
    name: str
    digest: str
    source: str
    num_samples: int


@runtime_checkable
class DescribesDatasets(Protocol):
    """A data module that can say what it serves (``zoo.data.base.SplitDataModule`` does)."""

    def dataset_inputs(self) -> list[DatasetInfo]: ...
