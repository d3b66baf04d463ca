"""One round on Flower's Grid: the strategy's messages out, the replies sorted into valid ones,
rejections and failures, the strategy's aggregate per key, the coordinator's pooling.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fedfreeze.federation.coordinator import Coordinator, FederationFailed
from fedfreeze.federation.exchange import ExchangePlan, key_groups
from fedfreeze.federation.protocol import ARRAYS, BASE, EVALUATE_ROLE, RoundOrders
from fedfreeze.federation.records import Reply, RoundRecord
from fedfreeze.federation.round_rules import check_min_sites, site_label
from fedfreeze.federation.secure_stats import SecureSum
from fedfreeze.flower.privacy import privacy_spent
from fedfreeze.flower.secagg_server import SecureRound
from fedfreeze.flower.server import record_bytes, send_and_receive, unpack, wait_for_sites

log = logging.getLogger("fedfreeze.server")


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
    try:
        check_min_sites(record, valid, coord.fed.min_sites, coord.node_names)
    except FederationFailed:
        coord.failed_round = record
        raise
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
