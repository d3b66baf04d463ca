"""The provenance of a federation's exported model, from its round records (no Flower type).

What every model folder's provenance holds (the code, the data summaries, the record's types) is
``fedfreeze.provenance``; this module adds what only a federation has: each site's latest data
summary and its answered rounds, every round's parts, bytes and pooled figures, and the stored
threshold with the rule that chose it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict
from typing import Any

from fedfreeze.federation.records import RoundRecord
from fedfreeze.git_state import git_state
from fedfreeze.provenance import Provenance, SiteSummary, ThresholdChoice, named_counts, now_utc


def summary_row(summary: dict[str, Any] | None) -> dict[str, Any]:
    """A data summary as the flat keys of a site's line in a round record (``data_images``, ...)."""
    if summary is None:
        return {}
    return {
        "data_images": summary["images"],
        "data_patients": summary["patients"],
        "data_class_counts": summary["class_counts"],
        "data_manifest_sha256": summary["manifest_sha256"],
    }


def federation_sites(
    records: Sequence[RoundRecord], evaluation_sites: Sequence[str], class_names: Sequence[str]
) -> tuple[list[SiteSummary], list[SiteSummary]]:
    """Training and evaluation-only sites, each with the latest data summary it sent and the number
    of rounds it answered with a valid reply."""
    latest: dict[str, dict[str, Any]] = {}
    answered: dict[str, int] = {}
    for record in records:
        for row in record.sites:
            latest[row["site"]] = row
            answered[row["site"]] = answered.get(row["site"], 0) + 1
    training: list[SiteSummary] = []
    evaluating: list[SiteSummary] = []
    for site in sorted(latest):
        row = latest[site]
        role = "evaluate" if site in evaluation_sites else "train"
        summary = SiteSummary(
            site=site,
            role=role,
            images=row.get("data_images"),
            patients=row.get("data_patients"),
            class_counts=named_counts(row.get("data_class_counts"), class_names),
            manifest_sha256=row.get("data_manifest_sha256"),
            rounds=answered[site],
        )
        (evaluating if role == "evaluate" else training).append(summary)
    return training, evaluating


def round_entry(record: RoundRecord, *, final: bool = False) -> dict[str, Any]:
    """What the model folder keeps of a round record: parts, sites, bytes and pooled figures (the
    pooled histograms are left out: metrics.json has them)."""
    data = asdict(record)
    pooled = {k: v for k, v in (data.get("pooled") or {}).items() if k != "histograms"}
    external = data.get("evaluation_sites") or {}
    return {
        "round": record.round,
        "final_evaluation": final,
        "evaluated_model": record.evaluated_model,
        "parts": list(record.parts),
        "sites": [row["site"] for row in record.sites],
        "rejected": [row["site"] for row in record.rejected],
        "failed": [row.get("site") or f"node {row.get('node')}" for row in record.failures],
        "bytes_down": record.bytes_down,
        "bytes_up": record.bytes_up,
        "round_seconds": record.round_seconds,
        "threshold_used": record.threshold_used,
        "threshold_next": record.threshold_next,
        "threshold_interval": record.threshold_interval,
        "pooled": pooled.get("at_threshold_used"),
        "pooled_at_threshold_next": pooled.get("at_threshold_next"),
        "weighted_mean": record.weighted_mean,
        "evaluation_sites": external.get("at_threshold_used"),
        "privacy": record.privacy,
    }


SITE_FIGURES = ("val_n", "val_auroc", "val_balanced_accuracy", "val_f1", "val_sensitivity", "val_specificity")


def federation_metrics(
    scored: RoundRecord | None, exported_round: int, export_rule: str, evaluation_sites: Sequence[str]
) -> dict[str, Any]:
    """The exported model's figures, from the record of the round whose sites scored it: pooled
    validation of the training sites at the stored threshold, each site's own figures (at the
    threshold the round used), and the evaluation-only sites' pooled figures."""
    out: dict[str, Any] = {"exported_round": exported_round, "export_rule": export_rule}
    if scored is None:
        return out
    pooled = scored.pooled or {}
    external = scored.evaluation_sites or {}
    out.update(
        {
            "scored_in_round": scored.round,
            "validation": pooled.get("at_threshold_next") or pooled.get("at_threshold_used"),
            "weighted_mean": scored.weighted_mean,
            "per_site": [
                {
                    "site": row["site"],
                    "threshold": scored.threshold_used,
                    **{k: row[k] for k in SITE_FIGURES if k in row},
                }
                for row in scored.sites
                if row["site"] not in evaluation_sites
            ],
            "external": None
            if not external
            else {
                "sites": list(external.get("sites", [])),
                "figures": external.get("at_threshold_next") or external.get("at_threshold_used"),
                "per_site": [
                    {
                        "site": row["site"],
                        "threshold": scored.threshold_used,
                        **{k: row[k] for k in SITE_FIGURES if k in row},
                    }
                    for row in scored.sites
                    if row["site"] in evaluation_sites
                ],
            },
        }
    )
    return out


THRESHOLD_RULES_IN_WORDS = {
    "youden": "Youden's J (sensitivity + specificity - 1) at its maximum",
    "youden-mid": "the middle of the plateau where Youden's J is within {tolerance} of its maximum",
    "target-sensitivity": "the highest threshold with sensitivity at least {target}",
}


def federation_threshold(
    value: float, rule: float | str, *, binary: bool, interval: list[float] | None, tolerance: float, target: float
) -> ThresholdChoice:
    """The federation's stored threshold and its rule (``federation.threshold``) in words."""
    if not binary:
        return ThresholdChoice(value=value, rule="arg-max", how="multi-class: the class with the highest score")
    if not isinstance(rule, str):
        return ThresholdChoice(
            value=value,
            rule="number",
            how=f"the configured federation.threshold = {rule:g} (snapped to the score bins), not fitted to data",
            interval=None,
        )
    words = THRESHOLD_RULES_IN_WORDS[rule].format(tolerance=tolerance, target=target)
    return ThresholdChoice(
        value=value,
        rule=rule,
        how=f"{words}, on the training sites' pooled validation score histograms (the same data its "
        "validation figures come from, so those are optimistic at this threshold)",
        interval=interval,
    )


def federation_provenance(
    *,
    config: dict[str, Any],
    app_hash: str | None,
    history: Sequence[RoundRecord],
    final: RoundRecord | None,
    exported: Mapping[str, Any],
    threshold: ThresholdChoice,
    evaluation_sites: Sequence[str],
    class_names: Sequence[str],
) -> Provenance:
    """The provenance of a federation's exported model, from plain data (no Flower type)."""
    records = [*history, *([final] if final is not None else [])]
    training, evaluating = federation_sites(records, evaluation_sites, class_names)
    scored = next((r for r in records if r.round == int(exported["round"]) + 1), None)
    commit, dirty = git_state()
    return Provenance(
        source="federation",
        created_utc=now_utc(),
        git_commit=commit,
        git_dirty=dirty,
        app_hash=app_hash or None,
        app_hash_note=""
        if app_hash
        else "no app bundle (FAB): the run was not started from one (an in-process federation)",
        config=config,
        sites=training,
        evaluation_sites=evaluating,
        rounds=[round_entry(r) for r in history] + ([round_entry(final, final=True)] if final is not None else []),
        threshold=threshold,
        metrics=federation_metrics(scored, int(exported["round"]), str(exported["rule"]), evaluation_sites),
    )
