"""Write docs/configuration.md, the configuration reference, from the pydantic models themselves.

Why generated: a hand-written reference drifts as soon as someone adds a field. Every key, type,
bound and default here is read from the models (``fedfreeze/config.py``,
``fedfreeze/federation/config.py``); descriptions come from each field's ``description``, or, for
fields without one, from ``EXTRA_DESCRIPTIONS`` below. ``tests/unit/test_config_docs.py`` regenerates
the page in memory and fails when the committed file differs.

    .venv/bin/python scripts/make_config_docs.py           # rewrite docs/configuration.md
    .venv/bin/python scripts/make_config_docs.py --check   # exit 1 when it is out of date
"""

from __future__ import annotations

import argparse
import inspect
import sys
import types
import typing
from pathlib import Path
from typing import Any, Literal

import annotated_types
from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from fedfreeze.config import CVConfig, DualConfig, DynamicFreezeConfig, ModelConfig, TrainConfig  # noqa: E402
from fedfreeze.federation.config import SITE_SCHEDULE_KEYS, FederationConfig  # noqa: E402

OUTPUT = ROOT / "docs" / "configuration.md"

# (table, model, which files hold it)
TABLES: list[tuple[str, type[BaseModel], str]] = [
    ("model", ModelConfig, "`site.toml` and `fed.toml`"),
    ("train", TrainConfig, "`site.toml` and `fed.toml`"),
    ("train.dynamic-freeze", DynamicFreezeConfig, "`site.toml` and `fed.toml`"),
    ("train.dual", DualConfig, "`site.toml` and `fed.toml`"),
    ("cv", CVConfig, "`site.toml` only"),
    ("federation", FederationConfig, "`fed.toml` only"),
]

# Descriptions of fields whose model gives none, keyed "table.key". A key here that is not a field,
# or a field that has its own description, fails tests/unit/test_config_docs.py.
EXTRA_DESCRIPTIONS: dict[str, str] = {
    "model.backbone": "the backbone; `fedfreeze models` lists them with parameters, groups and input size",
    "model.weights-format": "format of the checkpoint in `weights`; `auto` detects it from the checkpoint's keys",
    "model.in-channels": "3: grey images replicated to RGB; 1: the RGB stem's weights summed to one channel",
    "model.input-size": "every image is resized to this square side, in pixels",
    "model.num-classes": "2: one logit, BCE-with-logits; more: softmax cross-entropy",
    "model.class-names": "names of the classes in label order; lets a manifest use names as labels",
    "model.dropout": "dropout before the linear head",
    "model.mean": "input normalisation per channel; default: what the checkpoint format expects",
    "model.std": "input normalisation per channel; default: what the checkpoint format expects",
    "train.probe-epochs": "linear probing: epochs in which only the head trains (on cached backbone features)",
    "train.unfreeze": "fraction of the fine-tuning epochs before each group joins (top-down)",
    "train.method": "what an unfrozen group trains: its weights, zero-initialised low-rank adapters, or both",
    "train.adapter-rank": "channels of each low-rank adapter",
    "train.lr": "peak learning rate per group (AdamW, one-cycle); needs a `head` entry",
    "train.adapter-lr": "peak learning rate of the adapters",
    "train.weight-decay": "a number, or a table per group (`default` for groups not named); biases and norm "
    "weights get none",
    "train.batch-size": "images per step",
    "train.cutmix-prob": "chance that a fine-tuning batch is mixed with CutMix (never during the probe)",
    "train.cutmix-alpha": "CutMix's mixing fraction is drawn from Beta(cutmix-alpha, cutmix-alpha)",
    "train.balanced-sampling": "draw training images with inverse-frequency class weights",
    "train.augment": "rotation +/- 5 degrees, flip, scale 0.95-1.05, mild blur",
    "train.seed": "random seed of training",
    "train.dual.weight-decay": "weight decay of the dual stage (AdamW)",
    "cv.folds": "folds of the patient-level stratified k-fold split",
    "cv.repeats": "how many times the k-fold split is repeated with a new shuffle",
    "cv.seed": "seed of the fold split",
    "federation.rounds": "rounds in all: dual-stage, probe and fine-tuning rounds",
    "federation.method": "what an unfrozen group trains: its weights, low-rank adapters, or both",
    "federation.strategy": "Flower's aggregation strategy: FedAvg, FedProx, FedAvgM (server momentum, kept per array), FedTrimmedAvg or FedMedian",
    "federation.fraction-train": "share of the connected sites sampled for each round",
    "federation.score-bins": "bins of the per-class score histograms a site merges into cells before it sends them "
    "(uniform in logit space)",
    "federation.target-sensitivity": "threshold = 'target-sensitivity': the highest threshold whose pooled "
    "sensitivity reaches this",
    "federation.dp-noise-multiplier": "noise multiplier of Flower's DP wrappers (dp = 'client' or 'server')",
    "federation.dp-delta": "delta of the (epsilon, delta) budget reported every round",
    "federation.out-dir": "the coordinator's output folder (metrics, model, checkpoint)",
    "federation.seed": "random seed, sent to every site with the round's orders (validation split, training)",
}

BOUNDS = (
    (annotated_types.Ge, "ge", ">="),
    (annotated_types.Gt, "gt", ">"),
    (annotated_types.Le, "le", "<="),
    (annotated_types.Lt, "lt", "<"),
)


def key_of(name: str, info: FieldInfo) -> str:
    return info.alias or name.replace("_", "-")


def table_of(model: type[BaseModel]) -> str | None:
    for table, candidate, _ in TABLES:
        if candidate is model:
            return table
    return None


def type_text(annotation: Any) -> str:
    """A reader's name for a field's type (TOML terms)."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is Literal and len(args) == 1:
        return f"`{toml_value(args[0])}`"
    if origin is Literal:
        return "one of " + ", ".join(f"`{toml_value(a)}`" for a in args)
    if origin in (typing.Union, types.UnionType):
        parts = [type_text(a) for a in args if a is not type(None)]
        return " or ".join(parts)
    if origin is dict:
        return f"table of {type_text(args[1]).removeprefix('a ')}s by name"
    if origin is list and typing.get_origin(args[0]) is Literal:
        return "list of any of " + ", ".join(f"`{toml_value(a)}`" for a in typing.get_args(args[0]))
    if origin is list:
        return f"list of {type_text(args[0])}s"
    if inspect.isclass(annotation) and issubclass(annotation, BaseModel):
        table = table_of(annotation)
        return f"table [`[{table}]`](#{anchor(table)})" if table else "table"
    names = {bool: "boolean", int: "integer", float: "number", str: "string"}
    if annotation in names:
        return names[annotation]
    raise ValueError(f"make_config_docs: no name for the type {annotation!r}; add one to type_text")


def bounds_text(info: FieldInfo) -> str:
    found = []
    for item in info.metadata:
        for kind, attr, sign in BOUNDS:
            if isinstance(item, kind):
                found.append(f"{sign} {toml_value(getattr(item, attr))}")
    return ", ".join(found)


def toml_value(value: Any) -> str:
    """A value as it would be written in TOML."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return f'"{value}"'
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {toml_value(v)}" for k, v in value.items()) + " }" if value else "{}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    raise ValueError(f"make_config_docs: cannot write the default {value!r} as TOML")


def default_text(info: FieldInfo) -> str:
    if info.default_factory is not None:
        value = info.default_factory()  # type: ignore[call-arg]
        if isinstance(value, BaseModel):
            return "(table)"
    elif info.default is PydanticUndefined:
        return "(required)"
    else:
        value = info.default
    if value is None:
        return "(unset)"
    return f"`{toml_value(value)}`"


def description_of(table: str, key: str, info: FieldInfo) -> str:
    text = info.description or EXTRA_DESCRIPTIONS.get(f"{table}.{key}", "")
    if not text and inspect.isclass(info.annotation) and issubclass(info.annotation, BaseModel):
        text = f"the table `[{table}.{key}]`: {docstring(info.annotation)}"
    if not text:
        raise ValueError(
            f"make_config_docs: {table}.{key} has no description: give the field one "
            "(Field(description=...)) or add it to EXTRA_DESCRIPTIONS"
        )
    return text


def cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def anchor(table: str) -> str:
    """GitHub's anchor of a heading ``[table]``: lower case, punctuation dropped except '-'."""
    return "".join(c for c in table.lower() if c.isalnum() or c in "-_ ").replace(" ", "-")


def docstring(model: type[BaseModel]) -> str:
    text = inspect.cleandoc(model.__doc__ or "").split("\n\n")[0]
    return " ".join(text.replace("``", "`").split())


def render() -> str:
    """The whole page."""
    lines = [
        "# Configuration reference",
        "",
        "<!-- Generated by scripts/make_config_docs.py from the pydantic models; do not edit by hand.",
        "     tests/unit/test_config_docs.py fails when this file differs from what the script writes. -->",
        "",
        "Every key is optional: an empty file is a valid configuration. Keys are kebab-case; an unknown key",
        "or a bad value is rejected with the table, the key and the value named. Rules that tie several",
        'keys together (for example `federation.patience` needs `federation.export = "best"`) are checked',
        "too; the pages that explain each feature describe them.",
        "",
        "A site's `site.toml` holds `[model]`, `[train]` and `[cv]`",
        "([site training](site-training.md)); a federation's `fed.toml` holds `[model]`, `[train]` and",
        "`[federation]` ([federation](federation.md)).",
        "",
        "Tables: " + ", ".join(f"[`[{t}]`](#{anchor(t)})" for t, _, _ in TABLES) + ".",
        "",
    ]
    for table, model, files in TABLES:
        lines += [f"## [{table}]", "", f"{docstring(model)} In {files}.", ""]
        if table == "train":
            refused = ", ".join(f"`{k}` (use `federation.{v}`)" for k, v in SITE_SCHEDULE_KEYS.items())
            lines += [
                "A federation's schedule counts rounds, so a `fed.toml` that sets one of these `[train]` keys "
                f"is refused: {refused}.",
                "",
            ]
        lines += ["| key | type | default | description |", "|---|---|---|---|"]
        for name, info in model.model_fields.items():
            key = key_of(name, info)
            kind = type_text(info.annotation)
            limits = bounds_text(info)
            if limits:
                kind += f", {limits}"
            lines.append(
                f"| `{key}` | {cell(kind)} | {cell(default_text(info))} | {cell(description_of(table, key, info))} |"
            )
        lines.append("")
    return "\n".join(lines)


def unused_descriptions() -> list[str]:
    """Entries of ``EXTRA_DESCRIPTIONS`` that name no field, or a field that has its own description."""
    fields = {
        f"{table}.{key_of(name, info)}": info for table, model, _ in TABLES for name, info in model.model_fields.items()
    }
    return [k for k in EXTRA_DESCRIPTIONS if k not in fields or fields[k].description]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="exit 1 when docs/configuration.md is out of date")
    args = parser.parse_args(argv)
    stale = unused_descriptions()
    if stale:
        print(
            f"make_config_docs: EXTRA_DESCRIPTIONS entries that name no field without a description: {stale}",
            file=sys.stderr,
        )
        return 1
    text = render()
    if args.check:
        current = OUTPUT.read_text(encoding="utf-8") if OUTPUT.is_file() else ""
        if current != text:
            print(
                f"{OUTPUT.relative_to(ROOT)} is out of date: run .venv/bin/python scripts/make_config_docs.py",
                file=sys.stderr,
            )
            return 1
        return 0
    OUTPUT.parent.mkdir(parents=True, exist_ok=True)
    OUTPUT.write_text(text, encoding="utf-8")
    print(f"wrote {OUTPUT.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
