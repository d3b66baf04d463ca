"""The ServerApp's main: every round, then the final evaluation and the exported model.

The loop is ours (Flower's ``Strategy.start`` runs one fixed configuration for every round, cannot
resume, and reports success when every site failed); sampling and aggregation are Flower's own
strategies (``strategies.py``), called through their ``configure_train`` / ``aggregate_train`` on the
round's arrays only (``grid_round.py``), so Flower's DP wrappers compose with them.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from flwr.app import Context
from flwr.serverapp import Grid

from fedfreeze.data.overlap import NOT_CHECKED
from fedfreeze.errors import FedfreezeError
from fedfreeze.federation.config import FedConfig, from_run_config
from fedfreeze.federation.coordinator import Coordinator, FederationFailed
from fedfreeze.federation.estimates import round_line
from fedfreeze.federation.export import export_model
from fedfreeze.federation.records import RoundRecord
from fedfreeze.federation.report import write_report
from fedfreeze.federation.round_rules import sampled_sites
from fedfreeze.flower.grid_round import final_evaluation, train_round
from fedfreeze.flower.server import wait_for_sites
from fedfreeze.flower.strategies import make_strategy
from fedfreeze.outputs import output_folder
from fedfreeze.state import runstate, sitebook

log = logging.getLogger("fedfreeze.server")


LOCK_WAIT_S = 180.0


def run_federation(grid: Grid, context: Context) -> None:
    """The ServerApp's main: every round, then the final evaluation and the exported model.

    The output folder is written aside and published when the run completes (``outputs.py``),
    unless the run config names a ``work-dir``: then the caller (``simulate``, an in-process run)
    holds the folder and publishes it, and the run writes there. The run's status is written to
    ``metrics.json`` (and noted in the coordinator's state folder, ``state/runstate.py``) at every
    turn: running, completed, failed with its reason, or interrupted when the coordinator stops it (a
    signal ends the ServerApp with ``SystemExit``).
    """
    show_logs_with_flower()
    cfg = from_run_config(context.run_config)
    final = Path(cfg.federation.out_dir)
    work = context.run_config.get("work-dir")
    if work:
        federate(grid, context, cfg, Path(str(work)), final)
        return
    force, resume = bool(context.run_config.get("force", False)), bool(context.run_config.get("resume", False))
    # a coordinator restarted mid-run: the stopped run's ServerApp may still be ending (Flower starts it in
    # a session of its own) and hold the folder; it lets go once the new SuperLink tells it its run is over
    with output_folder(final, force=force, resume=resume, resumable=True, wait=LOCK_WAIT_S) as output:
        federate(grid, context, cfg, output.work, output.final)


def federate(grid: Grid, context: Context, cfg: FedConfig, work: Path, final: Path) -> None:
    """The rounds, written into ``work``; records name ``final``, the folder ``work`` becomes."""
    coord = Coordinator(cfg, work, app_hash=run_fab_hash(grid))
    if bool(context.run_config.get("resume", False)):
        coord.resume()
    if cfg.federation.evaluation_sites:
        check = context.run_config.get("held-out-check")  # the file simulate wrote, if any
        coord.held_out_check = json.loads(Path(str(check)).read_text()) if check else dict(NOT_CHECKED)
    coord.node_names.update(sitebook.names(sitebook.read_sites()))  # registered names, before any reply
    run_id = getattr(context, "run_id", None)
    last_round_at: str | None = None

    def note(
        status: str, reason: str | None = None, interrupted: dict[str, Any] | None = None, *, out: Path | None = None
    ) -> None:
        # the folder the run writes in (its metrics.json says how it stands), the published one once completed
        runstate.note_run(
            run_id,
            out or coord.out,
            status,
            completed_rounds=coord.completed,
            rounds_planned=cfg.federation.rounds,
            reason=reason,
            interrupted=interrupted,
        )

    note(runstate.RUNNING)
    strategy = make_strategy(cfg, sites=_sampled_sites(grid, coord) if cfg.federation.dp != "off" else None)
    log.info(
        "fedfreeze: %d rounds (%d probe), strategy %s, out %s",
        cfg.federation.rounds,
        cfg.federation.probe_rounds,
        cfg.federation.strategy,
        final,
    )
    try:
        for rnd in range(coord.completed + 1, cfg.federation.rounds + 1):
            if coord.should_stop() and coord.best is not None:
                log.info(
                    "stopping early after round %d: no better pooled validation AUROC since the model after "
                    "round %d (patience %d)",
                    coord.completed,
                    coord.best["round"],
                    cfg.federation.patience,
                )
                break
            record = train_round(grid, coord, strategy, rnd)
            coord.history.append(record)
            coord.completed = rnd
            coord.end_probe(rnd)
            coord.accumulate_swa(rnd)
            coord.checkpoint()
            write_report(coord, status="running")
            last_round_at = runstate.utc_now()
            note(runstate.RUNNING)
            log_round(record)
        coord.apply_swa()
        coord.apply_wise()
        final_record = final_evaluation(grid, coord, strategy)
        log_round(final_record, final=True)
        model_dir, exported = export_model(coord, final_record)
        log.info(
            "exported the global model after round %d (%s) with threshold %.3f",
            exported["round"],
            exported["rule"],
            exported["threshold"],
        )
        log.info("%s", coord.operating_points_line(exported))
        write_report(
            coord,
            status="completed",
            final=final_record,
            model_dir=final / model_dir.relative_to(work),
            exported=exported,
        )
        note(runstate.COMPLETED, out=final)
    except Exception as err:
        reason = f"{type(err).__name__}: {err}"
        write_report(coord, status="failed", reason=reason)
        note(runstate.FAILED, reason)
        raise
    except BaseException as err:  # SystemExit, KeyboardInterrupt: Flower's handler of SIGTERM or SIGINT
        how = "SIGINT" if isinstance(err, KeyboardInterrupt) else f"{type(err).__name__}, after a stop signal"
        info = runstate.interruption(
            f"the coordinator was stopped while it ran ({how})", coord.completed, last_round_at
        )
        reason = runstate.reason_for(info)
        write_report(coord, status=runstate.INTERRUPTED, reason=reason, interrupted=info)
        note(runstate.INTERRUPTED, reason, info)
        log.warning("fedfreeze: %s", reason)
        raise


def run_fab_hash(grid: Grid) -> str | None:
    """The hash of the app bundle (FAB) this run executes, as Flower reports it (``Run.fab_hash``: the
    string ``fedfreeze app-hash`` prints and a site approves); None for a run without a FAB (the
    in-process grid's run has an empty one)."""
    try:
        value = grid.run.fab_hash
    except (AttributeError, TypeError):  # a grid whose run was never set
        return None
    return str(value) or None


def show_logs_with_flower() -> None:
    """Send fedfreeze's log lines through Flower's handlers, so ``flwr run --stream`` shows them; a
    failed federation is one line there, not Flower's traceback of the ServerApp."""
    ours = logging.getLogger("fedfreeze")
    flower = logging.getLogger("flwr")
    if not ours.handlers:
        for handler in flower.handlers:
            ours.addHandler(handler)
        ours.setLevel(logging.INFO)
        ours.propagate = False
    if not any(isinstance(f, OneLineFailure) for f in flower.filters):
        flower.addFilter(OneLineFailure())


class OneLineFailure(logging.Filter):
    """Flower logs "ServerApp raised an exception" with the traceback (~30 lines of the round loop's
    frames) for any exception; for ``FederationFailed`` and every other ``FedfreezeError`` (a bad
    configuration, a missing extra), whose message says what failed and why, the message alone is the
    line (``metrics.json`` holds the details where there is one)."""

    def filter(self, record: logging.LogRecord) -> bool:
        failure = record.exc_info[1] if record.exc_info else None
        if isinstance(failure, (FederationFailed, FedfreezeError)):
            record.msg, record.args = "the federation failed: %s", (str(failure),)
            record.exc_info, record.exc_text = None, None
        return True


def _sampled_sites(grid: Grid, coord: Coordinator) -> int:
    """Sites a round samples (all connected, times fraction-train), for the DP wrapper's noise."""
    return sampled_sites(wait_for_sites(grid, coord), coord.fed)


def log_round(record: RoundRecord, *, final: bool = False) -> None:
    """One line per round (``round_line``: estimates beside their ranges, exact figures to four decimals)."""
    log.info("%s", round_line(record, final=final))
