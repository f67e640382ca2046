"""Text classification data in GLUE's TSV format, with a WordPiece tokenizer.

- GLUE tasks (SST-2, CoLA, MRPC, QNLI, RTE, plus the offline demo's ``pydoc_continuity``):
  single sentences or sentence pairs, header handling, label columns; a malformed row is an
  error naming the file and line. Download GLUE yourself (e.g. with the ``glue`` data script of
  the GLUE benchmark) and point ``data.data_dir`` at one task's folder (train.tsv, dev.tsv).
- Tokenizer: WordPiece from the ``tokenizers`` library, either from a checkpoint's vocab.txt
  (``data.tokenizer.vocab``) or trained on the training texts (cached as
  ``<data_dir>/tokenizer/vocab-<digest>.txt``, so every job on the same texts tokenizes alike,
  and logged to the run as ``tokenizer/vocab.txt``).
- Splits: train.tsv, dev.tsv (MNLI: dev_matched.tsv) for validation; test.tsv when it has
  labels (GLUE's own test sets have none, then test metrics use dev.tsv, which the data summary
  says).
- Encoded once: each split is tokenized with the fast tokenizer's batch API, in chunks, into flat
  arrays (token ids, token types, per-example offsets, labels) that are cached
  (``zoo.data.cache.ArrayCache``, ``data.cache``) under a digest of the TSV file, the
  vocabulary, ``max_length`` and the task, and read back by memory map; a later job on the same
  files reads no TSV and tokenizes nothing.
"""

from __future__ import annotations

import csv
import hashlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from zoo.data.base import SplitDataModule
from zoo.data.cache import ArrayCache, cache_folder, digest, file_fingerprint
from zoo.errors import ConfigError, DataError

log = logging.getLogger(__name__)

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


@dataclass(frozen=True)
class TaskSpec:
    text: tuple[str | int, ...]  # column names (header) or indices (no header)
    label: str | int
    header: bool
    labels: tuple[str, ...]  # label strings in class-id order
    dev: str = "dev.tsv"  # the labelled validation file


GLUE_TASKS = {
    "sst2": TaskSpec(("sentence",), "label", True, ("0", "1")),
    "cola": TaskSpec((3,), 1, False, ("0", "1")),
    "mrpc": TaskSpec(("#1 String", "#2 String"), "Quality", True, ("0", "1")),
    "qnli": TaskSpec(("question", "sentence"), "label", True, ("not_entailment", "entailment")),
    "rte": TaskSpec(("sentence1", "sentence2"), "label", True, ("not_entailment", "entailment")),
    "mnli": TaskSpec(
        ("sentence1", "sentence2"),
        "gold_label",
        True,
        ("contradiction", "entailment", "neutral"),
        dev="dev_matched.tsv",
    ),
    "qqp": TaskSpec(("question1", "question2"), "is_duplicate", True, ("0", "1")),
    "wnli": TaskSpec(("sentence1", "sentence2"), "label", True, ("0", "1")),
    "pydoc_continuity": TaskSpec(("sentence1", "sentence2"), "label", True, ("not_next", "next")),
}


def glue_labels(task: str) -> list[str]:
    """The class names of a GLUE task (``data.class_names`` of conf/data/glue.yaml)."""
    if task not in GLUE_TASKS:
        raise ValueError(f"data.task={task!r}: expected one of {list(GLUE_TASKS)}")
    return list(GLUE_TASKS[task].labels)


def read_glue_tsv(
    path: Path, spec: TaskSpec, require_labels: bool = True
) -> tuple[list[tuple[str, ...]], list[int] | None]:
    """Texts and label ids of one GLUE TSV file. Returns labels=None when the file has no label
    column (GLUE test sets) and require_labels is False."""
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    texts, labels = [], []
    with path.open(encoding="utf-8", newline="") as f:
        rows = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        text_idx, label_idx = list(spec.text), spec.label
        start = 1
        if spec.header:
            header = next(rows, None)
            if header is None:
                raise DataError(f"{path}: empty file")
            start = 2
            missing = [c for c in spec.text if c not in header]
            if missing:
                raise DataError(f"{path}:1: header {header} lacks column(s) {missing}")
            text_idx = [header.index(c) for c in spec.text]
            label_idx = header.index(spec.label) if spec.label in header else None
            if label_idx is None and require_labels:
                raise DataError(f"{path}:1: header {header} has no label column {spec.label!r}")
        need = max([*text_idx, label_idx if label_idx is not None else -1]) + 1
        for lineno, row in enumerate(rows, start=start):
            if not row or (len(row) == 1 and not row[0].strip()):
                continue
            if len(row) < need:
                raise DataError(
                    f"{path}:{lineno}: expected at least {need} tab-separated columns, got "
                    f"{len(row)}"
                )
            texts.append(tuple(row[i] for i in text_idx))
            if label_idx is not None:
                value = row[label_idx].strip()
                if value not in spec.labels:
                    raise DataError(
                        f"{path}:{lineno}: label {value!r} is not one of {list(spec.labels)}"
                    )
                labels.append(spec.labels.index(value))
    if not texts:
        raise DataError(f"{path}: no rows")
    return texts, (labels if label_idx is not None else None)


def train_tokenizer(texts: list[str], vocab_size: int, out_dir: Path, lowercase: bool = True):
    """A WordPiece vocabulary learned from ``texts``, cached in ``out_dir`` under a digest of
    the texts and options. The trainer breaks frequency ties differently in every process, so
    without the cache a job that evaluates a model would tokenize with another vocabulary than
    the job that trained it."""
    import hashlib
    import os
    import tempfile

    from tokenizers import BertWordPieceTokenizer

    key = hashlib.sha256(f"{vocab_size}|{lowercase}|".encode())
    for text in texts:
        key.update(text.encode())
        key.update(b"\0")
    vocab = out_dir / f"vocab-{key.hexdigest()[:16]}.txt"
    if not vocab.is_file():
        tok = BertWordPieceTokenizer(lowercase=lowercase)
        tok.train_from_iterator(
            texts, vocab_size=vocab_size, min_frequency=2, special_tokens=SPECIAL_TOKENS
        )
        out_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=out_dir) as tmp:
            tok.save_model(tmp)
            os.replace(Path(tmp) / "vocab.txt", vocab)  # atomic: concurrent jobs agree
    return load_tokenizer(vocab, lowercase), vocab


def load_tokenizer(vocab: Path, lowercase: bool = True):
    """A WordPiece vocab.txt, or a HuggingFace tokenizer.json (read as it is: its own
    normaliser, pre-tokenizer and post-processor; its padding is turned off, batches are padded
    by pad_collate)."""
    from tokenizers import BertWordPieceTokenizer, Tokenizer

    if not vocab.is_file():
        raise DataError(f"{vocab}: tokenizer file not found (a vocab.txt or tokenizer.json)")
    if vocab.suffix == ".json":
        try:
            tok = Tokenizer.from_file(str(vocab))
        except Exception as exc:
            raise DataError(f"{vocab}: not a tokenizers JSON file ({exc})") from None
        tok.no_padding()
        return tok
    return BertWordPieceTokenizer(str(vocab), lowercase=lowercase)


ENCODE_FORMAT = 1  # bump when the encoded arrays' layout or meaning changes
ENCODE_CHUNK = 8192  # examples per encode_batch call: bounded memory for Encoding objects


class EncodedText(Dataset):
    """One tokenized split as flat arrays (memory maps when cached): example ``i`` is
    ``ids[offsets[i]:offsets[i + 1]]`` with its token types and label. Flat arrays, not a list
    of per-example objects, so DataLoader workers share the pages instead of copying them."""

    def __init__(self, ids, type_ids, offsets, labels):
        self.ids, self.type_ids = ids, type_ids
        self.offsets, self.labels = offsets, labels

    @classmethod
    def from_encodings(cls, encodings: list, labels) -> EncodedText:
        """From ``tokenizers`` Encoding objects (one ``encode_batch`` result)."""
        arrays = _flatten(encodings)
        return cls(*arrays, np.asarray(labels, dtype=np.int64))

    def arrays(self) -> dict[str, np.ndarray]:
        return {
            "ids": self.ids,
            "type_ids": self.type_ids,
            "offsets": self.offsets,
            "labels": self.labels,
        }

    def label_counts(self, num_labels: int) -> list[int]:
        return np.bincount(np.asarray(self.labels), minlength=num_labels).tolist()

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict:
        a, b = int(self.offsets[i]), int(self.offsets[i + 1])
        return {
            "input_ids": self.ids[a:b],
            "token_type_ids": self.type_ids[a:b],
            "label": int(self.labels[i]),
        }


def _flatten(encodings: list) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Token ids (int32), token types (int8) and offsets (int64, n + 1) of Encoding objects
    (one attribute read per encoding; the tokens are chained in C)."""
    from itertools import chain

    ids = [e.ids for e in encodings]
    types = [e.type_ids for e in encodings]
    offsets = np.zeros(len(ids) + 1, np.int64)
    np.cumsum(np.fromiter(map(len, ids), np.int64, len(ids)), out=offsets[1:])
    total = int(offsets[-1])
    return (
        np.fromiter(chain.from_iterable(ids), np.int32, total),
        np.fromiter(chain.from_iterable(types), np.int8, total),
        offsets,
    )


def encode_texts(tokenizer, texts: list[tuple[str, ...]], labels, chunk: int = ENCODE_CHUNK):
    """``texts`` (single sentences or pairs) tokenized with ``encode_batch`` in chunks of
    ``chunk`` examples, each chunk flattened at once, so the Encoding objects of only one chunk
    are alive at a time (393k MNLI pairs of them would take gigabytes)."""
    parts = []
    for start in range(0, len(texts), chunk):
        batch = [t if len(t) > 1 else t[0] for t in texts[start : start + chunk]]
        parts.append(_flatten(tokenizer.encode_batch(batch)))
    offsets = np.zeros(len(texts) + 1, np.int64)
    if parts:
        np.cumsum(np.concatenate([np.diff(o) for _, _, o in parts]), out=offsets[1:])
    ids = np.concatenate([p[0] for p in parts]) if parts else np.zeros(0, np.int32)
    types = np.concatenate([p[1] for p in parts]) if parts else np.zeros(0, np.int8)
    return EncodedText(ids, types, offsets, np.asarray(labels, dtype=np.int64))


def pad_collate(batch: list[dict], pad_id: int = 0) -> dict[str, torch.Tensor]:
    """Pads to the longest sequence of the batch."""
    n = max(len(b["input_ids"]) for b in batch)
    ids = torch.full((len(batch), n), pad_id, dtype=torch.long)
    types = torch.zeros((len(batch), n), dtype=torch.long)
    mask = torch.zeros((len(batch), n), dtype=torch.long)
    for i, b in enumerate(batch):
        k = len(b["input_ids"])
        ids[i, :k] = torch.as_tensor(np.asarray(b["input_ids"], dtype=np.int64))
        types[i, :k] = torch.as_tensor(np.asarray(b["token_type_ids"], dtype=np.int64))
        mask[i, :k] = 1
    return {
        "input_ids": ids,
        "token_type_ids": types,
        "attention_mask": mask,
        "labels": torch.tensor([b["label"] for b in batch]),
    }


class GlueDataModule(SplitDataModule):
    """One GLUE-format task from ``data_dir`` (train.tsv, dev.tsv[, test.tsv]).

    ``demo`` (a writer such as ``zoo.data.demo.pydoc.write_demo_glue``, injected) first writes
    the offline
    pydoc_continuity task into ``data_dir``."""

    sample_unit = "examples"

    collate_fn = staticmethod(pad_collate)

    def __init__(
        self,
        data_dir: str,
        task: str = "sst2",
        max_length: int = 128,
        batch_size: int = 32,
        num_workers: int = 0,
        tokenizer: dict | None = None,
        subset: int | None = None,
        cache: str = "beside",
        cache_verify: bool = True,
        demo: Callable[..., object] | None = None,
        num_labels: int | None = None,
        class_names: list[str] | None = None,
    ):
        super().__init__()
        if task not in GLUE_TASKS:
            raise ConfigError(f"data.task={task!r}: expected one of {list(GLUE_TASKS)}")
        self.spec = GLUE_TASKS[task]
        if num_labels is not None and num_labels != len(self.spec.labels):
            raise ConfigError(
                f"data.num_labels={num_labels} but task {task} has {len(self.spec.labels)} labels"
            )
        self.data_dir, self.task = Path(data_dir), task
        self.max_length, self.batch_size, self.num_workers = max_length, batch_size, num_workers
        self.tok_cfg = {"vocab": None, "vocab_size": 4000, "lowercase": True, **(tokenizer or {})}
        self.subset, self.demo = subset, demo
        self.cache, self.cache_verify = str(cache), bool(cache_verify)
        self.class_names = list(class_names or self.spec.labels)
        self.datasets: dict[str, EncodedText] = {}
        self.tokenizer = None
        self.vocab_file: Path | None = None
        self.test_source = "test.tsv"
        self.timings: dict[str, float] = {}  # seconds per setup phase (benchmarks/data_scale.py)

    def prepare_data(self) -> None:
        self.write_demo()

    def _array_cache(self) -> ArrayCache | None:
        """Where encoded splits are kept (``data.cache``): ``beside`` the TSVs
        (``<data_dir>/.zoo-cache``), ``zoo_cache`` (``$ZOO_CACHE_DIR/glue``), a folder, or
        ``off``."""
        root = cache_folder(self.cache, self.data_dir, "glue")
        return None if root is None else ArrayCache(root, "data.cache", verify=self.cache_verify)

    def _read(self, path: Path, require_labels: bool = True):
        texts, labels = read_glue_tsv(path, self.spec, require_labels)
        n = int(self.subset) if self.subset else None
        return texts[:n], (labels[:n] if labels is not None else None)

    def _tokenizer(self):
        """The tokenizer: the configured vocabulary, or WordPiece trained on train.tsv (cached
        by a digest of its texts; an alias keyed by the file's fingerprint lets a later job find
        it without reading the file)."""
        if self.tok_cfg["vocab"]:
            from zoo.pretrained import resolve

            # a vocab.txt or tokenizer.json, or pkg:<module>/<zip>/tokenizer.json
            self.vocab_file = resolve(self.tok_cfg["vocab"])
            return load_tokenizer(self.vocab_file, self.tok_cfg["lowercase"])
        out_dir = self.data_dir / "tokenizer"
        train = self.data_dir / "train.tsv"
        if not train.is_file():
            raise DataError(f"{train}: file not found")
        alias_key = {
            "train": file_fingerprint(train),
            "subset": self.subset,
            "task": self.task,
            "vocab_size": int(self.tok_cfg["vocab_size"]),
            "lowercase": bool(self.tok_cfg["lowercase"]),
        }
        alias = out_dir / f"for-{digest(alias_key)[:16]}.txt"
        if alias.is_file():
            vocab = out_dir / alias.read_text().strip()
            if vocab.is_file():
                self.vocab_file = vocab
                return load_tokenizer(vocab, self.tok_cfg["lowercase"])
        texts, _ = self._read(train)
        flat = [t for row in texts for t in row]
        tok, self.vocab_file = train_tokenizer(
            flat, int(self.tok_cfg["vocab_size"]), out_dir, self.tok_cfg["lowercase"]
        )
        _write_atomic(alias, self.vocab_file.name)
        return tok

    def _split(self, split: str, path: Path, cache: ArrayCache | None) -> EncodedText | None:
        """One split, encoded (or read from the cache); None for a file without labels."""
        require = split != "test"

        def build():
            texts, labels = self._read(path, require_labels=require)
            if labels is None:
                return {"labels": np.zeros(0, np.int64)}, {"has_labels": False}
            t0 = time.perf_counter()
            ds = encode_texts(self.tokenizer, texts, labels)
            self.timings[f"tokenize/{split}"] = time.perf_counter() - t0
            self.timings[f"tokenized/{split}"] = len(texts)
            return ds.arrays(), {"has_labels": True}

        if cache is None:
            arrays, extra = build()
        else:
            if not path.is_file():
                raise DataError(f"{path}: file not found")
            key = {
                "format": ENCODE_FORMAT,
                "task": self.task,
                "file": file_fingerprint(path),
                "require_labels": require,
                "vocab": _file_digest(self.vocab_file),
                "lowercase": bool(self.tok_cfg["lowercase"]),
                "max_length": int(self.max_length),
                "subset": self.subset,
            }
            arrays, extra = cache.load_or_build_arrays(f"{self.task}-{split}", key, build)
        if not extra.get("has_labels", True):
            return None
        return EncodedText(arrays["ids"], arrays["type_ids"], arrays["offsets"], arrays["labels"])

    def setup(self, stage: str | None = None) -> None:
        if self.datasets:
            return
        if self.demo:
            self.prepare_data()
        t0 = time.perf_counter()
        self.tokenizer = self._tokenizer()
        self.tokenizer.enable_truncation(self.max_length)
        cache = self._array_cache()
        for split, name in (("train", "train.tsv"), ("val", self.spec.dev)):
            self.datasets[split] = self._split(split, self.data_dir / name, cache)
        test_path = self.data_dir / "test.tsv"
        test = self._split("test", test_path, cache) if test_path.is_file() else None
        if test is None:
            log.info(
                "%s has no labels (GLUE test sets do not): test metrics use %s",
                test_path,
                self.spec.dev,
            )
            self.datasets["test"] = self.datasets["val"]
            self.test_source = f"{self.spec.dev} (test.tsv has no labels)"
        else:
            self.datasets["test"] = test
        self.timings["setup"] = time.perf_counter() - t0
        if cache is not None:
            self.timings["cache_hits"], self.timings["cache_misses"] = cache.hits, cache.misses

    def preprocessing_spec(self) -> dict[str, Any]:
        """What turns raw text into the model's input: the tokenizer itself (its JSON, with
        the truncation to max_length), the task's text columns and labels."""
        self.setup()
        return {
            "tokenizer": self.tokenizer.to_str(),
            "max_length": int(self.max_length),
            "task": self.task,
            "text_columns": [str(c) for c in self.spec.text],
            "pair": len(self.spec.text) == 2,
            "class_names": list(self.class_names),
        }

    def raw_example(self) -> list[tuple[str, ...]]:
        """The first two texts of the validation file (the logged model's input example)."""
        texts, _ = read_glue_tsv(self.data_dir / self.spec.dev, self.spec, require_labels=False)
        return texts[:2]

    def dataset_files(self, split: str) -> list[Path]:
        name = {"train": "train.tsv", "val": self.spec.dev, "test": "test.tsv"}[split]
        if split == "test" and self.test_source != "test.tsv":
            name = self.spec.dev
        return [p for p in (self.data_dir / name,) if p.is_file()]

    def summary(self) -> dict[str, str]:
        self.setup()
        out = {
            "task": self.task,
            "data_dir": str(self.data_dir),
            "max_length": str(self.max_length),
            "tokenizer": f"WordPiece, {self.tokenizer.get_vocab_size()} tokens ({self.vocab_file})",
            "test split": self.test_source,
        }
        for split, ds in self.datasets.items():
            counts = ds.label_counts(len(self.class_names))
            out[f"{split} examples"] = (
                f"{len(ds)} ({', '.join(f'{c}: {n}' for c, n in zip(self.class_names, counts))})"
            )
        return out


def _file_digest(path: Path | None) -> str | None:
    """sha256 of a (small) vocabulary file's bytes."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest() if path else None


def _write_atomic(path: Path, text: str) -> None:
    import os

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
