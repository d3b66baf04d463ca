"""From every fold's test predictions to the numbers a paper reports.

*Scopes.* ``pooled`` is every site's test fold put together and scored as one set (one AUROC over
all sites' cases, not a mean of the sites' AUROCs); each site is also scored on its own test fold.

*Per arm and scope.* Every metric per fold (threshold metrics at ``experiment.threshold``), then
the mean and sample standard deviation over the folds (what the BPD paper reports as
``0.78 +/- 0.10``) and a percentile interval of that mean from the patient-level bootstrap
(``bootstrap.py``).

*Per pair of arms* (same folds, same test cases; the first minus the second), pooled and per site:

* AUROC: DeLong's test on the mean AUROC over folds (``delong.py``);
* every metric: the paired patient-level bootstrap (difference, interval, p-value);
* every metric: the corrected resampled t-test (Nadeau & Bengio 2003, *Machine Learning*
  52:239-281, in the repeated k-fold form of Bouckaert & Frank 2004, PAKDD) on the per-fold
  differences: ``t = mean(d) / sqrt((1/J + n_test/n_train) * var(d))`` with ``J - 1`` degrees of
  freedom. Unlike the other two it also reflects how much the models change with the training
  set; a plain paired t-test over CV folds is anti-conservative (its folds share training data).

No correction for multiple comparisons is applied; the report says how many tests it shows.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from fedfreeze.errors import DataError
from fedfreeze.evaluation.bootstrap import (
    BOOTSTRAP_NAME,
    METRICS,
    FoldCases,
    bootstrap_weights,
    fold_mean_replicates,
    paired_p_value,
    percentile_interval,
)
from fedfreeze.evaluation.delong import FoldScores, delong_test_over_folds
from fedfreeze.metrics import binary_metrics, summarize

POOLED = "pooled"
TTEST_NAME = "corrected resampled t-test on per-fold differences (Nadeau & Bengio 2003), two-sided"


def fold_key(result: dict[str, Any]) -> tuple[int, int]:
    return int(result["repeat"]), int(result["fold"])


def _cases(result: dict[str, Any], site: str | None) -> dict[str, np.ndarray]:
    p = result["predictions"]
    keep = np.ones(len(p["label"]), dtype=bool) if site is None else np.array([s == site for s in p["site"]])
    return {
        "site": np.array(p["site"], dtype=object)[keep],
        "patient": np.array(p["patient_id"], dtype=object)[keep],
        "source": np.array(p["source"], dtype=object)[keep],
        "label": np.array(p["label"], dtype=np.int64)[keep],
        "score": np.array(p["score"], dtype=float)[keep],
    }


def corrected_t_test(differences: Sequence[float], test_train_ratio: float) -> dict[str, float | str]:
    """Nadeau-Bengio corrected resampled t-test of per-fold differences (two-sided)."""
    from scipy.stats import t as student

    d = np.asarray([x for x in differences if np.isfinite(x)], dtype=float)
    j = len(d)
    if j < 2:
        return {"t": float("nan"), "df": float(max(j - 1, 0)), "p_value": float("nan"), "test": TTEST_NAME}
    mean, var = float(d.mean()), float(d.var(ddof=1))
    scale = math.sqrt((1.0 / j + test_train_ratio) * var)
    if scale == 0.0:
        t_stat, p = (0.0, 1.0) if mean == 0.0 else (math.copysign(math.inf, mean), 0.0)
    else:
        t_stat = mean / scale
        p = float(2.0 * student.sf(abs(t_stat), j - 1))
    return {"t": float(t_stat), "df": float(j - 1), "p_value": p, "test": TTEST_NAME}


class Analysis:
    """Every arm's fold results, the shared bootstrap weights, and the summaries built from them."""

    def __init__(
        self,
        results: dict[str, list[dict[str, Any]]],
        *,
        threshold: float,
        replicates: int,
        confidence: float,
        seed: int,
    ) -> None:
        self.results = {arm: sorted(rs, key=fold_key) for arm, rs in results.items() if rs}
        if not self.results:
            raise DataError("no finished folds to analyse yet")
        self.threshold = threshold
        self.confidence = confidence
        self.replicates = replicates
        self.sites = sorted({s for rs in self.results.values() for r in rs for s in r["predictions"]["site"]})
        # bootstrap units: every tested patient, stratified by site and class
        units: dict[tuple[str, str], int] = {}
        strata: list[str] = []
        for rs in self.results.values():
            for r in rs:
                p = r["predictions"]
                for site, pid, label in zip(p["site"], p["patient_id"], p["label"], strict=True):
                    if (site, pid) not in units:
                        units[(site, pid)] = len(units)
                        strata.append(f"{site}|{label}")
        self.units = units
        self.weights = bootstrap_weights(strata, replicates, seed)
        self._replicates: dict[tuple[str, str, tuple[tuple[int, int], ...]], dict[str, np.ndarray]] = {}

    # ------------------------------------------------------------------ helpers
    def scopes(self) -> list[str]:
        return [POOLED, *self.sites]

    def _fold_cases(self, arm: str, scope: str, folds: set[tuple[int, int]] | None = None) -> list[FoldCases]:
        out = []
        for r in self.results[arm]:
            if folds is not None and fold_key(r) not in folds:
                continue
            c = _cases(r, None if scope == POOLED else scope)
            if len(set(c["label"].tolist())) < 2:
                continue
            units = np.array([self.units[(s, p)] for s, p in zip(c["site"], c["patient"], strict=True)])
            out.append(FoldCases(units, c["label"], c["score"]))
        return out

    def _boot(self, arm: str, scope: str, folds: set[tuple[int, int]] | None = None) -> dict[str, np.ndarray]:
        key = (arm, scope, tuple(sorted(folds)) if folds is not None else ())
        if key not in self._replicates:
            self._replicates[key] = fold_mean_replicates(
                self._fold_cases(arm, scope, folds), self.weights, self.threshold
            )
        return self._replicates[key]

    def fold_metrics(self, arm: str, scope: str) -> list[dict[str, Any]]:
        rows = []
        for r in self.results[arm]:
            c = _cases(r, None if scope == POOLED else scope)
            if len(set(c["label"].tolist())) < 2:
                continue
            m = binary_metrics(c["label"], c["score"], self.threshold)
            rows.append(
                {
                    "repeat": r["repeat"],
                    "fold": r["fold"],
                    **m,
                    "n_train": int(sum(r["n_train"].values()) if scope == POOLED else r["n_train"].get(scope, 0)),
                }
            )
        return rows

    # ------------------------------------------------------------------ per arm
    def arm_summary(self, arm: str, scope: str) -> dict[str, Any]:
        rows = self.fold_metrics(arm, scope)
        summary = summarize(rows, METRICS)
        boot = self._boot(arm, scope)
        for key in METRICS:
            if key in summary:
                low, high = percentile_interval(boot[key], self.confidence)
                summary[key].update({"ci_low": low, "ci_high": high})
        n_test = [r["n"] for r in rows]
        return {
            "folds": len(rows),
            "metrics": summary,
            "n_test_per_fold": float(np.mean(n_test)) if n_test else 0.0,
            "n_test_total": int(sum(n_test)),
        }

    # ------------------------------------------------------------------ comparisons
    def compare(self, first: str, second: str, scope: str) -> dict[str, Any] | None:
        """``first - second`` on the folds both arms finished, with the same test cases in each."""
        by_fold_a = {fold_key(r): r for r in self.results.get(first, [])}
        by_fold_b = {fold_key(r): r for r in self.results.get(second, [])}
        common = sorted(set(by_fold_a) & set(by_fold_b))
        delong_folds: list[FoldScores] = []
        diffs: dict[str, list[float]] = {k: [] for k in METRICS}
        ratios: list[float] = []
        used: set[Any] = set()
        for key in common:
            a = _cases(by_fold_a[key], None if scope == POOLED else scope)
            b = _cases(by_fold_b[key], None if scope == POOLED else scope)
            order_a, order_b = np.lexsort((a["source"], a["site"])), np.lexsort((b["source"], b["site"]))
            if list(a["source"][order_a]) != list(b["source"][order_b]) or list(a["site"][order_a]) != list(
                b["site"][order_b]
            ):
                raise DataError(
                    f"arms {first!r} and {second!r} were tested on different cases in repeat "
                    f"{key[0] + 1} fold {key[1] + 1}: their results come from different fold plans"
                )
            labels = a["label"][order_a]
            if len(set(labels.tolist())) < 2:
                continue
            sa, sb = a["score"][order_a], b["score"][order_b]
            ids = [f"{s}|{p}" for s, p in zip(a["site"][order_a], a["patient"][order_a], strict=True)]
            delong_folds.append(FoldScores(labels, sa, sb, ids))
            used.add(key)
            ma = binary_metrics(labels, sa, self.threshold)
            mb = binary_metrics(labels, sb, self.threshold)
            for k in METRICS:
                diffs[k].append(ma[k] - mb[k])
            n_train = (
                sum(by_fold_a[key]["n_train"].values()) if scope == POOLED else by_fold_a[key]["n_train"].get(scope, 0)
            )
            ratios.append(len(labels) / max(n_train, 1))
        if not delong_folds:
            return None
        boot_a, boot_b = self._boot(first, scope, used), self._boot(second, scope, used)
        out: dict[str, Any] = {
            "first": first,
            "second": second,
            "scope": scope,
            "folds": len(delong_folds),
            "delong": delong_test_over_folds(delong_folds, confidence=self.confidence).to_dict(),
            "metrics": {},
        }
        ratio = float(np.mean(ratios))
        for k in METRICS:
            observed = float(np.mean(diffs[k]))
            replicates = boot_a[k] - boot_b[k]
            low, high = percentile_interval(replicates, self.confidence)
            out["metrics"][k] = {
                "difference": observed,
                "bootstrap": {
                    "ci_low": low,
                    "ci_high": high,
                    "p_value": paired_p_value(observed, replicates),
                    "replicates": self.replicates,
                    "test": BOOTSTRAP_NAME,
                },
                "corrected_t": corrected_t_test(diffs[k], ratio),
            }
        return out


def analyze(
    results: dict[str, list[dict[str, Any]]],
    comparisons: Sequence[tuple[str, str]],
    *,
    threshold: float,
    replicates: int,
    confidence: float,
    seed: int,
) -> dict[str, Any]:
    """Summaries per arm and scope, and every requested comparison per scope, as one JSON-able dict."""
    analysis = Analysis(results, threshold=threshold, replicates=replicates, confidence=confidence, seed=seed)
    arms = {arm: {scope: analysis.arm_summary(arm, scope) for scope in analysis.scopes()} for arm in analysis.results}
    fold_rows = {
        arm: {scope: analysis.fold_metrics(arm, scope) for scope in analysis.scopes()} for arm in analysis.results
    }
    compared = []
    for first, second in comparisons:
        if first in analysis.results and second in analysis.results:
            per_scope = {scope: analysis.compare(first, second, scope) for scope in analysis.scopes()}
            compared.append(
                {"first": first, "second": second, "scopes": {k: v for k, v in per_scope.items() if v is not None}}
            )
    return {
        "threshold": threshold,
        "confidence": confidence,
        "bootstrap_replicates": replicates,
        "sites": analysis.sites,
        "arms": arms,
        "folds": fold_rows,
        "comparisons": compared,
    }
