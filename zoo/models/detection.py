"""GroupSoftmax Faster R-CNN: one detector trained jointly on datasets with different label sets.

The idea (GroupSoftmax, chengzhengxin/groupsoftmax-simpledet): a class a source does not
annotate must not be taught as background by that source's images. Per source, the classes it
does not label are merged with background into group 0, and the classification loss of a sample
is −log Σ_{c ∈ group(y)} p_c (``zoo.kernels.group_softmax_cross_entropy``).

Built on torchvision's Faster R-CNN (ResNet-50-FPN or MobileNetV3-Large-FPN) at two seams:

- **box head** (:class:`GroupSoftmaxRoIHeads`): torchvision's ``fastrcnn_loss`` cross-entropy is
  replaced by GroupSoftmax; each sampled RoI takes its image's source row of the group table.
- **RPN** (:class:`GroupSoftmaxRPN`): objectness is a softmax over background + one foreground
  class per source; for an image of source r, the other sources' foreground classes are merged
  with background (they may be unannotated objects). The proposal score is 1 − p_background
  (the logit ``logsumexp(fg) − bg`` goes through torchvision's proposal filtering unchanged).

``loss=softmax`` keeps torchvision's plain cross-entropy box head and binary RPN: the baseline
GroupSoftmax is compared against in the mlflow UI.
"""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.backbone_utils import _mobilenet_extractor, _resnet_fpn_extractor
from torchvision.models.detection.roi_heads import RoIHeads
from torchvision.models.detection.rpn import (
    AnchorGenerator,
    RegionProposalNetwork,
    RPNHead,
    concat_box_prediction_layers,
)
from torchvision.models.detection.transform import GeneralizedRCNNTransform
from torchvision.ops import misc as misc_nn_ops

from zoo import kernels
from zoo.boxes import derive_group_table
from zoo.errors import ConfigError, DataError
from zoo.inference import ImageInputs, Item, Writer
from zoo.metrics.detection import DetectionScorer
from zoo.metrics.detection_figures import detections_figure, per_class_ap_figure, pr_curves_figure
from zoo.models.base import OptimizerFactory, SchedulerFactory, ZooModule
from zoo.outputs import Count, Figure, File, Section, Tag
from zoo.reports.detection import detection_sections

log = logging.getLogger(__name__)

BACKBONES = ("mobilenet_v3_large_fpn", "resnet50_fpn")
LOSSES = ("group_softmax", "softmax")


def rpn_group_table(num_sources: int) -> torch.Tensor:
    """[S, S + 1]: RPN classes are background + one foreground per source; for source r only its
    own foreground is a group of its own, the others share background's group 0."""
    table = torch.zeros(num_sources, num_sources + 1, dtype=torch.long)
    table[torch.arange(num_sources), torch.arange(1, num_sources + 1)] = torch.arange(
        1, num_sources + 1
    )
    return table


def _sources_of(targets: list[dict], counts: list[int], device) -> torch.Tensor:
    return torch.cat(
        [
            torch.full((n,), int(t.get("source", 0)), dtype=torch.long, device=device)
            for t, n in zip(targets, counts)
        ]
    )


class GroupSoftmaxRPN(RegionProposalNetwork):
    """torchvision's RPN with a (1 + S)-way grouped softmax objectness (see module docstring)."""

    def __init__(self, num_sources: int, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.num_sources = num_sources
        self.register_buffer("group_table", rpn_group_table(num_sources), persistent=False)

    def forward(self, images, features, targets=None):
        features = list(features.values())
        logits, pred_bbox_deltas = self.head(features)
        anchors = self.anchor_generator(images, features)
        k = self.num_sources + 1
        num_anchors_per_level = [o[0].numel() // k for o in logits]
        logits, pred_bbox_deltas = concat_box_prediction_layers(
            logits, pred_bbox_deltas
        )  # [N·A, k]
        objectness = logits[:, 1:].logsumexp(1) - logits[:, 0]  # sigmoid(.) = 1 − p_background
        proposals = self.box_coder.decode(pred_bbox_deltas.detach(), anchors).view(
            len(anchors), -1, 4
        )
        boxes, _ = self.filter_proposals(
            proposals, objectness, images.image_sizes, num_anchors_per_level
        )
        losses = {}
        if self.training:
            if targets is None:
                raise ValueError("targets should not be None")
            labels, matched_gt_boxes = self.assign_targets_to_anchors(anchors, targets)
            regression_targets = self.box_coder.encode(matched_gt_boxes, anchors)
            sources = _sources_of(targets, [len(lab) for lab in labels], logits.device)
            sampled_pos, sampled_neg = self.fg_bg_sampler(labels)
            pos = torch.where(torch.cat(sampled_pos))[0]
            sampled = torch.cat([pos, torch.where(torch.cat(sampled_neg))[0]])
            labels = torch.cat(labels)
            target = torch.where(labels[sampled] > 0, sources[sampled] + 1, 0)
            losses["loss_objectness"] = kernels.group_softmax_cross_entropy(
                logits[sampled], target, self.group_table, sources[sampled]
            )
            losses["loss_rpn_box_reg"] = F.smooth_l1_loss(
                pred_bbox_deltas[pos],
                torch.cat(regression_targets)[pos],
                beta=1 / 9,
                reduction="sum",
            ) / max(sampled.numel(), 1)
        return boxes, losses


class GroupSoftmaxRoIHeads(RoIHeads):
    """torchvision's box head with the GroupSoftmax classification loss."""

    def __init__(self, group_table: torch.Tensor, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.register_buffer("group_table", group_table.clone(), persistent=False)

    def forward(self, features, proposals, image_shapes, targets=None):
        if not self.training:
            return super().forward(features, proposals, image_shapes, targets)
        proposals, _, labels, regression_targets = self.select_training_samples(proposals, targets)
        box_features = self.box_head(self.box_roi_pool(features, proposals, image_shapes))
        class_logits, box_regression = self.box_predictor(box_features)
        sources = _sources_of(targets, [len(lab) for lab in labels], class_logits.device)
        labels, regression_targets = torch.cat(labels), torch.cat(regression_targets)
        loss_classifier = kernels.group_softmax_cross_entropy(
            class_logits, labels, self.group_table, sources
        )
        pos = torch.where(labels > 0)[0]
        box_regression = box_regression.reshape(len(labels), -1, 4)
        loss_box = F.smooth_l1_loss(
            box_regression[pos, labels[pos]], regression_targets[pos], beta=1 / 9, reduction="sum"
        ) / max(labels.numel(), 1)
        return [], {"loss_classifier": loss_classifier, "loss_box_reg": loss_box}


# --------------------------------------------------------------------------- construction


class Uint8RCNNTransform(GeneralizedRCNNTransform):
    """torchvision's resize-and-batch transform, taking uint8 images as they were decoded: the
    data pipeline keeps them uint8 (a quarter of float32's bytes through the worker queue and to
    the device), and they are converted and normalised here, once, on the model's device, in one
    fused multiply-add. Float images in [0, 1] are normalised as torchvision does."""

    def normalize(self, image: torch.Tensor) -> torch.Tensor:
        if image.is_floating_point():
            return super().normalize(image)
        if image.dtype != torch.uint8:
            raise TypeError(f"expected uint8 or float images, got {image.dtype}")
        device = image.device
        std = torch.as_tensor(self.image_std, dtype=torch.float32, device=device)[:, None, None]
        mean = torch.as_tensor(self.image_mean, dtype=torch.float32, device=device)[:, None, None]
        # (x / 255 - mean) / std == x * (1 / (255 std)) - mean / std
        return torch.addcmul(-mean / std, image.float(), 1.0 / (255.0 * std))


def _load_backbone_weights(net: nn.Module, path: str | Path, backbone: str) -> None:
    """A torchvision ImageNet classification checkpoint (e.g. ``mobilenet_v3_large-8738ca79.pth``
    or ``resnet50-0676ba61.pth``) or a plain state dict of the same network, loaded safely."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"model.net.backbone_weights={path}: file not found")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ConfigError(
            f"model.net.backbone_weights={path}: not a loadable state dict ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0]})"
        ) from None
    state = state.get("state_dict", state) if isinstance(state, dict) else state
    drop = ("fc.",) if backbone.startswith("resnet") else ("classifier.",)
    state = {k.removeprefix("module."): v for k, v in state.items() if not k.startswith(drop)}
    missing, unexpected = net.load_state_dict(state, strict=False)
    # the network's own classifier (fc / classifier) is not part of the detector
    missing = [k for k in missing if not k.startswith(drop)]
    if missing or unexpected:
        raise ConfigError(
            f"model.net.backbone_weights={path}: does not fit {backbone} "
            f"(missing {missing[:3]}..., "
            f"unexpected {unexpected[:3]}...)"
        )
    log.info("Loaded %s backbone weights from %s", backbone, path)


def build_faster_rcnn(
    backbone: str,
    num_classes: int,
    num_sources: int,
    group_table: torch.Tensor,
    loss: str = "group_softmax",
    backbone_weights: str | None = None,
    trainable_backbone_layers: int | None = None,
    anchor_sizes: list[int] | None = None,
    **detector_kwargs,
) -> FasterRCNN:
    """torchvision Faster R-CNN (its ``fasterrcnn_*`` builders' architecture) with the GroupSoftmax
    RPN and box head when ``loss == "group_softmax"``. Without backbone weights every layer trains
    with ordinary batch norm; with them, torchvision's defaults (frozen batch norm, 3 trainable
    stages). ``anchor_sizes`` (default: torchvision's 32..512) are spread one per FPN level for
    ResNet-50 (5 levels) and all used on each of MobileNet's 3 levels, as torchvision does."""
    from torchvision.models import mobilenet_v3_large, resnet50

    if backbone not in BACKBONES:
        raise ConfigError(f"model.net.backbone={backbone!r}: expected one of {list(BACKBONES)}")
    if loss not in LOSSES:
        raise ConfigError(f"model.net.loss={loss!r}: expected one of {list(LOSSES)}")
    pretrained = backbone_weights is not None
    norm = misc_nn_ops.FrozenBatchNorm2d if pretrained else nn.BatchNorm2d
    if backbone == "resnet50_fpn":
        layers = (
            trainable_backbone_layers
            if trainable_backbone_layers is not None
            else (3 if pretrained else 5)
        )
        body = resnet50(weights=None, norm_layer=norm)
        feature_net = _resnet_fpn_extractor(body, layers)
        anchor_generator = None  # torchvision's default: 32, 64, 128, 256, 512, one per FPN level
        if anchor_sizes is not None:
            if len(anchor_sizes) != 5:
                raise ConfigError(
                    f"model.net.anchor_sizes={list(anchor_sizes)}: resnet50_fpn has 5 FPN "
                    "levels, give 5 sizes"
                )
            anchor_generator = AnchorGenerator(
                tuple((int(s),) for s in anchor_sizes), ((0.5, 1.0, 2.0),) * 5
            )
    else:
        layers = (
            trainable_backbone_layers
            if trainable_backbone_layers is not None
            else (3 if pretrained else 6)
        )
        body = mobilenet_v3_large(weights=None, norm_layer=norm)
        feature_net = _mobilenet_extractor(body, True, layers)
        sizes = (tuple(int(s) for s in anchor_sizes or (32, 64, 128, 256, 512)),) * 3
        anchor_generator = AnchorGenerator(sizes, ((0.5, 1.0, 2.0),) * len(sizes))
        detector_kwargs.setdefault("rpn_score_thresh", 0.05)
    model = FasterRCNN(
        feature_net,
        num_classes=num_classes,
        rpn_anchor_generator=anchor_generator,
        **detector_kwargs,
    )
    # read when training starts (GroupSoftmaxDetector.resolve), not here: the trunk's modules
    # are the feature extractor's, so loading into it later fills the detector
    model.load_backbone_weights = (
        functools.partial(_load_backbone_weights, body, backbone_weights, backbone)
        if pretrained
        else None
    )
    t = model.transform
    model.transform = Uint8RCNNTransform(
        t.min_size, t.max_size, t.image_mean, t.image_std, t.size_divisible, t.fixed_size
    )
    if loss == "softmax":
        return model
    old = model.rpn
    # the proposal counts per mode, through the RPN's public per-mode accessors
    top_n = {}
    for mode in ("training", "testing"):
        old.train(mode == "training")
        top_n[mode] = (old.pre_nms_top_n(), old.post_nms_top_n())
    old.train(model.training)
    num_anchors = old.head.bbox_pred.out_channels // 4
    head = RPNHead(feature_net.out_channels, num_anchors)
    head.cls_logits = nn.Conv2d(feature_net.out_channels, num_anchors * (num_sources + 1), 1)
    nn.init.normal_(head.cls_logits.weight, std=0.01)
    nn.init.zeros_(head.cls_logits.bias)
    model.rpn = GroupSoftmaxRPN(
        num_sources,
        old.anchor_generator,
        head,
        old.proposal_matcher.high_threshold,
        old.proposal_matcher.low_threshold,
        old.fg_bg_sampler.batch_size_per_image,
        old.fg_bg_sampler.positive_fraction,
        {mode: pre for mode, (pre, _) in top_n.items()},
        {mode: post for mode, (_, post) in top_n.items()},
        old.nms_thresh,
        old.score_thresh,
    )
    heads = model.roi_heads
    model.roi_heads = GroupSoftmaxRoIHeads(
        group_table,
        heads.box_roi_pool,
        heads.box_head,
        heads.box_predictor,
        heads.proposal_matcher.high_threshold,
        heads.proposal_matcher.low_threshold,
        heads.fg_bg_sampler.batch_size_per_image,
        heads.fg_bg_sampler.positive_fraction,
        heads.box_coder.weights,
        heads.score_thresh,
        heads.nms_thresh,
        heads.detections_per_img,
    )
    return model


def warmup_multistep(warmup_iters: int, warmup_factor: float, milestones: list[int], gamma: float):
    """torchvision's detection reference schedule as a per-iteration LambdaLR factor: linear warmup
    from ``warmup_factor`` over ``warmup_iters`` iterations, times gamma at each milestone
    (iterations)."""

    def factor(it: int) -> float:
        warm = 1.0
        if it < warmup_iters:
            alpha = it / warmup_iters
            warm = warmup_factor * (1 - alpha) + alpha
        return warm * gamma ** sum(it >= m for m in milestones)

    return factor


def warmup_multistep_lr(
    optimizer: torch.optim.Optimizer,
    steps_per_epoch: int,
    warmup_iters: int,
    warmup_factor: float,
    lr_steps: list[int],
    gamma: float,
) -> torch.optim.lr_scheduler.LambdaLR:
    """torchvision's detection schedule, stepped per iteration: ``warmup_iters`` of linear
    warmup (at most one epoch), then x ``gamma`` at each epoch of ``lr_steps``."""
    warmup = min(warmup_iters, steps_per_epoch - 1) if warmup_iters else 0
    rule = warmup_multistep(warmup, warmup_factor, [e * steps_per_epoch for e in lr_steps], gamma)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, rule)


# --------------------------------------------------------------------------- Lightning module


class GroupSoftmaxDetector(ZooModule):
    """Faster R-CNN trained on several label sources at once.

    ``classes`` / ``sources`` come from the data config (``${data.classes}``, ``${data.sources}``):
    the group table is derived from the sources' label maps, exactly as the data module does.
    Logs ``train/loss`` and its parts (``train/loss_classifier``, ``train/loss_box_reg``,
    ``train/loss_objectness``, ``train/loss_rpn_box_reg``), ``val/mAP``, ``val/mAP_50``,
    ``val/mAP_75``, ``val/mAP_small|medium|large``, ``val/AR_1|10|100``, ``val/voc07_mAP_50``,
    ``val/voc_mAP_50`` (the same under ``test/``, plus ``test/AP/<class>`` and
    ``test/AP_50/<class>``), and figures: precision-recall curves and AP per class (validation
    epochs and test), test images with boxes drawn."""

    @classmethod
    def upgrade_config(cls, node: dict) -> dict | None:
        """A model node logged with flat keys, in today's shape (``zoo.legacy``)."""
        return None if "net" in node else upgrade_flat_config(node)

    def __init__(
        self,
        classes: list[str],
        sources: dict[str, dict],
        net: Callable[..., nn.Module],
        optimizer: OptimizerFactory,
        scheduler: SchedulerFactory | None,
        figure_images: int,
        figure_score_threshold: float,
        figures_every_n_epochs: int,
    ):
        """``net``: a partial of :func:`build_faster_rcnn` (backbone, loss, sizes, further
        FasterRCNN arguments); the module adds the class and source counts and the group table,
        derived from ``classes`` / ``sources``. ``optimizer``: a partial of an optimizer, given
        two parameter groups (weights; norms and biases, without weight decay).
        ``scheduler``: a partial called with ``optimizer`` and ``steps_per_epoch``, stepped per
        iteration (:func:`warmup_multistep_lr`)."""
        super().__init__()
        self.class_names = [str(c) for c in classes]
        self.source_names = [str(s) for s in sources]
        label_maps = [dict((spec or {}).get("label_map") or {}) for spec in sources.values()]
        group_table = derive_group_table(label_maps, self.class_names)
        self.save_hyperparameters(
            {
                "classes": self.class_names,
                "source_names": self.source_names,
                "label_maps": label_maps,
                "figure_images": figure_images,
                "figure_score_threshold": figure_score_threshold,
                "figures_every_n_epochs": figures_every_n_epochs,
            },
            logger=False,
        )
        self.register_buffer("group_table", group_table)
        self.net = net(
            num_classes=len(self.class_names) + 1,
            num_sources=len(self.source_names),
            group_table=group_table,
        )
        self.optimizer_factory, self.scheduler_factory = optimizer, scheduler
        self.val_scorer = DetectionScorer(self.class_names, group_table=group_table)
        self.test_scorer = DetectionScorer(self.class_names, group_table=group_table)
        self._shown: list = []
        self.resolved = getattr(self.net, "load_backbone_weights", None) is None

    def configure_model(self) -> None:
        """Lightning's hook, before any checkpoint is restored: the backbone weights are read."""
        self.resolve()

    def resolve(self) -> None:
        """Read the backbone weights the config names (``model.net.backbone_weights``). Once;
        never after ``load_state_dict``, whose weights win."""
        if not self.resolved:
            self.net.load_backbone_weights()
            self.resolved = True

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """Refuses weights trained with another group table (the label maps of the data config
        decide which class is which; silently mixing them would mislabel every box)."""
        stored = state_dict.get("group_table")
        if stored is not None and not torch.equal(stored.cpu(), self.group_table.cpu()):
            raise ConfigError(
                f"the checkpoint was trained with the group table {stored.tolist()} but "
                "data.classes / "
                f"data.sources.*.label_map give {self.group_table.tolist()}: use the run's data "
                "config"
            )
        result = super().load_state_dict(state_dict, strict=strict, assign=assign)
        self.resolved = True
        return result

    def parameter_groups(self) -> dict[str, nn.Module]:
        return {"backbone": self.net.backbone, "rpn": self.net.rpn, "roi_heads": self.net.roi_heads}

    def forward(self, images: list[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        return self.net(images)

    def on_fit_start(self) -> None:
        super().on_fit_start()
        table = "; ".join(
            f"{n}: {row}" for n, row in zip(self.source_names, self.group_table.tolist())
        )
        self.emit(Tag("zoo.group_table", table[:5000]))
        dm = getattr(self.trainer, "datamodule", None)
        for key, n in (dm.skipped() if hasattr(dm, "skipped") else {}).items():
            self.emit(Count(f"data/skipped/{key}", n))

    # ------------------------------------------------------------------ training

    def _count_unreadable(self, batch, split: str) -> None:
        """Images ``on_bad=skip`` left out of this batch (``detection_collate``'s third part),
        summed over the epoch as ``<split>/unreadable_images``."""
        n = len(batch[2]) if len(batch) > 2 else 0
        self.log(
            f"{split}/unreadable_images",
            float(n),
            on_step=False,
            on_epoch=True,
            reduce_fx="sum",
            batch_size=1,
            sync_dist=True,
        )

    def training_step(self, batch, batch_idx: int) -> torch.Tensor | None:
        images, targets = batch[:2]
        self._count_unreadable(batch, "train")
        if not images:  # every image of the batch was left out
            return None
        losses = self.net(images, targets)
        loss = sum(losses.values())
        if not torch.isfinite(loss):
            raise FloatingPointError(
                f"non-finite detection loss at step {self.global_step}: "
                f"{ {k: float(v) for k, v in losses.items()} } (lower model.optimizer.lr?)"
            )
        bs = len(images)
        self.log("train/loss", loss, on_step=False, on_epoch=True, prog_bar=True, batch_size=bs)
        for k, v in losses.items():
            self.log(f"train/{k}", v, on_step=False, on_epoch=True, batch_size=bs)
        return loss

    def configure_optimizers(self):
        decay, no_decay = [], []
        for p in self.net.parameters():
            if p.requires_grad:
                (no_decay if p.ndim <= 1 else decay).append(p)
        opt = self.optimizer_factory(
            params=[
                {"params": decay, "name": "weights"},
                {"params": no_decay, "weight_decay": 0.0, "name": "norms_biases"},
            ]
        )
        if self.scheduler_factory is None:
            return opt
        max_epochs = max(1, self.trainer.max_epochs or 1)
        total = self.trainer.estimated_stepping_batches
        per_epoch = max(1, int(total // max_epochs)) if total != float("inf") else 1
        sched = self.scheduler_factory(optimizer=opt, steps_per_epoch=per_epoch)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    # ------------------------------------------------------------------ evaluation

    def _eval_step(self, batch, scorer: DetectionScorer) -> None:
        images, targets = batch[:2]
        if not images:
            return
        preds = self.net(images)
        scorer.update(preds, targets)
        # a few images of every source
        quota = -(-self.hparams.figure_images // len(self.source_names))
        for image, t, p in zip(images, targets, preds):
            same_source = sum(int(s["source"]) == int(t["source"]) for _, s, _ in self._shown)
            if len(self._shown) < self.hparams.figure_images and same_source < quota:
                self._shown.append(
                    (
                        image.cpu(),
                        {k: v.cpu() for k, v in t.items() if torch.is_tensor(v)},
                        {k: v.detach().cpu() for k, v in p.items()},
                    )
                )

    def on_validation_epoch_start(self) -> None:
        self.val_scorer.reset()
        self._shown = []

    def validation_step(self, batch, batch_idx: int) -> None:
        self._count_unreadable(batch, "val")
        self._eval_step(batch, self.val_scorer)

    def on_validation_epoch_end(self) -> None:
        scores = self._log_scores("val", self.val_scorer)
        if self.epoch_due(self.hparams.figures_every_n_epochs):
            self._emit_figures(scores, "val", f"_epoch{self.current_epoch:03d}")

    def on_test_epoch_start(self) -> None:
        self.test_scorer.reset()
        self._shown = []

    def test_step(self, batch, batch_idx: int) -> None:
        self._count_unreadable(batch, "test")
        self._eval_step(batch, self.test_scorer)

    def on_test_epoch_end(self) -> None:
        scores = self._log_scores("test", self.test_scorer)
        for row in scores.per_class:
            for key in ("AP", "AP_50"):
                if row[key] == row[key]:  # not NaN
                    exact = torch.tensor(row[key], dtype=torch.float64)
                    self.log(f"test/{key}/{row['class']}", exact, sync_dist=True)
        self._emit_figures(scores, "test", "")
        gt, results = self.test_scorer.to_coco()  # what was scored, as COCO files
        self.emit(
            File("predictions/test_groundtruth.json", write=lambda path: _write_json(gt, path)),
            File("predictions/test_results.json", write=lambda path: _write_json(results, path)),
        )
        groups = "; ".join(
            f"{n}: {r}" for n, r in zip(self.source_names, self.group_table.tolist())
        )
        intro = Section("Detection results").paragraph(
            "COCO metrics: pycocotools' COCOeval as faster-coco-eval computes it (float64); "
            "VOC AP@.5 from zoo.metrics.voc (VOC2007 11-point and VOC2010+ all-point). Each test "
            "image is scored only on the classes its source annotates. Group table (rows: "
            f"sources, columns: background + classes): {groups}."
        )
        shown = list(self._shown)
        draw = (lambda: self._detections_figure(shown, "test")) if shown else None
        self.emit(intro, *detection_sections(scores, draw))

    def _log_scores(self, split: str, scorer: DetectionScorer):
        # DDP: every rank scores all images (a mean of per-shard mAPs is not the mAP)
        scorer.gather()
        scores = scorer.compute()
        for name, value in scores.metrics.items():
            # -1: no ground truth of that size; NaN: no class scored
            if value == value and value >= 0:
                # identical on every rank after gather(); sync_dist keeps Lightning's DDP
                # check quiet
                # a float64 tensor: Lightning would store a Python float as float32 (~1e-8 off)
                exact = torch.tensor(value, dtype=torch.float64)
                self.log(
                    f"{split}/{name}", exact, prog_bar=name in ("mAP", "mAP_50"), sync_dist=True
                )
        return scores

    def _names(self) -> dict[int, str]:
        return {i + 1: n for i, n in enumerate(self.class_names)}

    def _emit_figures(self, scores, split: str, suffix: str) -> None:
        self.emit(
            Figure(
                f"figures/{split}/pr_curves{suffix}.png",
                lambda: pr_curves_figure(scores, f"{split}: precision-recall, IoU 0.5"),
            ),
            Figure(
                f"figures/{split}/ap_per_class{suffix}.png",
                lambda: per_class_ap_figure(scores, f"{split}: AP per class"),
            ),
        )
        if self._shown:
            shown = list(self._shown)
            self.emit(
                Figure(
                    f"figures/{split}/detections{suffix}.png",
                    lambda: self._detections_figure(shown, split),
                )
            )

    def _detections_figure(self, shown, split: str):
        images, targets, preds = zip(*shown)
        return detections_figure(
            list(images),
            list(targets),
            list(preds),
            self._names(),
            self.hparams.figure_score_threshold,
            f"{split}: ground truth of the image's source (green, dashed); all predictions "
            f"with score >= {self.hparams.figure_score_threshold} (red)",
        )

    # ------------------------------------------------------------------ serving

    def serving_input(self, batch) -> np.ndarray:
        image = batch[0][0]
        if not image.is_floating_point():
            image = image.float() / 255  # the served model takes [0, 1] floats
        return image[None].detach().cpu().numpy()

    def export_network(self):
        raise ConfigError(
            "detection models are not exported: torchvision's Faster R-CNN exports to ONNX only "
            "through the TorchScript-based exporter (opset 11, a fixed image size per model), and "
            "torch.export stops at its data-dependent proposal and NMS shapes; serve it with the "
            "logged mlflow Model instead"
        )

    @torch.no_grad()
    def serve(self, inputs: np.ndarray) -> pd.DataFrame:
        """Detections for images [B, 3, H, W] in [0, 1]: one row per box (image index, class
        id and name, score, x1, y1, x2, y2 in pixels)."""
        images = list(torch.as_tensor(inputs, device=self.device))
        return detections_frame(self.net(images), self.class_names)

    def raw_inputs(self) -> DetectionImages:
        return DetectionImages(self)


BOX_COLUMNS = ["image", "label", "class", "score", "x1", "y1", "x2", "y2"]


def detections_frame(preds: list[dict[str, Any]], class_names: list[str]) -> pd.DataFrame:
    """One row per box of per-image predictions (``boxes``, ``labels``, ``scores``)."""
    rows = []
    for i, pred in enumerate(preds):
        for box, label, score in zip(
            np.asarray(pred["boxes"]).tolist(),
            np.asarray(pred["labels"]).tolist(),
            np.asarray(pred["scores"]).tolist(),
        ):
            rows.append([i, label, class_names[label - 1], score, *box])
    frame = pd.DataFrame(rows, columns=BOX_COLUMNS)
    return frame.astype(
        {c: "int64" if c in ("image", "label") else "float64" for c in BOX_COLUMNS if c != "class"}
    )


class DetectionImages(ImageInputs):
    """Raw photos, uint8 (H, W, 3) of any size: the detector resizes and normalises them
    itself. The answer is a table of boxes; predict.py writes COCO results (``detections.json``,
    which ``evaluate.py task=detection`` scores) and the images with their boxes drawn."""

    batch_size = 2

    def __init__(self, module: GroupSoftmaxDetector):
        super().__init__(module)
        self.class_names = list(module.class_names)
        self.annotations: Path | None = None
        self.score_threshold = 0.5

    def configure(self, cfg: Any) -> None:
        self.annotations = Path(cfg.annotations) if cfg.get("annotations") else None
        self.score_threshold = float(cfg.get("score_threshold", 0.5))

    def is_tensor_input(self, model_input: Any) -> bool:
        """[B, 3, H, W] floats in [0, 1], the served form before raw inputs."""
        x = model_input
        return isinstance(x, np.ndarray) and x.dtype.kind == "f" and x.ndim == 4 and x.shape[1] == 3

    @torch.no_grad()
    def answer(self, values: list[np.ndarray]) -> list[dict[str, Any]]:
        device = self.module.device
        images = [torch.from_numpy(v).permute(2, 0, 1).to(device) for v in values]
        return [
            {k: pred[k].cpu().numpy() for k in ("boxes", "labels", "scores")}
            for pred in self.module.net(images)
        ]

    def table(self, records: list[dict[str, Any]]) -> pd.DataFrame:
        return detections_frame(records, self.class_names)

    @functools.cached_property
    def ground_truth(self) -> tuple[dict[str, int], dict[int, int]] | None:
        """``annotations=``: (image ids by file name, category ids by the model's label), or
        None without annotations."""
        if self.annotations is None:
            return None
        try:
            gt = json.loads(self.annotations.read_text())
            by_file = {Path(im["file_name"]).name: int(im["id"]) for im in gt["images"]}
            by_name = {c["name"]: int(c["id"]) for c in gt["categories"]}
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise DataError(
                f"annotations={self.annotations}: not a COCO ground-truth JSON ({exc})"
            ) from None
        # a class matches a ground-truth category of its name, or of a name a source's
        # label map gives it (e.g. COCO's "motorcycle" for a unified "motorbike")
        aliases = {n: {n} for n in self.class_names}
        for label_map in self.module.hparams.get("label_maps") or []:
            for source_name, unified in dict(label_map).items():
                if unified in aliases:
                    aliases[unified].add(str(source_name))
        categories = {
            label: by_name[next(a for a in sorted(aliases[n]) if a in by_name)]
            for label, n in enumerate(self.class_names, start=1)
            if aliases[n] & set(by_name)
        }
        if not categories:
            raise DataError(
                f"annotations={self.annotations}: none of its categories {sorted(by_name)} is a "
                f"class of this model ({self.class_names})"
            )
        return by_file, categories

    def leave_out(self, name: str) -> str | None:
        """With ``annotations=``: the images the ground truth does not name."""
        if self.ground_truth is not None and name not in self.ground_truth[0]:
            return f"not an image of annotations={self.annotations}"
        return None

    def writer(self, output: Path) -> CocoResultsWriter:
        return CocoResultsWriter(self, output)


class CocoResultsWriter(Writer):
    """``detections.json`` (COCO results) at the end, and each image with its boxes of score
    >= ``score_threshold`` drawn into ``images/`` as it comes. Ids: the ground truth's
    (``annotations=``: images by file name, classes by name or through the label maps; boxes
    of classes it does not annotate are left out), else 1..N in file order and the model's
    labels."""

    def __init__(self, raw: DetectionImages, output: Path):
        self.raw, self.output = raw, output
        self.drawn = output / "images"
        self.drawn.mkdir(exist_ok=True)
        self.results: list[dict[str, Any]] = []
        self.count = 0
        n = len(raw.class_names)
        self.categories = (
            raw.ground_truth[1] if raw.ground_truth else {i: i for i in range(1, n + 1)}
        )

    def add(self, items: list[Item], records: list[dict[str, Any]]) -> None:
        from torchvision.io import write_png
        from torchvision.utils import draw_bounding_boxes

        names = self.raw.class_names
        for item, pred in zip(items, records):
            self.count += 1
            image_id = self.raw.ground_truth[0][item.name] if self.raw.ground_truth else self.count
            for (x1, y1, x2, y2), label, score in zip(
                pred["boxes"].tolist(), pred["labels"].tolist(), pred["scores"].tolist()
            ):
                if int(label) in self.categories:
                    self.results.append(
                        {
                            "image_id": image_id,
                            "category_id": self.categories[int(label)],
                            "bbox": [round(v, 2) for v in (x1, y1, x2 - x1, y2 - y1)],
                            "score": round(float(score), 5),
                        }
                    )
            keep = pred["scores"] >= self.raw.score_threshold
            image = torch.from_numpy(item.value).permute(2, 0, 1)
            if keep.any():
                labels = [
                    f"{names[int(c) - 1]} {s:.2f}"
                    for c, s in zip(pred["labels"][keep], pred["scores"][keep])
                ]
                boxes = torch.from_numpy(pred["boxes"][keep])
                image = draw_bounding_boxes(image, boxes, labels, colors="red", width=2)
            write_png(image, str(self.drawn / f"{Path(item.name).stem}.png"))

    def close(self) -> list[Path]:
        path = self.output / "detections.json"
        _write_json(self.results, path)
        return [path, self.drawn]


def _write_json(data, path: Path) -> None:
    Path(path).write_text(json.dumps(data))


# --------------------------------------------------------------------------- earlier configs


def upgrade_flat_config(old: dict[str, Any]) -> dict[str, Any]:
    """A detector model node with flat keys (``model.backbone``, ``model.lr``, ...) in the
    injected shape, with the same values."""
    net_keys = (
        "backbone",
        "loss",
        "backbone_weights",
        "trainable_backbone_layers",
        "anchor_sizes",
        "min_size",
        "max_size",
    )
    return {
        "_target_": "zoo.models.detection.GroupSoftmaxDetector",
        "_convert_": "all",
        "classes": old["classes"],
        "sources": old["sources"],
        "net": {
            "_target_": "zoo.models.detection.build_faster_rcnn",
            "_partial_": True,
            **{k: old.get(k) for k in net_keys},
            **(old.get("detector") or {}),
        },
        "optimizer": {
            "_target_": "torch.optim.SGD",
            "_partial_": True,
            "lr": old["lr"],
            "momentum": old["momentum"],
            "weight_decay": old["weight_decay"],
        },
        "scheduler": {
            "_target_": "zoo.models.detection.warmup_multistep_lr",
            "_partial_": True,
            "warmup_iters": old["warmup_iters"],
            "warmup_factor": old["warmup_factor"],
            "lr_steps": old["lr_steps"],
            "gamma": old["lr_gamma"],
        },
        **{
            k: old[k] for k in ("figure_images", "figure_score_threshold", "figures_every_n_epochs")
        },
    }
