"""Where a model folder came from: the code, the app, the configuration, the data and the rounds.

``model.json`` holds a ``provenance`` record (``Provenance``) beside what rebuilds the model; this
module gathers it, with no Flower import:

* the code: fedfreeze's version and, when the installed package is a git checkout, its commit and
  whether tracked files differ from it (``fedfreeze.git_state``; ``None`` when git or the checkout
  is absent, never an error);
* the app: in a federation, the hash of the Flower app bundle (FAB) that the run executed, as
  Flower reports it (``Run.fab_hash``), handed to the coordinator as plain data; ``None`` for a run
  without a FAB (in-process) and for ``site-train``;
* the full resolved configuration;
* each site's data as the site itself summarised it (``site_data_metrics``): images, patients,
  images per class and a fingerprint of its manifest's rows (never of images). A site sends these
  totals in its reply's metrics under ``DATA_KEYS``; the coordinator checks them
  (``data_summary``) and keeps the latest per site in the round records;
* every round's parts, bytes and pooled figures, the stored threshold and the rule that chose it
  (``fedfreeze.federation.provenance``, from the round records).

Adaptations applied later (``fedfreeze adapt``) are the card's ``adaptations`` list, kept apart.
"""

from __future__ import annotations

import csv
import hashlib
import json
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field

from fedfreeze import __version__
from fedfreeze.config import Section
from fedfreeze.data.dataset import MANIFEST_NAME
from fedfreeze.errors import ProtocolError
from fedfreeze.git_state import git_state

if TYPE_CHECKING:
    from fedfreeze.data.imageset import ImageSet

# a site's data summary in its reply's metrics: totals only (Flower's metric values are numbers or
# lists of numbers, so the manifest's SHA-256 travels as eight 32-bit words)
DATA_IMAGES = "data-images"
DATA_PATIENTS = "data-patients"
DATA_CLASS_COUNTS = "data-class-counts"
DATA_MANIFEST = "data-manifest-sha256"
DATA_KEYS = (DATA_IMAGES, DATA_PATIENTS, DATA_CLASS_COUNTS, DATA_MANIFEST)
SHA256_WORDS = 8


class SiteSummary(Section):
    """One site's data, as the site summarised it (totals only)."""

    site: str
    role: Literal["train", "evaluate"] = "train"
    images: int | None = Field(None, ge=0)
    patients: int | None = Field(None, ge=0)
    class_counts: dict[str, int] | None = Field(None, description="images per class, by class name")
    manifest_sha256: str | None = Field(None, description="SHA-256 of the manifest's rows; None: no manifest")
    rounds: int | None = Field(None, description="federation: rounds (and the final evaluation) it answered")
    data: str | None = Field(None, description="site-train: the data path at the site")


class ThresholdChoice(Section):
    """The stored decision threshold and how it was chosen."""

    value: float
    rule: str = Field(description="number | youden | youden-mid | target-sensitivity | youden-oof | arg-max")
    how: str = Field("", description="the rule in words, and on which data it was applied")
    interval: list[float] | None = Field(None, description="bootstrap 95% interval of the rule's pick")


class Provenance(Section):
    """What produced a model: code, app, configuration, data, rounds and threshold."""

    source: Literal["federation", "site-train"]
    created_utc: str
    fedfreeze_version: str = __version__
    git_commit: str | None = None
    git_dirty: bool | None = None
    app_hash: str | None = Field(None, description="federation: SHA-256 of the Flower app bundle (FAB) the run used")
    app_hash_note: str = ""
    config: dict[str, Any] = Field(default_factory=dict, description="the full resolved configuration")
    sites: list[SiteSummary] = Field(default_factory=list, description="the sites whose data trained the model")
    evaluation_sites: list[SiteSummary] = Field(default_factory=list)
    rounds: list[dict[str, Any]] = Field(default_factory=list, description="federation: every round, then the final")
    threshold: ThresholdChoice
    metrics: dict[str, Any] = Field(default_factory=dict, description="the figures the model card reports")
    started_from: dict[str, Any] | None = Field(None, description="site-train --init: the model it started from")


def now_utc() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


# ---------------------------------------------------------------------------------------- the data
def manifest_of(data_path: str | Path) -> Path | None:
    """The manifest a data path reads: a ``.csv`` file, or a folder's ``manifest.csv``; else None."""
    path = Path(data_path)
    if path.is_dir():
        path = path / MANIFEST_NAME
    return path if path.is_file() and path.suffix.lower() == ".csv" else None


def manifest_sha256(manifest: str | Path) -> str | None:
    """SHA-256 of a manifest's header and rows as CSV reads them (cells stripped, blank lines
    skipped), so a byte-order mark or line endings do not change it; no image is read. None when the
    file cannot be read as CSV text."""
    digest = hashlib.sha256()
    try:
        with Path(manifest).open(newline="", encoding="utf-8-sig") as handle:
            for cells in csv.reader(handle):
                row = [cell.strip() for cell in cells]
                if any(row):
                    digest.update(json.dumps(row, ensure_ascii=False).encode("utf-8") + b"\n")
    except (OSError, UnicodeDecodeError, csv.Error):
        return None
    return digest.hexdigest()


def data_fingerprint(data_path: str | Path) -> str | None:
    manifest = manifest_of(data_path)
    return None if manifest is None else manifest_sha256(manifest)


def site_data_metrics(data_path: str | Path, sets: Sequence[ImageSet]) -> dict[str, int | list[int]]:
    """A site's data summary for its reply's metrics: totals over ``sets`` (the splits of all its
    data), never a per-case value."""
    counts = [sum(column) for column in zip(*(s.class_counts() for s in sets), strict=True)]
    metrics: dict[str, int | list[int]] = {
        DATA_IMAGES: sum(len(s) for s in sets),
        DATA_PATIENTS: len({p for s in sets for p in s.patient_ids}),
        DATA_CLASS_COUNTS: counts,
    }
    fingerprint = data_fingerprint(data_path)
    if fingerprint is not None:
        metrics[DATA_MANIFEST] = sha256_to_words(fingerprint)
    return metrics


def sha256_to_words(hexdigest: str) -> list[int]:
    return [int(hexdigest[i : i + 8], 16) for i in range(0, 64, 8)]


def words_to_sha256(words: Sequence[int]) -> str:
    return "".join(f"{w:08x}" for w in words)


def data_summary(metrics: Mapping[str, Any], num_classes: int) -> dict[str, Any] | None:
    """The data summary in a reply's metrics, checked; None when the reply has none (a site of an
    earlier fedfreeze). A malformed one is a ``ProtocolError`` naming the key."""
    if not any(key in metrics for key in DATA_KEYS):
        return None
    images, patients = _count(metrics, DATA_IMAGES), _count(metrics, DATA_PATIENTS)
    counts = _counts(metrics.get(DATA_CLASS_COUNTS), num_classes)
    if counts is None:
        got = metrics.get(DATA_CLASS_COUNTS)
        raise ProtocolError(f"{DATA_CLASS_COUNTS} should be {num_classes} non-negative counts, got {got!r}")
    if sum(counts) != images:
        raise ProtocolError(f"{DATA_CLASS_COUNTS} sum to {sum(counts)}, but {DATA_IMAGES} is {images}")
    if patients > images or (images > 0) != (patients > 0):
        raise ProtocolError(f"{DATA_PATIENTS} {patients} does not fit {images} images")
    fingerprint = None
    if DATA_MANIFEST in metrics:
        words = _counts(metrics[DATA_MANIFEST], SHA256_WORDS, high=2**32 - 1)
        if words is None:
            raise ProtocolError(
                f"{DATA_MANIFEST} should be {SHA256_WORDS} 32-bit words, got {metrics[DATA_MANIFEST]!r}"
            )
        fingerprint = words_to_sha256(words)
    return {"images": images, "patients": patients, "class_counts": counts, "manifest_sha256": fingerprint}


def _count(metrics: Mapping[str, Any], key: str) -> int:
    value = metrics.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ProtocolError(f"{key} should be a non-negative integer, got {value!r}")
    return value


def _counts(value: Any, length: int, high: int | None = None) -> list[int] | None:
    """``value`` as ``length`` non-negative integers (at most ``high``), or None when it is not that."""
    if not isinstance(value, list) or len(value) != length:
        return None
    if not all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= (high or v) for v in value):
        return None
    return [int(v) for v in value]


def named_counts(counts: Sequence[int] | None, class_names: Sequence[str]) -> dict[str, int] | None:
    return None if counts is None else dict(zip(class_names, (int(c) for c in counts), strict=True))


# ---------------------------------------------------------------------------------------- site-train
def site_train_provenance(
    *,
    config: dict[str, Any],
    data_path: str | Path,
    data: ImageSet,
    threshold: Mapping[str, Any],
    report: Mapping[str, Any],
    started_from: dict[str, Any] | None = None,
) -> Provenance:
    """The provenance of ``site-train``'s refit model: one site, no federation, no app bundle."""
    commit, dirty = git_state()
    value = float(threshold["value"])
    if data.num_classes != 2:
        name, how = "arg-max", "multi-class: the class with the highest score"
    elif (config.get("cv") or {}).get("model-threshold") == "youden-oof":
        name = "youden-oof"
        how = (
            "Youden's J on the cross-validation's out-of-fold scores (each case scored by a model that did "
            "not train on it), applied to the model refit on all the data"
        )
    else:
        name, how = "number", f"the configured cv.model-threshold = {value:g}, not fitted to data"
    site = SiteSummary(
        site=Path(data_path).name,
        images=len(data),
        patients=len(set(data.patient_ids)),
        class_counts=named_counts(data.class_counts(), data.class_names),
        manifest_sha256=data_fingerprint(data_path),
        data=str(data_path),
    )
    return Provenance(
        source="site-train",
        created_utc=now_utc(),
        git_commit=commit,
        git_dirty=dirty,
        app_hash=None,
        app_hash_note="not a federation: site-train runs no Flower app",
        config=config,
        sites=[site],
        threshold=ThresholdChoice(value=value, rule=name, how=how),
        metrics={
            "cross_validation": {
                "folds": len(report.get("folds", [])),
                "summary": report.get("summary"),
                "out_of_fold_at_threshold": threshold.get("out_of_fold_at_threshold"),
            },
            "baseline": (report.get("baseline") or {}).get("summary"),
        },
        started_from=started_from,
    )


# ---------------------------------------------------------------------------------------- one line
def provenance_line(provenance: Provenance | None, threshold: float, adaptations: Sequence[Mapping[str, Any]]) -> str:
    """``model: federation, fedfreeze 0.1.0 (commit abc1234), app sha256:..., 3 sites, 5 rounds,
    threshold 0.5 (rule: number)``; a folder written before provenance was recorded says so.
    ``threshold``: the card's (an adaptation may have moved it from the one training stored)."""
    adapted = ""
    if adaptations:
        kinds = ", ".join(str(a.get("kind") or "?") for a in adaptations)
        adapted = f", then adapted {len(adaptations)}x ({kinds})"
    if provenance is None:
        decided = recorded_threshold(None, adaptations)
        hand = "" if decided is None or decided == threshold else f" (changed from {decided:.4g} without a record)"
        return (
            f"model: provenance: not recorded (an earlier fedfreeze wrote it), threshold {threshold:.4g}{hand}{adapted}"
        )
    p = provenance
    code = f"fedfreeze {p.fedfreeze_version}"
    if p.git_commit:
        code += f" (commit {p.git_commit[:7]}{', dirty' if p.git_dirty else ''})"
    if p.source == "federation":
        app = f"app sha256:{p.app_hash[:12]}" if p.app_hash else "no app hash (no FAB)"
        training = sum(1 for r in p.rounds if not r.get("final_evaluation"))
        where = f"{len(p.sites)} sites, {training} rounds"
        if p.evaluation_sites:
            where += f", {len(p.evaluation_sites)} evaluation-only"
    else:
        app = "not a federation"
        where = f"1 site ({sum(s.images or 0 for s in p.sites)} images)"
    decided = recorded_threshold(p, adaptations)
    if threshold != decided:
        rule = f"{p.threshold.rule} gave {decided:.4g}; changed since without a record"
    elif threshold != p.threshold.value:
        rule = f"{p.threshold.rule}, moved by adaptation"
    else:
        rule = p.threshold.rule
    return f"model: {p.source}, {code}, {app}, {where}, threshold {threshold:.4g} (rule: {rule}){adapted}"


def recorded_threshold(provenance: Provenance | None, adaptations: Sequence[Mapping[str, Any]]) -> float | None:
    """The threshold the model's records last set: the last adaptation that moved it (its
    ``threshold.after``; an adaptation that made a site operating point leaves it), else training's (``provenance.threshold``); a retraining (``site-train
    --init``) sets it anew through its own provenance, so adaptations before it no longer count. A card
    whose threshold differs was edited by hand; None when nothing was recorded."""
    decided = None if provenance is None else provenance.threshold.value
    for record in adaptations:
        moved = record.get("threshold")
        if str(record.get("kind", "")).startswith("site-train"):
            decided = None if provenance is None else provenance.threshold.value
        elif "operating_point" in record:  # it set a site's operating point; the global threshold stayed
            continue
        elif isinstance(moved, Mapping) and isinstance(moved.get("after"), (int, float)):
            decided = float(moved["after"])
    return decided
