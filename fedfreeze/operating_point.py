"""Site operating points: the threshold a model runs at at one site, with the evidence it came from.

A model's scores rank a new hospital's patients well long before its threshold suits them: on
patient-disjoint external paediatric X-rays the federated model ranked at AUROC 0.966 but ran at
specificity 0.59 at its stored threshold, while its pooled validation promised 0.97. So a model
folder holds the global model's default threshold (``ModelCard.threshold``, chosen by training)
and, beside it, named **site operating points**: a threshold (and optionally a recalibration of the
scores) that one site fitted on its own labelled patients, with what it promises (sensitivity,
specificity and balanced accuracy estimated on patients the fit did not use, with intervals) and
the hash of the weights it was fitted for. A site's operating point is made at the site and leaves
it only if the site chooses to share it.

:func:`in_use` is the one place that decides which threshold scores a site's data: the named site's
operating point, else the folder's own site's (``ModelCard.local_site``, set by ``fedfreeze adapt``),
else the global threshold, with one line that says it was not validated there.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from pydantic import Field

from fedfreeze.config import Section
from fedfreeze.errors import CheckpointError

CALIBRATION_LIMIT = 1e3  # |a|, |b| beyond this map every score to 0 or 1: a broken fit or a hand edit
Evidence = Literal["labelled-patients", "local-validation", "label-free-prevalence"]
EVIDENCE_TEXT = {
    "labelled-patients": "labelled patients of the site",
    "local-validation": "the site's validation patients in the federation",
    "label-free-prevalence": "the site's unlabelled images (EM prevalence; no label checked it)",
}


class ScoreCalibration(Section):
    """A recalibration of the positive-class score fitted at a site: ``p' = sigmoid(a * logit(p) + b)``.

    Temperature scaling is ``b = 0``, ``a = 1 / T``; Platt scaling fits both. The model's weights are
    untouched, so the ranking (AUROC) of its scores is unchanged; only probabilities and the
    meaning of a threshold move.
    """

    method: Literal["temperature", "platt"]
    a: float = Field(gt=0.0, le=CALIBRATION_LIMIT, allow_inf_nan=False)
    b: float = Field(0.0, ge=-CALIBRATION_LIMIT, le=CALIBRATION_LIMIT, allow_inf_nan=False)
    fitted_on: str = Field("", description="the data it was fitted on, for the record")

    def apply(self, p_pos: np.ndarray) -> np.ndarray:
        p = np.clip(np.asarray(p_pos, dtype=np.float64), 1e-12, 1 - 1e-12)
        return 1.0 / (1.0 + np.exp(-(self.a * np.log(p / (1 - p)) + self.b)))


class Promise(Section):
    """What an operating point promises at its site, estimated on patients its fit did not use."""

    sensitivity: float | None = None
    sensitivity_ci: tuple[float, float] | None = None
    specificity: float | None = None
    specificity_ci: tuple[float, float] | None = None
    balanced_accuracy: float | None = None
    balanced_accuracy_ci: tuple[float, float] | None = None
    how: str = Field(
        "", description="how the figures were estimated (e.g. the rule refitted on bootstrap resamples of patients)"
    )


class OperatingPoint(Section):
    """One site's threshold for one model, and the evidence it came from."""

    site: str = Field(min_length=1)
    threshold: float = Field(gt=0.0, lt=1.0, allow_inf_nan=False, strict=True)
    calibration: ScoreCalibration | None = Field(
        None, description="a recalibration of the scores at this site, applied before the threshold"
    )
    rule: str = Field(description="how the threshold was chosen (binormal, youden, target-sensitivity, ...)")
    evidence: Evidence
    labels_used: bool
    model_sha256: str = Field(description="state_sha256 of the weights it was fitted for")
    n_images: int = Field(ge=0)
    n_patients: int = Field(ge=0)
    n_positive_patients: int | None = None
    n_negative_patients: int | None = None
    threshold_ci: tuple[float, float] | None = None
    promise: Promise | None = None
    data_fingerprint: str | None = Field(None, description="sha256 of the site's manifest (never its path)")
    created_utc: str = ""
    fedfreeze_version: str = ""

    def summary(self) -> str:
        """``site 'a': threshold 0.87 [0.80, 0.91] (binormal, 60 labelled patients ...)``."""
        ci = f" [{self.threshold_ci[0]:.3f}, {self.threshold_ci[1]:.3f}]" if self.threshold_ci else ""
        made = f"{self.rule} on {self.n_patients} patients ({self.n_images} images), {EVIDENCE_TEXT[self.evidence]}"
        if self.created_utc:
            made += f", {self.created_utc[:10]}"
        promise = ""
        if self.promise is not None and self.promise.balanced_accuracy is not None:
            ba = self.promise
            promise = f"; promises balanced accuracy {ba.balanced_accuracy:.3f}" + (
                f" [{ba.balanced_accuracy_ci[0]:.3f}, {ba.balanced_accuracy_ci[1]:.3f}]"
                if ba.balanced_accuracy_ci
                else ""
            )
        return f"site {self.site!r}: threshold {self.threshold:.4g}{ci} ({made}){promise}"


def after_card_calibration(point: OperatingPoint, card: ScoreCalibration) -> OperatingPoint:
    """``point``, fitted on a model's raw scores, re-expressed for scores the card's ``sigmoid(a0 * z + b0)``
    has been applied to first (a site's calibration applies after the card's, ``InUse.apply``): the same
    decisions and probabilities at the site. A federation's sites fit theirs before the coordinator fits
    its pooled temperature (``federation.calibrate``), so the export re-expresses them."""
    own = point.calibration or ScoreCalibration(method="temperature", a=1.0)
    a = own.a / card.a  # a * z + b = (a / a0) * (a0 * z + b0) + b - a * b0 / a0
    b = own.b - own.a * card.b / card.a
    method: Literal["temperature", "platt"] = "temperature" if b == 0.0 else "platt"
    fitted = f"{own.fitted_on}; re-expressed after the model's own calibration ({card.method})".lstrip("; ")
    return point.model_copy(update={"calibration": ScoreCalibration(method=method, a=a, b=b, fitted_on=fitted)})


def state_sha256(state: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 of a state dict's content (names, dtypes, shapes, values in name order).

    Computed from the tensors, not from a file, so a site can name the model it fitted an operating
    point for from the arrays it holds, and ``fedfreeze evaluate`` can check the match after loading.
    """
    digest = hashlib.sha256()
    for key in sorted(state):
        tensor = state[key].detach().cpu().contiguous()
        digest.update(f"{key}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.numpy().tobytes() if tensor.dtype != torch.bfloat16 else tensor.float().numpy().tobytes())
    return digest.hexdigest()


@dataclass(frozen=True)
class InUse:
    """The threshold (and site recalibration) a site's data is scored at, and the line that says why."""

    threshold: float
    calibration: ScoreCalibration | None
    site: str | None
    operating_point: OperatingPoint | None
    validated: bool
    line: str

    def apply(self, scores: np.ndarray) -> np.ndarray:
        """The model's scores (card calibration applied) as this site scores them."""
        return self.calibration.apply(scores) if self.calibration is not None and scores.ndim == 1 else scores

    def record(self) -> dict[str, Any]:
        return {
            "site": self.site,
            "threshold": self.threshold,
            "validated_at_site": self.validated,
            "line": self.line,
            "operating_point": None if self.operating_point is None else self.operating_point.model_dump(),
        }


def in_use(
    threshold: float,
    operating_points: Mapping[str, OperatingPoint],
    local_site: str | None,
    site: str | None,
    model_sha256: str,
    *,
    binary: bool = True,
) -> InUse:
    """Which threshold scores data of ``site`` (None: the folder's own site, if it has one).

    A named site without an operating point of its own gets the global threshold and a line saying
    it was not validated there; an operating point fitted for other weights is a ``CheckpointError``.
    """
    wanted = site if site is not None else local_site
    if not binary:
        return InUse(threshold, None, wanted, None, False, "multi-class model: arg-max decisions, no threshold")
    point = operating_points.get(wanted) if wanted is not None else None
    if point is not None:
        if point.model_sha256 != model_sha256:
            raise CheckpointError(
                f"the operating point of site {point.site!r} was fitted for weights {point.model_sha256[:12]}, not "
                f"these ({model_sha256[:12]}): fit it again for this model (fedfreeze adapt --labels use)"
            )
        return InUse(point.threshold, point.calibration, point.site, point, True, f"operating point: {point.summary()}")
    where = f"site {wanted!r}" if wanted is not None else "this site"
    others = f"; operating points held for: {', '.join(sorted(operating_points))}" if operating_points else ""
    return InUse(
        threshold,
        None,
        wanted,
        None,
        False,
        f"threshold {threshold:.4g} is the global model's and was not validated at {where}: fit one on its own "
        f"labelled patients (fedfreeze suggest, then fedfreeze adapt --labels use){others}",
    )
