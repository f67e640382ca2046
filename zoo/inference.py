"""Raw inputs to answers: what ``predict.py`` and the logged model's ``predict`` share.

A family's model returns a :class:`RawInputs` from ``raw_inputs()``. It

- reads the files a user holds (``read``: a DEAP ``.dat``, a TSV, a photo) into items,
- checks what a Python or REST caller sends (``parse``: arrays, strings, a DataFrame),
- answers a batch of raw values (``answer``: one record per value), with the preprocessing the
  data module recorded when the model was trained (``ZooModule.preprocessing``),
- and turns the records into what the logged model returns (``table``) or into files
  (``writer``: a batch at a time, so ``predict.py`` holds one batch of inputs, whatever the
  size of the folder).

``predict.py`` and the pyfunc model both call :func:`answer_all`; neither has its own copy of a
family's preprocessing. This module names no family.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from zoo.errors import DataError


@dataclass
class Item:
    """One raw input: ``name`` says where it came from (``s01.dat#trial3``, ``photo.jpg``),
    ``value`` is what ``answer`` takes, ``meta`` what the written output repeats (file, line,
    label when the file has one)."""

    name: str
    value: Any
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass
class Skipped:
    """A file or item that could not be read: reported, and the rest are predicted."""

    name: str
    reason: str


class RawInputs:
    """The raw side of a model (a family subclasses it; see the module docstring)."""

    kind = "inputs"  # what the summary counts: trials, sentences, images
    suffixes: tuple[str, ...] = ()  # the files ``read`` takes, lower case
    batch_size = 32  # raw values per forward pass in the logged model's predict
    one_per_file = False  # each file is one item (the progress bar then knows its total)

    def __init__(self, module: Any):
        self.module = module
        self.spec: dict[str, Any] = dict(module.preprocessing)
        if not self.spec:
            raise DataError(
                f"this {type(module).__name__} carries no preprocessing for raw inputs: it was "
                "trained before models recorded theirs. Retrain it (or fine-tune it for one "
                "epoch) to predict on raw files; evaluate.py still works"
            )

    def configure(self, cfg: Any) -> None:
        """Read predict.py's family options (e.g. detection's ``annotations=``)."""

    # -- what a family provides ------------------------------------------------------------

    def read(self, path: Path) -> list[Item | Skipped]:
        """The items of one file, and its bad items (an empty line of a text file) as Skipped;
        raises ``DataError`` naming the file when the file itself is bad."""
        raise NotImplementedError

    def leave_out(self, name: str) -> str | None:
        """Why the item (or, for one-per-file families, the file) ``name`` is not to be
        predicted, e.g. an image a ground truth does not name; None: predict it."""
        return None

    def parse(self, model_input: Any) -> list[Any]:
        """The raw values of a pyfunc / REST input (raises ``DataError`` naming the field)."""
        raise NotImplementedError

    def is_tensor_input(self, model_input: Any) -> bool:
        """Whether ``model_input`` is the network's own input (answered by ``module.serve``)."""
        return False

    def network_input(self, values: list[Any]) -> Any:
        """The network's input (numpy, as ``serving_input`` gives it) for raw values: what
        ``answer`` runs, and what ``zoo.export`` checks an exported network on."""
        raise NotImplementedError

    def answer(self, values: list[Any]) -> list[dict[str, Any]]:
        """One record per raw value."""
        raise NotImplementedError

    def table(self, records: list[dict[str, Any]]) -> Any:
        """What the logged model returns for ``records``: a DataFrame by default."""
        import pandas as pd

        return pd.DataFrame.from_records(records)

    def writer(self, output: Path) -> Writer:
        """What writes the answers under ``output``, a batch at a time."""
        raise NotImplementedError

    def example(self, datamodule: Any) -> Any:
        """A small raw input for the logged model's input example."""
        raise NotImplementedError

    def output_spec(self) -> tuple[Any, tuple[int, ...]] | None:
        """The logged model's output where it is a tensor, as (dtype, shape) with -1 for the
        free dimensions (None: inferred from the answer to the input example);
        ``zoo.tracking.serving`` turns it into mlflow's TensorSpec. The input has no schema:
        ``parse`` checks it, so the forms a user holds (float64 or float32, one value or a
        batch, a dict of columns, a list of pairs) all reach it."""
        return None


def batches(values: Sequence[Any], size: int) -> Iterable[list[Any]]:
    for start in range(0, len(values), max(1, int(size))):
        yield list(values[start : start + max(1, int(size))])


def answer_all(
    raw: RawInputs,
    values: Sequence[Any],
    batch_size: int | None = None,
    progress: Callable[[int], None] | None = None,
) -> list[dict[str, Any]]:
    """Every value answered, ``batch_size`` at a time (``progress(n)`` after each batch)."""
    records: list[dict[str, Any]] = []
    for chunk in batches(values, batch_size or raw.batch_size):
        answers = raw.answer(chunk)
        if len(answers) != len(chunk):
            raise RuntimeError(f"{type(raw).__name__}.answer gave {len(answers)} for {len(chunk)}")
        records.extend(answers)
        if progress is not None:
            progress(len(chunk))
    return records


def respond(module: Any, model_input: Any) -> Any:
    """The logged model's ``predict``: raw inputs answered by the family's RawInputs, and the
    network's own (tensor) input still answered by ``module.serve``."""
    if not getattr(module, "preprocessing", None):  # from before raw inputs: tensors only
        return module.serve(_as_numpy(model_input))
    raw = module.raw_inputs()
    if raw.is_tensor_input(model_input):
        return module.serve(_as_numpy(model_input))
    return raw.table(answer_all(raw, raw.parse(model_input)))


def _as_numpy(model_input: Any) -> Any:
    import numpy as np

    if isinstance(model_input, dict):
        return {k: np.asarray(v) for k, v in model_input.items()}
    if hasattr(model_input, "to_numpy"):  # a DataFrame from a JSON request
        return model_input.to_numpy()
    return np.asarray(model_input)


def _as_uint8(x, where: str):
    """An image's values as uint8: integers 0..255 as they are; floats in [0, 1] (the float
    image convention of scikit-image and torchvision) scaled by 255; other floats in 0..255
    rounded."""
    import numpy as np

    if x.dtype.kind not in "iuf" or not x.size:
        raise DataError(f"{where}: an image holds numbers 0..255, got {x.dtype} values")
    if x.dtype.kind == "f" and not np.isfinite(x).all():
        raise DataError(f"{where}: the image contains NaN or inf values")
    low, high = x.min(), x.max()
    if low < 0 or high > 255:
        raise DataError(
            f"{where}: an image holds values 0..255 (uint8) or 0..1 (float), got {x.dtype} "
            f"values from {low} to {high}"
        )
    if x.dtype.kind == "f":
        x = (x * 255 if high <= 1 else x).round()
    return x.astype(np.uint8)


# --------------------------------------------------------------------------- files


def input_files(path: Path, raw: RawInputs) -> tuple[list[Path], list[Skipped]]:
    """The files of ``input=``: the file itself, or a folder's files in name order (files of
    another format are reported and skipped; hidden files are ignored)."""
    path = Path(path)
    wanted = " / ".join(raw.suffixes)
    if path.is_file():
        if path.suffix.lower() not in raw.suffixes:
            raise DataError(
                f"input={path}: a {path.suffix or 'suffix-less'} file, but this model takes "
                f"{raw.kind} from {wanted} files"
            )
        return [path], []
    if not path.is_dir():
        raise DataError(f"input={path}: no such file or folder")
    files, skipped = [], []
    for p in sorted(path.iterdir()):
        if p.name.startswith(".") or p.is_dir():
            continue
        if p.suffix.lower() in raw.suffixes:
            files.append(p)
        else:
            skipped.append(Skipped(p.name, f"not a {wanted} file"))
    if not files:
        raise DataError(f"input={path}: no {wanted} files in the folder ({raw.kind} expected)")
    return files, skipped


class Writer:
    """Writes a family's answers, a batch at a time; ``close`` returns the files written."""

    def add(self, items: list[Item], records: list[dict[str, Any]]) -> None:
        raise NotImplementedError

    def close(self) -> list[Path]:
        raise NotImplementedError


class TableWriter(Writer):
    """One row per item (its ``meta``, then its record) into one CSV or TSV file at the end
    (rows are small: the inputs themselves are not kept)."""

    def __init__(self, path: Path, sep: str = ",", clean: Callable[[Any], Any] | None = None):
        self.path, self.sep, self.clean = path, sep, clean
        self.rows: list[dict[str, Any]] = []

    def add(self, items: list[Item], records: list[dict[str, Any]]) -> None:
        self.rows.extend({**it.meta, **r} for it, r in zip(items, records))

    def close(self) -> list[Path]:
        import csv

        import pandas as pd

        frame = pd.DataFrame.from_records(self.rows)
        if self.clean is not None:
            frame = self.clean(frame)
        quoting = csv.QUOTE_NONE if self.sep == "\t" else csv.QUOTE_MINIMAL
        frame.to_csv(self.path, sep=self.sep, index=False, quoting=quoting)
        return [self.path]


@dataclass
class Prediction:
    """What ``predict.py`` did: for the summary line and the tests."""

    items: int
    skipped: list[Skipped]
    written: list[Path]
    seconds: float
    kind: str

    def rate(self) -> float:
        return self.items / self.seconds if self.seconds > 0 else float("inf")


def predict_path(
    raw: RawInputs, path: Path, output: Path, batch_size: int | None, progress: bool = True
) -> Prediction:
    """Read ``path`` (a file, or a folder's files in name order), answer its items a batch at a
    time and write the answers under ``output``. A bad file of a folder, or a bad item of a
    file, is skipped and listed in ``skipped.tsv``; a bad single file is an error."""
    path = Path(path)
    files, skipped = input_files(path, raw)
    size = max(1, int(batch_size or raw.batch_size))
    output.mkdir(parents=True, exist_ok=True)
    writer = raw.writer(output)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        total = len(files) if raw.one_per_file else None
        bar = tqdm(total=total, desc=f"predicting {raw.kind}", unit=raw.kind[:-1] or "item")
    pending: list[Item] = []
    count, seconds = 0, 0.0

    def flush(items: list[Item]) -> None:
        nonlocal count, seconds
        started = time.perf_counter()
        records = answer_all(raw, [it.value for it in items], size)
        seconds += time.perf_counter() - started
        writer.add(items, records)
        count += len(items)
        if bar is not None:
            bar.update(len(items))

    try:
        for f in files:
            if raw.one_per_file and (reason := raw.leave_out(f.name)) is not None:
                skipped.append(Skipped(f.name, reason))  # not even decoded
                continue
            try:
                entries = raw.read(f)
            except DataError as exc:
                if path.is_file():
                    raise
                skipped.append(Skipped(f.name, str(exc)))
                continue
            for entry in entries:
                if isinstance(entry, Skipped):
                    skipped.append(entry)
                elif not raw.one_per_file and (reason := raw.leave_out(entry.name)) is not None:
                    skipped.append(Skipped(entry.name, reason))
                else:
                    pending.append(entry)
            while len(pending) >= size:
                flush(pending[:size])
                del pending[:size]
        if pending:
            flush(pending)
    finally:
        if bar is not None:
            bar.close()
    if not count:
        reasons = "; ".join(f"{s.name}: {s.reason}" for s in skipped[:5])
        raise DataError(f"input={path}: nothing to predict ({reasons})")
    written = writer.close()
    if skipped:
        lines = [f"{s.name}\t{s.reason}" for s in skipped]
        (output / "skipped.tsv").write_text("name\treason\n" + "\n".join(lines) + "\n")
        written.append(output / "skipped.tsv")
    return Prediction(count, skipped, written, seconds, raw.kind)


# --------------------------------------------------------------------------- images

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".tif", ".tiff", ".webp")


def read_image(path: Path, channels: int = 3):
    """An image file as uint8 (H, W, channels), or a DataError naming the file."""
    import numpy as np
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im = im.convert("RGB" if channels == 3 else "L")
            return np.array(im, dtype=np.uint8)  # a writable copy
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise DataError(
            f"{path}: the image cannot be decoded ({type(exc).__name__}: {exc})"
        ) from None


class ImageInputs(RawInputs):
    """Raw images: uint8 arrays (H, W, 3) (or (H, W) grey, (H, W, 4) with alpha), one at a time
    or as a batch (B, H, W, 3), or a list of them in any sizes; image files in predict.py."""

    kind = "images"
    suffixes = IMAGE_SUFFIXES
    batch_size = 4
    one_per_file = True
    channels = 3

    def check(self, x: Any, where: str):
        import numpy as np

        if isinstance(x, str | bytes) or (isinstance(x, np.ndarray) and x.dtype.kind in "OUS"):
            raise DataError(f"{where}: a batch with mixed kinds: expected an image array")
        x = np.asarray(x)
        if x.ndim == 2:
            x = x[:, :, None]
        if x.ndim != 3 or x.shape[2] not in (1, 3, 4) or min(x.shape[:2]) < 1:
            raise DataError(
                f"{where}: an image is a (height, width, 3) uint8 array, got shape {x.shape}"
            )
        if x.dtype != np.uint8:
            x = _as_uint8(x, where)
        if x.shape[2] == 4:
            x = x[:, :, :3]
        if self.channels == 3 and x.shape[2] == 1:
            x = np.repeat(x, 3, axis=2)
        if self.channels == 1 and x.shape[2] == 3:  # ITU-R 601-2 luma, as PIL's convert("L")
            x = (x @ np.array([299, 587, 114]) / 1000).round().astype(np.uint8)[:, :, None]
        return x if x.flags.writeable and x.flags.c_contiguous else np.array(x, order="C")

    def read(self, path: Path) -> list[Item | Skipped]:
        image = read_image(path, self.channels)
        return [Item(path.name, self.check(image, str(path)), {"file": path.name})]

    def parse(self, model_input: Any) -> list[Any]:
        import numpy as np

        if hasattr(model_input, "to_numpy"):
            model_input = model_input.to_numpy()
        if isinstance(model_input, dict | str | bytes):
            raise DataError(
                f"inputs: expected image arrays (H, W, 3) or (B, H, W, 3), got "
                f"{type(model_input).__name__}"
            )
        if isinstance(model_input, np.ndarray) and model_input.dtype != object:
            if model_input.ndim == 4:
                return [self.check(v, f"inputs[{i}]") for i, v in enumerate(model_input)]
            return [self.check(model_input, "inputs")]
        if not len(model_input):
            raise DataError("inputs: no images")
        return [self.check(v, f"inputs[{i}]") for i, v in enumerate(model_input)]

    def example(self, datamodule: Any) -> Any:
        return datamodule.raw_example()[None]
