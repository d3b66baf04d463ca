"""Secure-metrics benchmark: what the pooled validation figures of a federation users meet are worth
under each release (secure aggregation, cells of k = 3, 5, 10 cases on the fixed grid and on the
coordinator's common grid of pooled quantiles, exact histograms), and what secure aggregation costs.

Accuracy. The scores are real: ``secure_metrics_capture.py`` runs the README demo (3 shipped sites,
Lite0 at 160 px, plus the evaluation-only held-out site) and a 3-site Kermany split at 128 px in
process and keeps every site's validation labels and scores of every round's global model. Each
release is then replayed exactly as a federation makes it: the sites' ``validation_release`` (cells)
or ``statistics_vector`` (their exact statistics, whose sum the coordinator learns under secure
aggregation), pooled by ``Coordinator.pool`` itself, round after round (so the common grid of a round
comes from the previous round's pooled estimate, as in a run). Against the exact figures of the pooled
raw scores (scikit-learn): the error of pooled AUROC and balanced accuracy at the threshold, the width
of the AUROC range the cells allow, the largest round-to-round swing of the printed AUROC, and the
round ``export = "best"`` would pick (with ``best-max-range`` at its default 0.05, and ignoring ranges
as before it existed) with the exact AUROC of the model picked.

Cost. (1) The protocol alone, in process: SecAgg+ for 3 sites on the demo's 400 counts (200 bins x 2
classes), stage by stage through ``LocalGrid`` (keys, Shamir shares, masks, unmasking), seconds and
bytes per round. (2) A loopback deployment of real Flower processes (``fedfreeze server``, three
``fedfreeze site``, ``fedfreeze run``, no TLS: the three extra message exchanges are the cost), the
demo's probe rounds with secure aggregation off, then on: seconds and bytes per round.

    .venv/bin/python benchmarks/secure_metrics.py [--work /tmp/fedfreeze-secure-metrics] [--deployment-rounds 3]

Results: ``benchmarks/results/secure-metrics/`` (results.json, table.md, run.json).
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

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from common import RESULTS, write_run  # noqa: E402
from secure_metrics_capture import CASES, SCORES_FILE, capture  # noqa: E402

OUT = RESULTS / "secure-metrics"
KS = (3, 5, 10)
MAX_RANGE = 0.05  # federation.best-max-range's default


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


# ------------------------------------------------------------------------------------------ accuracy
def sessions_of(scores: list[dict[str, Any]]) -> list[list[dict[str, Any]]]:
    """The captured score sets grouped by session: rounds 1..R, then the final evaluation."""
    keys = sorted({(s["round"], s["final"]) for s in scores}, key=lambda k: (k[1], k[0]))
    return [[s for s in scores if (s["round"], s["final"]) == key] for key in keys]


def exact_figures(group: list[dict[str, Any]], threshold: float) -> dict[str, float]:
    from sklearn.metrics import roc_auc_score

    y = np.concatenate([s["labels"] for s in group]).astype(int)
    p = np.concatenate([s["scores"] for s in group])
    pred = p >= threshold
    return {
        "auroc": float(roc_auc_score(y, p)),
        "balanced_accuracy": float((pred[y == 1].mean() + (~pred[y == 0]).mean()) / 2),
        "n": int(len(y)),
    }


def replay(case: dict[str, Any], mode: str, k: int, grid: str, work: Path) -> list[dict[str, Any]]:
    """Every session of a captured run, released as ``mode`` ("secure", "cells") with ``min-cell-count
    = k`` on ``grid`` and pooled by a real ``Coordinator``; each session's pooled figures."""
    from fedfreeze.federation.config import FedConfig
    from fedfreeze.federation.coordinator import Coordinator
    from fedfreeze.federation.protocol import TRAIN_ROLE
    from fedfreeze.federation.records import Reply, RoundRecord
    from fedfreeze.federation.secure_stats import SECURE, SecureSum, statistics_vector
    from fedfreeze.federation.site_runtime import validation_release

    data = json.loads(json.dumps(case["config"]))
    data["model"]["weights"] = "none"  # the pooling needs the model's shape, not its weights
    data["federation"].update(
        {"min-cell-count": k, "cell-edges": grid, "secure-aggregation": mode == "secure", "out-dir": str(work)}
    )
    cfg = FedConfig.model_validate(data)
    coord = Coordinator(cfg, work)
    out = []
    for number, group in enumerate(sessions_of(case["scores"]), start=1):
        orders = coord.orders(min(number, cfg.federation.rounds))
        replies, vectors = [], []
        for node, s in enumerate(sorted(group, key=lambda s: s["site"]), start=1):
            labels, scores = np.array(s["labels"]), np.array(s["scores"])
            secure = mode == "secure" and s["role"] == TRAIN_ROLE  # the one evaluation-only site: alone, cells
            if secure:
                metrics: dict[str, Any] = {"val-n": len(labels)}
                vectors.append((s["site"], statistics_vector(labels, scores, orders)))
            else:
                metrics = validation_release(labels, scores, orders)
            replies.append(
                Reply(node, s["site"], {}, metrics, "", role=s["role"], release=SECURE if secure else "cells")
            )
        sums = None
        if vectors:
            total = np.sum([v for _, v in vectors], axis=0)
            sums = {TRAIN_ROLE: SecureSum(TRAIN_ROLE, tuple(n for n, _ in vectors), total)}
        record = RoundRecord(round=number, parts=[])
        coord.pool(replies, record, orders, sums)
        train = [s for s in group if s["role"] == TRAIN_ROLE]
        held = [s for s in group if s["role"] != TRAIN_ROLE]
        at = (record.pooled or {})["at_threshold_used"]
        out.append(
            {
                "session": number,
                "threshold": at["threshold"],
                "auroc": at["auroc"],
                "balanced_accuracy": at["balanced_accuracy"],
                "auroc_range": at["ranges"]["auroc"],
                "pooled": record.pooled,
                "exact": exact_figures(train, at["threshold"]),
                "held_out": exact_figures(held, at["threshold"]) if held else None,
            }
        )
    return out


def best_pick(series: list[dict[str, Any]], max_width: float | None) -> int | None:
    """The session export = "best" picks (its model is the one after session - 1; ties to the later),
    among the sessions whose figures are decisive at ``max_width`` (None: every session)."""
    from fedfreeze.federation.estimates import decisive

    usable = [s for s in series if max_width is None or decisive(s["pooled"], max_width)]
    if not usable:
        return None
    return max(usable, key=lambda s: (s["auroc"], s["session"]))["session"]


def summarise(series: list[dict[str, Any]]) -> dict[str, Any]:
    auroc_err = [abs(s["auroc"] - s["exact"]["auroc"]) for s in series]
    ba_err = [abs(s["balanced_accuracy"] - s["exact"]["balanced_accuracy"]) for s in series]
    widths = [s["auroc_range"][1] - s["auroc_range"][0] for s in series]
    later = series[1:]  # from the first aggregated model on (session 1 scores the untrained head)
    swing = max(abs(b["auroc"] - a["auroc"]) for a, b in zip(later, later[1:], strict=False))
    exact_swing = max(abs(b["exact"]["auroc"] - a["exact"]["auroc"]) for a, b in zip(later, later[1:], strict=False))
    exact_of = {s["session"]: s["exact"]["auroc"] for s in series}
    picks = {"best_max_range_0.05": best_pick(series, MAX_RANGE), "ranges_ignored": best_pick(series, None)}
    return {
        "auroc_error_mean": float(np.mean(auroc_err)),
        "auroc_error_max": float(np.max(auroc_err)),
        "balanced_accuracy_error_mean": float(np.mean(ba_err)),
        "balanced_accuracy_error_max": float(np.max(ba_err)),
        "auroc_range_width_mean": float(np.mean(widths)),
        "largest_swing": float(swing),
        "largest_exact_swing": float(exact_swing),
        "widest_range_after_session_1": float(max(widths[1:])),
        "picks": picks,
        "picked_exact_auroc": {name: exact_of.get(p) if p else None for name, p in picks.items()},
        "exact_best_session": max(series, key=lambda s: (s["exact"]["auroc"], s["session"]))["session"],
        "exact_best_auroc": max(exact_of.values()),
    }


def accuracy(work: Path, threads: int) -> dict[str, Any]:
    results: dict[str, Any] = {}
    for name in CASES:
        folder = work / name
        if not (folder / SCORES_FILE).is_file():
            log(f"{name}: running the federation to capture its scores (secure_metrics_capture.py)")
            capture(name, folder, threads)
        case = json.loads((folder / SCORES_FILE).read_text())
        modes = [("secure", 1, "threshold"), ("exact histograms", 1, "threshold")]
        modes += [(f"cells k={k}, {grid}", k, grid) for k in KS for grid in ("threshold", "pooled-quantiles")]
        rows = {}
        for label, k, grid in modes:
            mode = "secure" if label == "secure" else "cells"
            with tempfile.TemporaryDirectory() as tmp:
                series = replay(case, mode, k, grid, Path(tmp))
            rows[label] = {"summary": summarise(series), "series": [{**s, "pooled": None} for s in series]}
            log(f"{name} {label}: {json.dumps(rows[label]['summary'])}")
        first = next(iter(rows.values()))["series"]
        federation, model = case["config"]["federation"], case["config"]["model"]
        setup = {
            "input_size": model["input-size"],
            "backbone": model["backbone"],
            "rounds": federation["rounds"],
            "probe_rounds": federation["probe-rounds"],
            "score_bins": federation["score-bins"],
            "sessions": len(first),
            "validation_images": first[-1]["exact"]["n"],
            "held_out_images": (first[-1]["held_out"] or {}).get("n"),
            "training_sites": len([s for s in case["sites"] if s not in case["evaluation_sites"]]),
        }
        results[name] = {
            "capture_seconds": case["seconds"],
            "sites": list(case["sites"]),
            "setup": setup,
            "modes": rows,
        }
    return results


# ------------------------------------------------------------------------------------------ cost
def protocol_cost(reps: int, bins: int = 200) -> dict[str, Any]:
    """SecAgg+ alone for 3 sites through LocalGrid: seconds (coordinator and sites, one process) and bytes."""
    from flwr.app import ConfigRecord, Context, Message, RecordDict
    from flwr.clientapp import ClientApp

    from fedfreeze.config import ModelConfig, TrainConfig
    from fedfreeze.federation.protocol import CONFIG, SECURE_SUM, RoundOrders
    from fedfreeze.federation.records import RoundRecord
    from fedfreeze.flower import secagg_site
    from fedfreeze.flower.client import handle_secagg_setup, handle_secagg_share_keys, handle_secagg_unmask
    from fedfreeze.flower.local_grid import LocalGrid
    from fedfreeze.flower.secagg_server import SecureRound
    from fedfreeze.flower.server import send_and_receive

    orders = RoundOrders(
        round=1, stage="single", parts=frozenset({"head"}), local_epochs=1, model=ModelConfig(), train=TrainConfig(),
        adapter_groups=(), bn_policy="average", bn_stats="frozen", partial_replies=False, proximal_mu=0.0,
        lr_scale=1.0, val_fraction=0.25, threshold=0.5, score_bins=bins, min_cell_count=5, cell_edges=(),
        secure_aggregation=True, seed=0, dp_weight=False, evaluation_sites=(),
    )  # fmt: skip
    rng = np.random.default_rng(0)
    vectors = {name: rng.integers(0, 3, size=2 * bins) for name in ("site-a", "site-b", "site-c")}

    def round_message(message: Message, context: Context) -> Message:
        part = message.content.config_records[SECURE_SUM]
        masked = secagg_site.mask(part, context, vectors[str(context.node_config["site-name"])])
        return Message(RecordDict({SECURE_SUM: masked}), reply_to=message)

    app = ClientApp()
    app.query("secagg_setup")(handle_secagg_setup)
    app.query("secagg_share_keys")(handle_secagg_share_keys)
    app.query("secagg_unmask")(handle_secagg_unmask)
    app.train()(round_message)
    nodes = {i: {"data-path": "/nowhere", "site-name": n} for i, n in enumerate(vectors, start=1)}
    seconds, summaries = [], []
    for _ in range(reps):
        grid = LocalGrid(app, nodes)
        secure = SecureRound(grid, send_and_receive, orders, "round 1", 60.0, {}, RoundRecord(round=1, parts=[]))
        started = time.perf_counter()
        config = RecordDict({CONFIG: ConfigRecord(orders.to_config())})
        messages = secure.prepare([Message(content=config, message_type="train", dst_node_id=n) for n in nodes])
        got = send_and_receive(grid, messages, timeout=60.0)
        accepted = [node for mid, node in got.sent.items() if not secure.take(node, got.replies[mid][0])]
        sums = secure.finish(accepted)
        seconds.append(time.perf_counter() - started)
        assert np.array_equal(sums["train"].vector, np.sum(list(vectors.values()), axis=0))
        summaries.append(secure.summary())
    return {
        "sites": 3,
        "counts": 2 * bins,
        "reps": reps,
        "seconds_median": statistics.median(seconds),
        "bytes_down": summaries[-1]["bytes_down"] + summaries[-1]["mask_bytes_down"],
        "bytes_up": summaries[-1]["bytes_up"] + summaries[-1]["mask_bytes_up"],
    }


def deployment_cost(rounds: int, size: int) -> dict[str, Any]:
    """Loopback deployment, 3 sites: the demo's probe rounds with secure aggregation off, then on."""
    from fedfreeze.deploy import launch
    from fedfreeze.sample_data import kermany_mini_site

    tmp = Path(tempfile.mkdtemp(prefix="ffsecure-"))
    env = launch.flower_env(tmp / "flwr-home", {"OMP_NUM_THREADS": "1"})
    port = launch.free_port()
    logs = tmp / "logs"
    logs.mkdir()
    fedfreeze = [sys.executable, "-m", "fedfreeze"]
    server = launch.Managed(
        "server", [*fedfreeze, "server", "--insecure", "--port", str(port), "--state-dir", str(tmp / "state")],
        logs / "server.log", env,
    ).start()  # fmt: skip
    sites: list[launch.Managed] = []
    runs: dict[str, Any] = {}
    try:
        launch.wait_healthy(f"127.0.0.1:{port}", server)
        launch.write_flwr_home(Path(env["FLWR_HOME"]), [launch.Connection("bench", f"127.0.0.1:{port}")])
        for i, site in enumerate(("site-a", "site-b", "site-c")):
            cmd = [
                *fedfreeze, "site", "--insecure", "--superlink", f"127.0.0.1:{port}", "--name", site,
                "--data", str(kermany_mini_site(tmp / site, site)), "--state-dir", str(tmp / f"{site}-state"),
                "--port", str(launch.free_port_from(port + 10 + i)), "--threads", "1",
            ]  # fmt: skip
            sites.append(launch.Managed(site, cmd, logs / f"{site}.log", env).start())
        launch.wait_sites_online("bench", env, 3, sites, timeout=120.0)
        for secure in (False, True):
            name = "secure" if secure else "cells"
            config = tmp / f"{name}.toml"
            config.write_text(
                textwrap.dedent(f"""
                [model]
                input-size = {size}
                [federation]
                rounds = {rounds}
                probe-rounds = {rounds}
                min-sites = 3
                secure-aggregation = {"true" if secure else "false"}
                """)
            )
            out = tmp / f"{name}-out"
            cmd = [*fedfreeze, "run", "--superlink", f"127.0.0.1:{port}", "--insecure", "--config", str(config)]
            cmd += ["--out", str(out)]
            log(f"deployment, secure aggregation {'on' if secure else 'off'}: {rounds} rounds")
            with (logs / f"{name}.log").open("w") as handle:
                done = subprocess.run(cmd, env=env, stdout=handle, stderr=subprocess.STDOUT, check=False, timeout=1800)
            if done.returncode != 0:
                raise SystemExit(
                    f"fedfreeze run ({name}) failed; its log ends:\n{(logs / f'{name}.log').read_text()[-3000:]}"
                )
            metrics = json.loads((out / "metrics.json").read_text())
            runs[name] = [
                {
                    "round": r["round"],
                    "round_seconds": r["round_seconds"],
                    "bytes_down": r["bytes_down"] + (r.get("secure_sum") or {}).get("bytes_down", 0),
                    "bytes_up": r["bytes_up"] + (r.get("secure_sum") or {}).get("bytes_up", 0),
                    "secure_sum": r.get("secure_sum"),
                }
                for r in metrics["rounds"]
            ]
    finally:
        for proc in [*sites, server]:
            proc.stop()

    def median(name: str, key: str) -> float:
        rows = runs[name][1:] if len(runs[name]) > 1 else runs[name]  # the first round also waits for the sites
        return float(statistics.median(r[key] for r in rows))

    return {
        "rounds": rounds,
        "input_size": size,
        "sites": 3,
        "round_seconds_off": median("cells", "round_seconds"),
        "round_seconds_on": median("secure", "round_seconds"),
        "bytes_per_round_off": median("cells", "bytes_down") + median("cells", "bytes_up"),
        "bytes_per_round_on": median("secure", "bytes_down") + median("secure", "bytes_up"),
        "runs": runs,
    }


# ------------------------------------------------------------------------------------------ tables
def table(results: dict[str, Any]) -> str:
    lines = [
        "# Pooled validation figures under each release, and the price of secure aggregation",
        "",
        f"Command: `{results['command']}`. Errors against scikit-learn on the pooled raw scores, over every",
        "session of the run (each round's sites scoring the model they received, and the final evaluation);",
        "the largest swing is the printed pooled AUROC's, between consecutive sessions from the first aggregated",
        'model on (the exact figures\' own largest swing beside it); picks: the session whose model export = "best"',
        "would export, with best-max-range = 0.05 (none: no estimate decisive, the last round is exported) and",
        "with ranges ignored, and the exact AUROC of that model.",
        "",
    ]
    for name, case in results["accuracy"].items():
        best = next(iter(case["modes"].values()))["summary"]
        setup = case["setup"]
        lines += [
            f"## {name} (exact best session {best['exact_best_session']}, AUROC {best['exact_best_auroc']:.4f})",
            "",
            f"{setup['training_sites']} training sites, {setup['validation_images']} validation images in all, "
            f"{setup['backbone']} at {setup['input_size']} px, {setup['rounds']} rounds ({setup['probe_rounds']} "
            f"probe), {setup['sessions']} sessions, {setup['score_bins']} score bins.",
            "",
            "| release | AUROC error, mean (max) | balanced accuracy error, mean (max) | AUROC range width, mean | "
            "largest swing (exact's) | pick at 0.05 | pick ignoring ranges |",
            "|---|---|---|---|---|---|---|",
        ]
        for label, row in case["modes"].items():
            s = row["summary"]

            def pick(key: str, s: dict[str, Any] = s) -> str:
                p = s["picks"][key]
                return "none (last)" if p is None else f"{p} ({s['picked_exact_auroc'][key]:.4f})"

            lines.append(
                f"| {label} | {s['auroc_error_mean']:.4f} ({s['auroc_error_max']:.4f}) | "
                f"{s['balanced_accuracy_error_mean']:.4f} ({s['balanced_accuracy_error_max']:.4f}) | "
                f"{s['auroc_range_width_mean']:.3f} | {s['largest_swing']:.3f} ({s['largest_exact_swing']:.3f}) | "
                f"{pick('best_max_range_0.05')} | {pick('ranges_ignored')} |"
            )
        lines.append("")
    cost = results.get("protocol_cost")
    if cost:
        lines += [
            "## The cost of secure aggregation per round",
            "",
            f"Protocol alone, in process ({cost['sites']} sites, {cost['counts']} counts each, median of "
            f"{cost['reps']}): {cost['seconds_median']:.3f} s (keys, Shamir shares, masks, unmasking, all parties "
            f"on one core), {cost['bytes_down']} bytes down and {cost['bytes_up']} bytes up.",
            "",
        ]
    dep = results.get("deployment_cost")
    if dep:
        lines += [
            f"Loopback deployment of Flower processes ({dep['sites']} sites, {dep['rounds']} probe rounds at "
            f"{dep['input_size']} px, median of rounds 2..{dep['rounds']}):",
            "",
            "| | seconds per round | bytes per round (down + up) |",
            "|---|---|---|",
            f"| cells (secure aggregation off) | {dep['round_seconds_off']:.1f} | {dep['bytes_per_round_off']:.0f} |",
            f"| secure aggregation | {dep['round_seconds_on']:.1f} | {dep['bytes_per_round_on']:.0f} |",
            "",
        ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/fedfreeze-secure-metrics"))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--protocol-reps", type=int, default=20)
    parser.add_argument("--deployment-rounds", type=int, default=3, help="0 skips the deployment")
    parser.add_argument("--deployment-size", type=int, default=64)
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    started = time.time()
    results: dict[str, Any] = {"accuracy": accuracy(args.work, args.threads)}
    log("protocol cost")
    results["protocol_cost"] = protocol_cost(args.protocol_reps)
    if args.deployment_rounds:
        results["deployment_cost"] = deployment_cost(args.deployment_rounds, args.deployment_size)
    from common import command_line

    results["command"] = command_line(argv if argv is None else [sys.argv[0], *argv])
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "table.md").write_text(table(results))
    write_run(args.out, results, started)
    print(table(results))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    raise SystemExit(main())
