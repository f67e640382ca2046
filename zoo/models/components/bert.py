"""A BERT encoder (Devlin et al. 2019) whose self-attention runs through
``zoo.kernels.masked_attention``, so a per-head keep mask (padding composed with a learned
sparse mask) turns into skipped work. While a mask is searched, the sampled float mask goes
through ``zoo.kernels.soft_masked_attention`` (one [H, L, L] mask shared by the batch, padding
applied inside the kernel), so no [B, H, L, L] tensor is built. Module and parameter names
follow HuggingFace's
``BertModel`` exactly, so its checkpoints load with a plain state-dict copy (see
``zoo.models.sparsebert.from_pretrained``).

Post-LN layers: x = LN(x + Attn(x)); x = LN(x + FFN(x)). One deliberate difference from HF:
dropout on the attention probabilities is not applied (the fused kernel never materialises them);
hidden-state dropout is.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

import torch
from torch import nn

from zoo import kernels


@dataclass
class SoftMask:
    """A float attention weight per head (a sampled mask, differentiable) with an optional bool
    keep mask (padding) that removes keys outright."""

    weight: torch.Tensor
    keep: torch.Tensor | None = None


AttentionMask = torch.Tensor | SoftMask | None


@dataclass
class BertConfig:
    vocab_size: int = 8000
    hidden_size: int = 128
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    intermediate_size: int = 512
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    max_position_embeddings: int = 128
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    pad_token_id: int = 0

    @classmethod
    def from_dict(cls, d: dict) -> BertConfig:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def to_dict(self) -> dict:
        return asdict(self)


ACTIVATIONS = {"gelu": nn.GELU(), "gelu_new": nn.GELU(approximate="tanh"), "relu": nn.ReLU()}


class BertEmbeddings(nn.Module):
    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(
            cfg.vocab_size, cfg.hidden_size, padding_idx=cfg.pad_token_id
        )
        self.position_embeddings = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)
        self.token_type_embeddings = nn.Embedding(cfg.type_vocab_size, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.dropout = nn.Dropout(cfg.hidden_dropout_prob)

    def forward(
        self, input_ids: torch.Tensor, token_type_ids: torch.Tensor | None = None
    ) -> torch.Tensor:
        length = input_ids.shape[1]
        if length > self.position_embeddings.num_embeddings:
            raise ValueError(
                f"sequence length {length} exceeds "
                f"max_position_embeddings={self.position_embeddings.num_embeddings}"
            )
        positions = torch.arange(length, device=input_ids.device)[None]
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        x = (
            self.word_embeddings(input_ids)
            + self.position_embeddings(positions)
            + self.token_type_embeddings(token_type_ids)
        )
        return self.dropout(self.LayerNorm(x))


class BertSelfAttention(nn.Module):
    def __init__(self, cfg: BertConfig):
        super().__init__()
        if cfg.hidden_size % cfg.num_attention_heads:
            raise ValueError(
                f"hidden_size {cfg.hidden_size} is not a multiple of num_attention_heads "
                f"{cfg.num_attention_heads}"
            )
        self.heads = cfg.num_attention_heads
        self.head_dim = cfg.hidden_size // cfg.num_attention_heads
        self.query = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.key = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.value = nn.Linear(cfg.hidden_size, cfg.hidden_size)

    def forward(self, x: torch.Tensor, keep_mask: AttentionMask) -> torch.Tensor:
        b, n, _ = x.shape

        def heads(t: torch.Tensor) -> torch.Tensor:  # -1: the rank's heads under TP
            return t.view(b, n, -1, self.head_dim).transpose(1, 2)

        q, k, v = heads(self.query(x)), heads(self.key(x)), heads(self.value(x))
        scale = 1.0 / math.sqrt(self.head_dim)
        if isinstance(keep_mask, SoftMask):
            out = kernels.soft_masked_attention(q, k, v, keep_mask.weight, scale, keep_mask.keep)
        else:
            out = kernels.masked_attention(q, k, v, keep_mask, scale)
        return out.transpose(1, 2).reshape(b, n, -1)


class BertResidual(nn.Module):
    """dense -> dropout -> LayerNorm(x + residual): HF's BertSelfOutput / BertOutput."""

    def __init__(self, d_in: int, cfg: BertConfig):
        super().__init__()
        self.dense = nn.Linear(d_in, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.dropout = nn.Dropout(cfg.hidden_dropout_prob)

    def forward(self, h: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dropout(self.dense(h)) + residual)


class BertAttention(nn.Module):
    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.self = BertSelfAttention(cfg)
        self.output = BertResidual(cfg.hidden_size, cfg)

    def forward(self, x: torch.Tensor, keep_mask: AttentionMask) -> torch.Tensor:
        return self.output(self.self(x, keep_mask), x)


class BertIntermediate(nn.Module):
    def __init__(self, cfg: BertConfig):
        super().__init__()
        if cfg.hidden_act not in ACTIVATIONS:
            raise ValueError(
                f"hidden_act={cfg.hidden_act!r} is not supported (use one of {list(ACTIVATIONS)})"
            )
        self.dense = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.act = ACTIVATIONS[cfg.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.dense(x))


class BertLayer(nn.Module):
    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.attention = BertAttention(cfg)
        self.intermediate = BertIntermediate(cfg)
        self.output = BertResidual(cfg.intermediate_size, cfg)

    def forward(self, x: torch.Tensor, keep_mask: AttentionMask) -> torch.Tensor:
        x = self.attention(x, keep_mask)
        return self.output(self.intermediate(x), x)


class BertEncoder(nn.Module):
    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.layer = nn.ModuleList(BertLayer(cfg) for _ in range(cfg.num_hidden_layers))

    def forward(self, x: torch.Tensor, keep_masks: list[AttentionMask]) -> torch.Tensor:
        for layer, mask in zip(self.layer, keep_masks):
            x = layer(x, mask)
        return x


class BertPooler(nn.Module):
    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.activation = nn.Tanh()

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.activation(self.dense(hidden[:, 0]))


class BertModel(nn.Module):
    """Embeddings + encoder + pooler. ``forward`` returns (sequence output, pooled output).

    ``attention_mask`` [B, L] (1 = token, 0 = padding) becomes a key mask; ``layer_masks`` is an
    optional list (one per layer) of boolean keep masks broadcastable to [B, H, L, L] (a learned
    sparse mask), combined with the padding mask."""

    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.config = cfg
        self.embeddings = BertEmbeddings(cfg)
        self.encoder = BertEncoder(cfg)
        self.pooler = BertPooler(cfg)
        self.apply(self._init)

    def _init(self, m: nn.Module) -> None:  # HF's BertPreTrainedModel init
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0.0, 0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, 0.0, 0.02)
            if m.padding_idx is not None:
                m.weight.data[m.padding_idx].zero_()
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        layer_masks: list[torch.Tensor | None] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.embeddings(input_ids, token_type_ids)
        pad = (
            None if attention_mask is None else attention_mask.bool()[:, None, None, :]
        )  # [B,1,1,L]
        n_layers = len(self.encoder.layer)
        layer_masks = layer_masks or [None] * n_layers
        if len(layer_masks) != n_layers:
            raise ValueError(f"got {len(layer_masks)} layer masks for {n_layers} layers")
        keep = [_combine(pad, m) for m in layer_masks]
        hidden = self.encoder(x, keep)
        return hidden, self.pooler(hidden)


def _combine(pad: torch.Tensor | None, mask: torch.Tensor | None) -> AttentionMask:
    """Padding (bool, [B,1,1,L]) and a layer mask (bool [1,H,L,L], or float while searching).

    A float mask stays [1,H,L,L] with the padding beside it (SoftMask); a bool mask is used as
    is when nothing is padded, so the kernels reuse its cached tile map."""
    if mask is None:
        return pad
    tracing = torch.compiler.is_compiling() or torch.compiler.is_exporting()
    if pad is not None and not tracing and bool(pad.all()):  # a data-dependent shortcut
        pad = None
    if mask.is_floating_point():
        return SoftMask(mask, pad)
    return mask if pad is None else mask & pad


class BertMLMHead(nn.Module):
    """HF's cls.predictions: transform (dense, act, LayerNorm) then a decoder tied to the word
    embeddings, plus a bias."""

    def __init__(self, cfg: BertConfig, word_embeddings: nn.Embedding):
        super().__init__()
        self.transform = nn.Sequential()
        self.transform.dense = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.transform.act = ACTIVATIONS[cfg.hidden_act]
        self.transform.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self._tied = [
            word_embeddings
        ]  # decoder weight tied to the word embeddings (not re-registered)
        self.bias = nn.Parameter(torch.zeros(cfg.vocab_size))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.transform(hidden) @ self._tied[0].weight.t() + self.bias
