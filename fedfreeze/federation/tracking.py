"""A run's round figures as scalar series for TensorBoard and MLflow (``federation.tracking``).

``metrics.json`` stays the record of a run; tracking is a copy of its figures in the tools a team
already uses to compare runs, written under the run's output folder (so it is published, and resumed,
with it). The writers' packages are an extra (``pip install 'fedfreeze[tracking]'``), imported only
when a run asks for them, and checked when the coordinator starts, before any round.
"""

from __future__ import annotations

import importlib
import json
import logging
import math
import numbers
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from fedfreeze.errors import MissingExtraError
from fedfreeze.federation.config import FedConfig
from fedfreeze.federation.records import RoundRecord
from fedfreeze.federation.trackers import Writer, open_writer

log = logging.getLogger(__name__)

EXTRA = "pip install 'fedfreeze[tracking]'"
# tracker -> (the module its writer imports, the package that provides it)
MODULES: dict[str, tuple[str, str]] = {
    "tensorboard": ("torch.utils.tensorboard", "tensorboard"),
    "mlflow": ("mlflow", "mlflow-skinny"),
}
STATE_FILE = "exported.json"  # in the tracking folder: what each tracker already holds (a resumed run adds the rest)
RUNNING = "running"
# the figures of a pooled release (fedfreeze.evaluation.pooled) that become series, where present
FIGURES = ("auroc", "balanced_accuracy", "f1", "sensitivity", "specificity", "accuracy", "n")


def require(trackers: Iterable[str]) -> None:
    """Import each tracker's package; one line naming the extra when any is missing (before any round)."""
    names = list(trackers)
    missing = []
    for name in names:
        module, package = MODULES[name]
        try:
            importlib.import_module(module)
        except ImportError:
            missing.append(package)
    if missing:
        raise MissingExtraError(
            f"federation.tracking = {names} needs {' and '.join(missing)}, which is not installed here: {EXTRA}"
        )


def round_scalars(record: RoundRecord) -> dict[str, float]:
    """One round's record (as ``metrics.json`` holds it) as named scalars; an undefined figure is left out.

    Pooled figures are the training sites' validation at the threshold the round used, each with the
    range its cells allow (``_low``, ``_high``); evaluation-only sites appear pooled and one by one."""
    scalars = _figures("pooled", (record.pooled or {}).get("at_threshold_used") or {})
    evaluation = record.evaluation_sites or {}
    scalars |= _figures("evaluation_sites", evaluation.get("at_threshold_used") or {})
    for row in record.sites:
        if row.get("site") in evaluation.get("sites", []):
            own = {key.removeprefix("val_"): value for key, value in row.items() if key.startswith("val_")}
            scalars |= _figures(f"evaluation_site/{tag_part(str(row['site']))}", own)
    for key, value in (record.weighted_mean or {}).items():
        _put(scalars, f"weighted_mean/{key.replace('-', '_')}", value)
    _put(scalars, "threshold/used", record.threshold_used)
    _put(scalars, "threshold/next", record.threshold_next)
    if record.threshold_interval:
        _put(scalars, "threshold/interval_low", record.threshold_interval[0])
        _put(scalars, "threshold/interval_high", record.threshold_interval[-1])
    _put(scalars, "bytes/up", record.bytes_up)
    _put(scalars, "bytes/down", record.bytes_down)
    _put(scalars, "seconds/round", record.round_seconds)
    _put(scalars, "seconds/max_site_train", max((row.get("train_seconds", 0.0) for row in record.sites), default=0.0))
    _put(scalars, "sites/replied", len(record.sites))
    _put(scalars, "sites/rejected", len(record.rejected))
    _put(scalars, "sites/failed", len(record.failures))
    _put(scalars, "privacy/epsilon", (record.privacy or {}).get("epsilon"))
    return scalars


def tag_part(name: str) -> str:
    """A site name as one part of a series name (MLflow allows letters, digits, ``_ - . /`` and spaces)."""
    return "".join(c if c.isalnum() or c in "_-." else "_" for c in name) or "_"


def config_params(cfg: FedConfig) -> dict[str, str]:
    """The run's configuration as flat ``table.key`` strings (MLflow's parameters, to compare runs by)."""
    params: dict[str, str] = {}
    for table, values in cfg.model_dump(mode="json", by_alias=True).items():
        for key, value in values.items():
            text = value if isinstance(value, str) else json.dumps(value)
            params[f"{table}.{key}"] = text[:500]  # MLflow's limit on a parameter's value is wider
    return params


class Tracking:
    """Writes each round's scalars to every configured tracker once, across a resumed run too.

    A tracker that fails (a full disk, a locked database) is reported in one warning and dropped for the
    rest of the run: ``metrics.json`` keeps every figure, and the federation goes on."""

    def __init__(self, cfg: FedConfig, out: Path) -> None:
        self.trackers: list[str] = list(cfg.federation.tracking)
        require(self.trackers)
        self.cfg = cfg
        self.folder = out / cfg.federation.tracking_dir
        self.final_folder = Path(cfg.federation.out_dir).resolve() / cfg.federation.tracking_dir
        self.writers: dict[str, Writer] | None = None  # opened at the first export

    def export(
        self, rounds: Sequence[RoundRecord], final: RoundRecord | None, *, status: str, reason: str | None = None
    ) -> None:
        """Write the records no tracker holds yet; a status other than running ends the trackers' runs."""
        state = self._read_state()
        if self.writers is None:
            self.writers = {}
            for name in self.trackers:
                mine = state.setdefault(name, {"rounds": [], "final": False})
                try:
                    self.writers[name] = open_writer(
                        name,
                        self.folder,
                        run_name=Path(self.cfg.federation.out_dir).name,
                        resume_id=mine.get("run_id"),
                        params=config_params(self.cfg),
                        final_folder=self.final_folder,
                    )
                except Exception as err:  # the tracker's own errors (MlflowException, OSError, ...), whatever they are
                    self._drop(name, err, status)
                    continue
                mine["run_id"] = self.writers[name].run_id
        for name, writer in list(self.writers.items()):
            mine = state[name]
            try:
                for record in rounds:
                    if record.round not in mine["rounds"]:
                        writer.log(record.round, round_scalars(record))
                        mine["rounds"].append(record.round)
                if final is not None and not mine["final"]:
                    writer.log(final.round, round_scalars(final))
                    mine["final"] = True
                writer.note_status(status, reason)
                if status != RUNNING:
                    writer.close(status)
            except Exception as err:  # as above: tracking never stops a federation
                self._drop(name, err, status)
        if status != RUNNING:
            self.writers = None
        self._write_state(state)

    def _drop(self, name: str, err: Exception, status: str) -> None:
        log.warning(
            "tracking: %s stopped (%s: %s) while the run was %s; the run goes on, metrics.json holds every figure",
            name,
            type(err).__name__,
            err,
            status,
        )
        if self.writers is not None:
            self.writers.pop(name, None)

    def _read_state(self) -> dict[str, Any]:
        path = self.folder / STATE_FILE
        return dict(json.loads(path.read_text(encoding="utf-8"))) if path.is_file() else {}

    def _write_state(self, state: Mapping[str, Any]) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        tmp = self.folder / (STATE_FILE + ".tmp")
        tmp.write_text(json.dumps(state, indent=1) + "\n", encoding="utf-8")
        tmp.replace(self.folder / STATE_FILE)


def _figures(prefix: str, figures: Mapping[str, Any]) -> dict[str, float]:
    out: dict[str, float] = {}
    for key in FIGURES:
        _put(out, f"{prefix}/{key}", figures.get(key))
    for key, bounds in (figures.get("ranges") or {}).items():
        if isinstance(bounds, (list, tuple)) and len(bounds) == 2:
            _put(out, f"{prefix}/{key}_low", bounds[0])
            _put(out, f"{prefix}/{key}_high", bounds[1])
    return out


def _put(scalars: dict[str, float], name: str, value: Any) -> None:
    if isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value):
        scalars[name] = float(value)
