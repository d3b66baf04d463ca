"""``fedfreeze evaluate``: score a saved model folder on labelled data it never saw."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fedfreeze.data.dataset import load_image_set
from fedfreeze.metrics import classification_metrics
from fedfreeze.model_io import load_model
from fedfreeze.training.engine import predict_scores, resolve_device


def evaluate_model(
    model_dir: str | Path,
    data_path: str | Path,
    *,
    split: str | None = None,
    device: str = "auto",
    progress: bool = False,
) -> dict[str, Any]:
    """Metrics of the model in ``model_dir`` on ``data_path`` at the model's stored threshold.

    The returned keys ``auroc, balanced_accuracy, f1, sensitivity, specificity, n`` are a stable
    contract: every model, site-level or federated, is judged by them.
    """
    model, card = load_model(model_dir)
    cfg = card.model
    data = load_image_set(
        data_path,
        image_size=cfg.input_size,
        channels=cfg.in_channels,
        split=split,
        class_names=card.class_names,
        num_classes=cfg.num_classes,
        progress=progress,
    )
    data.require_nonempty()
    data.require_classes(2, why="AUROC needs both classes in the evaluation data")
    scores = predict_scores(model, data.images, resolve_device(device))
    metrics = classification_metrics(data.labels.numpy(), scores, card.threshold)
    return {**metrics, "model": str(model_dir), "data": str(data_path), "backbone": cfg.backbone}
