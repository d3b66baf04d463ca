"""Start site training from a trained model folder (``fedfreeze site-train --init MODEL_DIR``).

The folder (``model.json`` + ``weights.pt``, usually a federated global model) is loaded once and
checked against the site's config; every cross-validation fold and the refit then start from an
exact copy of it, head, adapters and BatchNorm statistics included.

Rules (one source per setting):

* ``model.backbone``, ``input-size``, ``in-channels`` and ``num-classes`` must equal the folder's
  card; ``mean``/``std`` and ``class-names``, when the config sets them, too (the card's
  normalisation and class order are used: they are what the weights were trained with).
* ``model.weights`` and ``weights-format`` are not used: the folder supplies every weight.
* ``model.dropout`` is a training setting and applies to the head while the site trains.
* Adapters: the folder's adapters are kept (they are part of its function); they train when the
  schedule trains that group's adapters (``method = "adapters"`` or ``"both"``) and stay frozen
  otherwise. Groups whose adapters the schedule trains but the folder lacks get new zero-initialised
  adapters (the function at the start is unchanged), at the folder's rank; when the folder has
  adapters and the config trains adapters, ``train.adapter-rank`` must equal the folder's rank (a
  card holds one rank).
* BatchNorm: the loaded model counts as pretrained (``GroupedNet.pretrained``), so ``bn-stats =
  "auto"`` keeps its statistics frozen, by the one rule of ``config.resolve_bn_stats``.
* ``train.recipe = "dual"`` is refused: it builds its own model from scratch.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import torch

from fedfreeze.config import SiteConfig
from fedfreeze.errors import ConfigError
from fedfreeze.model_io import WEIGHTS_FILE, ModelCard, file_sha256, load_model
from fedfreeze.models.grouped import GroupedNet
from fedfreeze.training.engine import model_adapter_groups
from fedfreeze.training.schedule import check_groups, check_rate_groups

MUST_MATCH = ("backbone", "input_size", "in_channels", "num_classes")


def _kebab(name: str) -> str:
    return name.replace("_", "-")


@dataclass
class InitModel:
    """A loaded model folder that site training starts from."""

    folder: Path
    card: ModelCard
    model: GroupedNet  # exactly as saved (eval mode): the un-adapted baseline
    weights_sha256: str
    new_adapter_groups: tuple[str, ...]
    dropout: float
    seed: int

    def start_model(self) -> GroupedNet:
        """A fresh copy to train: the folder's weights, plus any new zero-initialised adapters."""
        model = copy.deepcopy(self.model)
        model.head.dropout.p = self.dropout
        if self.new_adapter_groups:
            torch.manual_seed(self.seed)  # the new adapters' down-projections: the same in every fold
            rank = self.card.adapter_rank
            for group in self.new_adapter_groups:
                model.add_adapters(group, rank)
        return model


def check_init_config(card: ModelCard, cfg: SiteConfig, folder: Path) -> tuple[str, ...]:
    """The config's [model] and adapter settings against the folder's card; returns the groups that
    need new adapters. A disagreement is a ``ConfigError`` naming the field and both values."""

    def mismatch(field: str, ours: object, theirs: object, why: str = "") -> ConfigError:
        return ConfigError(f"{field}: the config has {ours!r} but the --init model {folder} has {theirs!r}{why}")

    for name in MUST_MATCH:
        ours, theirs = getattr(cfg.model, name), getattr(card.model, name)
        if ours != theirs:
            raise mismatch(f"model.{_kebab(name)}", ours, theirs)
    for name in ("mean", "std"):
        ours, theirs = getattr(cfg.model, name), getattr(card.model, name)
        if ours is not None and theirs is not None and not _close(ours, theirs):
            raise mismatch(f"model.{name}", ours, theirs, " (leave it unset to use the model's)")
    default_names = [str(i) for i in range(card.model.num_classes)]
    names = cfg.model.class_names
    if names is not None and card.class_names != default_names and list(names) != list(card.class_names):
        raise mismatch("model.class-names", names, card.class_names)
    if cfg.train.recipe == "dual":
        raise ConfigError(
            f"train.recipe: 'dual' builds its model from scratch, so it cannot start from the "
            f"--init model {folder}; use recipe = 'standard'"
        )
    wanted = model_adapter_groups(cfg.train)
    if wanted and card.adapter_groups and cfg.train.adapter_rank != card.adapter_rank:
        raise mismatch(
            "train.adapter-rank",
            cfg.train.adapter_rank,
            card.adapter_rank,
            " (its adapters and new ones share one rank)",
        )
    return tuple(g for g in wanted if g not in card.adapter_groups)


def _close(a: list[float], b: list[float]) -> bool:
    return len(a) == len(b) and all(abs(x - y) <= 1e-6 * max(1.0, abs(y)) for x, y in zip(a, b, strict=True))


def load_init(folder: str | Path, cfg: SiteConfig) -> InitModel:
    """Load ``folder`` (a ``CheckpointError`` if it is not a valid model folder) and check it
    against ``cfg`` (a ``ConfigError`` on any disagreement)."""
    folder = Path(folder)
    model, card = load_model(folder)
    new_groups = check_init_config(card, cfg, folder)
    check_groups(cfg.train.unfreeze, list(model.groups))
    check_rate_groups(cfg.train, list(model.groups))
    model.pretrained = True  # trained statistics: bn-stats "auto" keeps them frozen (resolve_bn_stats)
    return InitModel(
        folder=folder,
        card=card,
        model=model,
        weights_sha256=file_sha256(folder / WEIGHTS_FILE),
        new_adapter_groups=new_groups,
        dropout=cfg.model.dropout,
        seed=cfg.train.seed,
    )


def data_class_names(init: InitModel, cfg: SiteConfig) -> list[str]:
    """The class order the site's labels are read with: the model's (the config's only if the card
    holds the default index names)."""
    return list(cfg.model.class_names or init.card.class_names)
