"""The coordinator's transport on Flower's Grid: wait for the sites, send a batch of messages and poll
for the replies, unpack a reply (or say in words why it cannot be read).

The round loop is ``federate.py``, a round's steps ``grid_round.py``, the strategies ``strategies.py``, DP
``privacy.py``; the rules that need no Flower are ``fedfreeze.federation.round_rules``.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

from flwr.app import ArrayRecord, Message, RecordDict
from flwr.common.constant import ErrorCode
from flwr.serverapp import Grid

from fedfreeze.federation.coordinator import Coordinator, FederationFailed
from fedfreeze.federation.protocol import ARRAYS, METRICS, OPERATING_POINT, PROOF, SITE_FIGURES, TRAIN_ROLE
from fedfreeze.federation.records import Reply
from fedfreeze.federation.round_rules import listing
from fedfreeze.flower.approval import refusal_in
from fedfreeze.state import sitebook

log = logging.getLogger("fedfreeze.server")


PROGRESS_SECONDS = 10.0  # how often a wait (for sites to connect, for a round's replies) says where it stands


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
