"""The coordinator on Flower: the round loop of the ServerApp.

The loop is ours (Flower's ``Strategy.start`` runs one fixed configuration for every round, cannot
resume, and reports success when every site failed); sampling and aggregation are Flower's own
strategies (FedAvg, FedProx, FedAvgM, FedTrimmedAvg, FedMedian), called through their ``configure_train`` /
``aggregate_train`` on the round's arrays only, so Flower's DP wrappers compose with them.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.common.constant import ErrorCode
from flwr.serverapp import Grid
from flwr.serverapp.strategy import (
    DifferentialPrivacyClientSideFixedClipping,
    DifferentialPrivacyServerSideFixedClipping,
    FedAvg,
    FedMedian,
    FedTrimmedAvg,
    Strategy,
)
from flwr.supercore.privacy_accounting import NeighboringRelation, PrivacyConfig, SamplingMethod
from flwr.supercore.privacy_accounting.rdp_accountant import RdpAccountant

from fedfreeze.data.overlap import NOT_CHECKED
from fedfreeze.deploy import runstate, sitebook
from fedfreeze.errors import FedfreezeError
from fedfreeze.federation.config import FedConfig, from_run_config
from fedfreeze.federation.coordinator import Coordinator, FederationFailed
from fedfreeze.federation.estimates import round_line
from fedfreeze.federation.exchange import ExchangePlan, key_groups
from fedfreeze.federation.protocol import (
    ARRAYS,
    BASE,
    EVALUATE_ROLE,
    METRICS,
    OPERATING_POINT,
    PROOF,
    SITE_FIGURES,
    TRAIN_ROLE,
    RoundOrders,
)
from fedfreeze.federation.records import Reply, RoundRecord
from fedfreeze.federation.report import write_report
from fedfreeze.federation.secure_stats import SecureSum
from fedfreeze.flower.approval import refusal_in
from fedfreeze.flower.fedavgm import KeyedFedAvgM
from fedfreeze.flower.fedprox import OrderedFedProx
from fedfreeze.flower.secagg_server import SecureRound
from fedfreeze.outputs import output_folder

log = logging.getLogger("fedfreeze.server")


def make_strategy(cfg: FedConfig, sites: int | None = None) -> Strategy:
    """Flower's own strategy for the configured aggregation rule, wrapped by Flower's DP wrapper
    (with Flower's RDP accountant) when ``federation.dp`` is on.

    ``sites``: how many sites each round samples (DP's noise scale and accounting need it).
    """
    fed = cfg.federation
    common: dict[str, Any] = {
        "fraction_train": fed.fraction_train,
        "fraction_evaluate": 1.0,
        "min_train_nodes": fed.min_sites,
        "min_evaluate_nodes": fed.min_sites,
        "min_available_nodes": fed.min_sites,
        "train_metrics_aggr_fn": no_metric_average,
        "evaluate_metrics_aggr_fn": no_metric_average,
    }
    if fed.dp != "off":
        common["weighted_by_key"] = "dp-weight"  # accounted DP needs every site weighted equally
    strategy: Strategy
    if fed.strategy == "fedprox":
        strategy = OrderedFedProx(proximal_mu=fed.proximal_mu, **common)
    elif fed.strategy == "fedavgm":
        strategy = KeyedFedAvgM(server_learning_rate=fed.server_lr, server_momentum=fed.server_momentum, **common)
    elif fed.strategy == "trimmed-mean":
        strategy = FedTrimmedAvg(beta=fed.trim_beta, **common)
    elif fed.strategy == "median":
        strategy = FedMedian(**common)
    else:
        strategy = FedAvg(**common)
    if fed.dp == "off":
        return strategy
    sampled = sites or fed.min_sites
    accountant = RdpAccountant(
        PrivacyConfig(
            target_delta=fed.dp_delta,
            population_size=sampled,
            neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE,
            sampling_method=SamplingMethod.NO_AMPLIFICATION,
        )
    )
    wrapper = (
        DifferentialPrivacyClientSideFixedClipping if fed.dp == "client" else DifferentialPrivacyServerSideFixedClipping
    )
    return wrapper(strategy, fed.dp_noise_multiplier, fed.dp_clipping_norm, sampled, accountant=accountant)


def no_metric_average(records: list[RecordDict], weighting_metric_name: str) -> MetricRecord:
    """In place of Flower's element-wise average of the replies' metrics: fedfreeze pools the sites'
    statistics itself (``Coordinator.pool``), and their released cells differ in number from site to
    site, which Flower's average cannot take."""
    return MetricRecord()


def privacy_spent(strategy: Strategy) -> dict[str, Any] | None:
    """Cumulative (epsilon, delta) from Flower's accountant, when the strategy is a DP wrapper."""
    spent_fn = getattr(strategy, "privacy_spent", None)
    spent = spent_fn() if spent_fn is not None else None
    if spent is None:
        return None
    return {
        "epsilon": spent.epsilon,
        "delta": spent.delta,
        "releases": spent.num_releases,
        "method": spent.accounting_method,
    }


PROGRESS_SECONDS = 10.0  # how often a wait (for sites to connect, for a round's replies) says where it stands


def site_label(node: int, names: Mapping[int, str]) -> str:
    """A site's name when a reply has told us, else its node id."""
    return names.get(node, f"node {node}")


def listing(nodes: Iterable[int], names: Mapping[int, str]) -> str:
    return ", ".join(sorted(site_label(n, names) for n in nodes)) or "none"


def wait_for_sites(grid: Grid, coord: Coordinator) -> int:
    """Wait until ``min-sites`` sites are connected; a federation that cannot start fails, it does not hang.

    (Flower's strategies wait for nodes forever.) While it waits it logs, every ``PROGRESS_SECONDS``,
    who is connected, how many are needed and how long until it gives up.
    """
    started = time.monotonic()
    deadline = started + coord.fed.site_wait
    next_note = started  # the first shortfall is reported at once
    while len(nodes := list(grid.get_node_ids())) < coord.fed.min_sites:
        now = time.monotonic()
        if now > deadline:
            raise FederationFailed(
                f"{len(nodes)} site(s) connected after {coord.fed.site_wait:.0f} s; "
                f"min-sites is {coord.fed.min_sites} (connected: "
                f"{listing(nodes, coord.node_names)})"
            )
        if now >= next_note:
            registered = sitebook.read_sites()  # the coordinator's registered sites, when it keeps them
            coord.node_names.update(
                {n: name for n, name in sitebook.names(registered).items() if n not in coord.node_names}
            )
            missing = sitebook.not_connected(registered, set(nodes))
            log.info(
                "waiting for sites: %d connected (%s), min-sites is %d%s; giving up in %.0f s",
                len(nodes),
                listing(nodes, coord.node_names),
                coord.fed.min_sites,
                f"; not connected: {', '.join(missing)}" if missing else "",
                deadline - now,
            )
            next_note = now + PROGRESS_SECONDS
        time.sleep(POLL_SECONDS)
    return len(nodes)


def record_bytes(content: RecordDict) -> int:
    """Payload size of a message: its arrays, metrics and config values."""
    return sum(record.count_bytes() for record in content.values())


def unpack(message: Message, bytes_down: int, node: int | None = None) -> Reply | str:
    """A reply's contents, or why it cannot be read.

    ``node``: the node the answered message went to (an error reply made by the SuperLink itself,
    e.g. for a node that stopped sending heartbeats, names the SuperLink as its source, not the site).
    """
    node = message.metadata.src_node_id if node is None else node
    if message.has_error():
        return error_reason(message)
    content = message.content
    try:
        metrics = dict(content[METRICS])
        proof = content[PROOF]
        arrays_record = content.array_records.get(ARRAYS, ArrayRecord())
        arrays = {k: v.numpy() for k, v in arrays_record.items()}
        bytes_up = record_bytes(content)
    except (KeyError, TypeError, ValueError) as err:
        return f"malformed reply ({err})"
    return Reply(
        node=node,
        site=str(proof.get("site", node)),
        arrays=arrays,
        metrics=metrics,
        frozen_hash=str(proof.get("frozen-hash", "")),
        bytes_down=bytes_down,
        bytes_up=bytes_up,
        role=str(proof.get("role", TRAIN_ROLE)),
        operating_point=str(proof[OPERATING_POINT]) if OPERATING_POINT in proof else None,
        own_figures=dict(content[SITE_FIGURES]) if SITE_FIGURES in content else {},  # type: ignore[arg-type]
    )


def error_reason(message: Message) -> str:
    """An error reply in words: what most likely happened, then Flower's own text."""
    error = message.error
    if error.code == ErrorCode.NODE_UNAVAILABLE:
        return (
            "the site's SuperNode stopped reporting to the coordinator (stopped, crashed, or lost its "
            f"network); Flower: {error.reason}"
        )
    if error.code in (ErrorCode.MESSAGE_UNAVAILABLE, ErrorCode.REPLY_MESSAGE_UNAVAILABLE):
        return f"the message or its reply expired at the SuperLink; Flower: {error.reason}"
    if (refusal := refusal_in(error.reason)) is not None:  # the site's list of approved apps lacks this app
        return refusal.text
    return f"the site failed: {error.reason}"


def reply_site(message: Message) -> str | None:
    """The site name a reply states, if it is a readable reply (or a site's refusal of the app)."""
    if message.has_error():
        refusal = refusal_in(message.error.reason)
        return refusal.site if refusal is not None else None
    try:
        return str(message.content[PROOF]["site"])
    except (KeyError, TypeError):
        return None


POLL_SECONDS = 0.2


@dataclass
class Exchanged:
    """What came back for one batch of messages, each reply matched to the message it answers."""

    sent: dict[str, int]  # message id -> the node it went to
    unsent: list[int]  # nodes whose message the SuperLink did not take
    replies: dict[str, tuple[Message, float]] = field(default_factory=dict)  # message id -> (reply, seconds)
    seconds: float = 0.0  # from the push to the last reply, or to the timeout


def send_and_receive(
    grid: Grid, messages: list[Message], *, timeout: float, names: dict[int, str] | None = None, what: str = "round"
) -> Exchanged:
    """Push the messages, then poll for replies every 0.2 s until all are in or ``timeout`` passes.

    Flower's ``Grid.send_and_receive`` polls every 3 s, which alone adds 1.5 s to every round on
    average; the sites' own polling (3 s, inside flower-supernode) is not ours to change. Every
    ``PROGRESS_SECONDS`` it logs which sites have replied, which failed (an error reply), which are
    pending and the seconds left.
    ``names`` (node -> site) is completed from the replies as they come in.
    """
    names = {} if names is None else names
    started = time.monotonic()
    ids = list(grid.push_messages(messages))
    sent = {mid: m.metadata.dst_node_id for m, mid in zip(messages, ids, strict=False) if mid}  # ids may be short
    unsent = [m.metadata.dst_node_id for i, m in enumerate(messages) if i >= len(ids) or not ids[i]]
    result = Exchanged(sent=sent, unsent=unsent)
    pending = set(sent)
    deadline = started + timeout
    next_note = started + PROGRESS_SECONDS
    while pending and time.monotonic() < deadline:
        for reply in grid.pull_messages(list(pending)):
            mid = reply.metadata.reply_to_message_id
            if mid not in pending:  # a second answer to one message: the first one counts
                continue
            pending.discard(mid)
            result.replies[mid] = (reply, time.monotonic() - started)
            if (site := reply_site(reply)) is not None:
                names[sent[mid]] = site
        now = time.monotonic()
        if pending and now >= next_note:
            replied = [sent[m] for m, (r, _) in result.replies.items() if not r.has_error()]
            failed = [sent[m] for m, (r, _) in result.replies.items() if r.has_error()]
            log.info(
                "%s: %d of %d sites replied (%s)%s; waiting for %d (%s); giving up in %.0f s",
                what,
                len(replied),
                len(sent),
                listing(replied, names),
                f", {len(failed)} failed ({listing(failed, names)})" if failed else "",
                len(pending),
                listing((sent[m] for m in pending), names),
                max(deadline - now, 0.0),
            )
            next_note = now + PROGRESS_SECONDS
        if pending:
            time.sleep(POLL_SECONDS)
    result.seconds = time.monotonic() - started
    return result


def exchange(
    grid: Grid,
    messages: Iterable[Message],
    coord: Coordinator,
    plan: ExchangePlan,
    orders: RoundOrders,
    record: RoundRecord,
    *,
    with_arrays: bool,
    secure: SecureRound | None = None,
) -> tuple[list[Message], list[Reply]]:
    """Send a round's messages, then sort the replies into valid ones, rejections and failures.

    Every node sent a message ends in exactly one of the three: a failure record holds the true
    cause (Flower's error reply, matched to the node by the message it answers, or the timeout),
    the seconds it took and the site's name when a reply has told us. ``min-sites`` counts valid
    replies of training sites; evaluation-only sites come on top."""
    messages = list(messages)
    bytes_down = {m.metadata.dst_node_id: record_bytes(m.content) for m in messages}
    what = f"round {record.round}" if with_arrays else "final evaluation"
    got = send_and_receive(grid, messages, timeout=coord.fed.round_timeout, names=coord.node_names, what=what)
    proof = coord.expected_hash(plan)
    valid_msgs, valid = [], []

    def fail(node: int, reason: str, seconds: float) -> None:
        site = coord.node_names.get(node)
        record.failures.append({"node": node, "site": site, "reason": reason, "seconds": round(seconds, 1)})
        log.warning("%s: %s failed after %.0f s: %s", what, site_label(node, coord.node_names), seconds, reason)

    for node in got.unsent:
        fail(node, "the SuperLink did not accept the message for this site", 0.0)
    for mid, node in got.sent.items():
        if mid not in got.replies:
            fail(node, f"no reply within {coord.fed.round_timeout:.0f} s", got.seconds)
            continue
        message, seconds = got.replies[mid]
        reply = unpack(message, bytes_down.get(node, 0), node=node)
        if isinstance(reply, str):
            fail(node, reply, seconds)
            continue
        coord.node_names[node] = reply.site
        if secure is not None:  # what the coordinator ordered this site to release, and its masked statistics
            reply.release = secure.release_of(node)
        problems = (secure.take(node, message) if secure is not None else []) + coord.check(
            reply, plan, proof, orders, with_arrays=with_arrays
        )
        if problems:
            record.rejected.append({"node": node, "site": reply.site, "reasons": problems})
            log.warning("%s: rejected the reply of site %s: %s", what, reply.site, "; ".join(problems))
            continue
        valid_msgs.append(message)
        valid.append(reply)
    record.bytes_down = sum(bytes_down.values())
    record.bytes_up = sum(r.bytes_up for r in valid)
    training = sum(r.role != EVALUATE_ROLE for r in valid)
    if training < coord.fed.min_sites:
        coord.failed_round = record
        raise FederationFailed(
            f"round {record.round}: {training} valid replies of training sites, fewer than min-sites = "
            f"{coord.fed.min_sites} ({len(record.failures)} failed, {len(record.rejected)} rejected)"
            + failure_summary(record, coord.node_names)
        )
    return valid_msgs, valid


def failure_summary(record: RoundRecord, names: Mapping[int, str], most: int = 3) -> str:
    """``: SITE: REASON; ...`` for the round's first ``most`` failures (all of them are in ``metrics.json``)."""
    if not record.failures:
        return ""
    shown = []
    for failure in record.failures[:most]:
        label, reason = site_label(failure["node"], names), str(failure["reason"])
        shown.append(reason if reason.startswith(f"{label} ") else f"{label}: {reason}")  # a refusal names its site
    more = len(record.failures) - most
    return ": " + "; ".join(shown) + (f"; and {more} more" if more > 0 else "")


def with_base(messages: Iterable[Message], base: dict[str, Any]) -> list[Message]:
    """Add the round's frozen-but-federated arrays (``Coordinator.base_for``) to every message, as a
    record of their own: the strategy and its DP wrappers see only the trainable ``arrays``."""
    messages = list(messages)
    if base:
        record = ArrayRecord(base)
        for message in messages:
            message.content[BASE] = record
    return messages


def aggregate_per_key(
    strategy: Strategy, rnd: int, messages: list[Message], replies: list[Reply], plan: ExchangePlan
) -> dict[str, Any]:
    """The strategy's aggregate of every key over the replies that hold it.

    Complete replies (the usual case) make one call. Under dynamic freezing, sites return different
    subsets; Flower's strategies need the same keys in every reply, so each group of keys held by
    the same sites (``exchange.key_groups``) is aggregated by its own call over those sites' replies.
    """
    aggregated: dict[str, Any] = {}
    groups = key_groups([r.arrays for r in replies], plan.sent)
    complete = len(groups) == 1 and len(groups[0][1]) == len(replies)  # every reply holds the same keys
    for keys, who in groups:
        group = messages if complete else [restricted(messages[i], keys) for i in who]
        arrays, _ = strategy.aggregate_train(rnd, group)
        if arrays is None:
            raise FederationFailed(f"round {rnd}: the {type(strategy).__name__} strategy aggregated nothing")
        aggregated.update({k: v.numpy() for k, v in arrays.items()})
    return {k: aggregated[k] for k in plan.sent if k in aggregated}


def restricted(message: Message, keys: Iterable[str]) -> Message:
    """A copy of a reply whose ``arrays`` record holds only ``keys`` (metrics and proof unchanged)."""
    arrays = message.content.array_records[ARRAYS]
    content = RecordDict({name: record for name, record in message.content.items() if name != ARRAYS})
    content[ARRAYS] = ArrayRecord({k: arrays[k] for k in keys})
    # (Flower's typed overloads omit ``metadata``, which its constructor takes for a received message)
    return Message(content=content, metadata=message.metadata)  # type: ignore[call-overload]


def train_round(grid: Grid, coord: Coordinator, strategy: Strategy, rnd: int) -> RoundRecord:
    started = time.perf_counter()
    wait_for_sites(grid, coord)
    coord.begin_round(rnd)
    orders = coord.orders(rnd)
    plan = coord.plan(orders)
    record = RoundRecord(round=rnd, parts=sorted(orders.parts), evaluated_model=f"global model after round {rnd - 1}")
    arrays = ArrayRecord(coord.arrays_for(plan))
    messages = strategy.configure_train(rnd, arrays, ConfigRecord(orders.to_config()), grid)
    messages = with_base(messages, coord.base_for(plan))
    secure = secure_round(grid, coord, orders, record, f"round {rnd}")
    if secure is not None:
        messages = secure.prepare(list(messages))
    valid_msgs, valid = exchange(grid, messages, coord, plan, orders, record, with_arrays=True, secure=secure)
    training = [i for i, r in enumerate(valid) if r.role != EVALUATE_ROLE]  # evaluation-only sites train nothing
    scored = dict(coord.state)  # the model every site scored before training (apply replaces arrays, in no place)
    coord.apply(
        plan,
        aggregate_per_key(strategy, rnd, [valid_msgs[i] for i in training], [valid[i] for i in training], plan),
        orders,
    )
    record.privacy = privacy_spent(strategy)
    coord.pool(valid, record, orders, unmasked(secure, valid, coord, record))
    coord.note_scored(record, scored, rnd - 1)
    record.sites = [coord.site_row(r) for r in valid]
    record.round_seconds = time.perf_counter() - started
    return record


def final_evaluation(grid: Grid, coord: Coordinator, strategy: Strategy) -> RoundRecord:
    """Score the final global model at every site; the pooled figures choose the stored threshold."""
    started = time.perf_counter()
    wait_for_sites(grid, coord)
    rnd = coord.completed
    orders = coord.orders(rnd)
    plan = coord.plan(orders)
    record = RoundRecord(round=rnd + 1, parts=sorted(orders.parts), evaluated_model=f"global model after round {rnd}")
    messages = strategy.configure_evaluate(
        rnd, ArrayRecord(coord.arrays_for(plan)), ConfigRecord(orders.to_config()), grid
    )
    messages = with_base(messages, coord.base_for(plan))
    secure = secure_round(grid, coord, orders, record, f"final evaluation after round {rnd}")
    if secure is not None:
        messages = secure.prepare(list(messages))
    _, valid = exchange(grid, messages, coord, plan, orders, record, with_arrays=False, secure=secure)
    coord.pool(valid, record, orders, unmasked(secure, valid, coord, record))
    coord.keep_operating_points(valid)
    record.sites = [coord.site_row(r) for r in valid]
    record.round_seconds = time.perf_counter() - started
    return record


def secure_round(
    grid: Grid, coord: Coordinator, orders: RoundOrders, record: RoundRecord, session: str
) -> SecureRound | None:
    """SecAgg+ around this round's exchange when ``federation.secure-aggregation`` is on (flower/secagg.py)."""
    if not orders.secure_aggregation:
        return None
    return SecureRound(grid, send_and_receive, orders, session, coord.fed.round_timeout, coord.node_names, record)


def unmasked(
    secure: SecureRound | None, valid: list[Reply], coord: Coordinator, record: RoundRecord
) -> dict[str, SecureSum] | None:
    """The secure sums of the round's statistics over the sites whose replies were accepted."""
    if secure is None:
        return None
    try:
        return secure.finish([r.node for r in valid])
    except FederationFailed:
        coord.failed_round = record
        raise
    finally:
        record.secure_sum = secure.summary()


LOCK_WAIT_S = 180.0


def run_federation(grid: Grid, context: Context) -> None:
    """The ServerApp's main: every round, then the final evaluation and the exported model.

    The output folder is written aside and published when the run completes (``outputs.py``),
    unless the run config names a ``work-dir``: then the caller (``simulate``, an in-process run)
    holds the folder and publishes it, and the run writes there. The run's status is written to
    ``metrics.json`` (and noted in the coordinator's state folder, ``deploy/runstate.py``) at every
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
        model_dir, exported = coord.export_model(final_record)
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
    return max(int(wait_for_sites(grid, coord) * coord.fed.fraction_train), coord.fed.min_sites)


def log_round(record: RoundRecord, *, final: bool = False) -> None:
    """One line per round (``round_line``: estimates beside their ranges, exact figures to four decimals)."""
    log.info("%s", round_line(record, final=final))
