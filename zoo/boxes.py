"""What detection's data, metrics and models share, so that none of them imports another:
box IoU, the error an annotation entry raises when a key is missing or of the wrong type, and
the group table of joint datasets with different label sets."""

from __future__ import annotations

from contextlib import contextmanager

import numpy as np
import torch

from zoo.errors import ConfigError, DataError


def box_iou(box: np.ndarray, boxes: np.ndarray, pixel_inclusive: bool = False) -> np.ndarray:
    """IoU of one xyxy box with many; ``pixel_inclusive`` adds 1 to widths/heights as the VOC
    devkit does for integer pixel coordinates."""
    one = 1.0 if pixel_inclusive else 0.0
    ix1, iy1 = np.maximum(boxes[:, 0], box[0]), np.maximum(boxes[:, 1], box[1])
    ix2, iy2 = np.minimum(boxes[:, 2], box[2]), np.minimum(boxes[:, 3], box[3])
    iw, ih = np.maximum(ix2 - ix1 + one, 0.0), np.maximum(iy2 - iy1 + one, 0.0)
    inter = iw * ih
    area = (box[2] - box[0] + one) * (box[3] - box[1] + one)
    areas = (boxes[:, 2] - boxes[:, 0] + one) * (boxes[:, 3] - boxes[:, 1] + one)
    return inter / np.maximum(area + areas - inter, np.finfo(float).eps)


@contextmanager
def entry_errors(where: str):
    """A missing key or a wrong type in one annotation entry becomes an error naming it."""
    try:
        yield
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        detail = (
            f"missing key {exc}" if isinstance(exc, KeyError) else f"{type(exc).__name__}: {exc}"
        )
        raise DataError(f"{where}: malformed entry ({detail})") from None


def derive_group_table(label_maps: list[dict[str, str | None]], classes: list[str]) -> torch.Tensor:
    """[S, C + 1] integer group ids: column 0 is background (group 0); class c (1-based in
    ``classes``) is group c for a source whose label map reaches it, else group 0."""
    table = torch.zeros(len(label_maps), len(classes) + 1, dtype=torch.long)
    index = {name: i + 1 for i, name in enumerate(classes)}
    for s, label_map in enumerate(label_maps):
        for src_name, unified in label_map.items():
            if unified is None:
                continue
            if unified not in index:
                raise ConfigError(
                    f"label map of source {s}: {src_name!r} -> {unified!r}, which is not one of "
                    f"the classes {classes}"
                )
            table[s, index[unified]] = index[unified]
    return table
