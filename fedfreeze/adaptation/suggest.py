"""Which patients a new site should label first, so that few labels fix its operating point well.

A random sample of a site's patients puts most labels where the model is already sure (most
patients score far from any threshold) and, by chance, can miss a stretch of the score range
altogether; the threshold rules then extrapolate. The suggestion is a **stratified sample over the
model's score range**: the site's patients are sorted by their score (the mean logit of their images,
as the model stands), cut into ``n`` strata of equal size, and one patient is drawn at random from
each. Every patient has the same chance ``n / N`` to be picked, so the labelled sample is still an
unbiased sample of the site (no weights needed by the rules that use it), but it covers the whole
score range evenly: the spread of each class's scores, which the binormal rule estimates, comes
from the whole range, not from the crowded ends. The list is deterministic for a seed.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fedfreeze.adaptation.prevalence import patient_index
from fedfreeze.adaptation.threshold_rules import logit
from fedfreeze.data.imageset import ImageSet
from fedfreeze.errors import ConfigError


@dataclass(frozen=True)
class Suggestion:
    """One patient to label: its id, its images' indices, its score, and the stratum it stands for."""

    patient_id: str
    images: tuple[int, ...]
    score: float  # sigmoid of the patient's mean logit
    stratum: int  # 1-based, from the lowest scores up
    strata: int


def suggest_patients(scores: np.ndarray, patient_ids: Sequence[str], n: int, *, seed: int = 0) -> list[Suggestion]:
    """``n`` patients, one from each of ``n`` equal-size strata of the patients sorted by score."""
    scores = np.asarray(scores, dtype=np.float64)
    if scores.ndim != 1 or len(scores) != len(patient_ids):
        raise ConfigError(f"suggest needs one score per image: {len(scores)} scores for {len(patient_ids)} images")
    units, count = patient_index(patient_ids)
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ConfigError(f"--n should be a positive number of patients, got {n!r}")
    if n > count:
        raise ConfigError(f"--n {n} is more patients than the site holds ({count}); label all of them")
    z = logit(scores)
    mean_logit = np.bincount(units, weights=z, minlength=count) / np.bincount(units, minlength=count)
    ids = np.unique(np.asarray(list(patient_ids), dtype=object).astype(str))
    order = np.lexsort((ids, mean_logit))  # by score, ties by id: the same list for the same data
    bounds = np.linspace(0, count, n + 1).round().astype(int)
    rng = np.random.default_rng(seed)
    picked = []
    for stratum, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:], strict=True), start=1):
        unit = int(order[lo + int(rng.integers(hi - lo))])
        images = tuple(int(i) for i in np.flatnonzero(units == unit))
        score = float(1.0 / (1.0 + np.exp(-mean_logit[unit])))
        picked.append(Suggestion(str(ids[unit]), images, score, stratum, n))
    return picked


def suggest_for_site(
    model_dir: str | Path,
    data_path: str | Path,
    n: int,
    *,
    seed: int = 0,
    device: str = "auto",
    progress: bool = False,
    outside_paths: bool = False,
) -> tuple[list[Suggestion], ImageSet]:
    """Score the site's (unlabelled) images with the model as it stands and suggest ``n`` patients."""
    from fedfreeze.data.dataset import load_image_set
    from fedfreeze.model_io import load_model, model_scores
    from fedfreeze.training.engine import resolve_device

    model, card = load_model(model_dir)
    if card.model.num_classes != 2:
        raise ConfigError(f"suggest is for binary models; {model_dir} has {card.model.num_classes} classes")
    data = load_image_set(
        data_path,
        image_size=card.model.input_size,
        channels=card.model.in_channels,
        class_names=card.class_names,
        num_classes=card.model.num_classes,
        progress=progress,
        labels="optional",
        outside_paths=outside_paths,
    )
    data.require_nonempty(f"suggest needs the site's images, and {data_path} lists none")
    scores = model_scores(model, card, data.images, resolve_device(device))
    return suggest_patients(scores, data.patient_ids, n, seed=seed), data


def write_suggestions(path: str | Path, suggestions: Sequence[Suggestion], data: ImageSet) -> Path:
    """A manifest of the suggested patients' images with an empty ``label`` column to fill in (written
    aside and renamed into place), so that the filled file is what ``fedfreeze adapt --labels use`` reads."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "patient_id", "label", "stratum", "score"])
        for s in suggestions:
            for i in s.images:
                writer.writerow(
                    [
                        _relative(data.sources[i], path.parent),
                        s.patient_id,
                        "",
                        f"{s.stratum}/{s.strata}",
                        f"{s.score:.4f}",
                    ]
                )
    tmp.replace(path)
    return path


def _relative(source: str, folder: Path) -> str:
    """An image file's path as the written manifest resolves it (relative to its folder when possible)."""
    file = Path(source)
    if not file.is_file():
        return source  # an array element ("x.npz[train][17]"): named as the loader named it
    try:
        return os.path.relpath(file.resolve(), folder.resolve())
    except ValueError:  # another drive
        return str(file.resolve())
