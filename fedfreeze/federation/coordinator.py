"""The coordinator's side of a federation, without any Flower types.

It holds the global model, decides each round's trainable parts (the site schedule counted in
rounds), checks every reply before anything of it can reach the global model, pools the sites'
validation statistics, chooses the operating threshold, and checkpoints after every round so a
stopped federation resumes where it stopped.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedfreeze.config import resolve_bn_stats
from fedfreeze.errors import FedfreezeError
from fedfreeze.federation.config import FedConfig
from fedfreeze.federation.dual_stage import DUAL, DualStage, base_arrays
from fedfreeze.federation.exchange import ExchangePlan, check_arrays, frozen_hash, plan_exchange, subset
from fedfreeze.federation.pooled import (
    SiteStats,
    pooled_metrics,
    pooled_multiclass_metrics,
    score_bin_edges,
    snap_threshold,
    threshold_for_sensitivity,
    weighted_mean,
    youden_threshold_from_histograms,
)
from fedfreeze.federation.report import json_default
from fedfreeze.model_io import make_card, save_model
from fedfreeze.models.grouped import GroupedNet
from fedfreeze.models.registry import build_model
from fedfreeze.training.schedule import adapter_groups, check_groups, trainable_parts

log = logging.getLogger("fedfreeze.coordinator")

CHECKPOINT_DIR = "checkpoint"
MODEL_DIR = "model"
PAYLOAD_SLACK_BYTES = 65536  # room for metrics and statistics beside the arrays


class FederationFailed(FedfreezeError):
    """The federation cannot go on (too few valid replies, for example)."""


@dataclass
class Reply:
    """One site's reply, unpacked from whatever transport carried it."""

    node: int
    site: str
    arrays: dict[str, np.ndarray]
    metrics: dict[str, Any]
    frozen_hash: str
    bytes_down: int = 0
    bytes_up: int = 0


@dataclass
class RoundRecord:
    """Everything measured in one round, as written to metrics.json."""

    round: int
    parts: list[str]
    sites: list[dict[str, Any]] = field(default_factory=list)
    rejected: list[dict[str, Any]] = field(default_factory=list)
    failures: list[dict[str, Any]] = field(default_factory=list)
    pooled: dict[str, Any] | None = None
    weighted_mean: dict[str, float] | None = None
    threshold_used: float | None = None
    threshold_next: float | None = None
    round_seconds: float = 0.0
    bytes_down: int = 0
    bytes_up: int = 0
    evaluated_model: str = ""
    privacy: dict[str, Any] | None = None


class Coordinator:
    """Global state and the rules of the federation."""

    def __init__(self, cfg: FedConfig, out_dir: str | Path) -> None:
        self.cfg = cfg
        self.fed = cfg.federation
        self.out = Path(out_dir)
        self.adapter_groups = adapter_groups(self.fed.unfreeze, self.fed.method)
        torch.manual_seed(self.fed.seed)
        self.model, _ = build_model(cfg.model, self.adapter_groups, cfg.train.adapter_rank)
        check_groups(self.fed.unfreeze, list(self.model.groups))
        self.state = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        # train.recipe = "dual": the first rounds train the dual model, whose state is the global
        # state until the merge (dual_stage.py explains the design)
        self.dual = (DualStage(cfg.model, self.fed.dual_rounds, self.fed.seed, self.fed.dual_lr_decay)
                     if cfg.train.recipe == "dual" else None)
        if self.dual is not None:
            self.state = self.dual.initial_state()
        # train.freezing = "dynamic": a site returns only the arrays it updated (exchange.changed_keys)
        self.partial_replies = cfg.train.freezing == "dynamic"
        self.binary = cfg.model.num_classes == 2
        self.edges = score_bin_edges(self.fed.score_bins)
        self.threshold = snap_threshold(0.5, self.edges) if self.binary else 0.5
        self.completed = 0
        self.history: list[RoundRecord] = []
        self.failed_round: RoundRecord | None = None  # the round that stopped the run, with its reasons
        self.started = time.time()

    # ------------------------------------------------------------------ schedule
    def parts(self, rnd: int) -> frozenset[str]:
        """Trainable parts of round ``rnd`` (1-based): probe rounds, then top-down unfreezing (after the
        dual stage's rounds, which train everything, under ``train.recipe = "dual"``)."""
        step = self._schedule_round(rnd)
        if step is None:
            return self.dual.parts
        return trainable_parts(step - 1, probe_steps=self.fed.probe_rounds, finetune_steps=self.fed.finetune_rounds,
                               unfreeze=self.fed.unfreeze, method=self.fed.method)

    def local_epochs(self, rnd: int) -> int:
        step = self._schedule_round(rnd)
        if step is None:
            return self.fed.dual_local_epochs
        return self.fed.probe_local_epochs if step <= self.fed.probe_rounds else self.fed.local_epochs

    def _schedule_round(self, rnd: int) -> int | None:
        """Round ``rnd`` counted in the probe/unfreezing schedule, or None for a dual-stage round."""
        if self.dual is None:
            return rnd
        return None if self.dual.stage(rnd) == DUAL else rnd - self.fed.dual_rounds

    def begin_round(self, rnd: int) -> None:
        """Under ``train.recipe = "dual"``: the first round after the dual stage merges the global dual model."""
        if self.dual is not None and self.dual.stage(rnd) != DUAL and self.dual.is_dual_state(self.state):
            self.state = self.dual.merge(self.state)
            log.info("round %d: the dual model of %d rounds merged into one single-input model", rnd, self.dual.rounds)

    def plan(self, parts: frozenset[str]) -> ExchangePlan:
        if self.dual is not None and self.dual.is_dual_state(self.state):
            return self.dual.plan(parts, self.fed.bn_policy)
        return plan_exchange(self.model, parts, bn_policy=self.fed.bn_policy,
                             bn_stats=resolve_bn_stats(self.cfg.train, self.model.pretrained))

    def orders(self, rnd: int, parts: frozenset[str]) -> dict[str, Any]:
        """The round's instructions for every site (scalars and lists: they travel in a config record)."""
        orders: dict[str, Any] = {
            "round": rnd,
            "parts": sorted(parts),
            "local-epochs": self.local_epochs(rnd),
            "site-config": self.cfg.site_payload(),
            "bn-policy": self.fed.bn_policy,
            "proximal-mu": self.fed.proximal_mu if self.fed.strategy == "fedprox" else 0.0,
            "val-fraction": self.fed.val_fraction,
            "threshold": self.threshold,
            "score-bins": self.fed.score_bins,
            "seed": self.fed.seed,
        }
        if self.fed.dp != "off":
            orders["dp-weight"] = True
        if self.adapter_groups:  # (Flower's ConfigRecord cannot size an empty list)
            orders["adapter-groups"] = list(self.adapter_groups)
        if self.dual is not None:
            orders["stage"] = self.dual.stage(rnd)
            if self.dual.stage(rnd) == DUAL:
                orders["lr-scale"] = self.dual.lr_scale(rnd)
        return orders

    def arrays_for(self, plan: ExchangePlan) -> dict[str, torch.Tensor]:
        return subset(self.state, plan.sent)

    def base_for(self, plan: ExchangePlan) -> dict[str, torch.Tensor]:
        """Frozen arrays sent down with a round's trainable ones: under ``train.recipe = "dual"``, after
        the merge, the frozen groups hold federated weights a site cannot rebuild (empty otherwise)."""
        if self.dual is None or self.dual.is_dual_state(self.state):
            return {}
        return base_arrays(self.state, plan)

    def expected_hash(self, plan: ExchangePlan) -> str:
        return frozen_hash(self.state, plan)

    # ------------------------------------------------------------------ replies
    def check(self, reply: Reply, plan: ExchangePlan, proof: str, *, with_arrays: bool = True) -> list[str]:
        """Reasons to reject a reply (empty when it is valid). Nothing of a rejected reply is used."""
        problems = []
        if with_arrays:
            expected = {k: v.numpy() for k, v in self.arrays_for(plan).items()}
            problems += check_arrays(reply.arrays, expected, partial=self.partial_replies)
            sent_bytes = sum(v.nbytes for v in expected.values())
            if reply.bytes_up > sent_bytes + PAYLOAD_SLACK_BYTES:
                problems.append(f"payload of {reply.bytes_up} bytes, far larger than the {sent_bytes} bytes sent")
            n = reply.metrics.get("num-examples")
            if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= self.fed.max_examples:
                problems.append(f"num-examples {n!r} is not an integer in [1, {self.fed.max_examples}]")
        if reply.frozen_hash != proof:
            problems.append("frozen-weight hash differs from the coordinator's: the site's backbone is not the same")
        try:
            self.site_stats(reply)
        except (ValueError, KeyError) as err:
            problems.append(f"validation statistics: {err}")
        return problems

    def site_stats(self, reply: Reply) -> SiteStats | np.ndarray:
        if self.binary:
            return SiteStats.from_metrics(reply.metrics, "val-", bins=self.fed.score_bins)
        flat = np.asarray(reply.metrics["val-confusion"], dtype=np.int64)
        k = self.cfg.model.num_classes
        if flat.shape != (k * k,) or (flat < 0).any():
            raise ValueError(f"val-confusion should hold {k * k} non-negative counts")
        return flat.reshape(k, k)

    def apply(self, plan: ExchangePlan, aggregated: dict[str, np.ndarray]) -> None:
        """Write aggregated arrays into the global state (only the round's keys, same dtypes; under
        dynamic freezing only the keys some site trained, the others keep their global value)."""
        problems = check_arrays(aggregated, {k: self.state[k].numpy() for k in plan.sent},
                                partial=self.partial_replies)
        if problems:
            raise FederationFailed("aggregation produced unusable arrays: " + "; ".join(problems))
        for key in plan.sent:
            if key in aggregated:
                self.state[key] = torch.from_numpy(np.array(aggregated[key], copy=True))

    # ------------------------------------------------------------------ metrics
    def pool(self, replies: list[Reply], record: RoundRecord) -> None:
        """Pooled and weighted-mean validation figures; choose the next threshold."""
        record.threshold_used = self.threshold
        weights = [r.metrics["val-n"] for r in replies]
        record.weighted_mean = {
            key: weighted_mean([r.metrics[f"val-{key}"] for r in replies], weights)
            for key in ("auroc", "balanced-accuracy", "f1")
        }
        if self.binary:
            stats = [self.site_stats(r) for r in replies]
            pooled = pooled_metrics(stats, self.edges)
            hist_neg = np.sum([s.hist_neg for s in stats], axis=0)
            hist_pos = np.sum([s.hist_pos for s in stats], axis=0)
            self.threshold = self.choose_threshold(hist_neg, hist_pos)
            record.pooled = {"at_threshold_used": pooled,
                             "at_threshold_next": pooled_metrics(stats, self.edges, self.threshold)}
        else:
            record.pooled = {"at_threshold_used": pooled_multiclass_metrics([self.site_stats(r) for r in replies])}
        record.threshold_next = self.threshold

    def choose_threshold(self, hist_neg: np.ndarray, hist_pos: np.ndarray) -> float:
        rule = self.fed.threshold
        if rule == "youden":
            return youden_threshold_from_histograms(hist_neg, hist_pos, self.edges)
        if rule == "target-sensitivity":
            return threshold_for_sensitivity(hist_neg, hist_pos, self.edges, self.fed.target_sensitivity)
        return snap_threshold(float(rule), self.edges)

    def site_row(self, reply: Reply) -> dict[str, Any]:
        """One site's line in the round record: its size, time, bytes and local validation figures."""
        row = {"site": reply.site, "node": reply.node, "bytes_down": reply.bytes_down, "bytes_up": reply.bytes_up,
               "arrays_up": len(reply.arrays)}
        for key in ("num-examples", "train-loss", "train-seconds", "eval-seconds", "process-seconds", "val-n", "val-auroc",
                    "val-balanced-accuracy", "val-f1", "val-sensitivity", "val-specificity"):
            if key in reply.metrics:
                row[key.replace("-", "_")] = reply.metrics[key]
        return row

    # ------------------------------------------------------------------ persistence
    def checkpoint(self) -> None:
        """Global state and schedule position after a completed round (written atomically)."""
        folder = self.out / CHECKPOINT_DIR
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / "state.pt.tmp"
        torch.save(self.state, tmp)
        tmp.replace(folder / "state.pt")
        progress = {"completed_rounds": self.completed, "threshold": self.threshold,
                    "history": [vars(r) for r in self.history], "config": self.cfg.model_dump(by_alias=True)}
        tmp = folder / "progress.json.tmp"
        tmp.write_text(json.dumps(progress, indent=1, default=json_default))
        tmp.replace(folder / "progress.json")

    def resume(self) -> bool:
        """Continue from the last checkpoint of this output folder, if any; refuse another run's."""
        folder = self.out / CHECKPOINT_DIR
        if not (folder / "progress.json").is_file():
            return False
        progress = json.loads((folder / "progress.json").read_text())
        if progress["config"] != json.loads(json.dumps(self.cfg.model_dump(by_alias=True))):
            raise FederationFailed(f"{folder} holds a checkpoint of a run with another configuration; "
                                   "use a new out-dir or the same configuration")
        state = torch.load(folder / "state.pt", map_location="cpu", weights_only=True)
        expected = set(self.state)
        if self.dual is not None and not self.dual.is_dual_state(state):  # checkpointed after the merge
            expected = set(self.model.state_dict())
        if set(state) != expected:
            raise FederationFailed(f"{folder}/state.pt does not match the model")
        self.state = state
        self.completed = int(progress["completed_rounds"])
        self.threshold = float(progress["threshold"])
        self.history = [RoundRecord(**r) for r in progress["history"]]
        log.info("resuming after round %d of %d", self.completed, self.fed.rounds)
        return True

    def export_model(self) -> Path:
        """The final global model as a model folder that ``fedfreeze evaluate`` reads."""
        model: GroupedNet = self.model
        model.load_state_dict(self.state)
        card = make_card(model, self.cfg.model, threshold=self.threshold if self.binary else 0.5,
                         trained_by="fedfreeze federation",
                         notes={"rounds": self.fed.rounds, "strategy": self.fed.strategy,
                                "bn_policy": self.fed.bn_policy,
                                "threshold_rule": str(self.fed.threshold)})
        return save_model(self.out / MODEL_DIR, model, card)

