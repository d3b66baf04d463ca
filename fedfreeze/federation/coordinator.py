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
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedfreeze.config import resolve_bn_stats
from fedfreeze.errors import FedfreezeError, ProtocolError
from fedfreeze.evaluation.pooled import (
    SiteStats,
    choose_threshold,
    pooled_metrics,
    pooled_multiclass_metrics,
    score_bin_edges,
    snap_threshold,
    threshold_interval,
    weighted_mean,
)
from fedfreeze.federation.config import FedConfig
from fedfreeze.federation.dual_stage import recipe_for
from fedfreeze.federation.exchange import (
    ExchangePlan,
    check_arrays,
    frozen_hash,
    get_trainable_state,
    plan_for,
    set_trainable_state,
)
from fedfreeze.federation.protocol import DUAL, EVALUATE_ROLE, RoundOrders
from fedfreeze.federation.records import Reply, RoundRecord, json_default
from fedfreeze.federation.rounds import RoundPlan, plan_round
from fedfreeze.model_io import make_card, save_model
from fedfreeze.models.grouped import GroupedNet
from fedfreeze.models.registry import build_model
from fedfreeze.training.schedule import adapter_groups, check_groups

log = logging.getLogger("fedfreeze.coordinator")

CHECKPOINT_DIR = "checkpoint"
MODEL_DIR = "model"
PAYLOAD_SLACK_BYTES = 65536  # room for metrics and statistics beside the arrays


class FederationFailed(FedfreezeError):
    """The federation cannot go on (too few valid replies, for example)."""


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
        # train.recipe = "dual": the first rounds train the dual model, whose state is the global
        # state until the merge (dual_stage.py explains the design); the recipe object hides which
        self.recipe = recipe_for(self.model, cfg.model, cfg.train.recipe, self.fed.dual_rounds, self.fed.seed)
        self.state = self.recipe.initial_state()
        self.binary = cfg.model.num_classes == 2
        self.edges = score_bin_edges(self.fed.score_bins)
        self.threshold = snap_threshold(0.5, self.edges) if self.binary else 0.5
        self.completed = 0
        self.history: list[RoundRecord] = []
        # federation.export = "best": the global model with the best pooled validation AUROC so far
        # (the model a round's sites scored before training: the one after the previous round)
        self.best: dict[str, Any] | None = None
        self.probe_state: dict[str, torch.Tensor] | None = None  # WiSE-FT's start: the model after the probe rounds
        self.failed_round: RoundRecord | None = None  # the round that stopped the run, with its reasons
        self.started = time.time()
        # node id -> site name, from the sites' replies: progress lines and failure records name the site
        self.node_names: dict[int, str] = {}

    # ------------------------------------------------------------------ schedule
    def round_plan(self, rnd: int) -> RoundPlan:
        return plan_round(rnd, self.fed, self.recipe.parts)

    def begin_round(self, rnd: int) -> None:
        """Whatever the recipe does as a round starts (the dual recipe's merge after its last dual round)."""
        self.state = self.recipe.begin_round(self.state, self.round_plan(rnd).stage)

    def orders(self, rnd: int) -> RoundOrders:
        """Every decision about round ``rnd``, made here once; sites apply them as sent."""
        plan = self.round_plan(rnd)
        stage = plan.stage
        return RoundOrders(
            round=rnd,
            stage=stage,  # type: ignore[arg-type]
            parts=plan.parts,
            local_epochs=plan.local_epochs,
            model=self.cfg.model,
            train=self.cfg.train,
            adapter_groups=tuple(self.adapter_groups),
            bn_policy=self.fed.bn_policy,
            # the dual stage trains from scratch: its statistics are learnt and travel
            bn_stats="update" if stage == DUAL else resolve_bn_stats(self.cfg.train, self.model.pretrained),
            partial_replies=self.cfg.train.freezing == "dynamic" and stage != DUAL,
            proximal_mu=self.fed.proximal_mu if self.fed.strategy == "fedprox" else 0.0,
            lr_scale=plan.lr_scale,
            val_fraction=self.fed.val_fraction,
            threshold=self.threshold,
            score_bins=self.fed.score_bins,
            seed=self.fed.seed,
            dp_weight=self.fed.dp != "off",
            evaluation_sites=tuple(self.fed.evaluation_sites),
        )

    def plan(self, orders: RoundOrders) -> ExchangePlan:
        return plan_for(self.recipe.model_for(orders.stage), orders)

    def arrays_for(self, plan: ExchangePlan) -> dict[str, torch.Tensor]:
        return get_trainable_state(self.state, plan)

    def base_for(self, plan: ExchangePlan) -> dict[str, torch.Tensor]:
        """Frozen arrays sent down with a round's trainable ones: under ``train.recipe = "dual"``, after
        the merge, the frozen groups hold federated weights a site cannot rebuild (empty otherwise)."""
        return self.recipe.base_for(self.state, plan)

    def expected_hash(self, plan: ExchangePlan) -> str:
        return frozen_hash(self.state, plan)

    # ------------------------------------------------------------------ replies
    def check(
        self, reply: Reply, plan: ExchangePlan, proof: str, orders: RoundOrders, *, with_arrays: bool
    ) -> list[str]:
        """Reasons to reject a reply (empty when it is valid). Nothing of a rejected reply is used."""
        problems = []
        role = orders.role_of(reply.site)
        if reply.role != role:
            problems.append(f"replied as a {reply.role!r} site, but the orders make {reply.site!r} a {role!r} site")
        elif with_arrays and role == EVALUATE_ROLE and reply.arrays:
            problems.append("an evaluation-only site returned arrays")
        elif with_arrays and role != EVALUATE_ROLE:
            expected = {k: v.numpy() for k, v in self.arrays_for(plan).items()}
            problems += check_arrays(reply.arrays, expected, partial=orders.partial_replies)
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
        """A reply's validation statistics: ``SiteStats`` (binary) or a confusion matrix (multi-class)."""
        return self.binary_stats(reply) if self.binary else self.confusion(reply)

    def binary_stats(self, reply: Reply) -> SiteStats:
        return SiteStats.from_metrics(reply.metrics, "val-", bins=self.fed.score_bins)

    def confusion(self, reply: Reply) -> np.ndarray:
        flat = np.asarray(reply.metrics["val-confusion"], dtype=np.int64)
        k = self.cfg.model.num_classes
        if flat.shape != (k * k,) or (flat < 0).any():
            raise ProtocolError(f"val-confusion should hold {k * k} non-negative counts")
        return flat.reshape(k, k)

    def apply(self, plan: ExchangePlan, aggregated: dict[str, np.ndarray], orders: RoundOrders) -> None:
        """Write aggregated arrays into the global state (only the round's keys, same dtypes; under
        dynamic freezing only the keys some site trained, the others keep their global value)."""
        try:
            set_trainable_state(self.state, aggregated, plan, partial=orders.partial_replies, who="aggregation: ")
        except ProtocolError as err:
            raise FederationFailed(f"aggregation produced unusable arrays: {err}") from None

    # ------------------------------------------------------------------ metrics
    def pool(self, replies: list[Reply], record: RoundRecord) -> None:
        """Pooled and weighted-mean validation figures of the training sites; choose the next threshold.
        Evaluation-only sites are pooled apart (``record.evaluation_sites``) and choose nothing."""
        record.threshold_used = self.threshold
        evaluators = [r for r in replies if r.role == EVALUATE_ROLE]
        replies = [r for r in replies if r.role != EVALUATE_ROLE]
        weights = [r.metrics["val-n"] for r in replies]
        record.weighted_mean = {
            key: weighted_mean([r.metrics[f"val-{key}"] for r in replies], weights)
            for key in ("auroc", "balanced-accuracy", "f1")
        }
        if self.binary:
            stats = [self.binary_stats(r) for r in replies]
            pooled = pooled_metrics(stats, self.edges)
            hist_neg = np.sum([s.hist_neg for s in stats], axis=0)
            hist_pos = np.sum([s.hist_pos for s in stats], axis=0)
            target, tolerance = self.fed.target_sensitivity, self.fed.threshold_tolerance
            self.threshold = choose_threshold(
                self.fed.threshold, hist_neg, hist_pos, self.edges, target_sensitivity=target, tolerance=tolerance
            )
            record.threshold_interval = list(
                threshold_interval(
                    self.fed.threshold,
                    hist_neg,
                    hist_pos,
                    self.edges,
                    target_sensitivity=target,
                    tolerance=tolerance,
                    seed=self.fed.seed + record.round,
                )
            )
            record.pooled = {
                "at_threshold_used": pooled,
                "at_threshold_next": pooled_metrics(stats, self.edges, self.threshold),
                "at_0.5": pooled_metrics(stats, self.edges, snap_threshold(0.5, self.edges)),
                "histograms": {"neg": hist_neg.tolist(), "pos": hist_pos.tolist()},
            }
            if evaluators:
                external = [self.binary_stats(r) for r in evaluators]
                record.evaluation_sites = {
                    "sites": [r.site for r in evaluators],
                    "at_threshold_used": pooled_metrics(external, self.edges),
                    "at_threshold_next": pooled_metrics(external, self.edges, self.threshold),
                }
        else:
            record.pooled = {"at_threshold_used": pooled_multiclass_metrics([self.confusion(r) for r in replies])}
            if evaluators:
                record.evaluation_sites = {
                    "sites": [r.site for r in evaluators],
                    "at_threshold_used": pooled_multiclass_metrics([self.confusion(r) for r in evaluators]),
                }
        record.threshold_next = self.threshold

    def note_scored(self, record: RoundRecord, scored_state: dict[str, torch.Tensor], scored_after: int) -> None:
        """``export = "best"``: keep ``scored_state`` (the global model after round ``scored_after``, which
        this record's training sites scored) when its pooled validation AUROC is the best so far (ties go
        to the later round). Evaluation-only sites never take part in this choice."""
        if self.fed.export != "best":
            return
        pooled = (record.pooled or {}).get("at_threshold_used", {})
        score = pooled.get("auroc", pooled.get("accuracy"))
        if score is None or (self.best is not None and score < self.best["score"]):
            return
        self.best = {
            "round": scored_after,
            "score": float(score),
            "threshold": float(self.threshold),
            "threshold_interval": record.threshold_interval,
            "pooled": record.pooled,
            "state": {k: v.clone() for k, v in scored_state.items()},
        }

    def should_stop(self) -> bool:
        """``patience``: no better pooled validation AUROC in that many rounds."""
        return bool(
            self.fed.patience and self.best is not None and self.completed - self.best["round"] > self.fed.patience
        )

    def end_probe(self, rnd: int) -> None:
        """Remember the model after the last probe round (WiSE-FT's start)."""
        if self.fed.wise_alpha < 1.0 and rnd == self.fed.probe_rounds:
            self.probe_state = {k: v.clone() for k, v in self.state.items()}

    def apply_wise(self) -> None:
        """WiSE-FT (Wortsman et al. 2022): move the fine-tuned global model back toward the probe-end model,
        ``probe + alpha * (fine-tuned - probe)``, every floating array (counters keep their value)."""
        if self.fed.wise_alpha >= 1.0 or self.probe_state is None:
            return
        alpha = self.fed.wise_alpha
        for key, value in self.state.items():
            if value.is_floating_point():
                start = self.probe_state[key]
                self.state[key] = start + alpha * (value - start)
        log.info("WiSE-FT: the final model is the probe-end model + %.2f x (fine-tuned - probe-end)", alpha)

    def site_row(self, reply: Reply) -> dict[str, Any]:
        """One site's line in the round record: its size, time, bytes and local validation figures."""
        row = {
            "site": reply.site,
            "node": reply.node,
            "bytes_down": reply.bytes_down,
            "bytes_up": reply.bytes_up,
            "arrays_up": len(reply.arrays),
        }
        for key in (
            "num-examples",
            "train-loss",
            "train-seconds",
            "eval-seconds",
            "process-seconds",
            "val-n",
            "val-auroc",
            "val-balanced-accuracy",
            "val-f1",
            "val-sensitivity",
            "val-specificity",
        ):
            if key in reply.metrics:
                row[key.replace("-", "_")] = reply.metrics[key]
        return row

    # ------------------------------------------------------------------ persistence
    def checkpoint(self) -> None:
        """Global state and schedule position after a completed round (written atomically)."""
        folder = self.out / CHECKPOINT_DIR
        folder.mkdir(parents=True, exist_ok=True)
        kept = {"state": self.state, "best": self.best, "probe_state": self.probe_state}
        for name, value in kept.items():
            if value is None:
                (folder / f"{name}.pt").unlink(missing_ok=True)
                continue
            tmp = folder / f"{name}.pt.tmp"
            torch.save(value, tmp)
            tmp.replace(folder / f"{name}.pt")
        progress = {
            "completed_rounds": self.completed,
            "threshold": self.threshold,
            "history": [vars(r) for r in self.history],
            "config": self.cfg.model_dump(by_alias=True),
        }
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
            raise FederationFailed(
                f"{folder} holds a checkpoint of a run with another configuration; "
                "use a new out-dir or the same configuration"
            )
        state = torch.load(folder / "state.pt", map_location="cpu", weights_only=True)
        if set(state) != self.recipe.state_keys(state):  # (the dual recipe: before or after the merge)
            raise FederationFailed(f"{folder}/state.pt does not match the model")
        self.state = state
        for name in ("best", "probe_state"):
            if (folder / f"{name}.pt").is_file():
                setattr(self, name, torch.load(folder / f"{name}.pt", map_location="cpu", weights_only=True))
        self.completed = int(progress["completed_rounds"])
        self.threshold = float(progress["threshold"])
        self.history = [RoundRecord(**r) for r in progress["history"]]
        log.info("resuming after round %d of %d", self.completed, self.fed.rounds)
        return True

    def exported(self) -> dict[str, Any]:
        """Which global model is exported, and the threshold and pooled figures that go with it."""
        if self.fed.export == "best" and self.best is not None:
            return {
                "round": self.best["round"],
                "rule": "best pooled validation AUROC of the training sites",
                "threshold": self.best["threshold"],
                "threshold_interval": self.best["threshold_interval"],
                "pooled": self.best["pooled"],
                "state": self.best["state"],
            }
        return {
            "round": self.completed,
            "rule": "last round",
            "threshold": self.threshold,
            "threshold_interval": None,
            "pooled": None,
            "state": self.state,
        }

    def export_model(self, final: RoundRecord | None = None) -> tuple[Path, dict[str, Any]]:
        """The exported global model as a model folder that ``fedfreeze evaluate`` reads, and what it is."""
        if final is not None:
            self.note_scored(final, self.state, self.completed)
        chosen = self.exported()
        if chosen["pooled"] is None and final is not None:
            chosen["pooled"], chosen["threshold_interval"] = final.pooled, final.threshold_interval
        model: GroupedNet = self.model
        model.load_state_dict(chosen["state"])
        threshold = chosen["threshold"] if self.binary else 0.5
        card = make_card(
            model,
            self.cfg.model,
            threshold=threshold,
            trained_by="fedfreeze federation",
            notes={
                "rounds": self.completed,
                "rounds_planned": self.fed.rounds,
                "exported_round": chosen["round"],
                "export_rule": chosen["rule"],
                "strategy": self.fed.strategy,
                "bn_policy": self.fed.bn_policy,
                "wise_alpha": self.fed.wise_alpha,
                "threshold_rule": str(self.fed.threshold),
                "threshold_interval": chosen["threshold_interval"],
            },
        )
        info = {k: v for k, v in chosen.items() if k != "state"}
        return save_model(self.out / MODEL_DIR, model, card), info
