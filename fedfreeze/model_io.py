"""A model folder: ``model.json`` (how to rebuild it), ``weights.pt`` (every weight) and
``MODEL_CARD.md`` (``model.json`` rendered for people, ``model_card.py``).

The folder is the contract between training and judging: ``fedfreeze evaluate`` rebuilds any
model, site-level or federated, from it alone (architecture, input size, channels, normalisation,
adapters, decision threshold, class names), with no pretrained checkpoint needed. ``model.json``
also records where the model came from (``provenance``: code, app, configuration, sites, rounds,
threshold rule; ``provenance.py``) and what was adapted since (``adaptations``); a folder written
before provenance was recorded loads as before, with ``provenance`` None.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import Field

from fedfreeze import __version__
from fedfreeze.config import ModelConfig, Section, parse_json_strictly
from fedfreeze.errors import CheckpointError
from fedfreeze.model_card import CARD_MARKDOWN, render_card
from fedfreeze.models.adapters import adapter_rank
from fedfreeze.models.grouped import GroupedNet
from fedfreeze.models.registry import Normalize, build_model
from fedfreeze.operating_point import OperatingPoint, ScoreCalibration, state_sha256
from fedfreeze.outputs import crash_point
from fedfreeze.provenance import Provenance
from fedfreeze.reference_scores import ReferenceScores

CARD_FILE = "model.json"
WEIGHTS_FILE = "weights.pt"

log = logging.getLogger("fedfreeze.model_io")


class ModelCard(Section):
    """Everything needed to rebuild a trained model besides its weights."""

    model: ModelConfig
    adapter_groups: list[str] = Field(default_factory=list)
    adapter_rank: int = 8
    threshold: float = Field(0.5, gt=0.0, lt=1.0)
    class_names: list[str]
    pretrained_format: str | None = None
    trained_by: str = ""
    fedfreeze_version: str = __version__
    notes: dict[str, Any] = Field(default_factory=dict)
    calibration: ScoreCalibration | None = Field(
        None, description="binary models: a recalibration applied to every score before the threshold"
    )
    adaptations: list[dict[str, Any]] = Field(
        default_factory=list, description="what was adapted after training, from which model, in order"
    )
    provenance: Provenance | None = Field(
        None, description="what produced the model (None: a folder written before it was recorded)"
    )
    operating_points: dict[str, OperatingPoint] = Field(
        default_factory=dict,
        description="site name -> the threshold that site fitted on its own patients (operating_point.py)",
    )
    local_site: str | None = Field(
        None, description="the site this folder was adapted at: its operating point is the one used by default"
    )
    reference_scores: ReferenceScores | None = Field(
        None, description="binary models: per-class validation scores of the training data, for label-free checks"
    )
    weights_sha256: str | None = Field(
        None, description="SHA-256 of weights.pt, set by save_model (None: a folder written before it was recorded)"
    )


def make_card(model: GroupedNet, cfg: ModelConfig, **fields: Any) -> ModelCard:
    """A card for ``model``, recording the normalisation it actually uses and its adapters."""
    norm = model.normalize
    assert isinstance(norm, Normalize), "every registry model normalises its input"
    resolved = cfg.model_copy(update={"mean": norm.mean.flatten().tolist(), "std": norm.std.flatten().tolist()})
    adapters = list(model.adapters.keys())
    rank = adapter_rank(model.adapters[adapters[0]]) if adapters else 8
    class_names = fields.pop("class_names", None) or cfg.class_names or [str(i) for i in range(cfg.num_classes)]
    return ModelCard(model=resolved, adapter_groups=adapters, adapter_rank=rank, class_names=class_names, **fields)


def save_model(folder: str | Path, model: GroupedNet, card: ModelCard, *, weights_from: Path | None = None) -> Path:
    """Write ``weights.pt``, ``MODEL_CARD.md`` and ``model.json`` (recording the weights' SHA-256)
    into ``folder`` (created if needed).

    Each file is written aside and renamed into place, ``model.json`` last: a folder interrupted
    half-way holds either no ``model.json`` or one whose hash does not match the weights beside it,
    and ``load_model`` refuses both (commands also write the whole folder aside, ``outputs.py``).
    ``weights_from``: copy this weights file byte for byte instead (``model`` holds the same weights).
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    weights_tmp = folder / f".{WEIGHTS_FILE}.tmp"
    if weights_from is not None:
        shutil.copyfile(weights_from, weights_tmp)
    else:
        state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
        with weights_tmp.open("wb") as handle:
            torch.save(state, handle)
            handle.flush()
            os.fsync(handle.fileno())
    card = card.model_copy(update={"weights_sha256": file_sha256(weights_tmp)})
    weights_tmp.replace(folder / WEIGHTS_FILE)
    crash_point("weights-written")
    write_model_card(folder, card)
    _write_text_atomic(folder / CARD_FILE, card.model_dump_json(by_alias=True, indent=2) + "\n")
    return folder


def _write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    tmp.replace(path)


def write_model_card(folder: str | Path, card: ModelCard) -> Path:
    """(Re)write ``folder/MODEL_CARD.md`` from ``card``, naming the sha256 of the folder's weights file."""
    folder = Path(folder)
    weights = folder / WEIGHTS_FILE
    text = render_card(card, weights_sha256=file_sha256(weights) if weights.is_file() else None)
    _write_text_atomic(folder / CARD_MARKDOWN, text)
    return folder / CARD_MARKDOWN


def read_card(folder: str | Path) -> ModelCard:
    """``model.json``, validated strictly: a number written as a string (``"0.3"``) is refused, not
    converted, so a hand-edited card cannot pass for a written one."""
    folder = Path(folder)
    path = folder / CARD_FILE
    if not path.is_file():
        raise CheckpointError(f"{folder} is not a model folder: {CARD_FILE} is missing")
    text = path.read_text(encoding="utf-8")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{path}: not valid JSON: {err}") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return parse_json_strictly(text, ModelCard, str(path))


def rebuild(card: ModelCard) -> GroupedNet:
    """The architecture described by ``card`` with untrained weights and the card's normalisation."""
    cfg = card.model.model_copy(update={"weights": "none"})
    model, _ = build_model(cfg, card.adapter_groups, card.adapter_rank)
    return model


def file_sha256(path: Path) -> str:
    """SHA-256 of a file (a model folder's ``weights.pt``), read in 1 MiB blocks: what an adaptation
    record names its source by."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    """A weights file as a state dict, read with ``weights_only`` (no code runs); a corrupt, truncated or
    foreign file is one ``CheckpointError`` line naming it, whatever torch's unpickler raised."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - torch raises many types for a bad file; all mean the same here
        raise CheckpointError(
            f"{path} is not a readable fedfreeze weights file (corrupt, truncated or another "
            f"format): {type(err).__name__}: {_first_line(err)}"
        ) from None
    if not isinstance(state, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        raise CheckpointError(f"{path} does not hold a state dict of named tensors (got {type(state).__name__})")
    return state


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0][:300] if text else ""


def load_model(folder: str | Path) -> tuple[GroupedNet, ModelCard]:
    """Rebuild a saved model; a weights file that does not match its card is an error."""
    folder = Path(folder)
    card = read_card(folder)
    model = rebuild(card)
    path = folder / WEIGHTS_FILE
    if not path.is_file():
        raise CheckpointError(f"{folder} is not a model folder: {WEIGHTS_FILE} is missing")
    check_weights_hash(folder, card)
    state = read_weights(path)
    try:
        result = model.load_state_dict(state, strict=False)
    except (RuntimeError, ValueError) as err:
        raise CheckpointError(
            f"{path} cannot be loaded into the model {CARD_FILE} describes: {_first_line(err)}"
        ) from None
    if result.missing_keys or result.unexpected_keys:
        raise CheckpointError(
            f"{path} does not match {CARD_FILE}: missing {result.missing_keys[:5]}, "
            f"unexpected {result.unexpected_keys[:5]}"
        )
    model.eval()
    return model, card


def model_sha256(model: GroupedNet) -> str:
    """The content hash that site operating points name their model by (``operating_point.state_sha256``)."""
    return state_sha256(model.state_dict())


def check_weights_hash(folder: Path, card: ModelCard) -> None:
    """``weights.pt`` must be the file ``model.json`` was written with; a folder from before the hash
    was recorded loads with a note."""
    if card.weights_sha256 is None:
        log.warning(
            "note: %s/%s records no weights_sha256 (written by an earlier fedfreeze): its weights are not checked",
            folder,
            CARD_FILE,
        )
        return
    actual = file_sha256(folder / WEIGHTS_FILE)
    if actual != card.weights_sha256:
        raise CheckpointError(
            f"{folder / WEIGHTS_FILE} does not match {CARD_FILE}: its SHA-256 is {actual[:12]}..., the card "
            f"records {card.weights_sha256[:12]}... (a partly written or altered folder)"
        )


def model_scores(model: GroupedNet, card: ModelCard, images: torch.Tensor, device: torch.device) -> np.ndarray:
    """The scores a saved model gives ``images``, its card's calibration applied: what the model's
    threshold is meant for. Every scorer of a model folder (evaluate, adapt, site-train --init) uses it."""
    from fedfreeze.training.engine import predict_scores

    scores = predict_scores(model, images, device)
    if card.calibration is not None and scores.ndim == 1:
        scores = card.calibration.apply(scores)
    return scores
