"""Prompts and preference pairs for RLHF, in the JSONL formats TRL and Hugging Face datasets use.

- **Prompts** (PPO, stage 2): one JSON object per line with ``prompt`` (a string) or
  ``messages`` (a chat: ``[{"role": "user", "content": ...}, ...]``).
- **Preference pairs** (the reward model, stage 1): ``prompt``, ``chosen``, ``rejected`` (strings).

A split is a file: ``train.jsonl``, ``val.jsonl``, ``test.jsonl`` in ``data_dir``. Texts are
turned into tokens by the model's tokenizer (``data.tokenizer``: the model's ``source``, see
``zoo.models.components.causal_lm``), through its chat template when ``chat: true``.

A prompt longer than ``max_prompt_length`` tokens (a pair longer than ``max_length``) follows
``truncation``: ``error`` (stop, naming the file and line), ``left`` (keep the last tokens), or
``drop`` (leave the example out). The rule and the number it touched are in the data summary.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from zoo.data.base import SplitDataModule
from zoo.errors import ConfigError, DataError

SPLITS = {"train": "train.jsonl", "val": "val.jsonl", "test": "test.jsonl"}
TRUNCATION = ("error", "left", "drop")


def read_jsonl(path: Path) -> list[tuple[int, dict[str, Any]]]:
    """(line number, object) for each non-empty line; a line that is not a JSON object is a
    DataError naming the file and line."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    out = []
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(
                    f"{path}:{n}: not valid JSON ({exc.msg} at column {exc.colno})"
                ) from None
            if not isinstance(obj, dict):
                raise DataError(f"{path}:{n}: expected a JSON object, got {type(obj).__name__}")
            out.append((n, obj))
    if not out:
        raise DataError(f"{path}: no examples")
    return out


def prompt_of(obj: dict[str, Any], where: str) -> str | list[dict[str, str]]:
    """A record's prompt: its ``prompt`` string or its chat ``messages``."""
    if "messages" in obj:
        msgs = obj["messages"]
        ok = isinstance(msgs, list) and msgs
        ok = ok and all(
            isinstance(m, dict)
            and isinstance(m.get("role"), str)
            and isinstance(m.get("content"), str)
            for m in msgs
        )
        if not ok:
            raise DataError(f"{where}: messages must be a list of {{role, content}} strings")
        return [{"role": m["role"], "content": m["content"]} for m in msgs]
    text = obj.get("prompt")
    if not isinstance(text, str) or not text.strip():
        raise DataError(f"{where}: expected a non-empty 'prompt' string or 'messages'")
    return text


def prompt_text(tokenizer, prompt: str | list[dict[str, str]], chat: bool) -> str:
    """The text the policy continues: the chat template with the assistant's turn opened, or
    the prompt as it is."""
    if chat or isinstance(prompt, list):
        messages = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return prompt


def pair_text(tokenizer, prompt, response: str, chat: bool) -> str:
    """A prompt and a response as the reward model reads them: the chat with the assistant's
    answer, or the prompt then the response then EOS."""
    if chat or isinstance(prompt, list):
        messages = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
        return tokenizer.apply_chat_template(
            [*messages, {"role": "assistant", "content": response}], tokenize=False
        )
    return prompt + response + (tokenizer.eos_token or "")


def encode(tokenizer, text: str, limit: int, truncation: str, where: str) -> list[int] | None:
    """Token ids of ``text`` under ``truncation`` (None: dropped)."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if len(ids) <= limit:
        return ids
    if truncation == "error":
        raise DataError(
            f"{where}: {len(ids)} tokens, more than the limit of {limit} (set "
            "data.truncation=left to keep the last tokens, or drop to leave such examples out)"
        )
    return ids[-limit:] if truncation == "left" else None


class Prompts(Dataset):
    def __init__(self, ids: list[list[int]], prompts: list[Any], where: list[str]):
        self.ids, self.prompts, self.where = ids, prompts, where

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {"input_ids": self.ids[i], "prompt": self.prompts[i], "index": i}


class Pairs(Dataset):
    def __init__(self, chosen: list[list[int]], rejected: list[list[int]], where: list[str]):
        self.chosen, self.rejected, self.where = chosen, rejected, where

    def __len__(self) -> int:
        return len(self.chosen)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {"chosen": self.chosen[i], "rejected": self.rejected[i], "index": i}


def left_pad(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, attention mask), left-padded to the longest."""
    n = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), n), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), n), dtype=torch.long)
    for i, s in enumerate(seqs):
        if s:
            ids[i, n - len(s) :] = torch.tensor(s)
            mask[i, n - len(s) :] = 1
    return ids, mask


class _RlhfData(SplitDataModule):
    sample_unit = "prompts"

    def __init__(
        self,
        data_dir: str,
        tokenizer: str = "smollm2",
        chat: bool = True,
        truncation: str = "error",
        batch_size: int = 8,
        num_workers: int = 0,
        subset: int | None = None,
        demo: Callable[..., object] | None = None,
    ):
        super().__init__()
        if truncation not in TRUNCATION:
            raise ConfigError(f"data.truncation={truncation!r}: expected one of {list(TRUNCATION)}")
        self.data_dir, self.tokenizer_source = Path(data_dir), str(tokenizer)
        self.chat, self.truncation = bool(chat), truncation
        self.batch_size, self.num_workers = int(batch_size), int(num_workers)
        self.subset, self.demo = subset, demo
        self.datasets: dict[str, Dataset] = {}
        self.tokenizer = None
        self.touched: dict[str, int] = {}  # split -> examples truncated or dropped

    def prepare_data(self) -> None:
        if self.demo is not None:  # the demo writes prompts/ and preferences/ side by side
            self.demo(self.data_dir.parent)

    def _tokenizer(self):
        if self.tokenizer is None:
            from zoo.models.components.causal_lm import load_tokenizer

            self.tokenizer = load_tokenizer(self.tokenizer_source)
        return self.tokenizer

    def _records(self, split: str) -> list[tuple[int, dict[str, Any]]]:
        records = read_jsonl(self.data_dir / SPLITS[split])
        return records[: int(self.subset) * self.batch_size] if self.subset else records

    def setup(self, stage: str | None = None) -> None:
        if self.datasets:
            return
        if self.demo:
            self.prepare_data()
        for split in SPLITS:
            self.datasets[split] = self._split(split)

    def dataset_files(self, split: str) -> list[Path]:
        return [p for p in (self.data_dir / SPLITS[split],) if p.is_file()]

    def preprocessing_spec(self) -> dict[str, Any]:
        from zoo.models.components.causal_lm import tokenizer_files

        self.setup()
        return {
            "tokenizer": tokenizer_files(self._tokenizer()),
            "chat": self.chat,
            "truncation": self.truncation,
            **self._limits(),
        }

    def summary(self) -> dict[str, str]:
        self.setup()
        out = {"data_dir": str(self.data_dir), "tokenizer": self.tokenizer_source}
        out |= {k: str(v) for k, v in self._limits().items()}
        out["truncation"] = self.truncation
        for split, ds in self.datasets.items():
            touched = self.touched.get(split, 0)
            verb = "dropped" if self.truncation == "drop" else "truncated"
            out[f"{split} {self.sample_unit}"] = f"{len(ds)} ({touched} {verb})"
        return out


class PromptDataModule(_RlhfData):
    """Prompts for PPO; a batch holds left-padded ``input_ids``/``attention_mask`` and the raw
    ``prompt`` of each row (the reward model re-reads prompt and completion as text)."""

    def __init__(self, *args, max_prompt_length: int = 64, **kwargs):
        super().__init__(*args, **kwargs)
        self.max_prompt_length = int(max_prompt_length)

    def _limits(self) -> dict[str, int]:
        return {"max_prompt_length": self.max_prompt_length}

    def _split(self, split: str) -> Prompts:
        tok = self._tokenizer()
        path = self.data_dir / SPLITS[split]
        ids, prompts, where = [], [], []
        self.touched[split] = 0
        for n, obj in self._records(split):
            at = f"{path}:{n}"
            prompt = prompt_of(obj, at)
            text = prompt_text(tok, prompt, self.chat)
            enc = encode(tok, text, self.max_prompt_length, self.truncation, at)
            if enc is None or len(tok(text, add_special_tokens=False)["input_ids"]) > len(enc):
                self.touched[split] += 1
            if enc is None:
                continue
            ids.append(enc)
            prompts.append(prompt)
            where.append(at)
        if not ids:
            raise DataError(f"{path}: every prompt was dropped (longer than max_prompt_length)")
        return Prompts(ids, prompts, where)

    def collate_fn(self, batch: list[dict]) -> dict[str, Any]:
        ids, mask = left_pad([b["input_ids"] for b in batch], self._tokenizer().pad_token_id)
        return {
            "input_ids": ids,
            "attention_mask": mask,
            "prompts": [b["prompt"] for b in batch],
            "index": torch.tensor([b["index"] for b in batch]),
        }

    def raw_example(self) -> list[str]:
        records = read_jsonl(self.data_dir / SPLITS["val"])[:2]
        return [
            json.dumps(prompt_of(o, "")) if "messages" in o else o["prompt"] for _, o in records
        ]


class PreferenceDataModule(_RlhfData):
    """Preference pairs for the reward model; a batch holds ``chosen`` and ``rejected`` ids
    and masks (left-padded to one length, so both go through the network as one batch)."""

    sample_unit = "pairs"

    def __init__(self, *args, max_length: int = 128, **kwargs):
        super().__init__(*args, **kwargs)
        self.max_length = int(max_length)

    def _limits(self) -> dict[str, int]:
        return {"max_length": self.max_length}

    def _split(self, split: str) -> Pairs:
        tok = self._tokenizer()
        path = self.data_dir / SPLITS[split]
        chosen, rejected, where = [], [], []
        self.touched[split] = 0
        for n, obj in self._records(split):
            at = f"{path}:{n}"
            prompt = prompt_of(obj, at)
            texts = []
            for key in ("chosen", "rejected"):
                value = obj.get(key)
                if not isinstance(value, str) or not value.strip():
                    raise DataError(f"{at}: '{key}' must be a non-empty string")
                texts.append(value)
            if texts[0].strip() == texts[1].strip():
                raise DataError(f"{at}: 'chosen' and 'rejected' are the same text")
            encs = []
            for text in texts:
                full = pair_text(tok, prompt, text, self.chat)
                encs.append(encode(tok, full, self.max_length, self.truncation, at))
                if encs[-1] is None or len(encs[-1]) < len(
                    tok(full, add_special_tokens=False)["input_ids"]
                ):
                    self.touched[split] += 1
            if None in encs:
                continue
            chosen.append(encs[0])
            rejected.append(encs[1])
            where.append(at)
        if not chosen:
            raise DataError(f"{path}: every pair was dropped (longer than max_length)")
        return Pairs(chosen, rejected, where)

    def collate_fn(self, batch: list[dict]) -> dict[str, Any]:
        seqs = [b["chosen"] for b in batch] + [b["rejected"] for b in batch]
        ids, mask = left_pad(seqs, self._tokenizer().pad_token_id)
        return {
            "input_ids": ids,
            "attention_mask": mask,
            "index": torch.tensor([b["index"] for b in batch]),
        }

    def raw_example(self) -> list[list[str]]:
        records = read_jsonl(self.data_dir / SPLITS["val"])[:2]
        return [[o["prompt"], o["chosen"]] for _, o in records]
