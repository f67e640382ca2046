"""Evaluation metrics that torchmetrics does not provide (VOC average precision)."""
