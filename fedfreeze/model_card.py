"""``MODEL_CARD.md``: a model folder's ``model.json`` rendered for people.

Intended use and what the model is not for, the sites whose data trained it, its pooled and
per-site figures (with intervals where the record allows them), external validation by
evaluation-only sites, the stored threshold and how it was chosen, every adaptation applied later,
and the known limits. Everything comes from the card (its ``provenance`` and ``adaptations``);
nothing is measured here. A folder written before provenance was recorded still gets a card that
says so. Written by ``model_io.save_model`` (so by every command that writes a model folder).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

from fedfreeze.config import ModelConfig
from fedfreeze.provenance import Provenance, SiteSummary, provenance_line

CARD_MARKDOWN = "MODEL_CARD.md"
SMALL_SITE_IMAGES = 200  # fewer images than this: a site's own figures are imprecise
SMALL_CLASS_IMAGES = 30  # fewer images of a class than this: its sensitivity or specificity is imprecise
Z95 = 1.959963984540054
KERMANY_NOTE = (
    "the Kermany et al. 2018 chest X-rays (the shipped `kermany_mini` sample data: children aged 1-5 at one "
    "centre, Guangzhou Women and Children's Medical Center; pneumonia against normal only)"
)
FIGURES = (
    ("auroc", "AUROC (over all thresholds)"),
    ("balanced_accuracy", "balanced accuracy"),
    ("sensitivity", "sensitivity"),
    ("specificity", "specificity"),
    ("f1", "F1"),
    ("accuracy", "accuracy (arg-max)"),
)


class Calibration(Protocol):
    """What the card shows of ``model_io.ScoreCalibration``."""

    @property
    def method(self) -> str: ...
    @property
    def a(self) -> float: ...
    @property
    def b(self) -> float: ...
    @property
    def fitted_on(self) -> str: ...


class ModelCard(Protocol):
    """What is rendered of ``model_io.ModelCard`` (a protocol: ``model_io`` imports this module)."""

    @property
    def model(self) -> ModelConfig: ...
    @property
    def adapter_groups(self) -> list[str]: ...
    @property
    def adapter_rank(self) -> int: ...
    @property
    def threshold(self) -> float: ...
    @property
    def class_names(self) -> list[str]: ...
    @property
    def trained_by(self) -> str: ...
    @property
    def notes(self) -> dict[str, Any]: ...
    @property
    def calibration(self) -> Calibration | None: ...
    @property
    def adaptations(self) -> list[dict[str, Any]]: ...
    @property
    def provenance(self) -> Provenance | None: ...
    @property
    def operating_points(self) -> Mapping[str, Any]: ...
    @property
    def local_site(self) -> str | None: ...


def render_card(card: ModelCard, *, weights_sha256: str | None = None) -> str:
    """The whole ``MODEL_CARD.md`` text for ``card``."""
    p = card.provenance
    sections = [
        _header(card, weights_sha256),
        _intended_use(card),
        _training_data(card, p),
        _training(p),
        _performance(card, p),
        _threshold(card, p),
        _operating_points(card),
        _adaptations(card.adaptations),
        _limits(card, p),
    ]
    return "\n\n".join(s.strip("\n") for s in sections if s) + "\n"


# ---------------------------------------------------------------------------------------- sections
def _header(card: ModelCard, weights_sha256: str | None) -> str:
    p, m = card.provenance, card.model
    adapters = f"{', '.join(card.adapter_groups)} (rank {card.adapter_rank})" if card.adapter_groups else "none"
    rows = [
        (
            "architecture",
            f"`{m.backbone}`, input {m.in_channels} x {m.input_size} x {m.input_size}, adapters {adapters}",
        ),
        ("classes", ", ".join(f"{i} = {name}" for i, name in enumerate(card.class_names))),
        ("trained by", card.trained_by or "not recorded"),
    ]
    if p is None:
        rows.append(("provenance", "**not recorded**: an earlier fedfreeze wrote this folder"))
    else:
        rows += [
            ("produced", f"{p.source}, {p.created_utc}"),
            ("code", _code(p)),
            ("app", _app(p)),
            ("configuration", "the full resolved configuration is `model.json` -> `provenance` -> `config`"),
        ]
    if weights_sha256:
        rows.append(("weights.pt sha256", f"`{weights_sha256}`"))
    lines = [
        f"# Model card: {m.backbone}, {' / '.join(card.class_names)}",
        "",
        "Rendered by fedfreeze from this folder's `model.json` (do not edit: `fedfreeze adapt` rewrites "
        "it for the folder it writes).",
        "",
        f"`{provenance_line(p, card.threshold, card.adaptations)}`",
        "",
        *_table(("", ""), rows),
    ]
    return "\n".join(lines)


def _code(p: Provenance) -> str:
    text = f"fedfreeze {p.fedfreeze_version}"
    if p.git_commit is None:
        return text + ", git commit not recorded (not installed from a git checkout, or git absent)"
    dirty = ", **dirty** (tracked files differed from the commit)" if p.git_dirty else ""
    return text + f", git commit `{p.git_commit}`{dirty}"


def _app(p: Provenance) -> str:
    if p.app_hash:
        return (
            f"Flower app bundle (FAB) sha256 `{p.app_hash}`: the app the run executed "
            "(what `fedfreeze app-hash` prints and a site approves)"
        )
    return f"none recorded: {p.app_hash_note or 'no app bundle'}"


def _intended_use(card: ModelCard) -> str:
    names = card.class_names
    if len(names) == 2:
        task = (
            f"scores an image for `{names[1]}` against `{names[0]}`; the decision is `{names[1]}` when the "
            f"score (after the card's calibration, if any) is at least the stored threshold {card.threshold:.4g}"
        )
    else:
        task = f"assigns an image to one of {len(names)} classes ({', '.join(names)}) by its highest score"
    return "\n".join(
        [
            "## Intended use",
            "",
            f"Research use. The model {task}, for images of the kind and population its training sites "
            "hold (below). Before any use at a new site: score it on that site's own labelled patients "
            "(`fedfreeze evaluate`) and, where needed, adapt it there (`fedfreeze adapt`).",
            "",
            "Not intended for:",
            "",
            "- decisions about patients: fedfreeze is research software, not a medical device, and this "
            "model has no clinical validation or approval;",
            "- populations, equipment, views or image types unlike the training sites' (for example adults, "
            "when the training data were paediatric);",
            f"- anything beyond the classes it learnt ({', '.join(names)}): a negative result does not rule "
            "out other findings.",
        ]
    )


def _training_data(card: ModelCard, p: Provenance | None) -> str:
    lines = ["## Training data", ""]
    if p is None:
        notes = card.notes or {}
        data = f" (notes: {', '.join(f'{k} = {v}' for k, v in notes.items() if k in ('data', 'n_images'))})"
        return "\n".join([*lines, "Not recorded" + (data if notes else "") + "."])
    lines.append(
        "Each site summarised its own data and sent only these totals; the manifest fingerprint is the SHA-256 "
        "of the manifest's rows (not of any image; `fedfreeze.provenance.manifest_sha256(path)` recomputes it)."
    )
    lines.append("")
    lines += _site_table(p.sites + p.evaluation_sites, federation=p.source == "federation")
    return "\n".join(lines)


def _site_table(sites: Sequence[SiteSummary], *, federation: bool) -> list[str]:
    if not sites:
        return ["No site summary was recorded."]
    header: tuple[str, ...] = ("site", "role", "images", "patients", "images per class", "manifest sha256")
    if federation:
        header += ("rounds answered",)
    rows = []
    for s in sites:
        counts = ", ".join(f"{k} {v}" for k, v in s.class_counts.items()) if s.class_counts else "not sent"
        row: tuple[str, ...] = (
            s.site,
            "evaluation only" if s.role == "evaluate" else "training",
            _int(s.images),
            _int(s.patients),
            counts,
            f"`{s.manifest_sha256[:16]}`" if s.manifest_sha256 else "no manifest",
        )
        if federation:
            row += (_int(s.rounds),)
        rows.append(row)
    return _table(header, rows)


def _training(p: Provenance | None) -> str:
    if p is None:
        return ""
    lines = ["## Training", ""]
    if p.source == "site-train":
        cv = p.config.get("cv") or {}
        train = p.config.get("train") or {}
        lines.append(
            f"`fedfreeze site-train` at one site: patient-level cross-validation ({cv.get('folds')} folds x "
            f"{cv.get('repeats')} repeats), then a refit on all its data; recipe `{train.get('recipe')}`, "
            f"freezing `{train.get('freezing')}`."
        )
        if p.started_from:
            lines.append(
                f"Started from the model folder `{p.started_from.get('model')}` (weights sha256 "
                f"`{str(p.started_from.get('weights_sha256', ''))[:16]}`), not from the pretrained backbone."
            )
        return "\n".join(lines)
    fed = p.config.get("federation") or {}
    train = p.config.get("train") or {}
    lines.append(
        f"A federation of {len(p.sites)} training site(s): strategy `{fed.get('strategy')}`, BatchNorm "
        f"`{fed.get('bn-policy')}`, {fed.get('rounds')} rounds planned ({fed.get('probe-rounds')} probe), "
        f"recipe `{train.get('recipe')}`, differential privacy `{fed.get('dp')}`, export `{fed.get('export')}`. "
        "Every round, the model each site received was scored on that site's validation patients before it "
        "trained; the row's figures are those, pooled over the training sites."
    )
    lines.append("")
    rows = []
    for r in p.rounds:
        pooled = r.get("pooled") or {}
        first = pooled.get("auroc", pooled.get("accuracy"))
        rows.append(
            (
                "final evaluation" if r.get("final_evaluation") else str(r["round"]),
                "+".join(r.get("parts") or []) if not r.get("final_evaluation") else "(none: scoring only)",
                str(len(r.get("sites") or [])),
                str(len(r.get("rejected") or [])),
                str(len(r.get("failed") or [])),
                _bytes(r.get("bytes_down")),
                _bytes(r.get("bytes_up")),
                _num(first),
                _num(pooled.get("balanced_accuracy")),
                _num(r.get("threshold_used")),
            )
        )
    header = ("round", "parts trained", "sites", "rejected", "failed", "down", "up", "pooled AUROC", "bal. acc.", "at")
    lines += _table(header, rows) if rows else ["No round was recorded."]
    return "\n".join(lines)


def _performance(card: ModelCard, p: Provenance | None) -> str:
    lines = ["## Performance", ""]
    if p is None:
        return "\n".join(
            [*lines, "Not recorded with this folder: judge it with `fedfreeze evaluate` on your own patients."]
        )
    if p.source == "site-train":
        return "\n".join(lines + _site_train_performance(p))
    m = p.metrics
    validation = m.get("validation")
    lines += [
        f"### Pooled validation of the training sites (the model exported: {m.get('export_rule')}, after round "
        f"{m.get('exported_round')})",
        "",
    ]
    if validation:
        lines += _figure_table(validation)
        if (m.get("weighted_mean") or {}).get("auroc") is not None:
            lines += ["", f"Weighted mean of the sites' own AUROCs: {_num(m['weighted_mean']['auroc'])}."]
    else:
        lines.append("Not recorded.")
    per_site = m.get("per_site") or []
    if per_site:
        lines += ["", "### Per training site (each site's validation patients)", ""]
        lines += _per_site_table(per_site)
    lines += ["", "### External validation", ""]
    external = m.get("external")
    if external and external.get("figures"):
        lines.append(
            f"Evaluation-only sites ({', '.join(external.get('sites') or [])}) scored the model on all their "
            "data, none of which trained it:"
        )
        lines.append("")
        lines += _figure_table(external["figures"])
        if external.get("per_site"):
            lines += [""] + _per_site_table(external["per_site"])
    else:
        lines.append(
            "None in this federation (no evaluation-only site). Validate on patients no site trained on with "
            "`fedfreeze evaluate` (patient-level bootstrap intervals)."
        )
    return "\n".join(lines)


def _site_train_performance(p: Provenance) -> list[str]:
    cv = p.metrics.get("cross_validation") or {}
    summary = cv.get("summary") or {}
    lines = [f"### Cross-validation at the site ({cv.get('folds')} folds; mean ± std over folds)", ""]
    rows = [
        (label, f"{summary[key]['mean']:.3f} ± {summary[key]['std']:.3f}")
        for key, label in FIGURES
        if isinstance(summary.get(key), Mapping)
    ]
    lines += _table(("metric", "value"), rows) if rows else ["Not recorded."]
    oof = cv.get("out_of_fold_at_threshold")
    if oof:
        lines += ["", f"### Out-of-fold scores at the stored threshold {p.threshold.value:.4g}", ""]
        lines += _figure_table(oof)
    if p.metrics.get("baseline"):
        lines += ["", "The model it started from, on the same folds: see `metrics.json` -> `comparison`."]
    lines += [
        "",
        "### External validation",
        "",
        "None: every figure above comes from the training site. Validate on another site's patients with "
        "`fedfreeze evaluate`.",
    ]
    return lines


def _figure_table(figures: Mapping[str, Any]) -> list[str]:
    """Metric, value and, for sensitivity and specificity, a Wilson 95% interval from the counts."""
    rows = []
    intervals = {
        "sensitivity": (figures.get("tp"), figures.get("fn")),
        "specificity": (figures.get("tn"), figures.get("fp")),
    }
    for key, label in FIGURES:
        if figures.get(key) is None:
            continue
        hit, miss = intervals.get(key, (None, None))
        interval = "—"
        if isinstance(hit, int) and isinstance(miss, int) and hit + miss > 0:
            low, high = wilson(hit, hit + miss)
            interval = f"{low:.3f} - {high:.3f} ({hit}/{hit + miss})"
        rows.append((label, _num(figures[key]), interval))
    table = _table(("metric", "value", "95% interval (Wilson, images)"), rows)
    at = f" at threshold {figures['threshold']:.4g}" if figures.get("threshold") is not None else ""
    n = f"n = {figures['n']} images{at}" if figures.get("n") is not None else ""
    return [*table, "", n] if n else table


def _per_site_table(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    header = ("site", "n", "AUROC", "sensitivity", "specificity", "balanced accuracy", "at threshold")
    return _table(
        header,
        [
            (
                str(r.get("site")),
                _int(r.get("val_n")),
                _num(r.get("val_auroc")),
                _num(r.get("val_sensitivity")),
                _num(r.get("val_specificity")),
                _num(r.get("val_balanced_accuracy")),
                _num(r.get("threshold")),
            )
            for r in rows
        ],
    )


def _threshold(card: ModelCard, p: Provenance | None) -> str:
    lines = ["## Decision threshold", ""]
    if p is None:
        rule = (card.notes or {}).get("threshold_rule")
        how = f" (notes: rule {rule})" if rule else ""
        return "\n".join([*lines, f"{card.threshold:.4g}; how it was chosen is not recorded{how}."])
    t = p.threshold
    lines.append(f"Stored by training: **{t.value:.4g}**, rule `{t.rule}`: {t.how}.")
    if t.interval:
        lines.append(
            f"Bootstrap 95% interval of the rule's pick on the same validation data: {t.interval[0]:.4g} - "
            f"{t.interval[1]:.4g} (a wide interval says the pick is close to arbitrary)."
        )
    if card.threshold != t.value:
        lines.append(f"Adaptations since moved it to **{card.threshold:.4g}** (below).")
    if card.calibration is not None:
        c = card.calibration
        lines.append(
            f"Scores are recalibrated before the threshold: {c.method}, a = {c.a:.4g}, b = {c.b:+.4g} "
            f"({c.fitted_on or 'fitted at a site'})."
        )
    return "\n".join(lines)


def _operating_points(card: ModelCard) -> str:
    """Each site's own threshold with the evidence behind it (``operating_point.OperatingPoint``)."""
    lines = ["## Site operating points", ""]
    if card.model.num_classes != 2:
        return ""
    points = card.operating_points
    if not points:
        return "\n".join(
            [
                *lines,
                f"None: no site has validated a threshold on its own patients, so every site runs at the global "
                f"threshold {card.threshold:.4g}, which was not validated there. A model's operating point moves "
                "between hospitals even when its ranking holds; before use at a site, fit one on its own labelled "
                "patients (`fedfreeze suggest`, then `fedfreeze adapt --labels use`).",
            ]
        )
    lines.append(
        f"Sites without their own run at the global threshold {card.threshold:.4g}. "
        + (
            f"This folder belongs to site **{card.local_site}**: `fedfreeze evaluate` uses its operating point "
            "unless `--site` names another."
            if card.local_site
            else "`fedfreeze evaluate --site NAME` uses NAME's operating point."
        )
    )
    lines.append("")
    rows = []
    for name in sorted(points):
        op = points[name]
        promise = op.promise
        ci = f" [{op.threshold_ci[0]:.3f}, {op.threshold_ci[1]:.3f}]" if op.threshold_ci else ""
        patients = str(op.n_patients)
        if op.n_positive_patients is not None and op.n_negative_patients is not None:
            patients += f" ({op.n_positive_patients} positive, {op.n_negative_patients} negative)"
        rows.append(
            (
                name,
                f"{op.threshold:.4g}{ci}",
                op.rule,
                op.evidence + ("" if op.labels_used else " (no labels)"),
                patients,
                _promised(promise, "sensitivity"),
                _promised(promise, "specificity"),
                _promised(promise, "balanced_accuracy"),
                (op.created_utc or "")[:10],
            )
        )
    lines += _table(
        (
            "site",
            "threshold [95% CI]",
            "rule",
            "evidence",
            "patients",
            "sensitivity",
            "specificity",
            "balanced accuracy",
            "date",
        ),
        rows,
    )
    lines += [
        "",
        "Promised figures are estimated at the site on patients the fit did not use (bootstrap); a threshold from "
        "unlabelled images promises nothing.",
    ]
    return "\n".join(lines)


def _promised(promise: Any, key: str) -> str:
    if promise is None or getattr(promise, key) is None:
        return "—"
    ci = getattr(promise, f"{key}_ci")
    return f"{getattr(promise, key):.3f}" + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "")


def _adaptations(adaptations: Sequence[Mapping[str, Any]]) -> str:
    lines = ["## Adaptations", ""]
    if not adaptations:
        return "\n".join([*lines, "None: the model is as training left it."])
    for number, a in enumerate(adaptations, start=1):
        lines.append(
            f"{number}. **{a.get('kind') or 'adaptation'}**" + (f" ({a['date_utc']})" if a.get("date_utc") else "")
        )
        source = a.get("source_model") or a.get("from")
        sha = a.get("source_weights_sha256") or a.get("from_weights_sha256")
        if source:
            lines.append(f"   - from `{source}`" + (f" (weights sha256 `{str(sha)[:16]}`)" if sha else ""))
        if a.get("data"):
            lines.append(
                f"   - on `{a['data']}`: {a.get('n_images')} images of {a.get('n_patients')} patients"
                + ("" if "labels_used" not in a else f", labels {'used' if a['labels_used'] else 'not used'}")
            )
        if (a.get("batchnorm") or {}).get("reestimated"):
            lines.append(f"   - BatchNorm statistics re-estimated in {a['batchnorm'].get('layers')} layers")
        prevalence = a.get("prevalence") or {}
        if prevalence.get("prevalence") is not None:
            lines.append(f"   - estimated prevalence {_num(prevalence['prevalence'])}" + _ci(prevalence))
        threshold = a.get("threshold") or {}
        if threshold.get("before") is not None:
            rule = threshold.get("rule") or threshold.get("objective") or ""
            lines.append(
                f"   - threshold {threshold['before']:.4g} -> {threshold.get('after', float('nan')):.4g}"
                + (f" ({rule})" if rule else "")
            )
        calibration = ((a.get("calibration") or {}).get("card_calibration")) or None
        if calibration:
            lines.append(
                f"   - calibration {calibration.get('method')}: a = {calibration.get('a'):.4g}, "
                f"b = {calibration.get('b'):+.4g}"
            )
        if a.get("comparison_p") is not None:
            lines.append(
                f"   - AUROC difference against the model it started from {a.get('auroc_difference'):+.3f} "
                f"(DeLong p = {a['comparison_p']:.3g})"
            )
        if a.get("fedfreeze_version"):
            lines.append(f"   - fedfreeze {a['fedfreeze_version']}")
    return "\n".join(lines)


def _limits(card: ModelCard, p: Provenance | None) -> str:
    items = []
    if p is None:
        items.append("Provenance not recorded: which code, configuration, sites and rounds made this model is unknown.")
    texts = _data_texts(card, p)
    if any("kermany" in t.lower() for t in texts):
        items.append(f"Trained on {KERMANY_NOTE}: not validated for adults or other hospitals' equipment.")
    else:
        items.append(
            f"If the training sites held {KERMANY_NOTE}, the model has seen children of one hospital only: it "
            "is not validated for adults or other hospitals' equipment."
        )
    if p is not None:
        for s in p.sites + p.evaluation_sites:
            smallest = min(s.class_counts.values()) if s.class_counts else None
            if (s.images is not None and s.images < SMALL_SITE_IMAGES) or (
                smallest is not None and smallest < SMALL_CLASS_IMAGES
            ):
                fewest = f", {smallest} in its smallest class" if smallest is not None else ""
                items.append(
                    f"Site {s.site} is small ({_int(s.images)} images, {_int(s.patients)} patients{fewest}): its "
                    "own figures are imprecise."
                )
        if p.threshold.rule not in ("number", "arg-max"):
            items.append(
                "The threshold was chosen on the validation data its figures come from: those figures are "
                "optimistic at it."
            )
        if p.source == "site-train":
            items.append("Trained and cross-validated at one site: nothing here shows it transfers to another.")
        elif not p.evaluation_sites:
            items.append("No evaluation-only site took part: every figure comes from the training sites' patients.")
        if p.source == "federation" and not p.app_hash:
            items.append("No app hash: the code is identified by the fedfreeze version and commit only.")
        if p.git_dirty:
            items.append("The source tree had uncommitted changes: the commit alone does not reproduce this model.")
    items.append(
        "Intervals here count images, not patients: several images of one patient make them too narrow "
        "(`fedfreeze evaluate` resamples patients)."
    )
    balanced = p is not None and (p.config.get("train") or {}).get("balanced-sampling") is True
    if balanced and card.calibration is None:
        items.append(
            "Training sampled the classes evenly (train.balanced-sampling) and no adaptation recalibrated the "
            "scores: they rank cases but are not probabilities at a site's prevalence."
        )
    return "\n".join(["## Known limits", "", *(f"- {item}" for item in items)])


def _data_texts(card: ModelCard, p: Provenance | None) -> list[str]:
    texts = [str((card.notes or {}).get("data", ""))]
    texts += [str(a.get("data", "")) for a in card.adaptations]
    if p is not None:
        texts += [s.data or "" for s in p.sites]
    return texts


# ---------------------------------------------------------------------------------------- helpers
def wilson(successes: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion."""
    phat = successes / n
    denominator = 1 + z * z / n
    centre = (phat + z * z / (2 * n)) / denominator
    half = z * math.sqrt(phat * (1 - phat) / n + z * z / (4 * n * n)) / denominator
    return max(0.0, centre - half), min(1.0, centre + half)


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"

    return [line(header), "|" + "|".join("---" for _ in header) + "|", *(line(r) for r in rows)]


def _num(value: Any) -> str:
    return "—" if value is None else f"{float(value):.4f}"


def _int(value: Any) -> str:
    return "—" if value is None else str(value)


def _bytes(value: Any) -> str:
    if value is None:
        return "—"
    value = float(value)
    for unit in ("B", "kB", "MB", "GB"):
        if value < 1000 or unit == "GB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1000
    return f"{value:.1f} GB"


def _ci(record: Mapping[str, Any]) -> str:
    low, high = record.get("ci_low"), record.get("ci_high")
    level = f"{record['confidence']:.0%}" if record.get("confidence") else "95%"
    return "" if low is None or high is None else f" ({level} CI {low:.3f} - {high:.3f})"
