"""The round's rules that need no Flower (federation/round_rules.py), checked without a Grid."""

from __future__ import annotations

import pytest

from fedfreeze.federation.config import FederationConfig
from fedfreeze.federation.coordinator import FederationFailed
from fedfreeze.federation.protocol import EVALUATE_ROLE
from fedfreeze.federation.records import Reply, RoundRecord
from fedfreeze.federation.round_rules import check_min_sites, failure_summary, listing, sampled_sites, site_label


def reply(node: int, role: str = "train") -> Reply:
    return Reply(node=node, site=f"site-{node}", arrays={}, metrics={}, frozen_hash="", role=role)


def test_sampled_sites_is_fraction_of_connected_but_at_least_min_sites() -> None:
    assert sampled_sites(10, FederationConfig(min_sites=2, fraction_train=0.5)) == 5
    assert sampled_sites(3, FederationConfig(min_sites=2, fraction_train=0.5)) == 2


def test_min_sites_counts_training_replies_only() -> None:
    record = RoundRecord(round=3, parts=["head"])
    check_min_sites(record, [reply(1), reply(2)], 2, {})
    record.failures.append({"node": 4, "site": None, "reason": "no reply within 60 s"})
    with pytest.raises(
        FederationFailed,
        match=r"round 3: 1 valid replies of training sites, fewer than min-sites = 2 "
        r"\(1 failed, 0 rejected\): node 4: no reply within 60 s$",
    ):
        check_min_sites(record, [reply(1), reply(3, EVALUATE_ROLE)], 2, {})


def test_failures_are_named_by_site_and_cut_after_the_first_few() -> None:
    record = RoundRecord(round=1, parts=["head"])
    assert failure_summary(record, {}) == ""
    record.failures = [{"node": n, "reason": f"reason {n}"} for n in range(1, 6)]
    record.failures.append({"node": 9, "reason": "site-9 refused to run app"})  # a refusal names its site
    names = {1: "alpha", 9: "site-9"}
    assert failure_summary(record, names, most=2) == ": alpha: reason 1; node 2: reason 2; and 4 more"
    assert failure_summary(record, names, most=6).endswith("; site-9 refused to run app")
    assert site_label(7, names) == "node 7" and listing([9, 1], names) == "alpha, site-9" and listing([], {}) == "none"
