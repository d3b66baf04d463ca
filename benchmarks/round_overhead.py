"""Round overhead of a deployed fedfreeze federation against a plain Flower app, side by side in one run.

Both apps run on the same loopback set-up: one ``fedfreeze server --insecure`` (a Flower SuperLink)
and two ``fedfreeze site --insecure`` processes (Flower SuperNodes with the shipped Kermany subset),
one after the other:

* ``plain``: a minimal Flower app written here (FedAvg from ``flwr.serverapp.strategy``; its
  ClientApp returns the arrays it received), carrying an array of the size fedfreeze sends in a probe
  round (the head, 1,281 float32). It measures Flower's own floor: SuperNode and grid polling
  (3 s each in 1.42), one ``flwr-clientapp`` process started per message, serialisation.
* ``fedfreeze``: fedfreeze's app with the shipped demo config, probe rounds only (head only, on cached
  features) so the payload matches the plain app's, at a small input size.

A round's seconds are measured the same way for both: from the server sending the round's messages
to the aggregate being applied (``RoundRecord.round_seconds``; the plain app times
``configure_train`` .. ``aggregate_train``). Each site reports ``process-seconds`` (since Flower
started its ClientApp process for the message), so fedfreeze's round splits into the plain app's
floor, the ClientApp's start-up (Python, torch and fedfreeze imports, model build, data loading) and
the site's work (scoring + training, ``eval-seconds`` + ``train-seconds``).

    .venv/bin/python benchmarks/round_overhead.py [--rounds 4] [--size 64] [--out benchmarks/results/round-overhead]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import RESULTS, write_run  # noqa: E402

from fedfreeze.deploy import launch  # noqa: E402
from fedfreeze.sample_data import kermany_mini_site  # noqa: E402

SITES = ("site-a", "site-b")
HEAD_FLOATS = 1281  # Lite0's binary head: 1,280 weights + 1 bias
CONNECTION = "bench"

PLAIN_PYPROJECT = """
[build-system]
requires = ["setuptools>=68"]
build-backend = "setuptools.build_meta"

[project]
name = "plainapp"
version = "1.0.0"
dependencies = ["flwr==1.42.0", "numpy"]

[tool.flwr.app]
publisher = "bench"

[tool.flwr.app.components]
serverapp = "plain_server:app"
clientapp = "plain_client:app"

[tool.flwr.app.config]
num-rounds = 3
size = 1281
out = ""
"""

PLAIN_SERVER = '''
"""A plain Flower ServerApp: FedAvg over one float32 array, timing each round."""
import json
import time
from pathlib import Path

import numpy as np
from flwr.app import ArrayRecord, Context
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

app = ServerApp()


class Timed(FedAvg):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.starts, self.rounds = {}, []

    def configure_train(self, server_round, arrays, config, grid):
        self.starts[server_round] = time.perf_counter()
        return super().configure_train(server_round, arrays, config, grid)

    def aggregate_train(self, server_round, replies):
        replies = list(replies)
        out = super().aggregate_train(server_round, replies)
        self.rounds.append({
            "round": server_round,
            "round_seconds": time.perf_counter() - self.starts[server_round],
            "process_seconds": [float(r.content["metrics"]["process-seconds"]) for r in replies if r.has_content()],
        })
        return out


@app.main()
def main(grid: Grid, context: Context) -> None:
    cfg = context.run_config
    strategy = Timed(fraction_train=1.0, fraction_evaluate=0.0, min_available_nodes=2, min_train_nodes=2)
    strategy.start(grid=grid, initial_arrays=ArrayRecord([np.zeros(int(cfg["size"]), np.float32)]),
                   num_rounds=int(cfg["num-rounds"]))
    Path(str(cfg["out"])).write_text(json.dumps(strategy.rounds))
'''

PLAIN_CLIENT = '''
"""A plain Flower ClientApp: returns the arrays it received, with the seconds since its process started."""
import os
import time

from flwr.app import Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

app = ClientApp()


def process_seconds() -> float:
    with open("/proc/self/stat") as handle:
        ticks = int(handle.read().rsplit(") ", 1)[1].split()[19])
    with open("/proc/stat") as handle:
        boot = next(int(line.split()[1]) for line in handle if line.startswith("btime"))
    return time.time() - (boot + ticks / os.sysconf("SC_CLK_TCK"))


@app.train()
def train(msg: Message, context: Context) -> Message:
    metrics = MetricRecord({"num-examples": 1, "process-seconds": process_seconds()})
    return Message(RecordDict({"arrays": msg.content["arrays"], "metrics": metrics}), reply_to=msg)
'''


def write_plain_app(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "pyproject.toml").write_text(PLAIN_PYPROJECT)
    (folder / "plain_server.py").write_text(textwrap.dedent(PLAIN_SERVER))
    (folder / "plain_client.py").write_text(textwrap.dedent(PLAIN_CLIENT))
    return folder


def fedfreeze_config(folder: Path, rounds: int, size: int) -> Path:
    """The shipped demo config, probe rounds only, at ``size`` pixels."""
    path = folder / "overhead.toml"
    path.write_text(
        textwrap.dedent(f"""
        [model]
        input-size = {size}
        [federation]
        rounds = {rounds}
        probe-rounds = {rounds}
        min-sites = 2
        """)
    )
    return path


def fedfreeze_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "fedfreeze", *args]


def run_plain(app: Path, rounds: int, out: Path, env: dict[str, str], log: Path) -> list[dict[str, Any]]:
    cmd = ["flwr", "run", str(app), CONNECTION, "--stream", "--run-config", f"num-rounds={rounds} out='{out}'"]
    launch.show(cmd)
    with log.open("w") as handle:
        subprocess.run(cmd, env=env, stdout=handle, stderr=subprocess.STDOUT, check=False, timeout=1200)
    if not out.exists():
        raise SystemExit(f"the plain app wrote no timings; its log ends:\n{log.read_text()[-3000:]}")
    return json.loads(out.read_text())


def run_fedfreeze(port: int, config: Path, out: Path, env: dict[str, str], log: Path) -> list[dict[str, Any]]:
    cmd = fedfreeze_cmd(
        "run", "--superlink", f"127.0.0.1:{port}", "--insecure", "--config", str(config), "--out", str(out)
    )
    launch.show(cmd)
    with log.open("w") as handle:
        done = subprocess.run(cmd, env=env, stdout=handle, stderr=subprocess.STDOUT, check=False, timeout=1800)
    if done.returncode != 0:
        raise SystemExit(f"fedfreeze run failed ({done.returncode}); its log ends:\n{log.read_text()[-3000:]}")
    metrics = json.loads((out / "metrics.json").read_text())
    rows = []
    for record in metrics["rounds"]:
        sites = record["sites"]
        rows.append(
            {
                "round": record["round"],
                "round_seconds": record["round_seconds"],
                "process_seconds": [s["process_seconds"] for s in sites],
                "work_seconds": [s["train_seconds"] + s["eval_seconds"] for s in sites],
            }
        )
    return rows


def summarise(plain: list[dict[str, Any]], fed: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians over the rounds after the first (the first also waits for the sites and warms caches)."""

    def later(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return rows[1:] if len(rows) > 1 else rows

    p = statistics.median(r["round_seconds"] for r in later(plain))
    f = statistics.median(r["round_seconds"] for r in later(fed))
    work = statistics.median(max(r["work_seconds"]) for r in later(fed))
    startup = statistics.median(max(r["process_seconds"]) - max(r["work_seconds"]) for r in later(fed))
    plain_startup = statistics.median(max(r["process_seconds"]) for r in later(plain))
    return {
        "plain_round_seconds": round(p, 2),
        "fedfreeze_round_seconds": round(f, 2),
        "ratio_round": round(f / p, 2),
        "fedfreeze_site_work_seconds": round(work, 2),
        "fedfreeze_round_minus_work_seconds": round(f - work, 2),
        "ratio_overhead": round((f - work) / p, 2),
        "fedfreeze_clientapp_startup_seconds": round(startup, 2),
        "plain_clientapp_process_seconds": round(plain_startup, 2),
        "fedfreeze_remainder_seconds": round(f - work - startup - p + plain_startup, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--size", type=int, default=64, help="fedfreeze's input size in pixels")
    parser.add_argument("--out", type=Path, default=RESULTS / "round-overhead")
    args = parser.parse_args()
    started = time.time()
    tmp = Path(tempfile.mkdtemp(prefix="ffoverhead-"))
    env = launch.flower_env(tmp / "flwr-home", {"OMP_NUM_THREADS": "1"})
    port = launch.free_port()
    launch.write_flwr_home(Path(env["FLWR_HOME"]), [launch.Connection(CONNECTION, f"127.0.0.1:{port}")])
    logs = tmp / "logs"
    logs.mkdir()
    server = launch.Managed(
        "server",
        fedfreeze_cmd("server", "--insecure", "--port", str(port), "--state-dir", str(tmp / "state")),
        logs / "server.log",
        env,
    ).start()
    sites: list[launch.Managed] = []
    try:
        launch.wait_healthy(f"127.0.0.1:{port}", server)
        for i, site in enumerate(SITES):
            cmd = fedfreeze_cmd(
                "site", "--insecure", "--superlink", f"127.0.0.1:{port}", "--name", site,
                "--data", str(kermany_mini_site(tmp / site, site)), "--state-dir", str(tmp / f"{site}-state"),
                "--port", str(launch.free_port_from(port + 10 + i)), "--threads", "1",
            )  # fmt: skip
            sites.append(launch.Managed(site, cmd, logs / f"{site}.log", env).start())
        launch.wait_sites_online(CONNECTION, env, len(SITES), sites, timeout=90.0)
        plain = run_plain(write_plain_app(tmp / "plainapp"), args.rounds, tmp / "plain.json", env, logs / "plain.log")
        fed = run_fedfreeze(
            port, fedfreeze_config(tmp, args.rounds, args.size), tmp / "fed-out", env, logs / "fedfreeze.log"
        )
    finally:
        for proc in [*sites, server]:
            proc.stop()
    summary = summarise(plain, fed)
    print(json.dumps(summary, indent=1))
    setup = {"rounds": args.rounds, "input_size": args.size, "sites": list(SITES), "payload_floats": HEAD_FLOATS}
    write_run(args.out, {"summary": summary, "plain": plain, "fedfreeze": fed, "setup": setup}, started)
    print(f"wrote {args.out}/results.json and run.json")


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
