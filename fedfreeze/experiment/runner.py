"""``fedfreeze experiment``: named arms trained and tested on the same folds, then the report.

For every fold (repeat x fold, each site keeping its own test fold; see ``folds.py``) and every arm:

* ``site``: each site trains its own model on its training fold (the ``site-train`` schedule);
* ``pooled``: one model trains on all sites' training folds put together (centralised);
* ``federated``: the sites train one model together through the real ServerApp loop and ClientApp,
  in process, each holding only its training fold: the federation runs through the runner the
  caller passes (``FederationRunner``; the CLI passes ``fedfreeze.flower.inprocess.run_in_process``),
  so this harness imports no Flower adapter;

then the model(s) score each site's test fold. Each (fold, arm) result, with every test
prediction, is written atomically to ``OUT/folds/<fold>/<arm>.json`` as soon as it is done, so a
stopped experiment continues where it stopped (a federation stopped mid-way resumes from its last
round checkpoint). Results made with other settings for an arm, or with another fold plan, are
refused rather than mixed in.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from fedfreeze.config import SiteConfig
from fedfreeze.data.dataset import ImageSet, load_image_set
from fedfreeze.data.overlap import check_distinct_patients_images
from fedfreeze.errors import ConfigError, DataError, FedfreezeError
from fedfreeze.evaluation.folds import ExperimentFold, experiment_folds
from fedfreeze.experiment.config import Arm, Experiment
from fedfreeze.outputs import output_folder

if TYPE_CHECKING:
    from collections.abc import Mapping

    from fedfreeze.federation.config import FedConfig


class FederationRunner(Protocol):
    """Runs the federation of ``cfg`` over ``sites`` (name -> data folder) and returns its ``metrics.json``
    (``fedfreeze.flower.inprocess.run_in_process`` is one)."""

    def __call__(
        self,
        cfg: FedConfig,
        out_dir: str | Path,
        sites: Mapping[str, str | Path],
        state_dir: str | Path,
        *,
        resume: bool = True,
        device: str = "auto",
    ) -> dict[str, Any]: ...


RESULTS_DIR = "folds"
WORK_DIR = "work"
STATE_FILE = "experiment.json"
FOLDS_FILE = "folds.csv"
PREDICTIONS_FILE = "predictions.csv"
SUMMARY_FILE = "summary.json"


class ExperimentInterrupted(FedfreezeError):
    """Raised by tests (through ``stop_after``) to simulate a stop between two finished results."""


def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` so that ``path`` holds either the old content or all of the new (never a part)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with tmp.open("w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    tmp.replace(path)


class ExperimentData:
    """The data set decoded once per input size, with each image's site."""

    def __init__(self, exp: Experiment, progress: bool, *, outside_paths: bool = False) -> None:
        self.exp = exp
        self.progress = progress
        self.outside_paths = outside_paths
        self._sets: dict[tuple[Any, ...], ImageSet] = {}
        first = next(iter(exp.arms.values())).cfg.model
        base = self.images(first)
        self.labels = base.labels.numpy()
        self.patient_ids = list(base.patient_ids)
        self.sources = list(base.sources)
        self.names = base.source_names()  # as the outputs record them: relative to the manifest's folder
        self.class_names = list(base.class_names)
        self.sites = self._sites(base)
        self.held_out_check = check_distinct_patients_images(base, str(exp.data_path))

    def images(self, model_cfg: Any) -> ImageSet:
        key = (model_cfg.input_size, model_cfg.in_channels, tuple(model_cfg.class_names or ()), model_cfg.num_classes)
        if key not in self._sets:
            data = load_image_set(
                self.exp.data_path,
                image_size=model_cfg.input_size,
                channels=model_cfg.in_channels,
                class_names=model_cfg.class_names,
                num_classes=model_cfg.num_classes,
                progress=self.progress,
                outside_paths=self.outside_paths,
            )
            data.require_classes(2, why="the experiment's AUROC needs both classes")
            if self._sets:
                ref = next(iter(self._sets.values()))
                if ref.sources != data.sources or not np.array_equal(ref.labels.numpy(), data.labels.numpy()):
                    raise DataError(f"{self.exp.data_path}: the data changed while the experiment loaded it")
            self._sets[key] = data
        return self._sets[key]

    def _sites(self, base: ImageSet) -> list[str]:
        n = self.exp.settings.sites
        if n > 0:
            from fedfreeze.data.partition import assign_sites  # plain NumPy: no Flower import

            index = assign_sites(
                self.labels,
                self.patient_ids,
                n,
                alpha=None,
                seed=self.exp.settings.seed,
                min_per_class=self.exp.settings.folds,
            )
            return [f"site-{i + 1}" for i in index.tolist()]
        if base.sites is not None:
            return list(base.sites)
        return ["all"] * len(base)

    def describe(self) -> dict[str, Any]:
        sites = {}
        for site in sorted(set(self.sites)):
            rows = [i for i, s in enumerate(self.sites) if s == site]
            sites[site] = {
                "images": len(rows),
                "patients": len({self.patient_ids[i] for i in rows}),
                "class_counts": [int(np.sum(self.labels[rows] == c)) for c in range(len(self.class_names))],
            }
        return {
            "path": str(self.exp.data_path),
            "held_out_check": self.held_out_check,
            "images": len(self.labels),
            "patients": len(set(self.patient_ids)),
            "class_names": self.class_names,
            "sites": sites,
        }


def _check_arms(exp: Experiment, n_sites: int, sources_are_files: bool) -> None:
    for arm in exp.arms.values():
        if arm.mode == "federated" and not sources_are_files:
            raise ConfigError(
                f"{exp.source}: arms.{arm.name}: federated arms give each site a manifest of its "
                f"training images, so experiment.data should be a manifest CSV, got {exp.data_path}"
            )
        if arm.cfg.model.num_classes != 2:
            raise ConfigError(
                f"{exp.source}: arms.{arm.name}.model.num-classes: the experiment compares binary "
                f"classifiers (AUROC, DeLong), got {arm.cfg.model.num_classes}"
            )
        if arm.mode == "federated" and n_sites < arm.cfg.federation.min_sites:
            raise ConfigError(
                f"{exp.source}: arms.{arm.name}: a federation of {n_sites} site(s) cannot reach "
                f"federation.min-sites = {arm.cfg.federation.min_sites}"
            )


def _check_state(exp: Experiment, out: Path, data_info: dict[str, Any]) -> None:
    """A folder holds one fold plan: refuse to mix in results of another."""
    path = out / STATE_FILE
    state = {
        "protocol": exp.protocol(),
        "data": {k: v for k, v in data_info.items() if k not in ("path", "held_out_check")},
    }
    if path.is_file():
        saved = json.loads(path.read_text(encoding="utf-8"))
        if saved.get("protocol") != json.loads(json.dumps(state["protocol"])) or saved.get("data") != json.loads(
            json.dumps(state["data"])
        ):
            raise ConfigError(
                f"{out} holds an experiment with another protocol or data (see {path}); "
                "use a new --out, or the same [experiment] data, sites, folds, repeats, seed, "
                "balance-test and test-images"
            )
    write_atomic(
        path, json.dumps({**state, "arms": {a.name: a.fingerprint() for a in exp.arms.values()}}, indent=1) + "\n"
    )


def _write_folds(out: Path, folds: list[ExperimentFold], data: ExperimentData) -> None:
    rows = ["repeat,fold,site,role,patient_id,label,source"]
    for fold in folds:
        for site, split in fold.sites.items():
            for role, index in (("train", split.train), ("test", split.test)):
                for i in index.tolist():
                    rows.append(
                        ",".join(
                            [
                                str(fold.repeat + 1),
                                str(fold.fold + 1),
                                site,
                                role,
                                _csv_field(data.patient_ids[i]),
                                str(int(data.labels[i])),
                                _csv_field(data.names[i]),
                            ]
                        )
                    )
    write_atomic(out / FOLDS_FILE, "\n".join(rows) + "\n")


def _csv_field(value: str) -> str:
    return f'"{value.replace(chr(34), chr(34) * 2)}"' if any(c in value for c in ',"\n') else value


def result_path(out: Path, fold: ExperimentFold, arm: str) -> Path:
    return out / RESULTS_DIR / fold.name / f"{arm}.json"


def load_result(path: Path, arm: Arm, *, check: bool = True) -> dict[str, Any] | None:
    """A finished result of this arm, or None; with ``check``, one made with other settings is an error."""
    if not path.is_file():
        return None
    result = json.loads(path.read_text(encoding="utf-8"))
    if check and result.get("fingerprint") != arm.fingerprint():
        raise ConfigError(
            f"{path} was made with other settings for arm {arm.name!r}; use a new --out, or delete "
            f"{path.parent.parent}/*/{arm.name}.json to run that arm again"
        )
    return result


# ---------------------------------------------------------------------- training one (fold, arm)
POOLED_KEY = "all sites"


def _site_cfg(arm: Arm, seed: int) -> SiteConfig:
    return SiteConfig(model=arm.cfg.model, train=arm.cfg.train.model_copy(update={"seed": arm.cfg.train.seed + seed}))


def _train_local(
    arm: Arm, fold: ExperimentFold, data: ExperimentData, seed: int, device: Any, cache: Any, progress: bool
) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Site-alone or pooled training; returns each site's test scores and what training did."""
    from fedfreeze.site import train_on
    from fedfreeze.training.engine import predict_scores

    cfg = _site_cfg(arm, seed)
    images = data.images(cfg.model)
    scores: dict[str, np.ndarray] = {}
    logs: dict[str, Any] = {}
    if arm.mode == "site":
        groups = {site: split.train for site, split in fold.sites.items()}
    else:
        groups = {POOLED_KEY: fold.train}
    for name, train_index in groups.items():
        model, epoch_logs = train_on(
            cfg,
            images,
            train_index,
            seed=cfg.train.seed,
            device=device,
            cache=cache,
            bar_label=f"{fold.name} {arm.name} {name}",
            progress=progress,
        )
        logs[name] = [{"epoch": e.epoch, "parts": e.parts, "loss": e.loss, "seconds": e.seconds} for e in epoch_logs]
        tested = fold.sites.items() if arm.mode == "pooled" else [(name, fold.sites[name])]
        for site, split in tested:
            scores[site] = predict_scores(model, images.images[split.test], device)
    return scores, {"epochs": logs}


def _train_federated(
    arm: Arm,
    fold: ExperimentFold,
    data: ExperimentData,
    seed: int,
    device: Any,
    device_name: str,
    work: Path,
    run_federation: FederationRunner,
) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """One federation over the sites' training folds, then the global model scores each test fold."""
    from fedfreeze.model_io import load_model
    from fedfreeze.training.engine import predict_scores

    cfg = arm.cfg.model_copy(
        update={
            "federation": arm.cfg.federation.model_copy(update={"seed": arm.cfg.federation.seed + seed}),
            "train": arm.cfg.train.model_copy(update={"seed": arm.cfg.train.seed + seed}),
        }
    )
    sites = {}
    for site, split in fold.sites.items():
        folder = work / "sites" / site
        lines = ["path,label,patient_id"]
        for i in split.train.tolist():
            lines.append(
                ",".join(
                    [
                        _csv_field(str(Path(data.sources[i]).resolve())),
                        str(int(data.labels[i])),
                        _csv_field(data.patient_ids[i]),
                    ]
                )
            )
        write_atomic(folder / "manifest.csv", "\n".join(lines) + "\n")
        sites[site] = folder
    metrics = run_federation(cfg, work / "federation", sites, work / "state", resume=True, device=device_name)
    if metrics.get("status") != "completed":
        raise FedfreezeError(
            f"{fold.name} arm {arm.name}: the federation {metrics.get('status')}: {metrics.get('reason')}"
        )
    model, card = load_model(metrics["model"])
    images = data.images(cfg.model)
    scores = {site: predict_scores(model, images.images[split.test], device) for site, split in fold.sites.items()}
    rounds = []
    for record in [*metrics["rounds"], metrics["final"]]:
        pooled = (record.get("pooled") or {}).get("at_threshold_used") or {}
        rounds.append(
            {
                "round": record["round"],
                "parts": record["parts"],
                "evaluated_model": record.get("evaluated_model", ""),
                "val_auroc": pooled.get("auroc"),
                "val_balanced_accuracy": pooled.get("balanced_accuracy"),
                "val_f1": pooled.get("f1"),
                "val_n": pooled.get("n"),
                "bytes_up": record.get("bytes_up", 0),
                "round_seconds": record.get("round_seconds", 0.0),
            }
        )
    return scores, {
        "rounds": rounds,
        "model_threshold": card.threshold,
        "bytes_up": metrics["totals"]["bytes_up"],
        "bytes_down": metrics["totals"]["bytes_down"],
    }


def run_fold_arm(
    arm: Arm,
    fold: ExperimentFold,
    data: ExperimentData,
    *,
    seed: int,
    device_name: str,
    cache: Any,
    work: Path,
    progress: bool,
    run_federation: FederationRunner | None = None,
) -> dict[str, Any]:
    """Train ``arm`` on ``fold`` and return its result record (every test prediction included);
    a federated arm runs through ``run_federation``."""
    from fedfreeze.training.engine import resolve_device

    device = resolve_device(device_name)
    started = time.perf_counter()
    if arm.mode == "federated":
        if run_federation is None:
            raise ConfigError(
                f"arm {arm.name} is federated: pass run_federation (e.g. flower.inprocess.run_in_process)"
            )
        scores, training = _train_federated(arm, fold, data, seed, device, device_name, work, run_federation)
    else:
        scores, training = _train_local(arm, fold, data, seed, device, cache, progress)
    predictions: dict[str, list[Any]] = {"site": [], "patient_id": [], "source": [], "label": [], "score": []}
    for site, split in fold.sites.items():
        for i, score in zip(split.test.tolist(), scores[site].tolist(), strict=True):
            predictions["site"].append(site)
            predictions["patient_id"].append(data.patient_ids[i])
            predictions["source"].append(data.names[i])
            predictions["label"].append(int(data.labels[i]))
            predictions["score"].append(float(score))
    return {
        "arm": arm.name,
        "mode": arm.mode,
        "fingerprint": arm.fingerprint(),
        "repeat": fold.repeat,
        "fold": fold.fold,
        "seed": seed,
        "n_train": {site: len(split.train) for site, split in fold.sites.items()},
        "n_test": {site: len(split.test) for site, split in fold.sites.items()},
        "seconds": time.perf_counter() - started,
        "training": training,
        "predictions": predictions,
    }


# ---------------------------------------------------------------------- the whole experiment
def run_experiment(
    exp: Experiment,
    out_dir: str | Path,
    *,
    device: str = "auto",
    progress: bool = True,
    train: bool = True,
    stop_after: int | None = None,
    command: str | None = None,
    force: bool = False,
    resume: bool = False,
    outside_paths: bool = False,
    run_federation: FederationRunner | None = None,
) -> dict[str, Any]:
    """Run every (fold, arm) not finished yet, then write the analysis and the report.

    Federated arms run through ``run_federation`` (the CLI passes
    ``fedfreeze.flower.inprocess.run_in_process``); an experiment with a federated arm and no runner
    is refused before any training.

    ``train=False`` only (re)writes the report from the finished results. ``stop_after`` stops
    (raising ``ExperimentInterrupted``) after that many newly finished results: for tests. The folder
    is written aside and published when the report is written (``outputs.py``); a stopped
    experiment is continued with ``resume``, an existing one replaced with ``force``.
    """
    from fedfreeze.training.engine import resolve_device

    resolve_device(device)  # a device this machine lacks stops here, before any training
    federated = [arm.name for arm in exp.arms.values() if arm.mode == "federated"]
    if federated and run_federation is None and train:
        raise ConfigError(
            f"arm(s) {', '.join(federated)} are federated: pass run_federation "
            "(e.g. fedfreeze.flower.inprocess.run_in_process)"
        )
    with output_folder(
        out_dir, force=force, resume=resume or not train, resumable=True, inputs={"--data": exp.data_path}
    ) as output:
        return _run_experiment(
            exp,
            output.work,
            device=device,
            progress=progress,
            train=train,
            stop_after=stop_after,
            command=command,
            outside_paths=outside_paths,
            run_federation=run_federation,
        )


def _run_experiment(
    exp: Experiment,
    out: Path,
    *,
    device: str,
    progress: bool,
    train: bool,
    stop_after: int | None,
    command: str | None,
    outside_paths: bool,
    run_federation: FederationRunner | None,
) -> dict[str, Any]:
    """``run_experiment``'s work, in the partial folder ``out``."""
    from tqdm.auto import tqdm

    from fedfreeze.training.features import FeatureCache

    started = time.perf_counter()
    data = ExperimentData(exp, progress, outside_paths=outside_paths)
    data_info = data.describe()
    _check_arms(exp, len(data_info["sites"]), all(Path(s).is_file() for s in data.sources))
    _check_state(exp, out, data_info)
    s = exp.settings
    folds = experiment_folds(
        data.labels,
        data.patient_ids,
        data.sites,
        folds=s.folds,
        repeats=s.repeats,
        seed=s.seed,
        balance_test=s.balance_test,
        test_images=s.test_images,
    )
    _write_folds(out, folds, data)

    results: dict[str, list[dict[str, Any]]] = {name: [] for name in exp.arms}
    cache = FeatureCache()  # backbone features, keyed by the backbone's weights: shared by every fold and arm
    done_now = 0
    tasks = [(fold, arm) for fold in folds for arm in exp.arms.values()]
    with tqdm(total=len(tasks), desc="experiment", unit="fold-arm", disable=not progress) as bar:
        for number, (fold, arm) in enumerate(tasks):
            path = result_path(out, fold, arm.name)
            result = load_result(path, arm, check=train)
            if result is None and train:
                seed = fold.repeat * s.folds + fold.fold
                work = out / WORK_DIR / fold.name / arm.name
                result = run_fold_arm(
                    arm,
                    fold,
                    data,
                    seed=seed,
                    device_name=device,
                    cache=cache,
                    work=work,
                    progress=progress,
                    run_federation=run_federation,
                )
                write_atomic(path, json.dumps(result) + "\n")
                shutil.rmtree(work, ignore_errors=True)  # the federation's model, checkpoint and caches
                done_now += 1
                if progress:
                    tqdm.write(f"{fold.name} {arm.name}: {_headline(result, s.threshold)} ({result['seconds']:.0f} s)")
            if result is not None:
                results[arm.name].append(result)
            bar.update(1)
            if stop_after is not None and done_now >= stop_after and number + 1 < len(tasks):
                raise ExperimentInterrupted(f"stopped after {done_now} new result(s), as asked")
    shutil.rmtree(out / WORK_DIR, ignore_errors=True)
    summary = write_outputs(
        exp, out, results, data_info, folds_planned=len(folds), seconds=time.perf_counter() - started, command=command
    )
    summary["trained_now"] = done_now
    return summary


def _headline(result: dict[str, Any], threshold: float) -> str:
    from fedfreeze.metrics import binary_metrics

    p = result["predictions"]
    m = binary_metrics(np.array(p["label"]), np.array(p["score"]), threshold)
    return f"pooled AUROC {m['auroc']:.3f}, balanced accuracy {m['balanced_accuracy']:.3f} (n={m['n']})"


def write_outputs(
    exp: Experiment,
    out: Path,
    results: dict[str, list[dict[str, Any]]],
    data_info: dict[str, Any],
    *,
    folds_planned: int,
    seconds: float,
    command: str | None,
) -> dict[str, Any]:
    """``summary.json``, ``predictions.csv``, ``report.md`` and the figures, from the finished results."""
    from fedfreeze.evaluation.analysis import analyze
    from fedfreeze.experiment.report import write_report

    s = exp.settings
    summary = analyze(
        results, exp.comparisons(), threshold=s.threshold, replicates=s.bootstrap, confidence=s.confidence, seed=s.seed
    )
    summary.update(
        {
            "data": data_info,
            "protocol": exp.protocol(),
            "arms_config": {
                a.name: {
                    "mode": a.mode,
                    "description": a.description,
                    "config": a.cfg.model_dump(mode="json", by_alias=True),
                }
                for a in exp.arms.values()
            },
            "cost": {name: _cost(rs) for name, rs in results.items()},
            "folds_planned": folds_planned,
            "folds_finished": {name: len(rs) for name, rs in results.items()},
            "seconds": {
                "this_run": seconds,
                "training_total": sum(r["seconds"] for rs in results.values() for r in rs),
            },
            "command": command,
        }
    )
    write_atomic(out / SUMMARY_FILE, json.dumps(summary, indent=1) + "\n")
    _write_predictions(out / PREDICTIONS_FILE, results)
    write_report(out, exp, summary, results)
    return summary


def _cost(results: list[dict[str, Any]]) -> dict[str, float]:
    """Mean training seconds per fold and, for federated arms, megabytes sent by the sites per fold."""
    if not results:
        return {}
    cost = {"seconds_per_fold": float(np.mean([r["seconds"] for r in results]))}
    uplink = [r["training"]["bytes_up"] for r in results if "bytes_up" in r["training"]]
    if uplink:
        cost["uplink_mb_per_fold"] = float(np.mean(uplink)) / 1e6
    return cost


def _write_predictions(path: Path, results: dict[str, list[dict[str, Any]]]) -> None:
    """Every test prediction of every arm, one row each (for re-analysis, e.g. with R's pROC)."""
    import io

    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["arm", "repeat", "fold", "site", "patient_id", "source", "label", "score"])
    for arm, rs in results.items():
        for r in rs:
            p = r["predictions"]
            for site, pid, source, label, score in zip(
                p["site"], p["patient_id"], p["source"], p["label"], p["score"], strict=True
            ):
                writer.writerow([arm, r["repeat"] + 1, r["fold"] + 1, site, pid, source, label, f"{score:.6f}"])
    write_atomic(path, buffer.getvalue())
