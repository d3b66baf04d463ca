"""The writers behind ``federation.tracking``: TensorBoard event files and an MLflow run, in a local folder.

Each imports its package when it is opened, never at module level: the default installation has
neither (``pip install 'fedfreeze[tracking]'``). ``tracking.py`` decides what is written and when.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Protocol

TENSORBOARD_DIR = "tensorboard"  # tensorboard --logdir OUT/tracking/tensorboard
MLFLOW_DB = "mlflow.db"  # mlflow ui --backend-store-uri sqlite:///OUT/tracking/mlflow.db
MLFLOW_EXPERIMENT = "fedfreeze"
# a run's status in metrics.json -> the MLflow run's status when it ends
MLFLOW_STATUS = {"completed": "FINISHED", "failed": "FAILED", "interrupted": "KILLED"}


class Writer(Protocol):
    """One tracker's view of one federation run."""

    run_id: str | None  # what a resumed run continues (MLflow's run id), None where nothing is needed

    def log(self, step: int, scalars: dict[str, float]) -> None: ...

    def note_status(self, status: str, reason: str | None) -> None: ...

    def close(self, status: str) -> None: ...


def open_writer(
    name: str, folder: Path, *, run_name: str, resume_id: str | None, params: dict[str, str], final_folder: Path
) -> Writer:
    """The writer of tracker ``name`` under ``folder`` (``final_folder``: where ``folder`` is published)."""
    if name == "tensorboard":
        return TensorBoardWriter(folder / TENSORBOARD_DIR)
    if name == "mlflow":
        return MlflowWriter(
            folder / MLFLOW_DB, run_name=run_name, resume_id=resume_id, params=params, final_folder=final_folder
        )
    raise ValueError(f"no tracker named {name!r}")  # the config's Literal allows only the two above


class TensorBoardWriter:
    """Scalars in float64 (TensorBoard's tensor-based scalars), so they equal ``metrics.json``'s figures;
    a resumed run adds an event file beside the earlier ones."""

    run_id: str | None = None

    def __init__(self, folder: Path) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self._writer = SummaryWriter(log_dir=str(folder))

    def log(self, step: int, scalars: dict[str, float]) -> None:
        for tag, value in scalars.items():
            self._writer.add_scalar(tag, value, global_step=step, new_style=True, double_precision=True)
        self._writer.flush()

    def note_status(self, status: str, reason: str | None) -> None:
        """TensorBoard has no run status: ``metrics.json`` says how the run ended."""

    def close(self, status: str) -> None:
        self._writer.close()


class MlflowWriter:
    """One MLflow run in an SQLite store in the tracking folder (MLflow 3 refuses its plain-folder store
    unless told to; SQLite needs nothing beyond what Flower installs). Parameters: the run's configuration."""

    def __init__(
        self, database: Path, *, run_name: str, resume_id: str | None, params: dict[str, str], final_folder: Path
    ) -> None:
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        database.parent.mkdir(parents=True, exist_ok=True)
        self._client = MlflowClient(tracking_uri=f"sqlite:///{database.resolve().as_posix()}")
        if resume_id is not None:
            self.run_id: str | None = resume_id
            self._client.update_run(resume_id, status="RUNNING")
            return
        experiment = self._client.get_experiment_by_name(MLFLOW_EXPERIMENT)
        experiment_id = (
            experiment.experiment_id
            if experiment is not None
            # nothing is logged as an artifact; named so that MLflow never picks a folder of its own (./mlruns)
            else self._client.create_experiment(
                MLFLOW_EXPERIMENT, artifact_location=(final_folder / "mlflow-artifacts").as_uri()
            )
        )
        run = self._client.create_run(
            experiment_id, run_name=run_name, tags={"fedfreeze.out": str(final_folder.parent)}
        )
        self.run_id = run.info.run_id
        items = [Param(key, value) for key, value in params.items()]
        for start in range(0, len(items), 100):  # MLflow takes at most 100 parameters per batch
            self._client.log_batch(self.run_id, params=items[start : start + 100])

    def log(self, step: int, scalars: dict[str, float]) -> None:
        from mlflow.entities import Metric

        stamp = int(time.time() * 1000)
        metrics = [Metric(key, value, stamp, step) for key, value in scalars.items()]
        self._client.log_batch(str(self.run_id), metrics=metrics)

    def note_status(self, status: str, reason: str | None) -> None:
        self._client.set_tag(str(self.run_id), "fedfreeze.status", status)
        self._client.set_tag(str(self.run_id), "fedfreeze.reason", (reason or "")[:5000])  # a resumed run clears it

    def close(self, status: str) -> None:
        self._client.set_terminated(str(self.run_id), MLFLOW_STATUS.get(status, "FINISHED"))
