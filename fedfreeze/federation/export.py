"""The federation's model export: which global model (the last round's, or the best pooled one), its
threshold and optional temperature, the reference histograms for a new site's label-free checks, and
the model folder (``model.json`` + ``weights.pt`` + ``MODEL_CARD.md``) ``fedfreeze evaluate`` reads.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from fedfreeze.adaptation.recalibration import fit_calibration
from fedfreeze.errors import DataError
from fedfreeze.evaluation.pooled import edge_logits
from fedfreeze.federation.coordinator import MODEL_DIR, Coordinator
from fedfreeze.federation.provenance import federation_provenance, federation_threshold
from fedfreeze.federation.records import RoundRecord
from fedfreeze.model_io import make_card, model_sha256, save_model
from fedfreeze.models.grouped import GroupedNet
from fedfreeze.operating_point import ScoreCalibration, after_card_calibration
from fedfreeze.reference_scores import ReferenceScores, reference_from_histograms

log = logging.getLogger("fedfreeze.coordinator")


def exported(coord: Coordinator) -> dict[str, Any]:
    """Which global model is exported, and the threshold and pooled figures that go with it."""
    if coord.fed.export == "best" and coord.best is not None:  # (None: no round's figures were decisive)
        return {
            "round": coord.best["round"],
            "rule": "best pooled validation AUROC of the training sites",
            "threshold": coord.best["threshold"],
            "threshold_interval": coord.best["threshold_interval"],
            "pooled": coord.best["pooled"],
            "state": coord.best["state"],
        }
    return {
        "round": coord.completed,
        "rule": "last round"
        if coord.fed.export == "last"
        else f"last round: no round's pooled validation AUROC was known to within best-max-range = "
        f"{coord.fed.best_max_range}",
        "threshold": coord.threshold,
        "threshold_interval": None,
        "pooled": None,
        "state": coord.state,
    }


def export_model(coord: Coordinator, final: RoundRecord | None = None) -> tuple[Path, dict[str, Any]]:
    """The exported global model as a model folder that ``fedfreeze evaluate`` reads, and what it is."""
    if final is not None:
        coord.note_scored(final, coord.state, coord.completed)
    chosen = exported(coord)
    if chosen["pooled"] is None and final is not None:
        chosen["pooled"], chosen["threshold_interval"] = final.pooled, final.threshold_interval
    model: GroupedNet = coord.model
    model.load_state_dict(chosen["state"])
    threshold = chosen["threshold"] if coord.binary else 0.5
    calibration = pooled_temperature(coord, chosen)
    if calibration is not None:  # the stored threshold moves with the scores: the same decisions
        threshold = float(calibration.apply(np.array([threshold]))[0])
    sha = model_sha256(model)
    points = {site: p for site, p in coord.shared_points.items() if p.model_sha256 == sha}
    if calibration is not None:  # sites fitted theirs on raw scores; a site's applies after the card's
        points = {site: after_card_calibration(p, calibration) for site, p in points.items()}
    chosen["operating_points"] = sorted(points)
    chosen["operating_points_for_other_weights"] = sorted(set(coord.shared_points) - set(points))
    provenance = federation_provenance(
        config=coord.cfg.model_dump(mode="json", by_alias=True),
        app_hash=coord.app_hash,
        history=coord.history,
        final=final,
        exported=chosen,
        threshold=federation_threshold(
            threshold,
            coord.fed.threshold,
            binary=coord.binary,
            interval=chosen["threshold_interval"],
            tolerance=coord.fed.threshold_tolerance,
            target=coord.fed.target_sensitivity,
        ),
        evaluation_sites=coord.fed.evaluation_sites,
        class_names=coord.cfg.model.class_names or [str(i) for i in range(coord.cfg.model.num_classes)],
    )
    card = make_card(
        model,
        coord.cfg.model,
        threshold=threshold,
        trained_by="fedfreeze federation",
        notes={
            "rounds": coord.completed,
            "rounds_planned": coord.fed.rounds,
            "exported_round": chosen["round"],
            "export_rule": chosen["rule"],
            "strategy": coord.fed.strategy,
            "bn_policy": coord.fed.bn_policy,
            "wise_alpha": coord.fed.wise_alpha,
            "threshold_rule": str(coord.fed.threshold),
            "threshold_interval": chosen["threshold_interval"],
        },
        provenance=provenance,
        reference_scores=pooled_reference(coord, chosen),
        calibration=calibration,
        operating_points=points,
    )
    info = {k: v for k, v in chosen.items() if k != "state"}
    return save_model(coord.out / MODEL_DIR, model, card), info


def pooled_temperature(coord: Coordinator, chosen: dict[str, Any]) -> ScoreCalibration | None:
    """``federation.calibrate = "temperature"``: temperature scaling fitted to the exported model's pooled
    validation histograms (each bin's cases at its centre logit), by ``recalibration.fit_calibration``."""
    hist = ((chosen.get("pooled") or {}).get("histograms") or {}) if coord.binary else {}
    if coord.fed.calibrate == "none" or not hist.get("neg") or not hist.get("pos"):
        return None
    logits = edge_logits(coord.edges)
    step = float(logits[2] - logits[1]) if len(logits) > 3 else 1.0
    inner = np.nan_to_num(logits, posinf=logits[-2] + step, neginf=logits[1] - step)
    centres = (inner[:-1] + inner[1:]) / 2
    z = np.r_[centres, centres]
    y = np.r_[np.zeros(len(centres)), np.ones(len(centres))]
    w = np.r_[np.asarray(hist["neg"], dtype=float), np.asarray(hist["pos"], dtype=float)]
    try:
        a, _ = fit_calibration(z[w > 0], y[w > 0], "temperature", w[w > 0])
    except DataError as err:
        log.warning("federation.calibrate = temperature: not fitted (%s); the scores stay as they are", err)
        return None
    return ScoreCalibration(
        method="temperature",
        a=a,
        fitted_on=f"pooled validation histograms of the training sites (after round {chosen['round']})",
    )


def pooled_reference(coord: Coordinator, chosen: dict[str, Any]) -> ReferenceScores | None:
    """The exported model's pooled validation histograms of the training sites (estimated from the
    cells they released): what a new site's label-free checks compare its scores with."""
    pooled = chosen.get("pooled") or {}
    hist = (pooled.get("histograms") or {}) if coord.binary else {}
    if not hist.get("neg") or not hist.get("pos"):
        return None
    about = pooled.get("cells") or {}
    k = int(about.get("min_cell_count", coord.fed.min_cell_count))
    how = "exact, the secure sum of the sites'" if "secure_sum" in about else f"estimated from cells of >= {k} cases"
    return reference_from_histograms(
        hist["neg"],
        hist["pos"],
        k,
        f"pooled validation of the training sites for the exported model (after round {chosen['round']}), {how}",
    )
