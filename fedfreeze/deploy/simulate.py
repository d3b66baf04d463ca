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
from fedfreeze.data.overlap import check_held_out
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
from fedfreeze.federation.config import FedConfig, load_fed_config, resolve_config_path
from fedfreeze.federation.report import METRICS_FILE
from fedfreeze.federation.tracking import require as require_trackers
from fedfreeze.outputs import Output, output_folder
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
    outside_paths: bool = False,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Write ``out/sites/site-<i>/data`` for every site; a manifest's ``site`` column wins when ``sites`` is None.
    ``evaluation``: name -> data of evaluation-only sites, written after the training sites, each
    checked to be held out (``data/overlap.py``). Returns the sites' summary and how that check was made."""

    def load(path: Path) -> Any:
        return load_image_set(
            path,
            image_size=image_size,
            channels=channels,
            num_classes=num_classes,
            class_names=class_names,
            progress=False,
            outside_paths=outside_paths,
        )

    def is_manifest(path: Path) -> bool:
        return path.suffix.lower() == ".csv" or (path / "manifest.csv").is_file()

    data = load(data_path)
    data.require_nonempty()
    if sites is None and data.sites is not None:
        names = sorted(set(data.sites))
        index = np.array([names.index(s) for s in data.sites])
    elif sites is None:
        raise FedfreezeError(f"{data_path} has no site column: say how many sites to make with --sites N")
    else:
        names = [f"site-{i}" for i in range(sites)]
        index = assign_sites(data.labels.numpy(), data.patient_ids, sites, alpha=alpha, seed=seed)
    held_sets = {}
    for name, path in (evaluation or {}).items():
        held_sets[name] = load(path)
        held_sets[name].require_nonempty(f"evaluation-only site {name!r}: {path} holds no images")
    # before anything is written: a site's data that overlaps another's stops the run here
    check = check_held_out(data, [names[i] for i in index.tolist()], held_sets)
    summary = write_sites(data, index, out / "sites", names, as_manifest=is_manifest(data_path))
    for name, held in held_sets.items():
        path = (evaluation or {})[name]
        summary.append(
            write_site(held, out / "sites", len(summary), name, as_manifest=is_manifest(path), role="evaluate")
        )
    write_summary(out / "sites", summary)
    return summary, check


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
    force: bool = False,
    cpus_per_site: int = 1,
    evaluation_sites: list[str] | None = None,
    outside_paths: bool = False,
    share_operating_points: bool = False,
    share_site_figures: bool = False,
) -> dict[str, Any]:
    """Partition, run every round in Flower's simulation runtime, and return ``metrics.json``.

    The output folder is written aside and renamed into place when the federation has completed
    (``outputs.py``): an existing non-empty one needs ``force`` (replace) or ``resume`` (continue the
    stopped run, or the finished one). ``share_operating_points``: every simulated site sends the
    operating point it fits at the final evaluation, so the model folder holds them (each site keeps
    its own in ``sites/site-N/state`` anyway). ``share_site_figures``: every simulated site sends its own
    exact validation figures every round."""
    config_path = resolve_config_path(config)
    cfg = load_fed_config(config_path, {"federation.out-dir": str(Path(out).resolve())})
    require_trackers(cfg.federation.tracking)  # here, not after the SuperLink has started and the sites are written
    data_path = Path(data) if data is not None else kermany_mini("train")
    evaluation = parse_evaluation_sites(evaluation_sites, cfg.federation.evaluation_sites)
    inputs = {"--data": data_path, **{f"--evaluation-site {name}": path for name, path in evaluation.items()}}
    with output_folder(out, force=force, resume=resume, resumable=True, inputs=inputs) as output:
        return _simulate(
            cfg,
            config_path,
            output,
            data_path=data_path,
            sites=sites,
            alpha=alpha,
            resume=resume,
            cpus_per_site=cpus_per_site,
            evaluation=evaluation,
            outside_paths=outside_paths,
            share_operating_points=share_operating_points,
            share_site_figures=share_site_figures,
        )


HELD_OUT_FILE = "held-out-check.json"


def _simulate(
    cfg: FedConfig,
    config_path: Path | None,
    output: Output,
    *,
    data_path: Path,
    sites: int | None,
    alpha: float | None,
    resume: bool,
    cpus_per_site: int,
    evaluation: dict[str, Path],
    outside_paths: bool,
    share_operating_points: bool = False,
    share_site_figures: bool = False,
) -> dict[str, Any]:
    """``simulate``'s work in ``output.work``; every record names ``output.final``."""
    out = output.work
    if resume and (out / "sites" / SITES_FILE).is_file():
        summary = json.loads((out / "sites" / SITES_FILE).read_text())
        checked = out / "sites" / HELD_OUT_FILE
        check = json.loads(checked.read_text()) if checked.is_file() else None
    else:
        summary, check = prepare_sites(
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
            outside_paths=outside_paths,
        )
        (out / "sites" / HELD_OUT_FILE).write_text(json.dumps(check, indent=1) + "\n", encoding="utf-8")
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
        "out-dir": str(output.final),
        "work-dir": str(out),
        "resume": resume,
        "share-operating-points": share_operating_points,
        "share-site-figures": share_site_figures,
    }
    if evaluation and check is not None:  # a file: Flower's run config cannot carry a JSON string
        run_config["held-out-check"] = str(out / "sites" / HELD_OUT_FILE)
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
    return dict(metrics)
