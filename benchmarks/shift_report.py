"""The shift benchmark's figures: every arm on every set with patient-level bootstrap intervals,
the mean over the shifted sets, the threshold rules replayed on each federation's pooled validation
histograms, and the paired comparison of the best candidate with the plain probe.

Intervals: ``fedfreeze.evaluation.external.external_validation`` per arm and set (patients drawn
with replacement within class strata, percentile interval). The mean over the shifted sets uses the
same patient weights for every shift (the shifted sets are the same patients), so its interval and
the paired differences keep that dependence (``fedfreeze.evaluation.bootstrap``). DeLong's test of
the mean AUROC over the shifted sets sums each patient's placements over the sets
(``fedfreeze.evaluation.delong.delong_test_over_folds``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from shift_data import HELD_OUT, NIH_SET, EvalSet

from fedfreeze.evaluation.bootstrap import (
    FoldCases,
    bootstrap_weights,
    fold_mean_replicates,
    paired_p_value,
    percentile_interval,
)
from fedfreeze.evaluation.delong import FoldScores, delong_test_over_folds
from fedfreeze.evaluation.external import external_validation, patient_strata

SHIFTED_MEAN = "shifted (mean of 7)"
KEEP = ("auroc", "balanced_accuracy", "sensitivity", "specificity", "f1", "threshold", "n")
RULES = ("stored", "0.5", "youden", "youden-mid")
BASELINE = "probe-lr"


def arm_thresholds(result: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """Each threshold rule's threshold for an arm, with the pooled validation figures at it when the
    federation's histograms are known: ``stored`` (what the model folder holds), ``0.5`` and, replayed
    on the histograms with ``fedfreeze.evaluation.pooled.choose_threshold``, ``youden`` and ``youden-mid``."""
    out: dict[str, dict[str, Any]] = {"stored": {"threshold": float(result["threshold"])}, "0.5": {"threshold": 0.5}}
    hist = result.get("histograms")
    if not hist:
        return out
    from fedfreeze.evaluation import pooled

    neg, pos, edges = np.array(hist["neg"]), np.array(hist["pos"]), np.array(hist["edges"])
    rules = getattr(pooled, "THRESHOLD_RULES", ("youden",))
    for rule in ("youden", "youden-mid"):
        if rule in rules:
            out[rule] = {"threshold": float(pooled.choose_threshold(rule, neg, pos, edges))}
    for row in out.values():
        t = pooled.snap_threshold(row["threshold"], edges)
        tp, fp, tn, fn = pooled.confusion_from_histograms(neg, pos, edges, t)
        row["internal_balanced_accuracy"] = (tp / (tp + fn) + tn / (tn + fp)) / 2
    return out


def _compact(ev: Mapping[str, Any]) -> dict[str, Any]:
    ci = ev.get("ci") or {}
    return {
        **{k: ev.get(k) for k in KEEP},
        "n_patients": ev["n_patients"],
        "ci": {k: ci.get(k) for k in ("auroc", "balanced_accuracy", "sensitivity", "specificity")},
        "brier": ev["calibration"]["brier"],
        "ece": ev["calibration"]["ece"],
    }


class Patients:
    """One set's patients as bootstrap units, and the replicate weights (shared by every arm)."""

    def __init__(self, s: EvalSet, replicates: int, seed: int) -> None:
        names, self.units = np.unique(np.asarray([str(p) for p in s.patient_ids]), return_inverse=True)
        self.n = len(names)
        self.weights = bootstrap_weights(patient_strata(s.labels, self.units, self.n), replicates, seed)
        self.ones = np.ones((1, self.n))


def mean_over(
    sets: Sequence[EvalSet],
    scores: Mapping[str, Sequence[float]],
    threshold: float,
    patients: Patients,
    confidence: float,
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Each metric's mean over ``sets`` (same patients) with its interval, and the replicates."""
    folds = [FoldCases(units=patients.units, labels=s.labels, scores=np.asarray(scores[s.name])) for s in sets]
    point = fold_mean_replicates(folds, patients.ones, threshold)
    reps = fold_mean_replicates(folds, patients.weights, threshold)
    row: dict[str, Any] = {
        k: float(point[k][0]) for k in ("auroc", "balanced_accuracy", "sensitivity", "specificity", "f1")
    }
    row["threshold"] = float(threshold)
    row["ci"] = {
        k: list(percentile_interval(reps[k], confidence))
        for k in ("auroc", "balanced_accuracy", "sensitivity", "specificity")
    }
    return row, reps


def evaluate(
    results: Mapping[str, Mapping[str, Any]],
    sets: list[EvalSet],
    *,
    replicates: int,
    seed: int,
    confidence: float = 0.95,
) -> dict[str, Any]:
    """Every arm x set x threshold rule, the shifted means, and the paired comparisons."""
    shifted = [s for s in sets if s.group == "shifted"]
    patients = {s.name: Patients(s, replicates, seed) for s in sets}
    out: dict[str, Any] = {"arms": {}, "replicates": replicates, "confidence": confidence, "seed": seed}
    reps: dict[tuple[str, str], dict[str, np.ndarray]] = {}
    for name, result in results.items():
        thresholds = arm_thresholds(result)
        arm: dict[str, Any] = {"thresholds": thresholds, "internal": result.get("internal"), "sets": {}}
        for rule, info in thresholds.items():
            per_set = {}
            for s in sets:
                ev = external_validation(
                    s.labels,
                    result["scores"][s.name],
                    s.patient_ids,
                    info["threshold"],
                    bootstrap=replicates,
                    confidence=confidence,
                    seed=seed,
                )
                per_set[s.name] = _compact(ev)
            row, r = mean_over(shifted, result["scores"], info["threshold"], patients[shifted[0].name], confidence)
            per_set[SHIFTED_MEAN] = row
            reps[(name, rule)] = r
            arm["sets"][rule] = per_set
        out["arms"][name] = arm
    out["ranking"] = rank(out)
    out["comparisons"] = compare(out, results, shifted, patients[shifted[0].name], reps, confidence)
    out["threshold_rules"] = rule_summary(out)
    return out


def _shifted(out: Mapping[str, Any], arm: str, rule: str, key: str) -> float:
    return out["arms"][arm]["sets"][rule][SHIFTED_MEAN][key]


def rank(out: Mapping[str, Any]) -> dict[str, Any]:
    """The candidates (not the baseline) ordered by their shifted mean AUROC, and by shifted mean
    balanced accuracy at their stored threshold and at their best threshold rule."""
    candidates = [a for a in out["arms"] if a != BASELINE]
    by_auroc = sorted(candidates, key=lambda a: -_shifted(out, a, "stored", "auroc"))
    by_ba = sorted(candidates, key=lambda a: -_shifted(out, a, "stored", "balanced_accuracy"))
    pairs = [(a, r) for a in candidates for r in out["arms"][a]["sets"]]
    by_ba_any = sorted(pairs, key=lambda p: -_shifted(out, p[0], p[1], "balanced_accuracy"))
    return {
        "by_shifted_auroc": by_auroc,
        "by_shifted_balanced_accuracy_stored": by_ba,
        "best_auroc": by_auroc[0] if by_auroc else None,
        "best_balanced_accuracy_stored": by_ba[0] if by_ba else None,
        "best_balanced_accuracy_any_rule": list(by_ba_any[0]) if by_ba_any else None,
    }


def compare(
    out: Mapping[str, Any],
    results: Mapping[str, Mapping[str, Any]],
    shifted: list[EvalSet],
    patients: Patients,
    reps: Mapping[tuple[str, str], Mapping[str, np.ndarray]],
    confidence: float,
) -> list[dict[str, Any]]:
    """Paired, on the shifted mean: the defaults, the seed defaults and each distinct winner (arm, rule)
    minus the plain probe at 0.5; the balanced-accuracy winner minus the AUROC winner at the same
    threshold rule (when they differ); the defaults minus the seed defaults, each at its stored
    threshold and both at 0.5."""
    if BASELINE not in out["arms"]:
        return []
    ranking = out["ranking"]
    winners: list[tuple[str, str]] = []
    for arm, rule in (
        ("defaults", "stored"),
        ("seed-defaults", "stored"),
        (ranking["best_auroc"], "stored"),
        (ranking["best_balanced_accuracy_stored"], "stored"),
        tuple(ranking["best_balanced_accuracy_any_rule"] or (None, None)),
    ):
        if arm in out["arms"] and (arm, rule) not in winners:
            winners.append((arm, rule))
    pairs = [((arm, rule), (BASELINE, "0.5")) for arm, rule in winners]
    if ranking["best_balanced_accuracy_any_rule"]:
        ba_arm, ba_rule = ranking["best_balanced_accuracy_any_rule"]
        if ba_arm != ranking["best_auroc"] and ba_rule in out["arms"][ranking["best_auroc"]]["sets"]:
            pairs.append(((ba_arm, ba_rule), (ranking["best_auroc"], ba_rule)))
    if "defaults" in out["arms"] and "seed-defaults" in out["arms"]:  # the new defaults against the old, always
        for rule in ("stored", "0.5"):
            pair = (("defaults", rule), ("seed-defaults", rule))
            if pair not in pairs:
                pairs.append(pair)
    rows = []
    for (arm, rule), (other, other_rule) in pairs:
        row: dict[str, Any] = {
            "arm": arm,
            "rule": rule,
            "baseline": f"{other} @ {other_rule}",
            "set": SHIFTED_MEAN,
            "test": "paired patient-level bootstrap (same patients and weights for both arms, "
            "stratified by class), two-sided; percentile interval of the difference",
        }
        for key in ("auroc", "balanced_accuracy"):
            observed = _shifted(out, arm, rule, key) - _shifted(out, other, other_rule, key)
            diff = np.asarray(reps[(arm, rule)][key]) - np.asarray(reps[(other, other_rule)][key])
            row[key] = {
                "difference": observed,
                "ci": list(percentile_interval(diff, confidence)),
                "p_value": paired_p_value(observed, diff),
            }
        folds = [
            FoldScores(
                labels=s.labels,
                scores_a=np.asarray(results[arm]["scores"][s.name]),
                scores_b=np.asarray(results[other]["scores"][s.name]),
                case_ids=[str(p) for p in s.patient_ids],
            )
            for s in shifted
        ]
        row["delong_auroc"] = delong_test_over_folds(folds, confidence=confidence).to_dict()
        rows.append(row)
    return rows


def rule_summary(out: Mapping[str, Any]) -> dict[str, Any]:
    """Per threshold rule, over the federated arms: balanced accuracy on the shifted mean (each arm and
    the mean over arms), the mean on the held-out set as is and on NIH, and on how many arms the rule
    gives the best shifted balanced accuracy."""
    federated = [a for a in out["arms"] if a != BASELINE]
    summary: dict[str, Any] = {}
    # "stored" is the arm's own rule (youden, unless an arm sets another): the contest is between rules
    contest = {a: [r for r in out["arms"][a]["sets"] if r != "stored"] or ["stored"] for a in federated}
    best = {a: max(contest[a], key=lambda r: _shifted(out, a, r, "balanced_accuracy")) for a in federated}
    for rule in RULES:
        arms = [a for a in federated if rule in out["arms"][a]["sets"]]
        if not arms:
            continue
        values = {a: _shifted(out, a, rule, "balanced_accuracy") for a in arms}
        summary[rule] = {
            "per_arm": values,
            "mean_over_arms": float(np.mean(list(values.values()))),
            "arms": len(arms),
            "held_out_mean": float(
                np.mean([out["arms"][a]["sets"][rule][HELD_OUT]["balanced_accuracy"] for a in arms])
            ),
            "nih_mean": float(np.mean([out["arms"][a]["sets"][rule][NIH_SET]["balanced_accuracy"] for a in arms])),
            "best_on_shifted_for": sorted(a for a in arms if best[a] == rule),
        }
    return summary


# ---------------------------------------------------------------------- Markdown
def _fmt(v: float | None, ci: Sequence[float] | None = None) -> str:
    if v is None or not np.isfinite(v):
        return "—"
    if ci is None or ci[0] is None or not np.isfinite(ci[0]):
        return f"{v:.3f}"
    return f"{v:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]"


def _cell(out: Mapping[str, Any], arm: str, rule: str, set_name: str, key: str) -> str:
    row = out["arms"][arm]["sets"].get(rule, {}).get(set_name)
    if row is None:
        return "—"
    return _fmt(row[key], (row.get("ci") or {}).get(key))


def _p(value: float) -> str:
    return "< 0.001" if value < 0.001 else f"{value:.3f}"


def _row(cells: Sequence[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def markdown(out: Mapping[str, Any], sets: list[EvalSet], meta: Mapping[str, Any]) -> str:
    arms = list(out["arms"])
    shifted = [s.name for s in sets if s.group == "shifted"]
    columns = [HELD_OUT, *shifted, NIH_SET]
    intro = (
        f"95 % patient-level bootstrap intervals ({out['replicates']} replicates, stratified by class). "
        "`stored` = the threshold the model folder holds (each federation's threshold rule on the pooled "
        "validation of the training sites: youden for every pinned arm, this checkout's default rule for "
        f"`defaults`; probe-lr: 0.5). Wall time {meta['wall_seconds']:.0f} s over {meta['invocations']} "
        f"invocation(s) on {meta['machine']}; the arms' own training + scoring took {meta['arm_seconds']:.0f} s "
        "(per arm in run.json)."
    )
    lines = [
        "# Shift benchmark: choosing fedfreeze's default federated recipe on data no site trained on",
        "",
        f"Command: `{meta['command']}`  ",
        f"Input size {meta['input_size']} px; {meta['data_line']}.  ",
        intro,
        "",
        "## Headline (each arm at its stored threshold)",
        "",
        _row(
            [
                "arm",
                "internal val AUROC",
                "internal val BA",
                "held-out AUROC",
                "held-out BA",
                "shifted AUROC",
                "shifted BA",
                "shifted BA @0.5",
                "NIH AUROC",
                "NIH BA",
            ]
        ),
        _row(["---"] * 10),
    ]
    for arm in arms:
        internal = (out["arms"][arm].get("internal") or {}).get("at_threshold_next") or {}
        lines.append(
            _row(
                [
                    arm,
                    _fmt(internal.get("auroc")),
                    _fmt(internal.get("balanced_accuracy")),
                    _cell(out, arm, "stored", HELD_OUT, "auroc"),
                    _cell(out, arm, "stored", HELD_OUT, "balanced_accuracy"),
                    _cell(out, arm, "stored", SHIFTED_MEAN, "auroc"),
                    _cell(out, arm, "stored", SHIFTED_MEAN, "balanced_accuracy"),
                    _cell(out, arm, "0.5", SHIFTED_MEAN, "balanced_accuracy"),
                    _cell(out, arm, "stored", NIH_SET, "auroc"),
                    _cell(out, arm, "stored", NIH_SET, "balanced_accuracy"),
                ]
            )
        )
    lines += [
        "",
        (
            "Internal val: the federation's final pooled validation of the training sites (what the run "
            "reports about itself), at the stored threshold. Shifted: mean over the 7 shifted copies of the "
            "held-out set. NIH: adults from another hospital, zero-shot, never blended into the Kermany "
            "figures."
        ),
        "",
    ]
    for key, title in (("auroc", "AUROC"), ("balanced_accuracy", "Balanced accuracy at the stored threshold")):
        lines += [f"## {title} per set", "", _row(["arm", *columns]), _row(["---"] * (len(columns) + 1))]
        lines += [_row([arm] + [_cell(out, arm, "stored", n, key) for n in columns]) for arm in arms]
        lines.append("")
    lines += [
        "## Threshold rules replayed on each federation's pooled validation histograms",
        "",
        (
            "Balanced accuracy of the same model at each rule's threshold; internal BA = the pooled validation "
            "of the training sites at that threshold (from the federation's histograms)."
        ),
        "",
        _row(["arm", "rule", "threshold", "internal BA", "held-out BA", "shifted BA", "NIH BA"]),
        _row(["---"] * 7),
    ]
    for arm in arms:
        for rule, info in out["arms"][arm]["thresholds"].items():
            lines.append(
                _row(
                    [
                        arm,
                        rule,
                        f"{info['threshold']:.3f}",
                        _fmt(info.get("internal_balanced_accuracy")),
                        _cell(out, arm, rule, HELD_OUT, "balanced_accuracy"),
                        _cell(out, arm, rule, SHIFTED_MEAN, "balanced_accuracy"),
                        _cell(out, arm, rule, NIH_SET, "balanced_accuracy"),
                    ]
                )
            )
    if out["threshold_rules"]:
        lines += [
            "",
            "Each rule over the federated arms (stored = each arm's own rule):",
            "",
            _row(
                [
                    "rule",
                    "mean held-out BA",
                    "mean shifted BA",
                    "mean NIH BA",
                    "best shifted BA among 0.5 / youden / youden-mid",
                ]
            ),
            _row(["---"] * 5),
        ]
        for rule, v in out["threshold_rules"].items():
            lines.append(
                _row(
                    [
                        rule,
                        f"{v['held_out_mean']:.3f}",
                        f"{v['mean_over_arms']:.3f}",
                        f"{v['nih_mean']:.3f}",
                        f"{len(v['best_on_shifted_for'])} of {v['arms']} arms" if rule != "stored" else "—",
                    ]
                )
            )
    r = out["ranking"]
    best_any = " @ ".join(r["best_balanced_accuracy_any_rule"] or [])
    lines += [
        "",
        "## Which candidate wins on the shifted sets",
        "",
        f"* by AUROC: **{r['best_auroc']}** (order: {', '.join(r['by_shifted_auroc'])})",
        f"* by balanced accuracy at the stored threshold: **{r['best_balanced_accuracy_stored']}**",
        f"* by balanced accuracy at any threshold rule: **{best_any}**",
        "",
        "## Paired comparisons (shifted mean; same patients, same bootstrap weights)",
        "",
        _row(
            [
                "candidate",
                "AUROC difference [95 % CI]",
                "p (bootstrap)",
                "p (DeLong)",
                "BA difference [95 % CI]",
                "p (bootstrap)",
            ]
        ),
        _row(["---"] * 6),
    ]
    for c in out["comparisons"]:
        a, b, d = c["auroc"], c["balanced_accuracy"], c["delong_auroc"]
        lines.append(
            _row(
                [
                    f"{c['arm']} @ {c['rule']} vs {c['baseline']}",
                    f"{a['difference']:+.3f} [{a['ci'][0]:+.3f}, {a['ci'][1]:+.3f}]",
                    _p(a["p_value"]),
                    _p(d["p_value"]),
                    f"{b['difference']:+.3f} [{b['ci'][0]:+.3f}, {b['ci'][1]:+.3f}]",
                    _p(b["p_value"]),
                ]
            )
        )
    lines += [
        "",
        (
            "The winner is picked on these same shifted sets, so its lead over the probe is optimistic (a "
            "selection effect); a difference whose interval includes 0 is not a win. The intervals reflect "
            "which patients were sampled, not how much training with another seed would change."
        ),
        "",
    ]
    if meta.get("unavailable"):
        missing = "; ".join(f"{k} ({v})" for k, v in meta["unavailable"].items())
        lines += [f"Arms this checkout could not run: {missing}", ""]
    return "\n".join(lines)
