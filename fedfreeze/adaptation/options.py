"""What ``fedfreeze adapt`` is asked to do (``AdaptOptions``), checked before anything is loaded."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from fedfreeze.adaptation.prevalence import check_prior
from fedfreeze.adaptation.threshold_rules import RULES, Rule
from fedfreeze.errors import ConfigError, DataError


class AdaptationRefused(DataError):
    """A label-free step the reliability check could not vouch for (nothing was written)."""


@dataclass(frozen=True)
class AdaptOptions:
    """What ``adapt`` does. ``None`` means "not given": the option's default for the mode that runs;
    an option given for the other mode is an error, never silently ignored."""

    bn: Literal["keep", "reestimate"] = "keep"
    labels: Literal["auto", "use", "ignore"] = "auto"
    site: str | None = None  # the operating point's site name (default: from the data's path)
    allow_unverified: bool = False  # store a label-free step the check cannot vouch for, flagged
    # unlabelled mode
    prevalence: Literal["em", "none"] | None = None  # default "em"
    train_prior: float | None = None  # default 0.5: fedfreeze trains with class-balanced sampling
    objective: Literal["balanced-accuracy", "accuracy"] | None = None  # default "balanced-accuracy"
    # labelled mode
    calibrate: Literal["temperature", "platt", "none"] | None = None  # default "temperature"
    threshold_rule: Rule | None = None  # default DEFAULT_RULE
    target_sensitivity: float | None = None  # default 0.9, with the target-sensitivity rules
    refit: Literal["none", "head"] | None = None  # default "none": threshold (and calibration) only
    # both
    replicates: int = 1000
    confidence: float = 0.95
    seed: int = 0
    split: str | None = None
    device: str = "auto"
    outside_paths: bool = False  # the manifest may name images outside its folder

    def check(self) -> None:
        if self.replicates < 1:
            raise ConfigError(f"--bootstrap should be at least 1 replicate, got {self.replicates}")
        if not 0.0 < self.confidence < 1.0:
            raise ConfigError(f"--confidence should be between 0 and 1, got {self.confidence}")
        if self.train_prior is not None:
            check_prior(self.train_prior, "--train-prior")
        if self.threshold_rule is not None and self.threshold_rule not in RULES:
            raise ConfigError(f"--threshold-rule should be one of {', '.join(RULES)}, got {self.threshold_rule!r}")
        if self.target_sensitivity is not None and not 0.0 < self.target_sensitivity < 1.0:
            raise ConfigError(f"--target-sensitivity should be in (0, 1), got {self.target_sensitivity}")
        if self.target_sensitivity is not None and not str(self.threshold_rule).startswith("target-sensitivity"):
            raise ConfigError(
                "--target-sensitivity applies with --threshold-rule target-sensitivity or target-sensitivity-lcb only"
            )
        if self.site is not None and not self.site.strip():
            raise ConfigError("--site should be a non-empty name")
        if self.refit == "head" and (self.calibrate, self.threshold_rule) != (None, None):
            raise ConfigError(
                "--calibrate and --threshold-rule do not apply with --refit head: the refitted head is "
                "class-balanced and runs at 0.5"
            )


UNLABELLED_OPTIONS = {"prevalence": "--prevalence", "train_prior": "--train-prior", "objective": "--objective"}
LABELLED_OPTIONS = {
    "refit": "--refit",
    "calibrate": "--calibrate",
    "threshold_rule": "--threshold-rule",
    "target_sensitivity": "--target-sensitivity",
}
