"""The coordinator's part of secure aggregation: SecAgg+'s stages around one round's exchange
(``secagg.py`` says why fedfreeze drives them itself, and what the coordinator learns).

``SecureRound`` wraps the round: ``prepare`` runs setup and the key exchange with the sampled sites
and adds to each site's round message the shares meant for it; ``take`` keeps each reply's masked
statistics; ``finish`` unmasks the sum of every group over the sites whose replies were accepted.
A site that fails before masking is left out of the sum, one that fails after masking stays in it;
a group with fewer than its threshold of sites left aborts, as SecAgg+ specifies.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, cast

import numpy as np
from flwr.app import ConfigRecord, Message, RecordDict
from flwr.common.secure_aggregation.crypto.shamir import combine_shares
from flwr.common.secure_aggregation.crypto.symmetric_encryption import generate_shared_key
from flwr.common.serde import recorddict_to_proto
from flwr.serverapp import Grid
from flwr.supercore.primitives.asymmetric import bytes_to_private_key, bytes_to_public_key

from fedfreeze.federation.coordinator import FederationFailed
from fedfreeze.federation.protocol import SECURE_SUM, TRAIN_ROLE, RoundOrders
from fedfreeze.federation.records import RoundRecord
from fedfreeze.federation.secure_stats import (
    CELLS,
    MODULUS,
    SECURE,
    SecureSum,
    plan_groups,
    reconstruction_threshold,
    vector_length,
)
from fedfreeze.flower.secagg import (
    MASK,
    SETUP,
    SETUP_TYPE,
    SHARE_KEYS,
    SHARE_KEYS_TYPE,
    UNMASK,
    UNMASK_TYPE,
    add_mod,
    from_wire,
    mask_stream,
    pairwise_sign,
)

log = logging.getLogger("fedfreeze.server")

# flower/server.py's send_and_receive: (grid, messages, *, timeout, names, what) -> its Exchanged
Send = Callable[..., Any]


def content_bytes(content: RecordDict) -> int:
    """Bytes of a message's content as serialised for the wire (Flower's ``count_bytes`` fails on a
    record holding an empty list, e.g. no dropped sites)."""
    return int(recorddict_to_proto(content).ByteSize())


@dataclass
class Group:
    """One group's protocol state at the coordinator (public values only)."""

    name: str
    threshold: int
    keys: dict[int, tuple[bytes, bytes]]  # node -> (pk1, pk2), the sites that completed setup
    shared: list[int] = field(default_factory=list)  # sites that completed the key exchange (U2)
    forward: dict[int, tuple[list[int], list[bytes]]] = field(default_factory=dict)  # node -> (sources, ciphertexts)


@dataclass
class SecureRound:
    """SecAgg+ for one round (or the final evaluation) of the federation."""

    grid: Grid
    send: Send
    orders: RoundOrders
    session: str  # "round 3", "final evaluation after round 6": every stage message names it
    timeout: float
    names: dict[int, str]  # node -> site, completed from the setup replies
    record: RoundRecord  # where failures are written, as the round's own are
    groups: dict[str, Group] = field(default_factory=dict)
    release: dict[int, str] = field(default_factory=dict)  # node -> SECURE or CELLS, as ordered
    masked: dict[int, np.ndarray] = field(default_factory=dict)
    seconds: float = 0.0
    bytes_down: int = 0  # the stages' own messages (setup, key exchange, unmask), to the sites
    bytes_up: int = 0  # ... and back
    mask_bytes_down: int = 0  # the parts riding on the round's messages (forwarded shares): in the round's bytes
    mask_bytes_up: int = 0  # ... and the masked statistics in the replies
    outcome: dict[str, Any] = field(default_factory=dict)

    # ------------------------------------------------------------------ stages 1 and 2
    def prepare(self, messages: list[Message]) -> list[Message]:
        """Setup and key exchange with the messages' sites; the messages to send, each site's with its
        part of the protocol (``SECURE_SUM``): its forwarded shares, or the order to release cells."""
        started = time.monotonic()
        nodes = [m.metadata.dst_node_id for m in messages]
        replies = self._stage(SETUP_TYPE, {n: {"stage": SETUP, "session": self.session} for n in nodes}, SETUP)
        keys = {n: (cast(bytes, r["pk1"]), cast(bytes, r["pk2"])) for n, r in replies.items()}
        self.names.update({n: str(r["site"]) for n, r in replies.items()})
        planned = plan_groups({n: self.names[n] for n in keys}, self.orders)
        for name, members in planned.items():
            self.groups[name] = Group(name, reconstruction_threshold(len(members)), {n: keys[n] for n in members})
        exchange = {}
        for group in self.groups.values():
            members = sorted(group.keys)
            for node in members:
                exchange[node] = {
                    "stage": SHARE_KEYS,
                    "session": self.session,
                    "group": group.name,
                    "threshold": group.threshold,
                    "nodes": members,
                    "pk1": [group.keys[n][0] for n in members],
                    "pk2": [group.keys[n][1] for n in members],
                }
        shared = self._stage(SHARE_KEYS_TYPE, exchange, SHARE_KEYS)
        for group in self.groups.values():
            group.shared = sorted(n for n in group.keys if n in shared)
            group.forward = {n: ([], []) for n in group.shared}
            for src in group.shared:
                dsts, texts = cast(list[int], shared[src]["dsts"]), cast(list[bytes], shared[src]["ctxts"])
                for dst, text in zip(dsts, texts, strict=True):
                    if dst in group.forward and dst != src:
                        group.forward[dst][0].append(src)
                        group.forward[dst][1].append(text)
            if len(group.shared) < group.threshold:  # SecAgg+ aborts: too few sites to ever unmask
                for node in group.shared:
                    self._failure(node, self._abort(group, "the key exchange"))
                group.shared = []
        out = []
        in_sum = {n for g in self.groups.values() for n in g.shared}
        grouped = {n for g in self.groups.values() for n in g.keys}
        for message in messages:
            node = message.metadata.dst_node_id
            if node in in_sum:
                group = next(g for g in self.groups.values() if node in g.shared)
                sources, texts = group.forward[node]
                part = {"stage": MASK, "session": self.session, "release": SECURE, "srcs": sources, "ctxts": texts}
                self.release[node] = SECURE
            elif node in keys and node not in grouped:  # alone in its group: no sum to hide in
                part = {"release": CELLS}
                self.release[node] = CELLS
            else:
                continue  # failed setup or the key exchange (its failure is recorded)
            record = ConfigRecord(part)  # type: ignore[arg-type]
            self.mask_bytes_down += content_bytes(RecordDict({SECURE_SUM: record}))
            out.append(with_part(message, record))
        self.seconds += time.monotonic() - started
        return out

    # ------------------------------------------------------------------ stage 3
    def release_of(self, node: int) -> str:
        return self.release.get(node, CELLS)

    def take(self, node: int, message: Message) -> list[str]:
        """Keep a reply's masked statistics; why the reply breaks the order (empty: it does not)."""
        part = message.content.config_records.get(SECURE_SUM)
        if self.release_of(node) != SECURE:
            return ["sent masked statistics, but was ordered to release cells"] if part is not None else []
        if part is None or part.get("stage") != MASK or not isinstance(part.get("masked"), bytes):
            return ["no masked statistics, though ordered into the secure sum"]
        try:
            self.masked[node] = from_wire(cast(bytes, part["masked"]), vector_length(self.orders))
        except ValueError as err:
            return [f"secure sum: {err}"]
        self.mask_bytes_up += content_bytes(RecordDict({SECURE_SUM: part}))
        return []

    # ------------------------------------------------------------------ stage 4
    def finish(self, accepted: list[int]) -> dict[str, SecureSum]:
        """Unmask each group's sum over its sites whose masked replies were ``accepted``; the others
        that shared keys count as dropped (their pairwise masks are removed with their rebuilt keys)."""
        started = time.monotonic()
        sums: dict[str, SecureSum] = {}
        asks: dict[int, dict[str, Any]] = {}
        for group in self.groups.values():
            active = [n for n in group.shared if n in accepted and n in self.masked]
            if not group.shared:
                continue
            if len(active) < group.threshold:
                self._fail(group, f"{len(active)} sites survived masking")
                continue
            dead = [n for n in group.shared if n not in active]
            for node in active:
                asks[node] = {"stage": UNMASK, "session": self.session, "active": active, "dead": dead}
        shares = self._stage(UNMASK_TYPE, asks, UNMASK)
        length = vector_length(self.orders)
        for group in self.groups.values():
            active = [n for n in group.shared if n in asks]
            if not active:
                continue
            dead = [n for n in group.shared if n not in active]
            answered = [n for n in active if n in shares]
            if len(answered) < group.threshold:
                self._fail(group, f"{len(answered)} sites answered the unmask stage")
                continue
            held: dict[int, list[bytes]] = {n: [] for n in group.shared}
            for node in answered:
                nids, parts = cast(list[int], shares[node]["nids"]), cast(list[bytes], shares[node]["shares"])
                for owner, share in zip(nids, parts, strict=True):
                    if owner in held:
                        held[owner].append(share)
            short = [n for n in group.shared if len(held[n]) < group.threshold]
            if short:
                self._fail(group, f"{min(len(held[n]) for n in short)} shares of a site's secret came back")
                continue
            total = np.zeros(length, dtype=np.uint64)
            for node in active:
                total = add_mod(total, self.masked[node], 1)
            for node in group.shared:
                seed = combine_shares(held[node][: group.threshold])
                if node in active:  # its own mask, rebuilt from the survivors' shares of its seed
                    total = add_mod(total, mask_stream(seed, length), -1)
                    continue
                private = bytes_to_private_key(seed)  # a dropped site: its pairwise masks with the survivors
                for other in active:
                    shared = generate_shared_key(private, bytes_to_public_key(group.keys[other][0]))
                    total = add_mod(total, mask_stream(shared, length), -pairwise_sign(other, node))
            values = np.where(total >= MODULUS // 2, total.astype(np.int64) - MODULUS, total.astype(np.int64))
            sums[group.name] = SecureSum(
                group.name,
                tuple(self.names.get(n, str(n)) for n in active),
                values.astype(np.int64),
                tuple(self.names.get(n, str(n)) for n in dead),
            )
            self.outcome[group.name] = {
                "sites": len(active),
                "dropped": [self.names.get(n, str(n)) for n in dead],
                "threshold": group.threshold,
            }
        self.seconds += time.monotonic() - started
        return sums

    def summary(self) -> dict[str, Any]:
        """What ``RoundRecord.secure_sum`` keeps: the groups, dropouts, the coordinator's seconds in the
        protocol's own stages, their bytes (``bytes_down``/``bytes_up``, on top of the round's) and the bytes
        of its parts inside the round's own messages (``mask_bytes_*``, already in the round's)."""
        return {
            "groups": self.outcome,
            "cells": sorted(self.names.get(n, str(n)) for n, r in self.release.items() if r == CELLS),
            "seconds": round(self.seconds, 3),
            "bytes_down": self.bytes_down,
            "bytes_up": self.bytes_up,
            "mask_bytes_down": self.mask_bytes_down,
            "mask_bytes_up": self.mask_bytes_up,
        }

    # ------------------------------------------------------------------ helpers
    def _stage(self, message_type: str, parts: Mapping[int, dict[str, Any]], stage: str) -> dict[int, ConfigRecord]:
        """Send one stage's messages and return the readable replies by node; failures are recorded."""
        if not parts:
            return {}
        messages = [
            Message(
                content=RecordDict({SECURE_SUM: ConfigRecord(part)}),
                message_type=message_type,
                dst_node_id=node,
                group_id=self.session,
            )
            for node, part in parts.items()
        ]
        self.bytes_down += sum(content_bytes(m.content) for m in messages)
        got = self.send(
            self.grid,
            messages,
            timeout=self.timeout,
            names=self.names,
            what=f"{self.session}, secure aggregation ({stage})",
        )
        replies: dict[int, ConfigRecord] = {}
        for node in got.unsent:
            self._failure(node, f"secure aggregation ({stage}): the SuperLink did not take the message")
        for mid, node in got.sent.items():
            if mid not in got.replies:
                self._failure(node, f"secure aggregation ({stage}): no reply within {self.timeout:.0f} s")
                continue
            message, _ = got.replies[mid]
            if message.has_error():
                self._failure(node, f"secure aggregation ({stage}): the site failed: {message.error.reason}")
                continue
            part = message.content.config_records.get(SECURE_SUM)
            self.bytes_up += content_bytes(message.content)
            if part is None or part.get("stage") != stage:
                self._failure(node, f"secure aggregation ({stage}): a reply without this stage's part")
                continue
            replies[node] = part
        return replies

    def _failure(self, node: int, reason: str) -> None:
        """A site lost to the protocol, recorded as the round's failures are (flower/grid_round.py's ``exchange``)."""
        site = self.names.get(node)
        self.record.failures.append({"node": node, "site": site, "reason": reason, "seconds": 0.0})
        log.warning("%s: %s failed: %s", self.session, site or f"node {node}", reason)

    def _abort(self, group: Group, where: str) -> str:
        return (
            f"secure aggregation of the {group.name} sites aborted at {where}: fewer than its threshold of "
            f"{group.threshold} sites left (SecAgg+ cannot unmask the sum)"
        )

    def _fail(self, group: Group, why: str) -> None:
        """A group that cannot be unmasked: the training sites' fails the round, the evaluation-only
        sites' only loses their figures (they choose nothing)."""
        reason = f"secure aggregation of the {group.name} sites: {why}, fewer than its threshold of {group.threshold}"
        self.outcome[group.name] = {"aborted": reason}
        if group.name == TRAIN_ROLE:
            raise FederationFailed(f"{self.session}: {reason}; SecAgg+ cannot unmask the sum")
        log.warning("%s: %s; no pooled figures of these sites this time", self.session, reason)


def with_part(message: Message, part: ConfigRecord) -> Message:
    """A copy of a round message with this site's part of the protocol (a strategy's messages share
    one content)."""
    content = RecordDict({name: record for name, record in message.content.items()})
    content[SECURE_SUM] = part
    return Message(
        content=content,
        message_type=message.metadata.message_type,
        dst_node_id=message.metadata.dst_node_id,
        group_id=message.metadata.group_id,
    )
