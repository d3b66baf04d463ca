"""Federation configuration: the site's ``[model]`` and ``[train]`` plus a ``[federation]`` table.

The coordinator owns this configuration. Flower's run config holds only scalars, so a run names a
TOML file (``config``) and may override single keys with dotted names (``federation.rounds=4``);
the coordinator then sends the model and training sections to every site with each message, so
sites need no copy of the file.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path, PurePosixPath
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from fedfreeze.config import DEFAULT_FED_UNFREEZE, ModelConfig, Section, TrainConfig, parse_config, read_toml
from fedfreeze.errors import ConfigError

# federation.tracking: where a run's round figures also go (federation/tracking.py writes them)
Tracker = Literal["tensorboard", "mlflow"]


class FederationConfig(Section):
    """Rounds, the server-driven freezing schedule, aggregation and reporting."""

    rounds: int = Field(8, ge=1)
    probe_rounds: int = Field(3, ge=0, description="rounds that train only the head")
    unfreeze: dict[str, float] = Field(
        default_factory=lambda: dict(DEFAULT_FED_UNFREEZE),
        description="fraction of the fine-tuning rounds before each group joins",
    )
    method: Literal["unfreeze", "adapters", "both"] = "unfreeze"
    local_epochs: int = Field(1, ge=1, description="local epochs per fine-tuning round")
    probe_local_epochs: int = Field(5, ge=1, description="local epochs per probe round (on cached features)")
    strategy: Literal["fedavg", "fedprox", "fedavgm", "trimmed-mean", "median"] = "fedavg"
    proximal_mu: float = Field(0.01, ge=0.0, description="FedProx: weight of the proximal term")
    server_lr: float = Field(1.0, gt=0.0, description="FedAvgM: the server's step along the averaged update")
    server_momentum: float = Field(0.9, ge=0.0, lt=1.0, description="FedAvgM: the server's momentum")
    trim_beta: float = Field(0.2, gt=0.0, lt=0.5, description="trimmed mean: fraction cut at each end")
    bn_policy: Literal["average", "local"] = Field(
        "average", description="BatchNorm of trainable groups: averaged by the server, or kept at each site (FedBN)"
    )
    min_sites: int = Field(2, ge=1, description="fewest replies a round needs; fewer fails the run")
    fraction_train: float = Field(1.0, gt=0.0, le=1.0)
    round_timeout: float = Field(900.0, gt=0.0, description="seconds to wait for a round's replies")
    val_fraction: float = Field(0.25, gt=0.0, lt=1.0, description="share of each site's patients kept for validation")
    score_bins: int = Field(200, ge=10, le=10_000)
    min_cell_count: int = Field(
        5,
        ge=1,
        description="fewest validation cases of one class a released cell of a site's statistics holds: a site "
        "merges score bins (or predicted classes) into cells of at least this many before anything leaves it "
        "(a class with fewer is sent as its total alone), and the coordinator rejects a reply that breaks it; "
        "pooled figures then carry the range the cells allow (what it costs: benchmarks/results/stats-privacy); "
        "1 sends the exact histograms",
    )
    cell_edges: Literal["pooled-quantiles", "threshold"] = Field(
        "pooled-quantiles",
        description="where sites cut their cells first: pooled-quantiles (the round's threshold, then the "
        "16-quantiles of the previous round's pooled validation scores, a common grid the coordinator announces "
        "in the orders, so cells split the scores where they are) or threshold (the threshold alone)",
    )
    secure_aggregation: bool = Field(
        False,
        description="sites send their exact validation histograms masked (Flower's SecAgg+ primitives), and the "
        "coordinator learns only their sum over the training sites and, apart, over the evaluation-only sites: "
        "exact pooled figures without any site's histogram; a group of one site sends cells of min-cell-count "
        "instead (fedfreeze/flower/secagg.py; what the sum still reveals: docs/federation.md)",
    )
    best_max_range: float = Field(
        0.05,
        ge=0.0,
        le=1.0,
        description="export = 'best' and patience choose only on pooled validation AUROCs whose range (what the "
        "sites' cells allow) is at most this wide; a round with a wider one neither becomes the best nor counts "
        "toward patience (exact figures, from secure aggregation or min-cell-count = 1, always qualify)",
    )
    threshold: float | Literal["youden", "youden-mid", "target-sensitivity"] = Field(
        0.5,
        description="the stored threshold: a number (default 0.5, the Bayes threshold for balanced accuracy "
        "of a model trained with class-balanced sampling; it beat Youden on shifted data, benchmarks/results/shift), "
        "or a rule on the pooled validation histograms: youden, youden-mid (the middle of the plateau where J is "
        "within threshold-tolerance of its maximum), target-sensitivity",
    )
    threshold_tolerance: float = Field(
        0.02,
        ge=0.0,
        lt=1.0,
        description="youden-mid: how far below the best J a threshold still counts as on the plateau",
    )
    target_sensitivity: float = Field(0.9, gt=0.0, le=1.0)
    export: Literal["last", "best"] = Field(
        "last",
        description="the exported model: the last round's, or the round's with the best pooled validation "
        "AUROC of the training sites (evaluation-only sites never choose)",
    )
    patience: int = Field(
        0,
        ge=0,
        description="export = 'best': stop after this many rounds without a better "
        "pooled validation AUROC (0: never stop early)",
    )
    wise_alpha: float = Field(
        1.0,
        ge=0.0,
        le=1.0,
        description="WiSE-FT: the final model is the probe-end model + "
        "wise-alpha x (fine-tuned - probe-end); 1 keeps the fine-tuned model",
    )
    swa_rounds: int = Field(
        0,
        ge=0,
        description="SWA over rounds: the exported model is the average of the global models after the last "
        "swa-rounds fine-tuning rounds (0: the last round's)",
    )
    calibrate: Literal["none", "temperature"] = Field(
        "temperature",
        description="temperature: fit temperature scaling on the final pooled validation histograms of the "
        "training sites and store it in the model folder (decisions at 0.5 unchanged, probabilities calibrated; "
        "chosen on benchmarks/results/recipe-external); none: the scores as the model gives them",
    )
    evaluation_sites: list[str] = Field(
        default_factory=list,
        description="sites (by name) that only score the global model every round: they "
        "never train or send arrays, and are pooled apart from the training sites' validation",
    )
    max_examples: int = Field(1_000_000, ge=1, description="a reply claiming more examples is rejected")
    site_wait: float = Field(300.0, gt=0.0, description="seconds to wait for min-sites sites to be connected")
    dp: Literal["off", "client", "server"] = Field(
        "off",
        description="central differential privacy: updates clipped at each site or at the server, noise added by the server",
    )
    dp_noise_multiplier: float = Field(1.0, gt=0.0)
    dp_clipping_norm: float = Field(1.0, gt=0.0, description="L2 bound of each site's update (all arrays of a round)")
    dp_delta: float = Field(1e-5, gt=0.0, lt=1.0)
    # train.recipe = "dual" (federation/dual_stage.py): the dual-input-output stage's rounds come first
    dual_rounds: int = Field(0, ge=0, description="rounds of the dual stage before the merge (train.recipe = 'dual')")
    dual_local_epochs: int = Field(1, ge=1, description="local epochs per dual-stage round")
    dual_lr_decay: Literal["cosine", "none"] = Field(
        "cosine",
        description="train.dual.lr across the dual rounds: cosine decay from 1x toward 0.05x (round r of R at "
        "cos-schedule position (r-1)/R), or the same every round",
    )
    tracking: list[Tracker] = Field(
        default_factory=list,
        description="also write every round's figures (pooled validation with the ranges its cells allow, "
        "evaluation-only sites, weighted mean, threshold, bytes, seconds, failures) to TensorBoard and/or "
        "MLflow, in tracking-dir; needs pip install 'fedfreeze[tracking]' (default: neither, metrics.json only)",
    )
    tracking_dir: str = Field(
        "tracking",
        description="where tracking writes: a folder inside the run's output folder, so that it is published "
        "(and resumed) with the run",
    )
    out_dir: str = "runs/fed"
    seed: int = 0

    @field_validator("unfreeze")
    @classmethod
    def _fractions(cls, value: dict[str, float]) -> dict[str, float]:
        for group, fraction in value.items():
            if not 0.0 <= fraction <= 1.0:
                raise ValueError(f"unfreeze.{group} should be a fraction in [0, 1], got {fraction}")
        return value

    @field_validator("tracking")
    @classmethod
    def _trackers(cls, value: list[Tracker]) -> list[Tracker]:
        if len(set(value)) != len(value):
            raise ValueError(f"names a tracker twice: {value}")
        return value

    @field_validator("tracking_dir")
    @classmethod
    def _inside_output(cls, value: str) -> str:
        path = PurePosixPath(value)
        if value.strip() in ("", ".") or path.is_absolute() or ".." in path.parts:
            raise ValueError(
                f"should be a folder inside the run's output folder (relative, without '..'), got {value!r}"
            )
        return value

    @model_validator(mode="after")
    def _rounds(self) -> FederationConfig:
        if self.probe_rounds > self.rounds:
            raise ValueError(f"probe-rounds ({self.probe_rounds}) cannot exceed rounds ({self.rounds})")
        if self.dual_rounds and self.dual_rounds >= self.rounds:
            raise ValueError(
                f"dual-rounds ({self.dual_rounds}) should be fewer than rounds ({self.rounds}): "
                "the merged model needs at least one round"
            )
        if self.dual_rounds + self.probe_rounds > self.rounds:
            raise ValueError(
                f"dual-rounds ({self.dual_rounds}) + probe-rounds ({self.probe_rounds}) cannot exceed "
                f"rounds ({self.rounds})"
            )
        if isinstance(self.threshold, float) and not 0.0 < self.threshold < 1.0:
            raise ValueError(f"threshold should be in (0, 1), got {self.threshold}")
        if self.patience and self.export != "best":
            raise ValueError(f"patience ({self.patience}) needs export = 'best': stopping early keeps the best round")
        if self.wise_alpha < 1.0 and self.probe_rounds == 0:
            raise ValueError(
                f"wise-alpha ({self.wise_alpha}) interpolates from the probe-end model: it needs probe-rounds >= 1"
            )
        if self.swa_rounds > self.rounds - self.probe_rounds:
            raise ValueError(
                f"swa-rounds ({self.swa_rounds}) is more than the fine-tuning rounds ({self.rounds - self.probe_rounds})"
            )
        if self.swa_rounds and self.export == "best":
            raise ValueError("swa-rounds averages the last rounds: it needs export = 'last'")
        if len(set(self.evaluation_sites)) != len(self.evaluation_sites):
            raise ValueError(f"evaluation-sites names a site twice: {self.evaluation_sites}")
        return self

    @property
    def finetune_rounds(self) -> int:
        return self.rounds - self.dual_rounds - self.probe_rounds


class FedConfig(Section):
    """Everything a federated run needs besides each site's data."""

    model: ModelConfig = Field(default_factory=ModelConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    federation: FederationConfig = Field(default_factory=FederationConfig)

    def site_payload(self) -> str:
        """The part of the configuration every site needs, as JSON for a message."""
        return site_payload(self.model, self.train)


def site_payload(model: ModelConfig, train: TrainConfig) -> str:
    """``[model]`` and ``[train]`` as the JSON a round's orders carry (``site_sections`` reads it back)."""
    return json.dumps({"model": model.model_dump(by_alias=True), "train": train.model_dump(by_alias=True)})


def site_sections(payload: str) -> tuple[ModelConfig, TrainConfig]:
    """Parse what ``site_payload`` wrote (a site receives it with each message)."""
    try:
        data = json.loads(payload)
    except json.JSONDecodeError as err:
        raise ConfigError(f"site configuration in the message is not JSON: {err}") from None
    cfg = parse_config({"model": data.get("model", {}), "train": data.get("train", {})}, FedConfig, "message")
    return cfg.model, cfg.train


def unflatten(flat: Mapping[str, Any]) -> dict[str, Any]:
    """``{"federation.rounds": 4}`` -> ``{"federation": {"rounds": 4}}``."""
    out: dict[str, Any] = {}
    for key, value in flat.items():
        node = out
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"run config key {key!r} clashes with a value at {part!r}")
        node[leaf] = value
    return out


def merge(base: dict[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    """Deep-merge ``override`` into a copy of ``base``."""
    out = dict(base)
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


CONFIG_KEY = "config"  # run-config key naming the TOML file
# run-config keys about this run rather than the federation's settings: out-dir is the output folder
# (what records name); work-dir, where a caller that holds that folder (simulate, in process) has the
# run write until it publishes it; force and resume say what to do with an existing out-dir;
# held-out-check names the file saying how the caller compared the evaluation-only sites' data with the
# training sites'
RUN_KEYS = {
    CONFIG_KEY,
    "sites-dir",
    "resume",
    "out-dir",
    "work-dir",
    "force",
    "held-out-check",
    "share-operating-points",
    "share-site-figures",
}


def load_fed_config(path: str | Path | None, overrides: Mapping[str, Any] | None = None) -> FedConfig:
    """A TOML file (or the defaults) with dotted-key overrides applied; every field validated."""
    data = read_toml(path) if path else {}
    if overrides:
        data = merge(data, unflatten(overrides))
    check_one_schedule(data, str(path or "run config"))
    cfg = parse_config(data, FedConfig, str(path or "run config"))
    check_recipe(cfg, str(path or "run config"))
    if cfg.train.freezing == "dynamic" and cfg.federation.dp != "off":
        raise ConfigError(
            f"{path or 'run config'}: federation.dp: differential privacy is not supported with "
            "train.freezing = 'dynamic' (sites return different subsets of arrays, aggregated per "
            "group of keys: Flower's DP wrappers would clip and noise each group as a release)"
        )
    if cfg.federation.evaluation_sites and cfg.federation.dp != "off":
        raise ConfigError(
            f"{path or 'run config'}: federation.evaluation-sites: not supported with federation.dp "
            f"= {cfg.federation.dp!r} (DP accounting counts every sampled site as a contributor)"
        )
    if cfg.federation.wise_alpha < 1.0 and cfg.train.recipe == "dual":
        raise ConfigError(
            f"{path or 'run config'}: federation.wise-alpha: not supported with train.recipe = "
            "'dual' (its probe-end model is the merged one, not a pretrained backbone)"
        )
    if cfg.train.freezing == "dynamic" and cfg.federation.strategy in ("median", "trimmed-mean"):
        raise ConfigError(
            f"{path or 'run config'}: federation.strategy: {cfg.federation.strategy!r} is not "
            "supported with train.freezing = 'dynamic' (each key is aggregated over the sites that "
            "trained it, so a key one site alone returns would take that site's value: no "
            "robustness left); use 'fedavg' or 'fedprox'"
        )
    return cfg


# [train] keys that describe a site's schedule in epochs; a federation's schedule is [federation]'s, in rounds
SITE_SCHEDULE_KEYS = {"unfreeze": "unfreeze", "method": "method", "probe-epochs": "probe-rounds", "epochs": "rounds"}


def check_one_schedule(data: Mapping[str, Any], source: str) -> None:
    """One schedule per run: a federation config that sets a site-schedule key in ``[train]`` is refused
    (it would be silently ignored: the coordinator's ``[federation]`` schedule is the one that runs)."""
    train = data.get("train") or {}
    for key, instead in SITE_SCHEDULE_KEYS.items():
        if isinstance(train, Mapping) and (key in train or key.replace("-", "_") in train):
            raise ConfigError(
                f"{source}: train.{key}: not used in a federation, whose schedule counts rounds; "
                f"set federation.{instead} instead"
            )


def check_recipe(cfg: FedConfig, source: str) -> None:
    """``train.recipe = "dual"`` and ``federation.dual-rounds`` go together (checked here rather than
    in ``FedConfig``, which also parses the sites' copy of ``[model]`` and ``[train]`` alone)."""
    dual_rounds = cfg.federation.dual_rounds
    if cfg.train.recipe == "dual" and dual_rounds == 0:
        raise ConfigError(
            f"{source}: federation.dual-rounds: train.recipe = 'dual' needs at least one dual-stage round, got 0"
        )
    if cfg.train.recipe != "dual" and dual_rounds > 0:
        raise ConfigError(
            f"{source}: federation.dual-rounds: {dual_rounds} dual-stage rounds need "
            f"train.recipe = 'dual', got {cfg.train.recipe!r}"
        )
    if cfg.train.recipe == "dual" and cfg.federation.method != "unfreeze":
        raise ConfigError(
            f"{source}: federation.method: train.recipe = 'dual' needs 'unfreeze' (the merged model "
            f"unfreezes whole groups), got {cfg.federation.method!r}"
        )
    if cfg.train.recipe == "dual" and cfg.federation.bn_policy == "local":
        raise ConfigError(
            f"{source}: federation.bn-policy: 'local' (FedBN) is not supported with train.recipe = "
            "'dual': the merged model's frozen BatchNorm must be the federation's"
        )
    if cfg.train.recipe == "dual" and cfg.federation.dp == "client":
        raise ConfigError(
            f"{source}: federation.dp: 'client' is not supported with train.recipe = 'dual' (Flower's "
            "client-side clipping mod takes one array record per message; merged rounds also send "
            "the frozen base): use dp = 'server'"
        )


SHIPPED_CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def resolve_config_path(value: object) -> Path | None:
    """A config path as given, else the name of a config shipped in ``fedfreeze/configs``."""
    if value is None or str(value) == "":
        return None
    path = Path(str(value)).expanduser()
    if not path.is_file() and not path.is_absolute() and (SHIPPED_CONFIGS / path.name).is_file():
        return SHIPPED_CONFIGS / path.name
    return path


def from_run_config(run_config: Mapping[str, Any]) -> FedConfig:
    """The configuration of a Flower run: ``config`` names the TOML file, other keys override it."""
    overrides = {k: v for k, v in run_config.items() if k not in RUN_KEYS}
    path = resolve_config_path(run_config.get(CONFIG_KEY) or None)
    if run_config.get("out-dir"):
        overrides["federation.out-dir"] = str(run_config["out-dir"])
    return load_fed_config(path, overrides)
