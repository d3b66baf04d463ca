"""End to end with Flower's own processes, on the shipped real chest X-rays.

- ``fedfreeze simulate``: Flower's simulation runtime (a SuperLink in simulation mode, Ray).
- A loopback deployment: one ``flower-superlink``, two ``flower-supernode`` started through
  ``fedfreeze site`` (each with its own data folder and ``FLWR_HOME``), and ``fedfreeze run``.
- ``fedfreeze run`` fails when the ServerApp fails, although ``flwr run`` itself exits 0.

Every process these tests start carries a private tag in its environment (children inherit it:
``flower-superexec``, ``flwr-serverapp``, ``flwr-clientapp``, Ray's daemons and workers), so the
tests can prove that none is left running, and the teardown kills any that is, by process id
(the helpers are in ``processes.py``, shared with ``test_tls_auth.py``).
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import pytest

from fedfreeze.cli import main
from fedfreeze.deploy import launch
from fedfreeze.model_card import CARD_MARKDOWN
from fedfreeze.model_io import read_card
from fedfreeze.sample_data import kermany_mini
from tests.federation.conftest import read_metrics, small_config
from tests.federation.processes import TAG_VAR, Tracker, check_completed, run_cli, site_folder, wait_online

pytestmark = pytest.mark.process

SMALL_CONFIG = small_config(rounds=3, probe_rounds=2, probe_local_epochs=5, local_epochs=1, unfreeze={"layer4": 0.0})

CONNECTION = "fedfreeze-test"


def evaluate_json(model: Path, capsys: pytest.CaptureFixture[str]) -> dict:
    """``fedfreeze evaluate --json`` on the 100 held-out patients (in this process: no second torch start)."""
    capsys.readouterr()
    assert main(["evaluate", "--model", str(model), "--data", str(kermany_mini("test")), "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def write_config(path: Path) -> Path:
    path.write_text(SMALL_CONFIG)
    return path


def check_uplink(metrics: dict) -> None:
    """Probe rounds send the head only (a few kB), the fine-tuning round also layer4 (MBs)."""
    rounds = metrics["rounds"]
    assert [r["parts"] for r in rounds] == [["head"], ["head"], ["head", "layer4"]]
    assert all(r["bytes_up"] > 0 for r in rounds)
    assert max(rounds[0]["bytes_up"], rounds[1]["bytes_up"]) * 1000 <= rounds[2]["bytes_up"]


# ---------------------------------------------------------------------------------------- simulation
def test_simulation_completes_and_leaves_nothing_running(tracker: Tracker, tmp_path: Path, capsys):
    out = tmp_path / "sim"
    code, log = run_cli(
        ["simulate", "--config", str(write_config(tmp_path / "fed.toml")), "--out", str(out)],
        tracker,
        tmp_path / "logs" / "simulate.log",
    )
    assert code == 0, log[-3000:]

    metrics = json.loads((out / "metrics.json").read_text())
    check_completed(metrics, rounds=3)
    assert len({s["site"] for s in metrics["final"]["sites"]}) == 3  # every simulated site answered
    check_uplink(metrics)

    # Flower's and Ray's processes were seen while it ran (so "none left" is not vacuous) ...
    assert {"flower-superlink", "flower-superexec", "flwr-simulation", "raylet", "gcs_server"} <= tracker.names()
    assert any(name.startswith("ray::") for name in tracker.names())  # Ray's workers (ClientAppActor)
    # ... and none is left once `fedfreeze simulate` has returned
    left = tracker.leftovers()
    assert not left, f"still running after `fedfreeze simulate` returned: {left}"

    result = evaluate_json(out / "model", capsys)
    assert result["n"] == 100
    assert result["auroc"] > 0.75, result  # patients never seen; chance is 0.5

    # the demo's command writes the model card, and its provenance names the app bundle Flower ran
    provenance = read_card(out / "model").provenance
    assert (out / "model" / CARD_MARKDOWN).is_file()
    assert provenance is not None and re.fullmatch(r"[0-9a-f]{64}", provenance.app_hash or ""), provenance
    written = json.loads((out / "sites" / "sites.json").read_text())  # what simulate wrote for each site
    assert {s.site: s.images for s in provenance.sites} == {w["name"]: w["images"] for w in written}


# ---------------------------------------------------------------------------------------- deployment
@dataclass
class Deployment:
    address: str
    link: launch.Managed
    sites: list[launch.Managed]
    tracker: Tracker

    def stop(self) -> None:
        self.tracker.running()  # remember every process, to wait until each has ended and been reaped
        for site in self.sites:
            site.stop()
        self.link.stop()


@pytest.fixture
def deploy(tracker: Tracker, tmp_path: Path) -> Iterator[Callable[[Mapping[str, Path]], Deployment]]:
    """Start a SuperLink and one SuperNode per site (through ``fedfreeze site``); all stopped at teardown."""
    started: list[launch.Managed] = []

    def start(sites: Mapping[str, Path]) -> Deployment:
        port = launch.free_port()
        address = f"127.0.0.1:{port}"
        launch.write_flwr_home(Path(tracker.env["FLWR_HOME"]), [launch.Connection(CONNECTION, address)])
        cmd = launch.superlink_command(port=port, database=tmp_path / "superlink.db", insecure=True)
        link = launch.Managed("superlink", cmd, tmp_path / "logs" / "superlink.log", tracker.env)
        started.append(link.start())
        launch.wait_healthy(address, link)
        nodes = []
        for name, data in sites.items():
            cmd = [
                sys.executable,
                "-m",
                "fedfreeze",
                "site",
                "--data",
                str(data),
                "--name",
                name,
                "--insecure",
                "--superlink",
                address,
                "--port",
                str(launch.free_port()),
                "--state-dir",
                str(tmp_path / "state" / name),
            ]
            # Each site its own FLWR_HOME, as on its own machine. The two sites share this machine's
            # cores: one thread each, as Ray gives each simulated site (with torch's default threads
            # per process, one fine-tuning epoch took 10.3 s instead of 1.2 s here).
            env = tracker.env_with(FLWR_HOME=str(tmp_path / "home" / name), OMP_NUM_THREADS="1")
            nodes.append(launch.Managed(name, cmd, tmp_path / "logs" / f"{name}.log", env).start())
            started.append(nodes[-1])
        wait_online(CONNECTION, tracker.env, len(nodes), [link, *nodes])
        return Deployment(address, link, nodes, tracker)

    try:
        yield start
    finally:
        tracker.running()
        for proc in reversed(started):  # the sites first, then the SuperLink
            proc.stop()


def overhead_rows(metrics: dict) -> list[dict]:
    """Per round: its seconds at the coordinator, the slowest site's training, and the rest (orchestration)."""
    rows = []
    for record in metrics["rounds"]:
        train = max(s["train_seconds"] for s in record["sites"])
        rows.append(
            {
                "round": record["round"],
                "parts": record["parts"],
                "round_seconds": record["round_seconds"],
                "max_site_train_seconds": train,
                "overhead_seconds": record["round_seconds"] - train,
            }
        )
    return rows


def test_loopback_deployment_completes(deploy, tracker: Tracker, tmp_path: Path, capsys):
    dep = deploy(
        {"site-a": site_folder(tmp_path / "site-a", "site-a"), "site-b": site_folder(tmp_path / "site-b", "site-b")}
    )
    out = tmp_path / "fed"
    code, log = run_cli(
        [
            "run",
            "--superlink",
            dep.address,
            "--insecure",
            "--config",
            str(write_config(tmp_path / "fed.toml")),
            "--out",
            str(out),
        ],
        tracker,
        tmp_path / "logs" / "run.log",
    )
    assert code == 0, log[-3000:]

    metrics = json.loads((out / "metrics.json").read_text())
    check_completed(metrics, rounds=3)
    assert sorted(s["site"] for s in metrics["final"]["sites"]) == ["site-a", "site-b"]
    check_uplink(metrics)

    rows = overhead_rows(metrics)
    final = {"round": "final evaluation", "round_seconds": metrics["final"]["round_seconds"]}
    (tmp_path / "overhead.json").write_text(json.dumps({"rounds": rows, "final": final}, indent=1))
    with capsys.disabled():
        print("\nloopback deployment, 2 SuperNodes on one 2-core machine:")
        for row in rows:
            print(
                f"  round {row['round']} ({'+'.join(row['parts'])}): {row['round_seconds']:.1f} s, "
                f"slowest site's training {row['max_site_train_seconds']:.2f} s, "
                f"overhead {row['overhead_seconds']:.1f} s"
            )
        print(f"  final evaluation: {final['round_seconds']:.1f} s  ({tmp_path / 'overhead.json'})")
    assert all(row["overhead_seconds"] > 0 for row in rows)

    result = evaluate_json(Path(metrics["model"]), capsys)
    assert result["n"] == 100
    assert result["auroc"] > 0.75, result  # patients never seen; chance is 0.5

    # every process of the topology was seen, the SuperLink's and the SuperNodes' children too ...
    dep.stop()
    assert {
        "flower-superlink",
        "flower-supernode",
        "flower-superexec",
        "flwr-serverapp",
        "flwr-clientapp",
    } <= tracker.names()
    # ... and none is left once the SuperNodes and the SuperLink are stopped
    left = tracker.leftovers()
    assert not left, f"still running after stopping the SuperLink and the SuperNodes: {left}"


def test_run_fails_when_the_server_app_fails(deploy, tracker: Tracker, tmp_path: Path, monkeypatch, capsys):
    """site-b holds one class only: its reply is an error, 1 valid reply < min-sites = 2, the ServerApp raises.

    ``fedfreeze run`` runs in this process, so a spy on ``launch.submit`` sees what ``flwr run`` itself
    returned for the same run (one run shows both sides of Flower's trap).
    """
    dep = deploy(
        {
            "site-a": site_folder(tmp_path / "site-a", "site-a"),
            "site-b": site_folder(tmp_path / "site-b", "site-b", only_label="1"),
        }
    )
    submit = launch.submit
    flwr_codes = []

    def spy(*args, **kwargs):
        code, run_id = submit(*args, **kwargs)
        flwr_codes.append(code)
        return code, run_id

    monkeypatch.setattr(launch, "submit", spy)
    monkeypatch.setenv(TAG_VAR, tracker.tag)
    out = tmp_path / "fed"
    code = main(
        [
            "run",
            "--superlink",
            dep.address,
            "--insecure",
            "--config",
            str(write_config(tmp_path / "fed.toml")),
            "--out",
            str(out),
            "--flwr-home",
            str(tmp_path / "flwr-cli"),
        ]
    )
    captured = capsys.readouterr()

    assert flwr_codes == [0]  # `flwr run --stream` exits 0 although the ServerApp failed (flwr 1.42) ...
    assert code == 2, captured.err  # ... `fedfreeze run` does not
    assert "finished:failed" in captured.err
    assert "site 'site-b' needs both classes" in captured.out  # the site's error, in the ServerApp's log stream
    assert not out.exists()  # a failed run publishes nothing; its report is in the partial folder
    metrics = read_metrics(out)
    assert metrics["status"] == "failed"
    assert "fewer than min-sites = 2" in metrics["reason"], metrics["reason"]
    assert metrics["model"] is None
