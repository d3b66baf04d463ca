"""Differential privacy that the tests would catch missing: every update the aggregator averages is
clipped to the configured norm, and the released aggregate carries Gaussian noise of the configured
scale (Flower's wrappers around Flower's FedAvg, on the real ServerApp loop and ClientApp, in
process through ``LocalGrid``).

The strategy is instrumented, not replaced: the DP wrapper's inner strategy records the replies it
is given (after the wrapper clipped them, in server mode) and the aggregate it returns (the
noiseless one); the wrapper records what it releases. Everything is recomputed from what the sites
sent, so a wrapper that stopped clipping or adding noise would fail here.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flwr.app import Context, Message, RecordDict
from flwr.clientapp import ClientApp

from fedfreeze.flower import federate, strategies
from fedfreeze.flower.client import dp_clipping_mod, handle_evaluate, handle_train
from fedfreeze.flower.local_grid import LocalGrid
from fedfreeze.model_io import load_model
from tests.federation.conftest import fast_config
from tests.federation.test_federation_inprocess import node_configs

pytestmark = pytest.mark.slow  # each test runs, or shares, a federation or a trained model

CLIP = 0.05  # far below what a probe round's update measures (> 0.1), so every update is clipped
NOISE = 0.5
SITES = 3


def _arrays(message: Message) -> dict[str, np.ndarray]:
    return {k: v.numpy().astype(np.float64) for k, v in message.content["arrays"].items()}


def _norm(update: dict[str, np.ndarray]) -> float:
    return float(np.sqrt(sum(float(np.sum(u**2)) for u in update.values())))


def _minus(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {k: a[k] - b[k] for k in a}


class Recorder:
    """What the DP wrapper gave its inner strategy, and what each of them returned, per round."""

    def __init__(self) -> None:
        self.inner_in: dict[int, dict[str, dict[str, np.ndarray]]] = {}  # round -> site -> arrays
        self.inner_out: dict[int, dict[str, np.ndarray]] = {}
        self.released: dict[int, dict[str, np.ndarray]] = {}

    def strategy(self, cfg: Any, sites: int | None = None) -> Any:
        strategy = REAL_MAKE_STRATEGY(cfg, sites=sites)
        inner, outer = strategy.strategy.aggregate_train, strategy.aggregate_train

        def inner_aggregate(rnd: int, replies: list[Message]) -> Any:
            replies = list(replies)
            self.inner_in[rnd] = {str(r.content["proof"]["site"]): _arrays(r) for r in replies}
            arrays, metrics = inner(rnd, replies)
            self.inner_out[rnd] = {k: v.numpy().astype(np.float64) for k, v in arrays.items()}
            return arrays, metrics

        def released(rnd: int, replies: list[Message]) -> Any:
            arrays, metrics = outer(rnd, replies)
            self.released[rnd] = {k: v.numpy().astype(np.float64) for k, v in arrays.items()}
            return arrays, metrics

        strategy.strategy.aggregate_train = inner_aggregate  # instance attributes: the classes are untouched
        strategy.aggregate_train = released
        return strategy


REAL_MAKE_STRATEGY = strategies.make_strategy


def recording_client(raw: dict[tuple[str, int], dict[str, np.ndarray]]) -> ClientApp:
    """The real ClientApp (the DP clipping mod in front of the train handler), recording each site's
    update before the mod clips it."""
    app = ClientApp()

    def train(msg: Message, context: Context) -> Message:
        reply = handle_train(msg, context)
        raw[(str(context.node_config["site-name"]), int(msg.content["config"]["round"]))] = _arrays(reply)
        return reply

    app.train(mods=[dp_clipping_mod])(train)
    app.evaluate()(handle_evaluate)
    return app


def run_dp(tmp: Path, site_folders: dict[str, Path], mode: str, monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    config = fast_config(
        tmp, rounds=2, extra=f'dp = "{mode}"\ndp-clipping-norm = {CLIP}\ndp-noise-multiplier = {NOISE}'
    )
    recorder = Recorder()
    monkeypatch.setattr(federate, "make_strategy", recorder.strategy)
    sent: dict[int, dict[str, np.ndarray]] = {}
    wire: dict[tuple[str, int], dict[str, np.ndarray]] = {}  # what each site sent, copied as it arrived
    raw: dict[tuple[str, int], dict[str, np.ndarray]] = {}

    def on_reply(message: Message, reply: Message) -> None:
        if message.metadata.message_type == "train":
            rnd = int(message.content["config"]["round"])
            sent[rnd] = _arrays(message)
            wire[(str(reply.content["proof"]["site"]), rnd)] = _arrays(reply)

    out = tmp / "out"
    run_config = {"config": str(config), "out-dir": str(out), "resume": False}
    grid = LocalGrid(recording_client(raw), node_configs(site_folders, tmp / "state"), run_config, on_reply=on_reply)
    np.random.seed(1234)  # Flower draws the noise from NumPy's global generator
    federate.run_federation(
        grid, Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=run_config)
    )
    metrics = json.loads((out / "metrics.json").read_text())
    return {"metrics": metrics, "recorder": recorder, "sent": sent, "wire": wire, "raw": raw}


@pytest.fixture(scope="module")
def monkeymodule():
    with pytest.MonkeyPatch.context() as patch:
        yield patch


@pytest.fixture(scope="module", params=["server", "client"])
def dp_run(request, tmp_path_factory, site_folders, monkeymodule) -> tuple[str, dict[str, Any]]:
    mode = request.param
    return mode, run_dp(tmp_path_factory.mktemp(f"dp-{mode}"), site_folders, mode, monkeymodule)


def test_the_run_completes_and_reports_its_privacy_budget(dp_run) -> None:
    _, run = dp_run
    metrics = run["metrics"]
    assert metrics["status"] == "completed", metrics["reason"]
    privacy = metrics["privacy"]
    assert privacy["releases"] == 2 and privacy["delta"] == pytest.approx(1e-5)
    assert 0 < privacy["epsilon"] < float("inf")
    assert sorted(run["recorder"].released) == [1, 2]


def test_every_update_the_aggregator_averages_is_clipped_to_the_norm(dp_run) -> None:
    """The updates reaching FedAvg are the sites' raw updates scaled to norm CLIP, whichever side
    clips: recomputed from the raw updates, not read back from the wrapper."""
    mode, run = dp_run
    recorder = run["recorder"]
    for rnd, given in recorder.inner_in.items():
        base = run["sent"][rnd]
        assert sorted(given) == ["site-a", "site-b", "site-c"]
        for site, reply in given.items():
            raw = _minus(run["raw"][(site, rnd)], base)
            assert _norm(raw) > 2 * CLIP, _norm(raw)  # clipping has work to do: else this test could not fail
            clipped = _minus(reply, base)
            assert _norm(clipped) == pytest.approx(CLIP, rel=1e-5)
            for key in raw:  # the site's own update, scaled: its direction kept
                np.testing.assert_allclose(clipped[key], raw[key] * CLIP / _norm(raw), atol=1e-6)
            # what left the site: clipped in client mode (by the mod), raw in server mode (the server clips)
            sent_up = _norm(_minus(run["wire"][(site, rnd)], base))
            assert sent_up == pytest.approx(CLIP if mode == "client" else _norm(raw), rel=1e-5)


def test_the_noiseless_aggregate_is_the_mean_of_the_clipped_updates(dp_run) -> None:
    _, run = dp_run
    recorder = run["recorder"]
    for rnd, aggregate in recorder.inner_out.items():
        base = run["sent"][rnd]
        mean = {k: np.mean([reply[k] for reply in recorder.inner_in[rnd].values()], axis=0) for k in base}
        for key in base:
            np.testing.assert_allclose(aggregate[key], mean[key], atol=1e-6)  # equal weights (dp-weight)


def test_the_released_aggregate_carries_noise_of_the_configured_scale(dp_run) -> None:
    """Released minus noiseless is Gaussian noise with sd noise-multiplier x clipping-norm / sites:
    checked over all the round's numbers (1,281 a round) within 15 % (the sd's standard error here is
    under 2 %), mean within 5 standard errors of 0."""
    _, run = dp_run
    recorder = run["recorder"]
    noise = np.concatenate(
        [
            np.concatenate([(recorder.released[rnd][k] - recorder.inner_out[rnd][k]).ravel() for k in run["sent"][rnd]])
            for rnd in sorted(recorder.released)
        ]
    )
    expected_sd = NOISE * CLIP / SITES
    assert noise.size >= 2 * 1281
    assert noise.std() == pytest.approx(expected_sd, rel=0.15), (noise.std(), expected_sd)
    assert abs(noise.mean()) < 5 * expected_sd / np.sqrt(noise.size)


def test_the_global_model_is_the_released_noisy_aggregate(dp_run) -> None:
    _, run = dp_run
    model, _ = load_model(run["metrics"]["model"])
    state = model.state_dict()
    released = run["recorder"].released[2]
    for key, value in released.items():
        np.testing.assert_allclose(state[key].numpy().astype(np.float64), value, atol=1e-6)
    noiseless = run["recorder"].inner_out[2]
    assert not np.allclose(state["head.fc.weight"].numpy(), noiseless["head.fc.weight"], atol=1e-4)
