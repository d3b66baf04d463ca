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
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedfreeze.config import resolve_bn_stats
from fedfreeze.errors import DataError, FedfreezeError, ProtocolError
from fedfreeze.evaluation.cells import ReleasedCells, common_edges
from fedfreeze.evaluation.pooled import (
    choose_threshold,
    estimated_counts,
    pooled_multiclass_metrics,
    released_metrics,
    score_bin_edges,
    snap_threshold,
    threshold_interval,
    weighted_mean,
)
from fedfreeze.federation.config import FedConfig
from fedfreeze.federation.dual_stage import recipe_for
from fedfreeze.federation.estimates import auroc_width, decisive
from fedfreeze.federation.exchange import (
    ExchangePlan,
    check_arrays,
    frozen_hash,
    get_trainable_state,
    plan_for,
    set_trainable_state,
)
from fedfreeze.federation.protocol import DUAL, EVALUATE_ROLE, OWN_FIGURES, TRAIN_ROLE, RoundOrders
from fedfreeze.federation.provenance import summary_row
from fedfreeze.federation.records import Reply, RoundRecord, json_default
from fedfreeze.federation.rounds import RoundPlan, plan_round
from fedfreeze.federation.secure_stats import SECURE, SecureSum, check_sum
from fedfreeze.federation.tracking import Tracking
from fedfreeze.models.registry import build_model
from fedfreeze.operating_point import OperatingPoint
from fedfreeze.provenance import data_summary
from fedfreeze.training.schedule import adapter_groups, check_groups, check_rate_groups

log = logging.getLogger("fedfreeze.coordinator")

CHECKPOINT_DIR = "checkpoint"
MODEL_DIR = "model"
PAYLOAD_SLACK_BYTES = 65536  # room for metrics and statistics beside the arrays


class FederationFailed(FedfreezeError):
    """The federation cannot go on (too few valid replies, for example)."""


class Coordinator:
    """Global state and the rules of the federation."""

    def __init__(self, cfg: FedConfig, out_dir: str | Path, *, app_hash: str | None = None) -> None:
        self.cfg = cfg
        self.fed = cfg.federation
        self.out = Path(out_dir)
        # federation.tracking: the report's figures also go to TensorBoard / MLflow (report.py writes them);
        # a missing package stops the run here, before any round
        self.tracking = Tracking(cfg, self.out) if self.fed.tracking else None
        # the hash of the Flower app bundle (FAB) this run executes, as the transport reports it
        # (None: no FAB, e.g. in process); recorded in the exported model's provenance
        self.app_hash = app_hash
        self.adapter_groups = adapter_groups(self.fed.unfreeze, self.fed.method)
        torch.manual_seed(self.fed.seed)
        self.model, _ = build_model(cfg.model, self.adapter_groups, cfg.train.adapter_rank)
        check_groups(self.fed.unfreeze, list(self.model.groups))
        check_rate_groups(cfg.train, list(self.model.groups))
        # train.recipe = "dual": the first rounds train the dual model, whose state is the global
        # state until the merge (dual_stage.py explains the design); the recipe object hides which
        self.recipe = recipe_for(self.model, cfg.model, cfg.train.recipe, self.fed.dual_rounds, self.fed.seed)
        self.state = self.recipe.initial_state()
        self.binary = cfg.model.num_classes == 2
        self.edges = score_bin_edges(self.fed.score_bins)
        self.shared_points: dict[
            str, OperatingPoint
        ] = {}  # site -> the operating point it shared at the final evaluation
        self.threshold = snap_threshold(0.5, self.edges) if self.binary else 0.5
        # federation.cell-edges = "pooled-quantiles": where sites cut their cells first, from the last pooled scores
        self.cell_edges: tuple[int, ...] = ()
        self.completed = 0
        self.resumed_after: int | None = None  # --resume: the rounds completed by an earlier process
        self.history: list[RoundRecord] = []
        # federation.export = "best": the global model with the best pooled validation AUROC so far
        # (the model a round's sites scored before training: the one after the previous round)
        self.best: dict[str, Any] | None = None
        self.probe_state: dict[str, torch.Tensor] | None = None  # WiSE-FT's start: the model after the probe rounds
        self.swa_state: dict[str, torch.Tensor] | None = None  # SWA: the running mean of the last rounds' models
        self.swa_count = 0
        self.failed_round: RoundRecord | None = None  # the round that stopped the run, with its reasons
        self.started = time.time()
        # node id -> site name, from the sites' replies: progress lines and failure records name the site
        self.node_names: dict[int, str] = {}
        # node id -> the site's own validation figures of the last pooled round (from its cells)
        self.site_figures: dict[int, dict[str, Any]] = {}
        # how the evaluation-only sites' data was checked to be held out (data/overlap.py), for the report
        self.held_out_check: dict[str, Any] | None = None

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
            min_cell_count=self.fed.min_cell_count,
            cell_edges=self.cell_edges,
            secure_aggregation=self.fed.secure_aggregation,
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
        if reply.operating_point is not None:
            problems += self._operating_point_problems(reply, with_arrays)
        if reply.frozen_hash != proof:
            problems.append("frozen-weight hash differs from the coordinator's: the site's backbone is not the same")
        try:
            if reply.release == SECURE:
                self._secure_release_problems(reply)
            else:
                self.site_stats(reply, orders)
        except (ValueError, KeyError) as err:
            problems.append(f"validation statistics: {err}")
        problems += [
            f"site figures: {key} {value!r} is not one of {sorted(OWN_FIGURES.values())} with a value in [0, 1]"
            for key, value in reply.own_figures.items()
            if key not in OWN_FIGURES.values() or not (isinstance(value, float) and 0.0 <= value <= 1.0)
        ]
        try:
            data_summary(reply.metrics, self.cfg.model.num_classes)
        except ValueError as err:
            problems.append(f"data summary: {err}")
        return problems

    def _operating_point_problems(self, reply: Reply, with_arrays: bool) -> list[str]:
        """A shared operating point belongs to the final evaluation, names the replying site and parses."""
        if with_arrays:
            return ["sent an operating point outside the final evaluation"]
        try:
            point = OperatingPoint.model_validate_json(str(reply.operating_point))
        except ValueError as err:
            return [f"operating point: {str(err).splitlines()[0]}"]
        if point.site != reply.site:
            return [f"operating point names site {point.site!r}, but the reply comes from {reply.site!r}"]
        return []

    def keep_operating_points(self, replies: list[Reply]) -> None:
        """The operating points sites shared at the final evaluation (checked with their replies)."""
        self.shared_points = {
            r.site: OperatingPoint.model_validate_json(r.operating_point)
            for r in replies
            if r.operating_point is not None
        }

    def operating_points_line(self, exported: dict[str, Any]) -> str:
        """Which threshold each site runs the exported model at, and whether it was validated there."""
        kept = exported.get("operating_points") or []
        skipped = exported.get("operating_points_for_other_weights") or []
        line = f"threshold in use: the global {exported['threshold']:.3f} at every site without its own (not validated there)"
        if kept:
            line += f"; site operating points in the model folder: {', '.join(kept)}"
        else:
            line += "; no site shared an operating point (sites keep theirs in their state folder)"
        if skipped:
            line += f"; left out, fitted for another round's model: {', '.join(skipped)}"
        return line

    @staticmethod
    def _secure_release_problems(reply: Reply) -> None:
        """A reply whose statistics went into a secure sum carries their count and no cells (cells beside
        the masked statistics would give away what the sum hides)."""
        n = reply.metrics.get("val-n")
        if not isinstance(n, int) or isinstance(n, bool) or n < 0:
            raise ProtocolError(f"val-n {n!r} is not a count")
        cells = [key for key in reply.metrics if key.startswith("val-cell-")]
        if cells:
            raise ProtocolError(f"cells {cells} sent beside statistics ordered into the secure sum")

    def site_stats(self, reply: Reply, orders: RoundOrders) -> ReleasedCells:
        """A reply's validation statistics: the cells it released (per class, over score bins or, for
        a multi-class model, over predicted classes), checked against the round's orders: a cell
        below ``min-cell-count`` rejects the reply (``ProtocolError``, a ``ValueError``)."""
        k = self.cfg.model.num_classes
        cells = ReleasedCells.from_metrics(
            reply.metrics,
            "val-",
            classes=k,
            units=orders.score_bins if self.binary else k,
            min_count=orders.min_cell_count,
        )
        if reply.metrics.get("val-n") != cells.n:
            raise ProtocolError(f"val-n is {reply.metrics.get('val-n')!r} but the cells hold {cells.n} cases")
        return cells

    def apply(self, plan: ExchangePlan, aggregated: dict[str, np.ndarray], orders: RoundOrders) -> None:
        """Write aggregated arrays into the global state (only the round's keys, same dtypes; under
        dynamic freezing only the keys some site trained, the others keep their global value)."""
        try:
            set_trainable_state(self.state, aggregated, plan, partial=orders.partial_replies, who="aggregation: ")
        except ProtocolError as err:
            raise FederationFailed(f"aggregation produced unusable arrays: {err}") from None

    # ------------------------------------------------------------------ metrics
    def group_counts(
        self, replies: list[Reply], orders: RoundOrders, secure: SecureSum | None
    ) -> tuple[list[ReleasedCells], list[np.ndarray], dict[str, Any]]:
        """One group's releases and counts for pooling: its secure sum as one exact release (checked
        against the sites' ``val-n``), else each site's cells with the counts estimated from them; and
        what ``pooled.cells`` says of them."""
        if secure is not None:
            check_sum(secure.vector, orders, sum(int(r.metrics["val-n"]) for r in replies), secure.group)
            summed = secure.release(orders)
            about = {"min_cell_count": 1, "secure_sum": {"sites": list(secure.sites), "dropped": list(secure.dropped)}}
            return [summed], [secure.table(orders).astype(float)], about
        cells = [self.site_stats(r, orders) for r in replies]
        about = {"min_cell_count": orders.min_cell_count, "allocation": "binormal" if self.binary else "pooled"}
        return cells, estimated_counts(cells, self.edges if self.binary else None), about

    def pool(
        self,
        replies: list[Reply],
        record: RoundRecord,
        orders: RoundOrders,
        sums: Mapping[str, SecureSum] | None = None,
    ) -> None:
        """Pooled and weighted-mean validation figures of the training sites; choose the next threshold
        and, with ``cell-edges = "pooled-quantiles"``, the next round's common cell edges.
        Evaluation-only sites are pooled apart (``record.evaluation_sites``) and choose nothing.

        A group with a secure sum (``sums``, by role) is pooled from it: exact figures. Otherwise every
        figure comes from the cells the sites released (``fedfreeze.evaluation.cells``): the counts
        within a cell are estimated, and each binary figure carries the range that the cells fix
        exactly (``ranges``)."""
        record.threshold_used = self.threshold
        sums = sums or {}
        replies = sorted(replies, key=lambda r: (r.site, r.node))  # figures independent of the arrival order
        evaluators = [r for r in replies if r.role == EVALUATE_ROLE]
        replies = [r for r in replies if r.role != EVALUATE_ROLE]
        cells, estimated, released = self.group_counts(replies, orders, sums.get(TRAIN_ROLE))
        # each site's own figures (the site rows of metrics.json, and their weighted mean for comparison)
        self.site_figures = self._site_figures(replies, cells, estimated, record.threshold_used)
        record.weighted_mean = mean_of_sites(self.site_figures)
        if self.binary:
            hist_neg, hist_pos = np.sum(estimated, axis=0)
            if self.fed.cell_edges == "pooled-quantiles":  # the next round's common edges, decided here once
                self.cell_edges = tuple(common_edges(hist_neg + hist_pos))
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
                "at_threshold_used": released_metrics(cells, estimated, self.edges, record.threshold_used),
                "at_threshold_next": released_metrics(cells, estimated, self.edges, self.threshold),
                "at_0.5": released_metrics(cells, estimated, self.edges, snap_threshold(0.5, self.edges)),
                # estimated from the cells (exact when min-cell-count = 1)
                "histograms": {"neg": _rounded(hist_neg), "pos": _rounded(hist_pos)},
                "cells": released,
            }
        else:
            record.pooled = {"at_threshold_used": pooled_multiclass_metrics(estimated), "cells": released}
        if evaluators:
            self._pool_evaluators(evaluators, record, record.threshold_used, orders, sums.get(EVALUATE_ROLE))
        record.threshold_next = self.threshold

    def _pool_evaluators(
        self,
        evaluators: list[Reply],
        record: RoundRecord,
        used: float,
        orders: RoundOrders,
        secure_sum: SecureSum | None,
    ) -> None:
        """The evaluation-only sites pooled apart (``record.evaluation_sites``), at the threshold used and,
        for a binary task, the next one; their figures choose nothing. ``used``: the round's threshold."""
        cells, counts, about = self.group_counts(evaluators, orders, secure_sum)
        self.site_figures.update(self._site_figures(evaluators, cells, counts, used))
        if self.binary:
            figures = {
                "at_threshold_used": released_metrics(cells, counts, self.edges, used),
                "at_threshold_next": released_metrics(cells, counts, self.edges, self.threshold),
            }
        else:
            figures = {"at_threshold_used": pooled_multiclass_metrics(counts)}
        record.evaluation_sites = {"sites": [r.site for r in evaluators], **figures, "cells": about}

    def _site_figures(
        self, replies: list[Reply], cells: list[ReleasedCells], estimated: list[np.ndarray], threshold: float
    ) -> dict[int, dict[str, Any]]:
        """Each site's own validation figures: the exact ones it shared (``share-site-figures``), else
        the coordinator's estimate from the site's cells (``cells`` and ``estimated``, one per reply);
        from a secure sum (one release for the group), none."""
        per_site = len(cells) == len(replies) and not any(r.release == SECURE for r in replies)
        out: dict[int, dict[str, Any]] = {}
        for i, reply in enumerate(replies):
            shared = {key: reply.own_figures[wire] for key, wire in OWN_FIGURES.items() if wire in reply.own_figures}
            if shared:
                out[reply.node] = {"n": reply.metrics["val-n"], **shared, "figures_from": "site"}
            elif per_site:
                out[reply.node] = {**self._own_figures(cells[i], estimated[i], threshold), "figures_from": "cells"}
            else:
                out[reply.node] = {"n": reply.metrics["val-n"]}
        return out

    def _own_figures(self, cells: ReleasedCells, estimated: np.ndarray, threshold: float) -> dict[str, Any]:
        """One site's own validation figures at ``threshold``, from its cells alone (left out where
        they are undefined, e.g. a validation split of one class)."""
        keys: tuple[str, ...]
        try:
            if self.binary:
                figures = released_metrics([cells], [estimated], self.edges, threshold)
                keys = ("auroc", "balanced_accuracy", "f1", "sensitivity", "specificity")
            else:
                figures = pooled_multiclass_metrics([estimated])
                keys = ("balanced_accuracy", "f1", "accuracy")
        except DataError:
            return {"n": cells.n}
        return {"n": cells.n, **{k: figures[k] for k in keys}}

    def note_scored(self, record: RoundRecord, scored_state: dict[str, torch.Tensor], scored_after: int) -> None:
        """``export = "best"``: keep ``scored_state`` (the global model after round ``scored_after``, which
        this record's training sites scored) when its pooled validation AUROC is the best so far (ties go
        to the later round). Evaluation-only sites never take part in this choice."""
        if self.fed.export != "best":
            return
        pooled = (record.pooled or {}).get("at_threshold_used", {})
        score = pooled.get("auroc", pooled.get("accuracy"))
        if score is None:
            return
        if not decisive(record.pooled, self.fed.best_max_range):
            log.info(
                "the global model after round %d: its pooled validation AUROC is only known to within %.2f "
                "(the sites' cells allow that much), wider than best-max-range = %.2f: not used to choose",
                scored_after,
                auroc_width(record.pooled) or 0.0,
                self.fed.best_max_range,
            )
            return
        if self.best is not None and score < self.best["score"]:
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
        """``patience``: no better pooled validation AUROC in that many rounds, counting only the rounds
        whose figures were known well enough to choose on (``decisive``)."""
        if not self.fed.patience or self.best is None:
            return False
        since = [
            r for r in self.history if r.round - 1 > self.best["round"] and decisive(r.pooled, self.fed.best_max_range)
        ]
        return len(since) >= self.fed.patience

    def end_probe(self, rnd: int) -> None:
        """Remember the model after the last probe round (WiSE-FT's start)."""
        if self.fed.wise_alpha < 1.0 and rnd == self.fed.probe_rounds:
            self.probe_state = {k: v.clone() for k, v in self.state.items()}

    def accumulate_swa(self, rnd: int) -> None:
        """SWA over rounds: fold the global model after round ``rnd`` into the running mean when it is one
        of the last ``swa-rounds`` rounds (floating arrays; counters keep the last round's value)."""
        if self.fed.swa_rounds == 0 or rnd <= self.fed.rounds - self.fed.swa_rounds:
            return
        self.swa_count += 1
        if self.swa_state is None:
            self.swa_state = {k: v.clone() for k, v in self.state.items()}
            return
        for key, value in self.state.items():
            if value.is_floating_point():
                self.swa_state[key] += (value - self.swa_state[key]) / self.swa_count
            else:
                self.swa_state[key] = value.clone()

    def apply_swa(self) -> None:
        """The exported model becomes the mean of the last rounds' global models (``accumulate_swa``)."""
        if self.swa_state is None:
            return
        self.state = {k: v.clone() for k, v in self.swa_state.items()}
        log.info("SWA: the final model is the mean of the global models after the last %d rounds", self.swa_count)

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
        """One site's line in the round record: its size, time, bytes and its own validation figures
        (estimated by ``pool`` from the site's cells: a site sends no figure of its own)."""
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
        ):
            if key in reply.metrics:
                row[key.replace("-", "_")] = reply.metrics[key]
        own = self.site_figures.get(reply.node, {})
        row.update({f"val_{k}": v for k, v in own.items() if k != "n"})
        # the site's data summary (checked with the reply): what the model card lists per site
        row.update(summary_row(data_summary(reply.metrics, self.cfg.model.num_classes)))
        return row

    # ------------------------------------------------------------------ persistence
    def checkpoint(self) -> None:
        """Global state and schedule position after a completed round (written atomically)."""
        folder = self.out / CHECKPOINT_DIR
        folder.mkdir(parents=True, exist_ok=True)
        kept = {"state": self.state, "best": self.best, "probe_state": self.probe_state, "swa_state": self.swa_state}
        for name, value in kept.items():
            if value is None:
                (folder / f"{name}.pt").unlink(missing_ok=True)
                continue
            tmp = folder / f"{name}.pt.tmp"
            torch.save(value, tmp)
            tmp.replace(folder / f"{name}.pt")
        progress = {
            "completed_rounds": self.completed,
            "swa_count": self.swa_count,
            "threshold": self.threshold,
            "cell_edges": list(self.cell_edges),
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
        self.swa_count = int(progress.get("swa_count", 0))
        for name in ("best", "probe_state", "swa_state"):
            if (folder / f"{name}.pt").is_file():
                setattr(self, name, torch.load(folder / f"{name}.pt", map_location="cpu", weights_only=True))
        self.completed = int(progress["completed_rounds"])
        self.resumed_after = self.completed
        self.threshold = float(progress["threshold"])
        self.cell_edges = tuple(int(e) for e in progress.get("cell_edges", ()))
        self.history = [RoundRecord(**r) for r in progress["history"]]
        log.info("resuming after round %d of %d", self.completed, self.fed.rounds)
        return True


def mean_of_sites(figures: Mapping[int, Mapping[str, Any]]) -> dict[str, Any]:
    """The weighted mean of the sites' own figures (what other frameworks report, for comparison):
    over the sites that shared their exact figures when any did, else over the estimates from each
    site's cells; ``from`` says which. Empty when no site has figures (a secure sum, no site sharing)."""
    exact = [f for f in figures.values() if f.get("figures_from") == "site"]
    usable = exact or [f for f in figures.values() if f.get("figures_from") == "cells"]
    out: dict[str, Any] = {}
    for key in ("auroc", "balanced-accuracy", "f1"):
        rows = [f for f in usable if f.get(key.replace("-", "_")) is not None]
        if rows:
            out[key] = weighted_mean([f[key.replace("-", "_")] for f in rows], [f["n"] for f in rows])
    if out:
        out["from"] = (
            f"exact figures shared by {len(exact)} of {len(figures)} sites"
            if exact
            else "estimates from each site's cells"
        )
    return out


def _rounded(values: np.ndarray) -> list[float]:
    """Estimated counts for metrics.json: six decimals are far below one case."""
    return [round(float(v), 6) for v in values]
