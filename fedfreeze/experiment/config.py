"""The experiment file (``exp.toml``): shared settings, the protocol, and named arms.

```toml
[experiment]                  # the protocol: data, folds, statistics
data = "manifest.csv"
folds = 5
repeats = 6

[model]                       # what every arm starts from: the tables of site.toml / fed.toml
weights = "package"
[train]
epochs = 3
[federation]
rounds = 6

[arms.pretrained]             # an arm: how it trains, and overrides of the tables above
mode = "federated"
[arms.random-init]
mode = "federated"
model = { weights = "none" }
```

Every arm's settings are the shared tables with its overrides merged in, validated as a whole
federation config (unknown keys and bad values are errors naming ``arms.<name>.<table>.<key>``).
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from fedfreeze.config import Section, parse_config, read_toml
from fedfreeze.errors import ConfigError
from fedfreeze.federation.config import merge

Mode = Literal["site", "federated", "pooled"]
ARM_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
MODES_TEXT = {
    "site": "site alone: each site trains its own model on its own training folds",
    "federated": "federated: the sites train one model together on their training folds",
    "pooled": "pooled (centralised): one model trained on all sites' training folds put together",
}


class ExperimentSettings(Section):
    """The protocol every arm shares: data, folds, statistics."""

    data: str = Field(description="manifest CSV (path,label[,patient_id][,site]); relative to the config file")
    sites: int = Field(
        0,
        ge=0,
        description="0: the manifest's site column (one site without it); N: patients dealt at random to N sites",
    )
    folds: int = Field(5, ge=2)
    repeats: int = Field(1, ge=1)
    seed: int = 0
    balance_test: bool = Field(True, description="test folds hold as many patients of each class")
    test_images: Literal["one-per-patient", "all"] = "one-per-patient"
    threshold: float = Field(0.5, gt=0.0, lt=1.0, description="decision threshold of the threshold metrics")
    bootstrap: int = Field(2000, ge=100, description="bootstrap replicates")
    confidence: float = Field(0.95, gt=0.5, lt=1.0)
    comparisons: list[tuple[str, str]] | None = Field(
        None, description="pairs of arms to compare (first minus second); default: every pair"
    )


class ArmSpec(Section):
    """One arm: how it trains, and its overrides of the shared tables."""

    mode: Mode
    description: str = ""
    model: dict[str, Any] = Field(default_factory=dict)
    train: dict[str, Any] = Field(default_factory=dict)
    federation: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _federation_only_when_federated(self) -> ArmSpec:
        if self.federation and self.mode != "federated":
            raise ValueError(f"federation settings apply to federated arms only (this arm's mode is {self.mode!r})")
        return self


class ExperimentFile(Section):
    """The whole file as written."""

    experiment: ExperimentSettings
    model: dict[str, Any] = Field(default_factory=dict)
    train: dict[str, Any] = Field(default_factory=dict)
    federation: dict[str, Any] = Field(default_factory=dict)
    arms: dict[str, ArmSpec]

    @field_validator("arms")
    @classmethod
    def _arm_names(cls, value: dict[str, ArmSpec]) -> dict[str, ArmSpec]:
        if not value:
            raise ValueError('needs at least one arm, e.g. [arms.pretrained] with mode = "federated"')
        for name in value:
            if not ARM_NAME.match(name):
                raise ValueError(f"arm name {name!r} should use letters, digits, '-', '_' or '.' only")
        return value

    @model_validator(mode="after")
    def _comparisons(self) -> ExperimentFile:
        for first, second in self.experiment.comparisons or []:
            for name in (first, second):
                if name not in self.arms:
                    raise ValueError(f"experiment.comparisons names unknown arm {name!r}; arms are {sorted(self.arms)}")
            if first == second:
                raise ValueError(f"experiment.comparisons compares arm {first!r} with itself")
        return self


@dataclass(frozen=True)
class Arm:
    """A validated arm: its settings as one federation config (site and pooled arms use model and train)."""

    name: str
    mode: Mode
    description: str
    cfg: Any  # FedConfig

    def fingerprint(self) -> str:
        """Changes whenever a setting of this arm changes. Settings left at their defaults are not
        part of it, so a fedfreeze version that adds a setting can still resume an experiment."""
        cfg = self.cfg.model_dump(mode="json", by_alias=True, exclude_defaults=True)
        blob = json.dumps({"mode": self.mode, "cfg": cfg}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Experiment:
    """Settings, arms (in file order), and where the config came from."""

    settings: ExperimentSettings
    arms: dict[str, Arm]
    source: str
    data_path: Path

    def comparisons(self) -> list[tuple[str, str]]:
        if self.settings.comparisons is not None:
            return [tuple(pair) for pair in self.settings.comparisons]  # type: ignore[misc]
        names = list(self.arms)
        return [(a, b) for i, a in enumerate(names) for b in names[i + 1 :]]

    def protocol(self) -> dict[str, Any]:
        """What decides the folds: results made under another protocol cannot be mixed in."""
        keys = ("sites", "folds", "repeats", "seed", "balance_test", "test_images")
        return {"data": str(self.data_path), **{k: getattr(self.settings, k) for k in keys}}


def parse_experiment(
    data: dict[str, Any], source: str, base_dir: Path | None = None, data_override: str | Path | None = None
) -> Experiment:
    """Validate an experiment dict; every arm becomes a full, validated federation config."""
    from fedfreeze.federation.config import FedConfig

    raw = parse_config(data, ExperimentFile, source)
    arms = {}
    for name, spec in raw.arms.items():
        merged = {
            "model": merge(raw.model, spec.model),
            "train": merge(raw.train, spec.train),
            "federation": merge(raw.federation, spec.federation),
        }
        cfg = parse_config(merged, FedConfig, f"{source}: arms.{name}")
        arms[name] = Arm(name=name, mode=spec.mode, description=spec.description, cfg=cfg)
    data_path = Path(data_override) if data_override is not None else Path(raw.experiment.data)
    if data_override is None and not data_path.is_absolute() and base_dir is not None:
        data_path = base_dir / data_path
    return Experiment(settings=raw.experiment, arms=arms, source=source, data_path=data_path)


def load_experiment(path: str | Path, data_override: str | Path | None = None) -> Experiment:
    """Read and validate ``exp.toml``; ``data_override`` replaces ``experiment.data``."""
    path = Path(path)
    data = read_toml(path)
    if data_override is not None:
        data.setdefault("experiment", {}).setdefault("data", str(data_override))
    if "experiment" not in data or not isinstance(data["experiment"], dict):
        raise ConfigError(f'{path}: needs an [experiment] table (with at least data = "manifest.csv")')
    return parse_experiment(data, str(path), base_dir=path.parent, data_override=data_override)
