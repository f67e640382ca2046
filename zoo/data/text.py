"""Text classification data in GLUE's TSV format, with a WordPiece tokenizer.

- GLUE tasks (SST-2, CoLA, MRPC, QNLI, RTE, plus the offline demo's ``pydoc_continuity``):
  single sentences or sentence pairs, header handling, label columns; a malformed row is an
  error naming the file and line. Download GLUE yourself (e.g. with the ``glue`` data script of
  the GLUE benchmark) and point ``data.data_dir`` at one task's folder (train.tsv, dev.tsv).
- Tokenizer: WordPiece from the ``tokenizers`` library, either from a checkpoint's vocab.txt
  (``data.tokenizer.vocab``) or trained on the training texts (cached as
  ``<data_dir>/tokenizer/vocab-<digest>.txt``, so every job on the same texts tokenizes alike,
  and logged to the run as ``tokenizer/vocab.txt``).
- Splits: train.tsv, dev.tsv for validation; test.tsv when it has labels (GLUE's own test sets
  have none, then test metrics use dev.tsv, which the data summary says).
"""

from __future__ import annotations

import csv
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import Dataset

from zoo.data.base import SplitDataModule
from zoo.errors import ConfigError, DataError

log = logging.getLogger(__name__)

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


@dataclass(frozen=True)
class TaskSpec:
    text: tuple[str | int, ...]  # column names (header) or indices (no header)
    label: str | int
    header: bool
    labels: tuple[str, ...]  # label strings in class-id order


GLUE_TASKS = {
    "sst2": TaskSpec(("sentence",), "label", True, ("0", "1")),
    "cola": TaskSpec((3,), 1, False, ("0", "1")),
    "mrpc": TaskSpec(("#1 String", "#2 String"), "Quality", True, ("0", "1")),
    "qnli": TaskSpec(("question", "sentence"), "label", True, ("not_entailment", "entailment")),
    "rte": TaskSpec(("sentence1", "sentence2"), "label", True, ("not_entailment", "entailment")),
    "pydoc_continuity": TaskSpec(("sentence1", "sentence2"), "label", True, ("not_next", "next")),
}


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


class EncodedText(Dataset):
    def __init__(self, encodings: list, labels: list[int]):
        self.encodings, self.labels = encodings, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict:
        e = self.encodings[i]
        return {"input_ids": e.ids, "token_type_ids": e.type_ids, "label": self.labels[i]}


def pad_collate(batch: list[dict], pad_id: int = 0) -> dict[str, torch.Tensor]:
    """Pads to the longest sequence of the batch."""
    n = max(len(b["input_ids"]) for b in batch)
    ids = torch.full((len(batch), n), pad_id, dtype=torch.long)
    types = torch.zeros((len(batch), n), dtype=torch.long)
    mask = torch.zeros((len(batch), n), dtype=torch.long)
    for i, b in enumerate(batch):
        k = len(b["input_ids"])
        ids[i, :k] = torch.tensor(b["input_ids"])
        types[i, :k] = torch.tensor(b["token_type_ids"])
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
        self.class_names = list(class_names or self.spec.labels)
        self.datasets: dict[str, EncodedText] = {}
        self.tokenizer = None
        self.vocab_file: Path | None = None
        self.test_source = "test.tsv"

    def prepare_data(self) -> None:
        self.write_demo()

    def _tokenizer(self, train_texts: list[tuple[str, ...]]):
        if self.tok_cfg["vocab"]:
            from zoo.pretrained import resolve

            # a vocab.txt or tokenizer.json, or pkg:<module>/<zip>/tokenizer.json
            self.vocab_file = resolve(self.tok_cfg["vocab"])
            return load_tokenizer(self.vocab_file, self.tok_cfg["lowercase"])
        flat = [t for row in train_texts for t in row]
        tok, self.vocab_file = train_tokenizer(
            flat,
            int(self.tok_cfg["vocab_size"]),
            self.data_dir / "tokenizer",
            self.tok_cfg["lowercase"],
        )
        return tok

    def _encode(self, texts: list[tuple[str, ...]], labels: list[int]) -> EncodedText:
        self.tokenizer.enable_truncation(self.max_length)
        encodings = self.tokenizer.encode_batch([t if len(t) > 1 else t[0] for t in texts])
        return EncodedText(encodings, labels)

    def setup(self, stage: str | None = None) -> None:
        if self.datasets:
            return
        if self.demo:
            self.prepare_data()
        splits = {}
        for split, name in (("train", "train.tsv"), ("val", "dev.tsv")):
            splits[split] = read_glue_tsv(self.data_dir / name, self.spec)
        test_path = self.data_dir / "test.tsv"
        test = (
            read_glue_tsv(test_path, self.spec, require_labels=False)
            if test_path.is_file()
            else (None, None)
        )
        if test[1] is None:
            log.info(
                "%s has no labels (GLUE test sets do not): test metrics use dev.tsv", test_path
            )
            splits["test"], self.test_source = splits["val"], "dev.tsv (test.tsv has no labels)"
        else:
            splits["test"] = test
        if self.subset:
            splits = {
                k: (t[: int(self.subset)], y[: int(self.subset)]) for k, (t, y) in splits.items()
            }
        self.tokenizer = self._tokenizer(splits["train"][0])
        self.datasets = {k: self._encode(t, y) for k, (t, y) in splits.items()}

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
            counts = [ds.labels.count(i) for i in range(len(self.class_names))]
            out[f"{split} examples"] = (
                f"{len(ds)} ({', '.join(f'{c}: {n}' for c, n in zip(self.class_names, counts))})"
            )
        return out
