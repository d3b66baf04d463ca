"""The candidates of the shift benchmark, each trained through fedfreeze's own code, and a cache of
their scores so a stopped or repeated run skips the finished ones.

* ``probe-lr``: scikit-learn's LogisticRegression (defaults, max_iter=2000) on frozen ImageNet Lite0
  features of every training site's images pooled (centralised), threshold 0.5: the plain baseline.
* every other arm is one federation of the 3 training sites through the real ServerApp loop and
  ClientApp in process (``fedfreeze.flower.inprocess.run_in_process``); its exported model folder
  scores each benchmark set (``PrefixScorer``: the pretrained prefix runs once per set, and every
  model's scores are checked against ``fedfreeze.model_io.model_scores``).

An arm whose knobs this checkout's ``FederationConfig`` does not have is listed as unavailable, not
silently dropped. A cached result is used only when its fingerprint (configuration, data, sets)
matches; otherwise the arm is trained again.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from shift_data import EvalSet, Sizes

RESULT_FILE = "result.json"
STAMP_FILE = "fingerprint.txt"


@dataclass(frozen=True)
class ArmSpec:
    """A candidate: its name, what it is, and its federation overrides (dotted keys)."""

    name: str
    description: str
    kind: str  # "probe-lr" or "federated"
    overrides: Mapping[str, Any] = field(default_factory=dict)
    quick_overrides: Mapping[str, Any] = field(default_factory=dict)  # --quick: fewer rounds

    def needs(self) -> list[str]:
        """``federation.*`` fields the overrides use."""
        return sorted({key.split(".")[1].replace("-", "_") for key in self.overrides if key.startswith("federation.")})


QUICK_ROUNDS = {"federation.rounds": 2, "federation.probe-rounds": 1}
# Every candidate but "defaults" pins its recipe, so that it stays the same candidate when the defaults move.
# The seed recipe: fedfreeze's defaults until the shift benchmark (what the user ran).
SEED = {
    "federation.unfreeze": {"layer4": 0.1, "layer3": 0.3, "layer2": 0.6},
    "train.lr": {"head": 1e-3, "layer4": 5e-4, "layer3": 2.5e-4, "layer2": 1e-4},
    "federation.threshold": "youden",
}
# LP-FT: after the probe rounds only layer4 joins, from the first fine-tuning round
LPFT = {"federation.unfreeze": {"layer4": 0.0}, "federation.threshold": "youden"}

ARMS: tuple[ArmSpec, ...] = (
    ArmSpec(
        "probe-lr", "LogisticRegression on frozen ImageNet Lite0 features, all sites pooled, threshold 0.5", "probe-lr"
    ),
    ArmSpec(
        "seed-defaults",
        "the seed defaults: 8 rounds, 3 probe, layer4/3/2 join at 0.1/0.3/0.6, seed learning "
        "rates (head 1e-3, layer4 5e-4, layer3 2.5e-4, layer2 1e-4), threshold youden",
        "federated",
        SEED,
        QUICK_ROUNDS,
    ),
    ArmSpec("defaults", "this checkout's FederationConfig defaults, no override", "federated", {}, QUICK_ROUNDS),
    ArmSpec(
        "probe-only",
        "5 probe rounds, nothing unfrozen, threshold youden",
        "federated",
        {"federation.rounds": 5, "federation.probe-rounds": 5, "federation.threshold": "youden"},
        {"federation.rounds": 2, "federation.probe-rounds": 2},
    ),
    ArmSpec(
        "lpft-l4-lr/5",
        "3 probe rounds, then only layer4 for 5 rounds, seed learning rates / 5, youden",
        "federated",
        {**LPFT, "train.lr": {"head": 2e-4, "layer4": 1e-4}},
        QUICK_ROUNDS,
    ),
    ArmSpec(
        "adapters",
        "the seed recipe with federation.method = adapters (low-rank adapters in layer4/3/2)",
        "federated",
        {**SEED, "federation.method": "adapters"},
        QUICK_ROUNDS,
    ),
    ArmSpec(
        "seed+best",
        "the seed recipe, exporting the round with the best pooled validation AUROC (patience 2)",
        "federated",
        {**SEED, "federation.export": "best", "federation.patience": 2},
        QUICK_ROUNDS,
    ),
    ArmSpec(
        "seed+wise0.5",
        "the seed recipe, WiSE-FT: probe-end + 0.5 x (fine-tuned - probe-end)",
        "federated",
        {**SEED, "federation.wise-alpha": 0.5},
        QUICK_ROUNDS,
    ),
    ArmSpec(
        "lpft-l4-lr/10",
        "3 probe rounds, then only layer4 for 5 rounds, seed learning rates / 10, youden",
        "federated",
        {**LPFT, "train.lr": {"head": 1e-4, "layer4": 5e-5}},
        QUICK_ROUNDS,
    ),
    ArmSpec(
        "lpft-l4-lr/5+wise0.5",
        "lpft-l4-lr/5, WiSE-FT alpha 0.5",
        "federated",
        {**LPFT, "train.lr": {"head": 2e-4, "layer4": 1e-4}, "federation.wise-alpha": 0.5},
        QUICK_ROUNDS,
    ),
)


def available(arm: ArmSpec) -> str | None:
    """None when this checkout can run the arm, else why not."""
    if arm.kind != "federated":
        return None
    from fedfreeze.federation.config import FederationConfig

    missing = [name for name in arm.needs() if name not in FederationConfig.model_fields]
    return f"FederationConfig has no {', '.join(missing)}" if missing else None


def arm_config(arm: ArmSpec, sizes: Sizes, seed: int, quick: bool) -> Any:
    from fedfreeze.federation.config import load_fed_config

    overrides = {
        "model.input-size": sizes.input_size,
        "federation.seed": seed,
        "train.seed": seed,
        **arm.overrides,
        **(arm.quick_overrides if quick else {}),
    }
    return load_fed_config(None, overrides)


def fingerprint(payload: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


# settings that change what a run reports, not what it trains or scores: left out of an arm's fingerprint, so a
# cached arm stays valid when such a setting is added to the configuration
REPORTING_ONLY = {"federation": ("tracking", "tracking-dir")}


def trained_config(cfg: Any) -> dict[str, Any]:
    """The configuration an arm's fingerprint covers: everything but ``REPORTING_ONLY``."""
    dump = cfg.model_dump(mode="json", by_alias=True)
    for table, keys in REPORTING_ONLY.items():
        for key in keys:
            dump.get(table, {}).pop(key, None)
    return dump


def sets_signature(sets: list[EvalSet]) -> list[Any]:
    return [
        [s.name, len(s.labels), int(s.labels.sum()), hashlib.sha256(s.images.numpy().tobytes()).hexdigest()[:12]]
        for s in sets
    ]


def load_cached(folder: Path, key: str) -> dict[str, Any] | None:
    path = folder / RESULT_FILE
    if not path.is_file():
        return None
    result = json.loads(path.read_text())
    return result if result.get("fingerprint") == key else None


def write_result(folder: Path, result: dict[str, Any]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".{RESULT_FILE}.tmp-{os.getpid()}"
    tmp.write_text(json.dumps(result) + "\n")
    tmp.replace(folder / RESULT_FILE)


# ---------------------------------------------------------------------- scoring with shared work
class PrefixScorer:
    """Scores benchmark sets with a model, running the leading groups that are still the pretrained
    ImageNet model's (every arm leaves the stem and layer1 frozen, a probe leaves all) once per set.

    Why: 9 sets x several arms on 2 shared cores; the frozen prefix is most of the cost. Each model's
    scores are checked against ``fedfreeze.model_io.model_scores`` (the path every scorer of a model
    folder uses) on the first images of every set; a mismatch stops the benchmark.
    """

    CHECK = 8
    KEEP_FROM = 2  # earlier outputs are large at 128 px (stem: 16 x 64 x 64 floats an image)

    def __init__(self, input_size: int) -> None:
        from fedfreeze.config import ModelConfig
        from fedfreeze.models.registry import build_model

        self.base, _ = build_model(ModelConfig(input_size=input_size), [], 8)
        self.base.eval()
        self.names = list(self.base.groups)
        self.base_state = self.base.state_dict()
        self._cache: dict[tuple[str, int], torch.Tensor] = {}

    def shared_depth(self, model: Any) -> int:
        """How many leading groups of ``model`` are exactly the pretrained model's (no adapters)."""
        if (
            not (
                torch.equal(model.normalize.mean, self.base.normalize.mean)
                and torch.equal(model.normalize.std, self.base.normalize.std)
                and getattr(model.normalize, "equalize", False) == getattr(self.base.normalize, "equalize", False)
            )
            or list(model.groups) != self.names
        ):
            return 0
        state = model.state_dict()
        depth = 0
        for name in self.names:
            prefix = f"groups.{name}."
            keys = [k for k in self.base_state if k.startswith(prefix)]
            if name in model.adapters or any(not torch.equal(state[k], self.base_state[k]) for k in keys):
                break
            depth += 1
        return depth

    @torch.no_grad()
    def activations(self, s: EvalSet, depth: int) -> torch.Tensor:
        """The pretrained prefix's output on a set after ``depth`` groups (all groups: pooled features).
        The first call for a set runs every group once and keeps each depth from ``KEEP_FROM`` on."""
        from fedfreeze.training.engine import EVAL_BATCH, to_unit

        if (s.name, depth) not in self._cache:
            kept: dict[int, list[torch.Tensor]] = {
                d: [] for d in range(min(depth, self.KEEP_FROM), len(self.names) + 1)
            }
            for i in range(0, len(s.images), EVAL_BATCH):
                x = self.base.normalize(to_unit(s.images[i : i + EVAL_BATCH], torch.device("cpu")))
                for d, name in enumerate(self.names, start=1):
                    x = self.base.forward_groups(x, [name])
                    if d in kept:
                        kept[d].append(
                            torch.flatten(torch.nn.functional.adaptive_avg_pool2d(x, 1), 1)
                            if d == len(self.names)
                            else x.contiguous()
                        )
            for d, chunks in kept.items():
                self._cache.setdefault((s.name, d), torch.cat(chunks))
        return self._cache[(s.name, depth)]

    def features(self, s: EvalSet) -> np.ndarray:
        """Pooled features of the pretrained backbone (what ``extract_features`` gives)."""
        return self.activations(s, len(self.names)).numpy()

    @torch.no_grad()
    def scores(self, model: Any, card: Any, s: EvalSet) -> np.ndarray:
        from fedfreeze.model_io import model_scores
        from fedfreeze.training.engine import EVAL_BATCH

        model.eval()
        depth = self.shared_depth(model)
        cached = self.activations(s, depth) if depth else None
        rest = self.names[depth:]
        out = []
        for i in range(0, len(s.images), EVAL_BATCH):
            if depth == len(self.names):
                feats = cached[i : i + EVAL_BATCH]
            else:
                x = (
                    cached[i : i + EVAL_BATCH]
                    if depth
                    else model.normalize(s.images[i : i + EVAL_BATCH].float().div(255.0))
                )
                x = model.forward_groups(x, rest)
                feats = torch.flatten(torch.nn.functional.adaptive_avg_pool2d(x, 1), 1)
            logits = model.head(feats).float()
            out.append(torch.sigmoid(logits[:, 0]))
        scores = torch.cat(out).numpy().astype(np.float64)
        if card.calibration is not None:
            scores = card.calibration.apply(scores)
        direct = model_scores(model, card, s.images[: self.CHECK], torch.device("cpu"))
        if not np.allclose(scores[: self.CHECK], direct, atol=1e-4):
            raise SystemExit(
                f"{s.name}: scores through the cached prefix (depth {depth}) differ from model_scores: "
                f"{scores[: self.CHECK]} vs {direct}"
            )
        return scores


# ---------------------------------------------------------------------- the plain probe
def run_probe_lr(
    sites: Mapping[str, Path], sets: list[EvalSet], sizes: Sizes, seed: int, scorer: PrefixScorer
) -> dict[str, Any]:
    """Frozen ImageNet Lite0 features of all sites' images pooled; LogisticRegression; threshold 0.5."""
    from sklearn.linear_model import LogisticRegression

    from fedfreeze.config import ModelConfig
    from fedfreeze.data.dataset import load_image_set
    from fedfreeze.models.registry import build_model
    from fedfreeze.training.engine import extract_features

    device = torch.device("cpu")
    started = time.perf_counter()
    model, _ = build_model(ModelConfig(input_size=sizes.input_size), [], 8)
    feats, labels = [], []
    for folder in sites.values():
        data = load_image_set(folder, image_size=sizes.input_size, channels=3, progress=False, outside_paths=True)
        feats.append(extract_features(model, data.images, device).numpy())
        labels.append(data.labels.numpy())
    x, y = np.concatenate(feats), np.concatenate(labels)
    clf = LogisticRegression(max_iter=2000, random_state=seed).fit(x, y)
    trained = time.perf_counter()
    scores = {}
    for s in sets:
        feats = scorer.features(s)
        check = extract_features(model, s.images[: PrefixScorer.CHECK], device).numpy()
        if not np.allclose(feats[: PrefixScorer.CHECK], check, atol=1e-4):
            raise SystemExit(f"{s.name}: cached features differ from extract_features")
        scores[s.name] = clf.predict_proba(feats)[:, 1].tolist()
    return {
        "scores": scores,
        "threshold": 0.5,
        "threshold_rule": "0.5 (fixed)",
        "internal": None,
        "histograms": None,
        "train_images": len(y),
        "lr_iterations": int(clf.n_iter_[0]),
        "seconds": {"train": trained - started, "score": time.perf_counter() - trained},
    }


# ---------------------------------------------------------------------- federated arms
def run_federated(
    arm: ArmSpec,
    cfg: Any,
    sites: Mapping[str, Path],
    sets: list[EvalSet],
    folder: Path,
    state: Path,
    scorer: PrefixScorer,
) -> dict[str, Any]:
    """One federation in process; its exported model scores every set."""
    from fedfreeze.flower.inprocess import run_in_process
    from fedfreeze.model_io import load_model

    started = time.perf_counter()
    metrics = run_in_process(cfg, folder / "federation", dict(sites), state, resume=True, device="cpu")
    if metrics.get("status") != "completed":
        raise SystemExit(f"arm {arm.name}: the federation {metrics.get('status')}: {metrics.get('reason')}")
    trained = time.perf_counter()
    model, card = load_model(metrics["model"])
    scores = {s.name: scorer.scores(model, card, s).tolist() for s in sets}
    final = metrics.get("final") or {}
    exported = metrics.get("exported") or {}
    pooled = exported.get("pooled") or final.get("pooled") or {}
    return {
        "scores": scores,
        "threshold": float(card.threshold),
        "threshold_rule": metrics.get("threshold_rule"),
        "calibration": card.calibration.model_dump() if card.calibration is not None else None,
        "internal": {
            key: pooled.get(key)
            for key in ("at_threshold_used", "at_threshold_next", "at_0.5")
            if pooled.get(key) is not None
        },
        "histograms": histograms_of(metrics, cfg),
        "exported": {k: v for k, v in exported.items() if k != "pooled"} or None,
        "rounds": [
            {
                "round": r.get("round"),
                "parts": r.get("parts"),
                "val_auroc": ((r.get("pooled") or {}).get("at_threshold_used") or {}).get("auroc"),
            }
            for r in [*metrics.get("rounds", []), final]
        ],
        "completed_rounds": metrics.get("completed_rounds"),
        "seconds": {"train": trained - started, "score": time.perf_counter() - trained},
    }


def histograms_of(metrics: Mapping[str, Any], cfg: Any) -> dict[str, list[float]] | None:
    """The pooled validation histograms of the training sites for the exported model, with their bin
    edges, wherever this checkout's ``metrics.json`` keeps them (None when it keeps none)."""
    from fedfreeze.evaluation.pooled import score_bin_edges

    final = metrics.get("final") or {}
    candidates = [
        ((metrics.get("exported") or {}).get("pooled") or {}).get("histograms"),
        final.get("pooled_histograms"),
        (final.get("pooled") or {}).get("histograms"),
    ]
    for hist in candidates:
        if hist and "neg" in hist and "pos" in hist:
            edges = hist.get("edges") or score_bin_edges(cfg.federation.score_bins).tolist()
            return {"neg": list(hist["neg"]), "pos": list(hist["pos"]), "edges": list(edges)}
    return None


def run_arm(
    arm: ArmSpec,
    *,
    sizes: Sizes,
    seed: int,
    quick: bool,
    sites: Mapping[str, Path],
    sets: list[EvalSet],
    work: Path,
    scorer: PrefixScorer,
    log: Any,
) -> dict[str, Any]:
    """The arm's cached result, or train and score it now (then cache it)."""
    folder = work / "arms" / arm.name.replace("/", "-")
    cfg = arm_config(arm, sizes, seed, quick) if arm.kind == "federated" else None
    key = fingerprint(
        {
            "arm": arm.name,
            "kind": arm.kind,
            "sizes": sizes.describe(),
            "seed": seed,
            "config": trained_config(cfg) if cfg is not None else None,
            "sites": {name: (Path(p) / "manifest.csv").read_text() for name, p in sites.items()},
            "sets": sets_signature(sets),
        }
    )
    cached = load_cached(folder, key)
    if cached is not None:
        log(f"{arm.name}: cached ({folder / RESULT_FILE})")
        return cached
    stamp = folder / STAMP_FILE  # a federation stopped mid-way resumes only under the same settings
    if folder.exists() and (not stamp.is_file() or stamp.read_text() != key):
        old = stamp.read_text() if stamp.is_file() else "unstamped"
        stale = work / "arms" / ".stale" / f"{folder.name}-{old}"
        log(f"{arm.name}: {folder} holds a run with other settings (moved to {stale}); training again")
        shutil.rmtree(stale, ignore_errors=True)
        stale.parent.mkdir(parents=True, exist_ok=True)
        folder.rename(stale)
    folder.mkdir(parents=True, exist_ok=True)
    stamp.write_text(key)
    log(f"{arm.name}: training ({arm.description})")
    if arm.kind == "probe-lr":
        result = run_probe_lr(sites, sets, sizes, seed, scorer)
    else:
        # the sites' caches (decoded images, probe features keyed by the backbone's weights) serve every arm
        result = run_federated(arm, cfg, sites, sets, folder, work / "site-state", scorer)
        result["config"] = cfg.model_dump(mode="json", by_alias=True)
    result.update({"fingerprint": key, "arm": arm.name, "description": arm.description, "kind": arm.kind})
    write_result(folder, result)
    log(
        f"{arm.name}: done in {sum(result['seconds'].values()):.0f} s "
        f"(train {result['seconds']['train']:.0f} s, score {result['seconds']['score']:.0f} s)"
    )
    return result
