"""What a coordinator says while it waits, and what it records when sites fail, with a scripted grid.

The grid answers as a SuperLink does: a site's own reply, the SuperLink's error reply for a node
whose heartbeats stopped (its source is the SuperLink, not the site: Flower's own function makes
it here), or nothing at all. Fast: no ClientApp runs, no training.
"""

from __future__ import annotations

import logging
import re
from types import SimpleNamespace

import pytest
from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.server.superlink.linkstate.utils import create_message_error_unavailable_res_message

from fedfreeze.federation.coordinator import FederationFailed
from fedfreeze.federation.protocol import METRICS, PROOF
from fedfreeze.federation.records import RoundRecord
from fedfreeze.flower import federate, grid_round
from fedfreeze.flower import server as flower_server
from fedfreeze.flower.local_grid import LocalGrid

SITES = {1: "site-a", 2: "site-b", 3: "site-c"}


class ScriptedGrid(LocalGrid):
    """``answers``: node -> "reply" (the site's own reply), "unavailable" (the SuperLink's error
    reply for a node that stopped sending heartbeats) or "silent" (never anything)."""

    def __init__(self, answers: dict[int, str], connected: list[int] | None = None) -> None:
        super().__init__(ClientApp(), {n: {} for n in answers})
        self.answers = answers
        self.connected = list(answers) if connected is None else connected

    def get_node_ids(self):
        return list(self.connected)

    def pull_messages(self, message_ids):
        replies = []
        for mid in message_ids:
            message = self._pending[mid]
            answer = self.answers[message.metadata.dst_node_id]
            if answer == "silent":
                continue
            del self._pending[mid]
            if answer == "unavailable":
                replies.append(create_message_error_unavailable_res_message(message.metadata, "node_unavail"))
            else:
                site = SITES[message.metadata.dst_node_id]
                content = RecordDict(
                    {
                        METRICS: MetricRecord({"val-n": 10, "num-examples": 10}),
                        PROOF: ConfigRecord({"site": site, "frozen-hash": "h", "role": "train"}),
                    }
                )
                replies.append(Message(content, reply_to=message))
        return replies


def coordinator(
    *, min_sites: int = 1, round_timeout: float = 1.0, site_wait: float = 1.0, names: dict[int, str] | None = None
) -> SimpleNamespace:
    """The part of ``Coordinator`` that waiting and failure bookkeeping use; every reply passes its checks."""
    return SimpleNamespace(
        fed=SimpleNamespace(min_sites=min_sites, round_timeout=round_timeout, site_wait=site_wait),
        node_names=dict(names or {}),
        expected_hash=lambda plan: "h",
        check=lambda *args, **kwargs: [],
        failed_round=None,
    )


def messages_for(grid: LocalGrid, nodes: list[int]) -> list[Message]:
    return [grid.create_message(RecordDict({"config": ConfigRecord({"round": 2})}), "train", n, "2") for n in nodes]


@pytest.fixture
def progress(monkeypatch, caplog) -> pytest.LogCaptureFixture:
    """The coordinator's log lines, with a progress line every 0.2 s instead of every 10 s."""
    monkeypatch.setattr(flower_server, "PROGRESS_SECONDS", 0.2)
    logger = logging.getLogger("fedfreeze.server")
    # straight to caplog's handler, and nowhere else: whether an earlier test in this process routed
    # "fedfreeze" to Flower's handlers (a ServerApp run) must not change what is captured, or how often
    propagate = logger.propagate
    logger.addHandler(caplog.handler)
    logger.propagate = False
    caplog.set_level(logging.INFO, logger="fedfreeze.server")
    yield caplog
    logger.removeHandler(caplog.handler)
    logger.propagate = propagate


def test_one_failure_per_site_with_its_cause_seconds_and_name(progress):
    """A killed SuperNode: the SuperLink's error reply (source: the SuperLink) is the site's one record."""
    grid = ScriptedGrid({1: "reply", 2: "unavailable", 3: "silent"})
    coord = coordinator(names={2: "site-b"})  # a previous round's reply named node 2
    record = RoundRecord(round=2, parts=["head"])
    valid_msgs, valid = grid_round.exchange(
        grid, messages_for(grid, [1, 2, 3]), coord, None, None, record, with_arrays=True
    )

    assert [r.site for r in valid] == ["site-a"] and len(valid_msgs) == 1
    assert [f["node"] for f in record.failures] == [2, 3]  # nothing recorded for the SuperLink's node id
    assert SUPERLINK_NODE_ID not in [f["node"] for f in record.failures]
    killed, silent = record.failures
    assert killed["site"] == "site-b"
    assert killed["reason"].startswith("the site's SuperNode stopped reporting")
    assert "Node Unavailable" in killed["reason"]  # Flower's own words follow ours
    assert 0.0 <= killed["seconds"] < 0.9  # when its error came, not the round's timeout
    assert silent == {"node": 3, "site": None, "reason": "no reply within 1 s", "seconds": pytest.approx(1.0, abs=0.5)}
    assert len(valid) + len(record.rejected) + len(record.failures) == 3  # every site counted once
    assert coord.node_names[1] == "site-a"  # learnt from this round's reply, for the next one

    lines = [m for m in progress.messages if "sites replied" in m]
    assert lines, progress.messages
    assert all(
        re.fullmatch(
            r"round 2: 1 of 3 sites replied \(site-a\), 1 failed \(site-b\); waiting for 1 "
            r"\(node 3\); giving up in \d+ s",
            line,
        )
        for line in lines
    ), lines
    warnings = [m for m in progress.messages if "failed after" in m]
    assert warnings == [
        f"round 2: site-b failed after 0 s: {killed['reason']}",
        "round 2: node 3 failed after 1 s: no reply within 1 s",
    ]


def test_too_few_replies_fail_the_round_and_keep_the_records():
    grid = ScriptedGrid({1: "reply", 2: "unavailable"})
    coord = coordinator(min_sites=2, names={1: "site-a", 2: "site-b"})
    record = RoundRecord(round=3, parts=["head"])
    with pytest.raises(
        FederationFailed,
        match=r"round 3: 1 valid replies of training sites, fewer than "
        r"min-sites = 2 \(1 failed, 0 rejected\)",
    ):
        grid_round.exchange(grid, messages_for(grid, [1, 2]), coord, None, None, record, with_arrays=False)
    assert coord.failed_round is record
    assert [(f["node"], f["site"]) for f in record.failures] == [(2, "site-b")]


def test_waiting_for_sites_says_who_is_there_and_for_how_long(progress):
    grid = ScriptedGrid({1: "reply", 2: "reply", 3: "reply"}, connected=[1, 2])
    coord = coordinator(min_sites=3, site_wait=0.7, names={1: "site-a"})
    with pytest.raises(
        FederationFailed,
        match=r"^2 site\(s\) connected after 1 s; min-sites is 3 "
        r"\(connected: node 2, site-a\)$",
    ):
        flower_server.wait_for_sites(grid, coord)
    lines = [m for m in progress.messages if m.startswith("waiting for sites")]
    assert len(lines) >= 2, progress.messages  # at once, then every PROGRESS_SECONDS
    seconds = [
        int(
            re.fullmatch(
                r"waiting for sites: 2 connected \(node 2, site-a\), min-sites is 3; "
                r"giving up in (\d+) s",
                line,
            ).group(1)
        )
        for line in lines
    ]
    assert seconds[0] == 1 and seconds[-1] == 0  # the countdown runs down to the deadline


def test_enough_sites_start_at_once_and_quietly(progress):
    grid = ScriptedGrid({1: "reply", 2: "reply"})
    assert flower_server.wait_for_sites(grid, coordinator(min_sites=2)) == 2
    assert not [m for m in progress.messages if m.startswith("waiting for sites")]


def test_waiting_for_sites_names_the_registered_sites_that_are_not_connected(progress, monkeypatch, tmp_path):
    """The coordinator's registered sites (written by ``fedfreeze server``) name every node, connected or not."""
    from fedfreeze.state import runstate, sitebook

    sitebook.write_sites(
        tmp_path,
        [
            {"node_id": 1, "name": "site-a", "status": "online", "last_seen": "2026-12-01T10:00:00Z"},
            {"node_id": 2, "name": "site-b", "status": "online", "last_seen": "2026-12-01T10:00:00Z"},
            {"node_id": 3, "name": "site-c", "status": "offline", "last_seen": "2026-12-01T09:12:00Z"},
            {"node_id": 4, "name": "old", "status": "unregistered", "last_seen": None},
        ],
    )
    monkeypatch.setenv(runstate.STATE_VARIABLE, str(tmp_path))
    grid = ScriptedGrid({1: "reply", 2: "reply", 3: "reply"}, connected=[1, 2])
    coord = coordinator(min_sites=3, site_wait=0.3)
    with pytest.raises(FederationFailed, match=r"\(connected: site-a, site-b\)$"):
        flower_server.wait_for_sites(grid, coord)
    lines = [m for m in progress.messages if m.startswith("waiting for sites")]
    assert lines and all(
        re.fullmatch(
            r"waiting for sites: 2 connected \(site-a, site-b\), min-sites is 3; not connected: site-c "
            r"\(offline, last seen 2026-12-01T09:12:00Z\); giving up in \d+ s",
            line,
        )
        for line in lines
    ), lines
    assert coord.node_names == {1: "site-a", 2: "site-b", 3: "site-c"}  # before any reply


def test_a_failed_federation_is_one_line_in_flowers_log_not_a_traceback():
    """Flower logs "ServerApp raised an exception" with the traceback; for a FederationFailed only its reason."""
    record = logging.LogRecord("flwr", logging.ERROR, "", 0, "%s raised an exception", ("ServerApp",), None)
    try:
        raise FederationFailed("round 1: 0 valid replies of training sites, fewer than min-sites = 2")
    except FederationFailed:
        import sys

        record.exc_info = sys.exc_info()
    assert federate.OneLineFailure().filter(record)
    text = logging.Formatter("%(levelname)s : %(message)s").format(record)
    assert text == "ERROR : the federation failed: round 1: 0 valid replies of training sites, fewer than min-sites = 2"

    other = logging.LogRecord("flwr", logging.ERROR, "", 0, "%s raised an exception", ("ServerApp",), None)
    try:
        raise ValueError("a bug")
    except ValueError:
        import sys

        other.exc_info = sys.exc_info()
    federate.OneLineFailure().filter(other)
    assert "Traceback" in logging.Formatter().format(other)  # anything else keeps its traceback
