"""SecAgg+ as fedfreeze runs it (flower/secagg*.py), without training: the real site stages and the
coordinator's driver exchange real serialised messages through ``LocalGrid``; each site masks a
known vector, and the coordinator must unmask exactly the sum over the sites that survived masking,
per group, or abort where SecAgg+ aborts."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

from fedfreeze.errors import ProtocolError
from fedfreeze.federation.coordinator import FederationFailed
from fedfreeze.federation.protocol import CONFIG, SECURE_SUM, RoundOrders
from fedfreeze.federation.records import RoundRecord
from fedfreeze.federation.secure_stats import (
    CELLS,
    SECURE,
    check_sum,
    plan_groups,
    reconstruction_threshold,
    vector_length,
)
from fedfreeze.flower import secagg_site
from fedfreeze.flower.client import handle_secagg_setup, handle_secagg_share_keys, handle_secagg_unmask
from fedfreeze.flower.local_grid import LocalGrid
from fedfreeze.flower.secagg import MASK, SETUP, SHARE_KEYS, mask_stream, pairwise_sign
from fedfreeze.flower.secagg_server import SecureRound
from fedfreeze.flower.server import send_and_receive
from tests.federation.conftest import plain_orders

BINS = 10


def orders(evaluation_sites: tuple[str, ...] = ()) -> RoundOrders:
    return plain_orders(score_bins=BINS, secure_aggregation=True, evaluation_sites=evaluation_sites)


def sites_app(vectors: dict[str, np.ndarray], crash: dict[str, str] | None = None) -> ClientApp:
    """The real secure-aggregation stages; the round's message masks the site's vector from
    ``vectors``; ``crash`` makes a named site fail at a stage ("setup", "share-keys", "mask", "unmask")."""
    crash = crash or {}
    app = ClientApp()

    def crashing(stage: str, handler: Any) -> Any:
        def run(message: Message, context: Context) -> Message:
            if crash.get(str(context.node_config["site-name"])) == stage:
                raise RuntimeError(f"lost at {stage}")
            return handler(message, context)

        return run

    def round_message(message: Message, context: Context) -> Message:
        part = message.content.config_records[SECURE_SUM]
        content = RecordDict({"metrics": ConfigRecord({"site": str(context.node_config["site-name"])})})
        if part.get("release") == SECURE:
            vector = vectors[str(context.node_config["site-name"])]
            content[SECURE_SUM] = secagg_site.mask(part, context, vector)
        return Message(content, reply_to=message)

    app.query("secagg_setup")(crashing(SETUP, handle_secagg_setup))
    app.query("secagg_share_keys")(crashing(SHARE_KEYS, handle_secagg_share_keys))
    app.query("secagg_unmask")(crashing("unmask", handle_secagg_unmask))
    app.train()(crashing(MASK, round_message))
    return app


def secure_round(
    vectors: dict[str, np.ndarray], roles: RoundOrders, crash: dict[str, str] | None = None
) -> tuple[SecureRound, dict[str, Any], RoundRecord, dict[int, str]]:
    """One round of the protocol over the sites of ``vectors`` (nodes 1.. in order); its sums by group."""
    names = list(vectors)
    nodes = {i: {"data-path": "/nowhere", "site-name": name} for i, name in enumerate(names, start=1)}
    grid = LocalGrid(sites_app(vectors, crash), nodes)
    record = RoundRecord(round=1, parts=["head"])
    known: dict[int, str] = {}
    secure = SecureRound(grid, send_and_receive, roles, "round 1", 30.0, known, record)
    config = RecordDict({CONFIG: ConfigRecord(roles.to_config())})
    messages = [Message(content=config, message_type="train", dst_node_id=n) for n in nodes]
    got = send_and_receive(grid, secure.prepare(messages), timeout=30.0, names=known)
    accepted = []
    for mid, node in got.sent.items():
        reply = got.replies[mid][0]
        if not reply.has_error() and not secure.take(node, reply):
            accepted.append(node)
    return secure, secure.finish(accepted), record, {n: v["site-name"] for n, v in nodes.items()}


def vectors_for(names: list[str], seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {name: rng.integers(0, 6, size=2 * BINS).astype(np.int64) for name in names}


def test_the_coordinator_unmasks_the_sum_per_group_and_nothing_else() -> None:
    vectors = vectors_for(["a", "b", "c", "e1", "e2", "e3"])
    secure, sums, record, _ = secure_round(vectors, orders(("e1", "e2", "e3")))
    assert set(sums) == {"train", "evaluate"}
    np.testing.assert_array_equal(sums["train"].vector, vectors["a"] + vectors["b"] + vectors["c"])
    np.testing.assert_array_equal(sums["evaluate"].vector, vectors["e1"] + vectors["e2"] + vectors["e3"])
    assert sums["train"].sites == ("a", "b", "c") and sums["train"].dropped == ()
    assert not record.failures
    for node, masked in secure.masked.items():  # what the coordinator received of each site
        own = vectors[secure.names[node]].astype(np.uint64)
        assert not np.array_equal(masked, own)
        assert masked.max() > 2**31  # spread over [0, 2^32): a mask, not counts
    summary = secure.summary()
    assert summary["groups"]["train"] == {"sites": 3, "dropped": [], "threshold": 2}
    assert summary["bytes_down"] > 0 and summary["bytes_up"] > 0


def test_a_group_of_one_releases_cells() -> None:
    vectors = vectors_for(["a", "b", "e1"])
    secure, sums, _, names = secure_round(vectors, orders(("e1",)))
    assert set(sums) == {"train"}
    assert {names[n]: r for n, r in secure.release.items()} == {"a": SECURE, "b": SECURE, "e1": CELLS}


def test_a_site_dropping_after_masking_stays_in_the_sum() -> None:
    """SecAgg+: a site whose masked vector arrived but that fails to unmask is still summed; its mask
    seed is rebuilt from the other sites' shares (threshold 2 of 3)."""
    vectors = vectors_for(["a", "b", "c"])
    _, sums, record, _ = secure_round(vectors, orders(), crash={"c": "unmask"})
    np.testing.assert_array_equal(sums["train"].vector, vectors["a"] + vectors["b"] + vectors["c"])
    assert [f["site"] for f in record.failures] == ["c"] and "unmask" in record.failures[0]["reason"]


def test_a_site_dropping_before_masking_leaves_the_sum() -> None:
    """SecAgg+: a site that shared its keys but never sent its masked vector is left out, and the
    pairwise masks it shared are removed with its private key, rebuilt from the survivors' shares."""
    vectors = vectors_for(["a", "b", "c", "d"])
    _, sums, _, _ = secure_round(vectors, orders(), crash={"d": MASK})
    np.testing.assert_array_equal(sums["train"].vector, vectors["a"] + vectors["b"] + vectors["c"])
    assert sums["train"].dropped == ("d",)


def test_a_site_failing_setup_is_left_out_before_any_mask() -> None:
    vectors = vectors_for(["a", "b", "c"])
    secure, sums, record, _ = secure_round(vectors, orders(), crash={"b": SETUP})
    np.testing.assert_array_equal(sums["train"].vector, vectors["a"] + vectors["c"])
    assert len(secure.masked) == 2 and [f["site"] for f in record.failures] == [None]  # never named itself


def test_too_few_survivors_abort_as_secagg_plus_specifies() -> None:
    vectors = vectors_for(["a", "b", "c"])
    with pytest.raises(FederationFailed, match="secure aggregation of the train sites: 1 sites answered"):
        secure_round(vectors, orders(), crash={"b": "unmask", "c": "unmask"})


def test_site_stages_refuse_to_run_out_of_order_or_give_both_shares() -> None:
    context = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})
    with pytest.raises(ProtocolError, match="expected stage 'setup' of 'round 1'"):
        secagg_site.share_keys(ConfigRecord({"session": "round 1"}), context)
    secagg_site.setup(ConfigRecord({"session": "round 1"}), context, 1, "a")
    with pytest.raises(ProtocolError, match="expected stage 'share-keys' of 'round 1'"):
        secagg_site.mask(ConfigRecord({"session": "round 1", "srcs": [], "ctxts": []}), context, np.zeros(2))
    context.state.config_records["fedfreeze-secagg"] = ConfigRecord(
        {
            **dict(context.state.config_records["fedfreeze-secagg"]),
            "stage": MASK,
            "threshold": 2,
            "holders": [1, 2],
            "seed_shares": [b"s1", b"s2"],
            "key_shares": [b"k1", b"k2"],
        }
    )
    with pytest.raises(ProtocolError, match="both as surviving and as dropped"):
        secagg_site.unmask(ConfigRecord({"session": "round 1", "active": [1, 2], "dead": [2]}), context)
    answer = secagg_site.unmask(ConfigRecord({"session": "round 1", "active": [1, 2], "dead": []}), context)
    assert answer["shares"] == [b"s1", b"s2"]
    with pytest.raises(ProtocolError, match="expected stage 'mask'"):  # once per session
        secagg_site.unmask(ConfigRecord({"session": "round 1", "active": [1, 2], "dead": []}), context)


def test_masks_cancel_in_pairs_and_come_from_the_whole_seed() -> None:
    assert pairwise_sign(3, 1) == 1 and pairwise_sign(1, 3) == -1
    a, b = mask_stream(b"x" * 32, 50), mask_stream(b"x" * 31 + b"y", 50)
    assert a.dtype == np.uint64 and (a < 2**32).all() and not np.array_equal(a, b)
    np.testing.assert_array_equal(a, mask_stream(b"x" * 32, 50))


def test_sum_checks_and_groups() -> None:
    sent = orders(("e1", "e2"))
    assert vector_length(sent) == 2 * BINS
    assert reconstruction_threshold(2) == 2 and reconstruction_threshold(3) == 2 and reconstruction_threshold(5) == 3
    assert plan_groups({5: "a", 2: "b", 9: "e1", 7: "e2", 1: "c"}, sent) == {"train": [1, 2, 5], "evaluate": [7, 9]}
    assert plan_groups({5: "a", 2: "b", 9: "e1"}, sent) == {"train": [2, 5]}  # a group of one: cells
    good = np.ones(2 * BINS, dtype=np.int64)
    assert check_sum(good, sent, 2 * BINS, "train").sum() == 2 * BINS
    with pytest.raises(ProtocolError, match="holds 20 cases, but their val-n add up to 19"):
        check_sum(good, sent, 19, "train")
    with pytest.raises(ProtocolError, match="counts outside"):
        check_sum(-good, sent, -2 * BINS, "train")
    with pytest.raises(ProtocolError, match="3 counts, expected 20"):
        check_sum(good[:3], sent, 3, "train")
