"""Run one whole federation in this process: the real ServerApp loop and the real ClientApp.

``fedfreeze experiment`` trains a federated model per fold and per arm, dozens of federations in
one experiment. Starting a SuperLink, Ray and one process per site for each would cost far more
than the training on a small machine; instead ``LocalGrid`` delivers the real, serialised Flower
messages to the project's ClientApp in this process, and ``run_federation`` (the ServerApp's main)
runs unchanged: same schedule, partial exchange, reply checks, strategies, pooled statistics,
checkpoints and exported model. What this leaves out is the transport (gRPC, process isolation,
timeouts), which ``fedfreeze simulate`` and the process-level tests exercise.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from flwr.app import Context, RecordDict
from flwr.clientapp import ClientApp

from fedfreeze.federation.config import SITE_SCHEDULE_KEYS, FedConfig
from fedfreeze.federation.report import METRICS_FILE
from fedfreeze.flower.client import client_app as project_client_app
from fedfreeze.flower.federate import run_federation
from fedfreeze.flower.local_grid import LocalGrid
from fedfreeze.models.checkpoints import names_a_file

CONFIG_FILE = "fed.toml"


def toml_text(data: Mapping[str, Any]) -> str:
    """A config dict (tables of scalars, lists and inline tables) as TOML; ``None`` values left out
    (they mean "the default" in fedfreeze's configs, and TOML has no null)."""
    lines: list[str] = []
    for table, values in data.items():
        lines.append(f"[{table}]")
        for key, value in values.items():
            if value is not None:
                lines.append(f"{key} = {_toml_value(value)}")
        lines.append("")
    return "\n".join(lines)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, Mapping):
        return (
            "{ "
            + ", ".join(f"{json.dumps(str(k))} = {_toml_value(v)}" for k, v in value.items() if v is not None)
            + " }"
        )
    raise TypeError(f"cannot write {type(value).__name__} to TOML")


def run_in_process(
    cfg: FedConfig,
    out_dir: str | Path,
    sites: Mapping[str, str | Path],
    state_dir: str | Path,
    *,
    resume: bool = True,
    device: str = "auto",
    client_app: ClientApp | None = None,
    share_operating_points: bool = False,
    share_site_figures: bool = False,
) -> dict[str, Any]:
    """Run the federation of ``cfg`` over ``sites`` (name -> data folder); returns its ``metrics.json``.

    ``share_operating_points``: every site sends the operating point it fits at the final evaluation
    (each keeps its own in its state folder either way). ``share_site_figures``: every site sends its
    own exact validation figures every round.

    The configuration is written to ``out_dir/fed.toml`` (the run reads it like any run config).
    With ``resume``, a federation stopped earlier in ``out_dir`` continues from its checkpoint.
    Raises the federation's own error when it fails (the reason is also in ``metrics.json``).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = out / CONFIG_FILE
    data = cfg.model_dump(mode="json", by_alias=True)
    for key in SITE_SCHEDULE_KEYS:  # a federation's schedule is [federation]'s (config.check_one_schedule)
        data["train"].pop(key, None)
    config.write_text(toml_text(data), encoding="utf-8")
    # the sites' manifests name the caller's images where they lie, and the caller's checkpoint is theirs too
    pinned = {"weights": str(Path(cfg.model.weights).resolve())} if names_a_file(cfg.model.weights) else {}
    nodes = {
        number: {
            "data-path": str(Path(folder).resolve()),
            "site-name": name,
            "state-dir": str(Path(state_dir).resolve() / name),
            "device": device,
            "allow-outside-paths": True,
            **pinned,
            "share-operating-point": share_operating_points,
            "share-site-figures": share_site_figures,
        }
        for number, (name, folder) in enumerate(sites.items(), start=1)
    }
    run_config: dict[str, bool | float | int | str] = {
        "config": str(config.resolve()),
        "out-dir": str(out.resolve()),
        "work-dir": str(out.resolve()),  # the caller holds this folder (an experiment's, a test's)
        "resume": resume,
    }
    grid = LocalGrid(client_app or project_client_app(), nodes, run_config)
    context = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=run_config)
    # one line per round and per message is noise inside an experiment: warnings and errors only
    loggers = [logging.getLogger(name) for name in ("fedfreeze.server", "flwr")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(max(logger.getEffectiveLevel(), logging.WARNING))
    try:
        run_federation(grid, context)
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)
    return json.loads((out / METRICS_FILE).read_text(encoding="utf-8"))
