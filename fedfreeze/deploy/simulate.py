"""``fedfreeze simulate``: split a dataset into sites and run the federation in Flower's simulation.

The simulation runtime is Flower's own (a SuperLink in simulation mode, Ray underneath), started
with a private ``FLWR_HOME`` and database in the output folder and always stopped at the end, so
nothing is left running (``flwr run .`` alone leaves a detached SuperLink behind).
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

import numpy as np

from fedfreeze.data.dataset import load_image_set
from fedfreeze.data.partition import SITES_FILE, assign_sites, write_site, write_sites, write_summary
from fedfreeze.deploy.launch import (
    Connection,
    LaunchError,
    Managed,
    flower_env,
    free_port,
    require_completed,
    run_command,
    stop_tagged,
    submit,
    superlink_command,
    wait_healthy,
    write_flwr_home,
)
from fedfreeze.errors import FedfreezeError
from fedfreeze.federation.config import load_fed_config, resolve_config_path
from fedfreeze.federation.report import METRICS_FILE
from fedfreeze.sample_data import kermany_mini

CONNECTION = "fedfreeze-sim"


def prepare_sites(
    data_path: Path,
    out: Path,
    *,
    sites: int | None,
    alpha: float | None,
    seed: int,
    image_size: int,
    channels: int,
    num_classes: int,
    class_names: list[str] | None,
    evaluation: dict[str, Path] | None = None,
) -> list[dict[str, Any]]:
    """Write ``out/sites/site-<i>/data`` for every site; a manifest's ``site`` column wins when ``sites`` is None.
    ``evaluation``: name -> data of evaluation-only sites, written after the training sites."""

    def load(path: Path) -> Any:
        return load_image_set(
            path,
            image_size=image_size,
            channels=channels,
            num_classes=num_classes,
            class_names=class_names,
            progress=False,
        )

    def is_manifest(path: Path) -> bool:
        return path.suffix.lower() == ".csv" or (path / "manifest.csv").is_file()

    data = load(data_path)
    data.require_nonempty()
    if sites is None and data.sites is not None:
        names = sorted(set(data.sites))
        index = np.array([names.index(s) for s in data.sites])
        summary = write_sites(data, index, out / "sites", names, as_manifest=is_manifest(data_path))
    elif sites is None:
        raise FedfreezeError(f"{data_path} has no site column: say how many sites to make with --sites N")
    else:
        index = assign_sites(data.labels.numpy(), data.patient_ids, sites, alpha=alpha, seed=seed)
        summary = write_sites(data, index, out / "sites", as_manifest=is_manifest(data_path))
    for name, path in (evaluation or {}).items():
        held = load(path)
        held.require_nonempty(f"evaluation-only site {name!r}: {path} holds no images")
        summary.append(
            write_site(held, out / "sites", len(summary), name, as_manifest=is_manifest(path), role="evaluate")
        )
    write_summary(out / "sites", summary)
    return summary


def parse_evaluation_sites(values: list[str] | None, listed: list[str]) -> dict[str, Path]:
    """``NAME=DATA`` pairs of ``--evaluation-site``; each name must be one the config's
    ``federation.evaluation-sites`` lists (the coordinator decides who only evaluates)."""
    pairs: dict[str, Path] = {}
    for value in values or []:
        name, sep, path = value.partition("=")
        if not sep or not name or not path:
            raise FedfreezeError(f"--evaluation-site {value!r}: expected NAME=DATA, e.g. held-out=test.csv")
        if name not in listed:
            raise FedfreezeError(
                f"--evaluation-site {name}: the config's federation.evaluation-sites does not name "
                f"it (it lists {listed}); add it there so the coordinator knows it only evaluates"
            )
        if name in pairs:
            raise FedfreezeError(f"--evaluation-site {name} is given twice")
        pairs[name] = Path(path)
    return pairs


def simulate(
    config: str | Path | None,
    out: str | Path,
    *,
    data: str | Path | None = None,
    sites: int | None = None,
    alpha: float | None = None,
    resume: bool = False,
    cpus_per_site: int = 1,
    evaluation_sites: list[str] | None = None,
    share_operating_points: bool = False,
    share_site_figures: bool = False,
) -> dict[str, Any]:
    """Partition, run every round in Flower's simulation runtime, and return ``metrics.json``.

    ``share_operating_points``: every simulated site sends the operating point it fits at the final
    evaluation, so the model folder holds them (each site keeps its own in ``sites/site-N/state`` anyway).
    ``share_site_figures``: every simulated site sends its own exact validation figures every round."""
    out = Path(out).resolve()
    config_path = resolve_config_path(config)
    cfg = load_fed_config(config_path, {"federation.out-dir": str(out)})
    data_path = Path(data) if data is not None else kermany_mini("train")
    evaluation = parse_evaluation_sites(evaluation_sites, cfg.federation.evaluation_sites)
    if resume and (out / "sites" / SITES_FILE).is_file():
        summary = json.loads((out / "sites" / SITES_FILE).read_text())
    else:
        summary = prepare_sites(
            data_path,
            out,
            sites=sites,
            alpha=alpha,
            seed=cfg.federation.seed,
            image_size=cfg.model.input_size,
            channels=cfg.model.in_channels,
            num_classes=cfg.model.num_classes,
            class_names=cfg.model.class_names,
            evaluation=evaluation,
        )
    for site in summary:
        role = " evaluation only," if site.get("role") == "evaluate" else ""
        print(
            f"{site['site']} ({site['name']}):{role} {site['images']} images, {site['patients']} patients, "
            f"class counts {site['class_counts']}",
            flush=True,
        )

    port = free_port()
    home = write_flwr_home(out / ".flwr", [Connection(CONNECTION, f"127.0.0.1:{port}")])
    tag = uuid.uuid4().hex
    env = flower_env(home, tag=tag)
    link_cmd = superlink_command(port=port, database=out / "superlink.db", simulation=True, insecure=True)  # loopback
    link = Managed("simulation SuperLink", link_cmd, out / "logs" / "superlink.log", env)
    run_config: dict[str, Any] = {
        "sites-dir": str(out / "sites"),
        "out-dir": str(out),
        "resume": resume,
        "share-operating-points": share_operating_points,
        "share-site-figures": share_site_figures,
    }
    if config_path is not None:
        run_config["config"] = str(config_path.resolve())
    cmd = run_command(
        connection=CONNECTION,
        run_config=run_config,
        federation_config={"num-supernodes": len(summary), "client-resources-num-cpus": cpus_per_site},
    )
    try:
        with link:
            wait_healthy(f"127.0.0.1:{port}", link)
            code, run_id = submit(cmd, env)
            entry = require_completed(CONNECTION, run_id, env)
    finally:
        stop_tagged(tag)  # the ServerApp executor, the simulation and Ray's workers too
    metrics_path = out / METRICS_FILE
    if not metrics_path.is_file():
        raise LaunchError(f"run {entry.get('run-id')} wrote no {metrics_path} (flwr run exited {code})")
    metrics = json.loads(metrics_path.read_text())
    if metrics.get("status") != "completed":
        raise LaunchError(f"the federation {metrics.get('status')}: {metrics.get('reason')}")
    return metrics
