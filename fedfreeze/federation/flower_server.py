"""The coordinator on Flower: the round loop of the ServerApp.

The loop is ours (Flower's ``Strategy.start`` runs one fixed configuration for every round, cannot
resume, and reports success when every site failed); sampling and aggregation are Flower's own
strategies (FedAvg, FedProx, FedTrimmedAvg, FedMedian), called through their ``configure_train`` /
``aggregate_train`` on the round's arrays only, so Flower's DP wrappers compose with them.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import (
    DifferentialPrivacyClientSideFixedClipping,
    DifferentialPrivacyServerSideFixedClipping,
    FedAvg,
    FedMedian,
    FedProx,
    FedTrimmedAvg,
    Strategy,
)
from flwr.supercore.privacy_accounting import NeighboringRelation, PrivacyConfig, SamplingMethod
from flwr.supercore.privacy_accounting.rdp_accountant import RdpAccountant

from fedfreeze.federation.config import FedConfig, from_run_config
from fedfreeze.federation.coordinator import Coordinator, FederationFailed, Reply, RoundRecord
from fedfreeze.federation.exchange import ExchangePlan, key_groups
from fedfreeze.federation.protocol import ARRAYS, BASE, METRICS, PROOF
from fedfreeze.federation.report import write_report

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
    }
    if fed.dp != "off":
        common["weighted_by_key"] = "dp-weight"  # accounted DP needs every site weighted equally
    strategy: Strategy
    if fed.strategy == "fedprox":
        strategy = FedProx(proximal_mu=fed.proximal_mu, **common)
    elif fed.strategy == "trimmed-mean":
        strategy = FedTrimmedAvg(beta=fed.trim_beta, **common)
    elif fed.strategy == "median":
        strategy = FedMedian(**common)
    else:
        strategy = FedAvg(**common)
    if fed.dp == "off":
        return strategy
    sampled = sites or fed.min_sites
    accountant = RdpAccountant(PrivacyConfig(
        target_delta=fed.dp_delta, population_size=sampled,
        neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE,
        sampling_method=SamplingMethod.NO_AMPLIFICATION,
    ))
    wrapper = (DifferentialPrivacyClientSideFixedClipping if fed.dp == "client"
               else DifferentialPrivacyServerSideFixedClipping)
    return wrapper(strategy, fed.dp_noise_multiplier, fed.dp_clipping_norm, sampled, accountant=accountant)


def privacy_spent(strategy: Strategy) -> dict[str, Any] | None:
    """Cumulative (epsilon, delta) from Flower's accountant, when the strategy is a DP wrapper."""
    spent_fn = getattr(strategy, "privacy_spent", None)
    spent = spent_fn() if spent_fn is not None else None
    if spent is None:
        return None
    return {"epsilon": spent.epsilon, "delta": spent.delta, "releases": spent.num_releases,
            "method": spent.accounting_method}


def wait_for_sites(grid: Grid, coord: Coordinator) -> int:
    """Wait until ``min-sites`` sites are connected; a federation that cannot start fails, it does not hang.

    (Flower's strategies wait for nodes forever.)
    """
    deadline = time.monotonic() + coord.fed.site_wait
    while (connected := len(list(grid.get_node_ids()))) < coord.fed.min_sites:
        if time.monotonic() > deadline:
            raise FederationFailed(f"{connected} site(s) connected after {coord.fed.site_wait:.0f} s; "
                                   f"min-sites is {coord.fed.min_sites}")
        time.sleep(POLL_SECONDS)
    return connected


def record_bytes(content: RecordDict) -> int:
    """Payload size of a message: its arrays, metrics and config values."""
    return sum(record.count_bytes() for record in content.values())


def unpack(message: Message, bytes_down: int) -> Reply | str:
    """A reply's contents, or why it cannot be read."""
    node = message.metadata.src_node_id
    if message.has_error():
        return f"node {node} failed: {message.error.reason}"
    content = message.content
    try:
        metrics = dict(content[METRICS])
        proof = content[PROOF]
        arrays_record = content.array_records.get(ARRAYS, ArrayRecord())
        arrays = {k: v.numpy() for k, v in arrays_record.items()}
        bytes_up = record_bytes(content)
    except (KeyError, TypeError, ValueError) as err:
        return f"node {node}: malformed reply ({err})"
    return Reply(node=node, site=str(proof.get("site", node)), arrays=arrays, metrics=metrics,
                 frozen_hash=str(proof.get("frozen-hash", "")), bytes_down=bytes_down, bytes_up=bytes_up)


POLL_SECONDS = 0.2


def send_and_receive(grid: Grid, messages: list[Message], *, timeout: float) -> list[Message]:
    """Push the messages, then poll for replies every 0.2 s until all are in or ``timeout`` passes.

    Flower's ``Grid.send_and_receive`` polls every 3 s, which alone adds 1.5 s to every round on
    average; the sites' own polling (3 s, inside flower-supernode) is not ours to change.
    """
    ids = [mid for mid in grid.push_messages(messages) if mid]
    pending = set(ids)
    replies: list[Message] = []
    deadline = time.monotonic() + timeout
    while pending and time.monotonic() < deadline:
        for reply in grid.pull_messages(list(pending)):
            replies.append(reply)
            pending.discard(reply.metadata.reply_to_message_id)
        if pending:
            time.sleep(POLL_SECONDS)
    return replies


def exchange(
    grid: Grid, messages: Iterable[Message], coord: Coordinator, plan: ExchangePlan, record: RoundRecord,
    *, with_arrays: bool,
) -> tuple[list[Message], list[Reply]]:
    """Send a round's messages, then sort the replies into valid ones and logged rejections."""
    messages = list(messages)
    bytes_down = {m.metadata.dst_node_id: record_bytes(m.content) for m in messages}
    replies = send_and_receive(grid, messages, timeout=coord.fed.round_timeout)
    proof = coord.expected_hash(plan)
    valid_msgs, valid = [], []
    answered = set()
    for message in replies:
        node = message.metadata.src_node_id
        answered.add(node)
        reply = unpack(message, bytes_down.get(node, 0))
        if isinstance(reply, str):
            record.failures.append({"node": node, "reason": reply})
            log.warning("round %d: %s", record.round, reply)
            continue
        problems = coord.check(reply, plan, proof, with_arrays=with_arrays)
        if problems:
            record.rejected.append({"node": node, "site": reply.site, "reasons": problems})
            log.warning("round %d: rejected the reply of site %s: %s", record.round, reply.site, "; ".join(problems))
            continue
        valid_msgs.append(message)
        valid.append(reply)
    for node in set(bytes_down) - answered:
        record.failures.append({"node": node, "reason": f"no reply within {coord.fed.round_timeout:.0f} s"})
    record.bytes_down = sum(bytes_down.values())
    record.bytes_up = sum(r.bytes_up for r in valid)
    if len(valid) < coord.fed.min_sites:
        coord.failed_round = record
        raise FederationFailed(
            f"round {record.round}: {len(valid)} valid replies, fewer than min-sites = {coord.fed.min_sites} "
            f"({len(record.failures)} failed, {len(record.rejected)} rejected)"
        )
    return valid_msgs, valid


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
    arrays = message.content[ARRAYS]
    content = RecordDict({name: record for name, record in message.content.items() if name != ARRAYS})
    content[ARRAYS] = ArrayRecord({k: arrays[k] for k in keys})
    return Message(content=content, metadata=message.metadata)


def train_round(grid: Grid, coord: Coordinator, strategy: Strategy, rnd: int) -> RoundRecord:
    started = time.perf_counter()
    wait_for_sites(grid, coord)
    coord.begin_round(rnd)
    parts = coord.parts(rnd)
    plan = coord.plan(parts)
    record = RoundRecord(round=rnd, parts=sorted(parts), evaluated_model=f"global model after round {rnd - 1}")
    arrays = ArrayRecord(coord.arrays_for(plan))
    messages = strategy.configure_train(rnd, arrays, ConfigRecord(coord.orders(rnd, parts)), grid)
    messages = with_base(messages, coord.base_for(plan))
    valid_msgs, valid = exchange(grid, messages, coord, plan, record, with_arrays=True)
    coord.apply(plan, aggregate_per_key(strategy, rnd, valid_msgs, valid, plan))
    record.privacy = privacy_spent(strategy)
    coord.pool(valid, record)
    record.sites = [coord.site_row(r) for r in valid]
    record.round_seconds = time.perf_counter() - started
    return record


def final_evaluation(grid: Grid, coord: Coordinator, strategy: Strategy) -> RoundRecord:
    """Score the final global model at every site; the pooled figures choose the stored threshold."""
    started = time.perf_counter()
    wait_for_sites(grid, coord)
    rnd = coord.fed.rounds
    parts = coord.parts(rnd)
    plan = coord.plan(parts)
    record = RoundRecord(round=rnd + 1, parts=sorted(parts), evaluated_model=f"global model after round {rnd}")
    orders = coord.orders(rnd, parts)
    messages = strategy.configure_evaluate(rnd, ArrayRecord(coord.arrays_for(plan)), ConfigRecord(orders), grid)
    messages = with_base(messages, coord.base_for(plan))
    _, valid = exchange(grid, messages, coord, plan, record, with_arrays=False)
    coord.pool(valid, record)
    record.sites = [coord.site_row(r) for r in valid]
    record.round_seconds = time.perf_counter() - started
    return record


def run_federation(grid: Grid, context: Context) -> None:
    """The ServerApp's main: every round, then the final evaluation and the exported model."""
    show_logs_with_flower()
    cfg = from_run_config(context.run_config)
    coord = Coordinator(cfg, cfg.federation.out_dir)
    if bool(context.run_config.get("resume", False)):
        coord.resume()
    strategy = make_strategy(cfg, sites=_sampled_sites(grid, coord) if cfg.federation.dp != "off" else None)
    log.info("fedfreeze: %d rounds (%d probe), strategy %s, out %s", cfg.federation.rounds,
             cfg.federation.probe_rounds, cfg.federation.strategy, coord.out)
    try:
        for rnd in range(coord.completed + 1, cfg.federation.rounds + 1):
            record = train_round(grid, coord, strategy, rnd)
            coord.history.append(record)
            coord.completed = rnd
            coord.checkpoint()
            write_report(coord, status="running")
            log_round(record)
        final = final_evaluation(grid, coord, strategy)
        log_round(final)
        model_dir = coord.export_model()
        write_report(coord, status="completed", final=final, model_dir=model_dir)
    except Exception as err:
        write_report(coord, status="failed", reason=f"{type(err).__name__}: {err}")
        raise


def show_logs_with_flower() -> None:
    """Send fedfreeze's log lines through Flower's handlers, so ``flwr run --stream`` shows them."""
    ours = logging.getLogger("fedfreeze")
    if not ours.handlers:
        for handler in logging.getLogger("flwr").handlers:
            ours.addHandler(handler)
        ours.setLevel(logging.INFO)
        ours.propagate = False


def _sampled_sites(grid: Grid, coord: Coordinator) -> int:
    """Sites a round samples (all connected, times fraction-train), for the DP wrapper's noise."""
    return max(int(wait_for_sites(grid, coord) * coord.fed.fraction_train), coord.fed.min_sites)


def log_round(record: RoundRecord) -> None:
    pooled = (record.pooled or {}).get("at_threshold_used", {})
    mean = record.weighted_mean or {}
    # binary: AUROC from the pooled histograms; multi-class: accuracy from the pooled confusion matrices
    first, key = ("AUROC", "auroc") if "auroc" in pooled else ("accuracy", "accuracy")
    log.info(
        "round %d [%s] %s: pooled %s %.4f, balanced acc %.4f, F1 %.4f (weighted mean of sites: AUROC %.4f) "
        "| %d sites, %d rejected, %d failed, up %d B, %.1f s",
        record.round, "+".join(record.parts), record.evaluated_model, first, pooled.get(key, float("nan")),
        pooled.get("balanced_accuracy", float("nan")), pooled.get("f1", float("nan")),
        mean.get("auroc", float("nan")), len(record.sites), len(record.rejected), len(record.failures),
        record.bytes_up, record.round_seconds,
    )
