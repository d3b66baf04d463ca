"""What a hospital site does in a round, without any Flower types.

In a deployment every message starts a fresh process, so nothing survives in memory between
rounds: what a site reuses lives in its state folder on its own disk (decoded images, backbone
features keyed by the frozen weights' hash, and under FedBN its own BatchNorm layers). Every such
file is read with ``weights_only=True`` (tensors and plain values, never code): whoever can write
the state folder cannot make the site run anything, and an entry that does not read as expected is
decoded anew. The job decides nothing about which files a site opens: image paths stay inside the
site's data folder unless the site allows otherwise, and a pretrained checkpoint is opened only if
the site names it itself (``--weights``), never because the job's ``model.weights`` does.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedfreeze import __version__
from fedfreeze.adaptation.recalibration import recalibrate
from fedfreeze.adaptation.threshold_rules import Rule
from fedfreeze.config import ModelConfig
from fedfreeze.data.dataset import MANIFEST_NAME, ImageSet, load_image_set
from fedfreeze.data.labels import resolve_class_names
from fedfreeze.data.manifest import read_manifest
from fedfreeze.data.splits import split_patients
from fedfreeze.errors import DataError, ProtocolError
from fedfreeze.evaluation.cells import release_cells
from fedfreeze.evaluation.pooled import class_histograms, multiclass_confusion, score_bin_edges, snap_threshold
from fedfreeze.federation.exchange import (
    ExchangePlan,
    changed_keys,
    check_arrays,
    frozen_hash,
    plan_for,
    set_trainable_state,
    subset,
)
from fedfreeze.federation.protocol import EVALUATE_ROLE, OWN_FIGURES, TRAIN_ROLE, RoundOrders
from fedfreeze.federation.secure_stats import statistics_vector
from fedfreeze.federation.site_stages import stage_for
from fedfreeze.inference.engine import InferenceSettings
from fedfreeze.metrics import binary_metrics, multiclass_metrics
from fedfreeze.model_io import read_weights
from fedfreeze.models.checkpoints import names_a_file
from fedfreeze.models.grouped import GroupedNet
from fedfreeze.operating_point import Evidence, OperatingPoint, ScoreCalibration, state_sha256
from fedfreeze.provenance import now_utc, site_data_metrics
from fedfreeze.training.dynamic_freeze import updated_keys
from fedfreeze.training.engine import predict_scores, resolve_device
from fedfreeze.training.features import FeatureCache
from fedfreeze.training.freezing import apply_parts

log = logging.getLogger("fedfreeze.site")


@dataclass
class SiteReply:
    """What a site returns: trained arrays, the frozen-weights hash, and aggregate numbers only."""

    arrays: dict[str, torch.Tensor]
    frozen_hash: str
    metrics: dict[str, Any] = field(default_factory=dict)
    role: str = TRAIN_ROLE
    operating_point: OperatingPoint | None = None  # final evaluation, only when the site shares it
    note: str | None = None  # for the site's own log (e.g. why it has no operating point): never sent
    # secure aggregation: the exact validation statistics, which leave the site only masked (flower/secagg_site.py)
    secure_vector: np.ndarray | None = None
    own_figures: dict[str, float] = field(default_factory=dict)  # only when the site shares them


class SiteRuntime:
    """One site's data, state folder and model building."""

    def __init__(
        self,
        data_path: str | Path,
        site: str,
        state_dir: str | Path,
        *,
        weights: str | None = None,
        device: str = "auto",
        max_train_memory_mb: float | None = None,
        outside_paths: bool = False,
        job_weights: bool = False,
        share_operating_point: bool = False,
        share_site_figures: bool = False,
    ) -> None:
        self.data_path = Path(data_path)
        self.site = site
        self.state_dir = Path(state_dir)
        self.weights = weights  # a site-local checkpoint path overriding the coordinator's model.weights
        # the site's manifest may name images outside its folder (the site's own choice, never the job's)
        self.outside_paths = outside_paths
        # the job's model.weights may name a file for this site to open: a simulation only, where the
        # job and the data are one person's
        self.job_weights = job_weights
        self.device = resolve_device(device)
        # this site's memory for training, overriding the coordinator's train.max-train-memory-mb
        self.max_train_memory_mb = max_train_memory_mb
        # the site's own choice: its operating point stays in its state folder unless this is set
        self.share_operating_point = share_operating_point
        # the site's own choice: its exact validation figures (AUROC, balanced accuracy, F1) travel only if set
        self.share_site_figures = share_site_figures

    # ------------------------------------------------------------------ data
    def datasets(self, orders: RoundOrders) -> tuple[ImageSet, ImageSet]:
        """The site's training and validation splits (by patient), decoded once and kept on disk."""
        data = self._decoded(orders.model)
        data.require_nonempty(f"site {self.site!r} has no images to train on")
        data.require_classes(2, why=f"site {self.site!r} needs both classes for training and validation")
        train_idx, val_idx = split_patients(
            data.labels.numpy(), data.patient_ids, test_fraction=orders.val_fraction, seed=orders.seed
        )
        return data.subset(train_idx), data.subset(val_idx)

    def _decoded(self, cfg: ModelConfig) -> ImageSet:
        key = self._data_key(cfg)
        path = self.state_dir / "data" / f"{key}.pt"
        cached = read_cached_images(path)
        if cached is not None:
            return cached
        data = load_image_set(
            self.data_path,
            image_size=cfg.input_size,
            channels=cfg.in_channels,
            class_names=cfg.class_names,
            num_classes=cfg.num_classes,
            progress=False,
            outside_paths=self.outside_paths,
        )
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        torch.save(vars(data), tmp)
        tmp.replace(path)
        return data

    def _data_key(self, cfg: ModelConfig) -> str:
        """Changes when the data source, any image it lists (its size and modification time) or the
        decoding settings change: an image replaced under the same name is decoded anew."""
        source = self.data_path / MANIFEST_NAME if (self.data_path / MANIFEST_NAME).is_file() else self.data_path
        if not source.exists():
            raise DataError(f"site {self.site!r}: data path {self.data_path} does not exist")
        digest = hashlib.sha256()
        if source.is_file():
            digest.update(source.read_bytes() if source.stat().st_size < 64_000_000 else b"")
        items = sorted(source.parent.rglob("*")) if source.is_dir() else [source]
        if source.suffix.lower() == ".csv":
            rows = read_manifest(
                source,
                resolve_class_names(cfg.class_names, cfg.num_classes),
                labels="optional",
                outside_paths=self.outside_paths,
            )
            items += [row.path for row in rows]
        for item in items:
            stat = item.stat()
            digest.update(f"{item}|{stat.st_size}|{stat.st_mtime_ns}".encode())
        digest.update(f"{cfg.input_size}|{cfg.in_channels}|{cfg.num_classes}|{cfg.class_names}".encode())
        return digest.hexdigest()[:24]

    # ------------------------------------------------------------------ model
    def model(
        self, orders: RoundOrders, arrays: dict[str, torch.Tensor], base: dict[str, torch.Tensor] | None = None
    ) -> tuple[GroupedNet, ExchangePlan]:
        """The model of the round's stage with the coordinator's arrays (and this site's own BatchNorm)
        loaded, after checking what arrived against the round's plan (``exchange.plan_for``).

        ``base``: frozen arrays the coordinator also sent (merged rounds of ``train.recipe = "dual"``).
        """
        cfg = orders.model
        if self.weights is not None:
            cfg = cfg.model_copy(update={"weights": self.weights})
        elif names_a_file(cfg.weights) and not self.job_weights:
            raise ProtocolError(
                f"site {self.site!r}: the job's model.weights names a file ({cfg.weights}) for this site to open; "
                "a site opens only a checkpoint it was given itself: start it with --weights FILE"
            )
        torch.manual_seed(orders.seed)
        model = stage_for(orders).build(cfg, orders)
        plan = plan_for(model, orders)
        state = dict(model.state_dict())
        where = f"site {self.site!r}: "
        set_trainable_state(state, arrays, plan, who=where)
        base = base or {}
        unknown = [k for k in base if k not in plan.frozen]
        problems = check_arrays(
            {k: v.numpy() for k, v in base.items()}, {k: state[k].numpy() for k in base if k in state}
        )
        if unknown or problems:
            raise ProtocolError(
                f"{where}frozen arrays sent that do not match the round's plan: "
                + "; ".join(([f"not frozen this round: {unknown[:4]}"] if unknown else []) + problems)
            )
        model.load_state_dict({**state, **base, **self._local_bn(plan)})
        return model, plan

    def _local_bn_path(self) -> Path:
        return self.state_dir / "local_batchnorm.pt"

    def _local_bn(self, plan: ExchangePlan) -> dict[str, torch.Tensor]:
        """FedBN: this site's own BatchNorm arrays from earlier rounds (new ones start pretrained)."""
        path = self._local_bn_path()
        if not plan.local or not path.is_file():
            return {}
        saved = read_weights(path)
        return {k: v for k, v in saved.items() if k in plan.local}

    def _save_local_bn(self, model: GroupedNet, plan: ExchangePlan) -> None:
        if not plan.local:
            return
        path = self._local_bn_path()
        saved = read_weights(path) if path.is_file() else {}
        saved.update(subset(model.state_dict(), plan.local))
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        torch.save(saved, tmp)
        tmp.replace(path)

    # ------------------------------------------------------------------ round work
    def train(
        self,
        orders: RoundOrders,
        arrays: dict[str, torch.Tensor],
        base: dict[str, torch.Tensor] | None = None,
        *,
        secure: bool = False,
    ) -> SiteReply:
        """Evaluate the received global model, train the round's parts locally, return them.
        A site the orders name as evaluation-only scores the model and returns no arrays.

        ``secure``: the coordinator put this site's statistics into a secure sum (its decision, sent
        with the message): they go into ``SiteReply.secure_vector`` for masking, not into cells."""
        if orders.role_of(self.site) == EVALUATE_ROLE:
            return self.evaluate(orders, arrays, base, secure=secure)
        train_set, val_set = self.datasets(orders)
        model, plan = self.model(orders, arrays, base)
        proof = frozen_hash(model.state_dict(), plan)
        stage = stage_for(orders)
        started = time.perf_counter()
        labels, scores = self._evaluate(stage.scored(model), orders, val_set, head_only=orders.is_probe)
        metrics, vector, own = self._release(labels, scores, orders, secure)
        eval_seconds = time.perf_counter() - started

        features = None
        if orders.is_probe and not orders.train.probe_augment:
            features = self._cache(orders).features(model, train_set.images, self.device)
        regularizer = proximal_term(model, orders.proximal_mu) if orders.proximal_mu > 0 else None
        rng = np.random.default_rng([orders.seed, orders.round, _stable_int(self.site)])
        torch.manual_seed(int(rng.integers(2**31)))
        train_cfg = orders.train
        if train_cfg.freezing == "dynamic":  # a sweep order of its own at every site and round, so that
            # a round too short for the first sweep still trains different layers at different sites
            dyn = train_cfg.dynamic_freeze.model_copy(update={"seed": int(rng.integers(2**31))})
            train_cfg = train_cfg.model_copy(update={"dynamic_freeze": dyn})
        if self.max_train_memory_mb is not None:
            train_cfg = train_cfg.model_copy(update={"max_train_memory_mb": self.max_train_memory_mb})
        started = time.perf_counter()
        logs = stage.train(
            model,
            train_set,
            orders,
            train_cfg,
            rng=rng,
            device=self.device,
            features=features,
            regularizer=regularizer,
            engine_cache=self.state_dir / ENGINE_DIR,
        )
        train_seconds = time.perf_counter() - started
        self._save_local_bn(model, plan)
        metrics.update(
            {
                "num-examples": len(train_set),
                "train-loss": float(np.mean([log.loss for log in logs])),
                "train-seconds": train_seconds,
                "eval-seconds": eval_seconds,
                # totals of all the site's data for the model card (provenance.DATA_KEYS), no per-case value
                **site_data_metrics(self.data_path, [train_set, val_set]),
            }
        )
        keys: Sequence[str] = plan.sent
        if orders.partial_replies:  # only what changed travels back
            keys = changed_keys(plan.sent, (k for k, _ in model.named_parameters()), updated_keys(logs))
        return SiteReply(subset(model.state_dict(), keys), proof, metrics, secure_vector=vector, own_figures=own)

    def evaluate(
        self,
        orders: RoundOrders,
        arrays: dict[str, torch.Tensor],
        base: dict[str, torch.Tensor] | None = None,
        *,
        final: bool = False,
        secure: bool = False,
    ) -> SiteReply:
        """Score the received global model on the validation split (an evaluation-only site: on all its data).

        ``final`` (the federation's final evaluation): the site also fits its own operating point for
        this model on those labelled patients (``site_operating_point``), keeps it in its state folder,
        and returns it only if it shares it."""
        role = orders.role_of(self.site)
        splits = [self._evaluation_set(orders)] if role == EVALUATE_ROLE else list(self.datasets(orders))
        val_set = splits[-1]
        model, plan = self.model(orders, arrays, base)
        scored = stage_for(orders).scored(model)
        scores = self._scores(scored, val_set, orders)
        metrics, vector, own = self._release(val_set.labels.numpy(), scores, orders, secure)
        metrics.update(site_data_metrics(self.data_path, splits))  # totals for the model card (provenance.py)
        reply = SiteReply(
            {}, frozen_hash(model.state_dict(), plan), metrics, role=role, secure_vector=vector, own_figures=own
        )
        if final and scores.ndim == 1:
            point, reply.note = self._operating_point(scored, val_set, scores, role)
            reply.operating_point = point if self.share_operating_point else None
        return reply

    def _operating_point(
        self, model: GroupedNet, data: ImageSet, scores: np.ndarray, role: str
    ) -> tuple[OperatingPoint | None, str]:
        """This site's operating point for ``model`` from its labelled patients, written to its state
        folder (``operating-points/<model sha256>.json``); a site too small for one writes why instead."""
        folder = self.state_dir / OPERATING_POINTS_DIR
        folder.mkdir(parents=True, exist_ok=True)
        sha = state_sha256(model.state_dict())
        evidence: Evidence = "labelled-patients" if role == EVALUATE_ROLE else "local-validation"
        try:
            point = site_operating_point(self.site, sha, data, scores, evidence)
        except DataError as err:
            refusal = {"site": self.site, "model_sha256": sha, "reason": str(err)}
            _write_json(folder / f"{sha[:16]}.refused.json", refusal)
            return None, f"site {self.site}: no operating point of its own for this model: {err}"
        path = folder / f"{sha[:16]}.json"
        _write_json(path, point.model_dump(mode="json", by_alias=True))
        shared = "shared with the coordinator" if self.share_operating_point else "kept at the site (not shared)"
        return point, f"site {self.site}: its operating point for this model is {path} ({shared}): {point.summary()}"

    def _evaluation_set(self, orders: RoundOrders) -> ImageSet:
        """An evaluation-only site scores every image it holds: none of it trains anything."""
        data = self._decoded(orders.model)
        data.require_nonempty(f"evaluation-only site {self.site!r} has no images")
        data.require_classes(2, why=f"evaluation-only site {self.site!r} needs both classes for AUROC")
        return data

    def _cache(self, orders: RoundOrders) -> FeatureCache:
        return FeatureCache(self.state_dir / "features", self._inference(orders))

    def _inference(self, orders: RoundOrders) -> InferenceSettings:
        """The round's engine and precision; exported graphs stay in this site's state folder."""
        return InferenceSettings.of(orders.train, self.state_dir / ENGINE_DIR)

    def _release(
        self, labels: np.ndarray, scores: np.ndarray, orders: RoundOrders, secure: bool
    ) -> tuple[dict[str, Any], np.ndarray | None, dict[str, float]]:
        """What leaves the site about its validation scores: cells (:func:`validation_release`), or for a
        secure sum its case count in clear and its exact statistics for masking; and with
        ``share_site_figures`` its own exact figures."""
        if secure:
            metrics: dict[str, Any] = {"val-n": int(len(labels))}
            vector: np.ndarray | None = statistics_vector(labels, scores, orders)
        else:
            metrics, vector = validation_release(labels, scores, orders), None
        return metrics, vector, own_figures(labels, scores, orders) if self.share_site_figures else {}

    def _evaluate(
        self, model: GroupedNet, orders: RoundOrders, val_set: ImageSet, *, head_only: bool
    ) -> tuple[np.ndarray, np.ndarray]:
        """The validation split's labels and scores (they stay here; ``_release`` says what leaves)."""
        if head_only:
            feats = self._cache(orders).features(model, val_set.images, self.device)
            with torch.no_grad():
                model.eval()
                logits = model.head(feats)
            scores = torch.sigmoid(logits[:, 0]).numpy() if logits.shape[1] == 1 else torch.softmax(logits, 1).numpy()
        else:
            scores = self._scores(model, val_set, orders)
        return val_set.labels.numpy(), scores

    def _scores(self, model: GroupedNet, data: ImageSet, orders: RoundOrders) -> np.ndarray:
        if orders.parts <= set(model.parts):  # the groups frozen this round are the engine's (one graph, every round)
            apply_parts(model, orders.parts)
        return predict_scores(model, data.images, self.device, inference=self._inference(orders))


def read_cached_images(path: Path) -> ImageSet | None:
    """A decoded-image cache entry, read with ``weights_only=True`` (no code runs, whatever the file
    holds); None, and the entry removed, when it is absent or not an image set this site wrote."""
    if not path.is_file():
        return None
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
        return ImageSet(**saved) if isinstance(saved, dict) else None
    except Exception as err:  # noqa: BLE001 - unpickling refusals, corrupt files, foreign dicts: all a cache miss
        log.warning("site cache %s is unreadable (%s): decoding the images again", path, type(err).__name__)
        path.unlink(missing_ok=True)
        return None


def validation_release(labels: np.ndarray, scores: np.ndarray, orders: RoundOrders) -> dict[str, Any]:
    """What a site sends about its validation cases: their number and the cells of its per-class
    counts (``fedfreeze.evaluation.cells``), each holding 0 or at least ``orders.min_cell_count``
    cases, anchored where both sides agree before any score is seen. Nothing else: a figure computed
    from the exact scores (a local AUROC, a confusion count at the threshold) could single a case out,
    so the coordinator computes every figure from the cells.

    Binary: per class, cells of the ``orders.score_bins`` score bins, anchored at the round's threshold
    and then at the coordinator's common edges (``orders.cell_edges``), finest on the side facing the other class (negatives from the top down, positives from the bottom
    up: where the classes meet, which AUROC and the threshold depend on). Multi-class: per true class,
    cells of the predicted classes, anchored around the class itself.
    """
    k = orders.min_cell_count
    if scores.ndim == 1:
        edges = score_bin_edges(orders.score_bins)
        cut = int(np.searchsorted(edges, snap_threshold(orders.threshold, edges)))
        anchors = [cut, *orders.cell_edges]  # the threshold first, then the coordinator's common edges
        cells = release_cells(
            class_histograms(labels, scores, edges), k, anchors=[anchors, anchors], walk=["down", "up"]
        )
    else:
        classes = scores.shape[1]
        matrix = multiclass_confusion(labels, scores.argmax(1), classes)
        around = [[e for e in (c, c + 1) if 0 < e < classes] for c in range(classes)]
        cells = release_cells(matrix, k, anchors=around)
    return {"val-n": int(len(labels)), **cells.to_metrics("val-")}


def own_figures(labels: np.ndarray, scores: np.ndarray, orders: RoundOrders) -> dict[str, float]:
    """A site's own exact validation figures, sent only when the site shares them (node config
    ``share-site-figures``): binary AUROC, and balanced accuracy and F1 at the round's threshold (which,
    with the site's class totals, fix its confusion counts there); multi-class balanced accuracy and
    F1 of the arg-max. Site-level totals over the whole split; none when it holds one class."""
    try:
        if scores.ndim == 1:
            edges = score_bin_edges(orders.score_bins)
            figures = binary_metrics(labels, scores, snap_threshold(orders.threshold, edges))
        else:
            figures = multiclass_metrics(labels, scores)
    except DataError:  # a split of one class: no AUROC
        return {}
    return {wire: float(figures[key]) for key, wire in OWN_FIGURES.items() if key in figures}


OPERATING_POINTS_DIR = "operating-points"
ENGINE_DIR = "engine"  # exported graphs of the frozen layers (fedfreeze.inference), by weights hash
SITE_RULE: Rule = "binormal"


def site_operating_point(
    site: str, model_sha: str, data: ImageSet, scores: np.ndarray, evidence: Evidence
) -> OperatingPoint:
    """A federation site's own operating point for the final model, from its labelled validation
    patients (an evaluation-only site: all its patients): temperature scaling and the binormal rule,
    as ``fedfreeze adapt --labels use`` fits one, with the promise estimated on left-out patients."""
    fit = recalibrate(
        scores, data.labels.numpy(), data.patient_ids, method="temperature", rule=SITE_RULE, replicates=SITE_REPLICATES
    )
    return fit.operating_point(
        site=site,
        calibration=ScoreCalibration(
            method="temperature", a=fit.a, fitted_on=f"{fit.n_images} validation images of {fit.n_patients} patients"
        ),
        rule=SITE_RULE,
        evidence=evidence,
        model_sha256=model_sha,
        created_utc=now_utc(),
        fedfreeze_version=__version__,
    )


SITE_REPLICATES = 300  # bootstrap replicates of a federation site's operating point (seconds, not minutes)


def _write_json(path: Path, value: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(value, indent=1) + "\n", encoding="utf-8")
    tmp.replace(path)


def proximal_term(model: GroupedNet, mu: float):
    """FedProx: ``mu / 2 * ||w - w_global||^2`` over the trainable weights, w_global as received."""
    anchors = [(p, p.detach().clone()) for p in model.parameters()]

    def term() -> torch.Tensor:
        total = torch.zeros(())
        for param, anchor in anchors:
            if param.requires_grad:
                total = total + (param - anchor).pow(2).sum()
        return 0.5 * mu * total

    return term


def _stable_int(text: str) -> int:
    return int(hashlib.sha256(text.encode()).hexdigest()[:8], 16)
