"""Shift benchmark: which federated recipe (and threshold rule) should be fedfreeze's default, judged
on data no site trained on, against a plain logistic-regression probe on frozen ImageNet features.

Kermany paediatric chest X-rays are split by patient (seeded) into 3 label-skewed training sites
(about 50 %, 12 % and 12 % normal) and a patient-disjoint held-out set that no arm trains or chooses
anything on. Every candidate is scored on the held-out set as is, under 7 deterministic acquisition
shifts (benchmarks/shifts.py), and on NIH adult chest X-rays (another hospital and population,
reported apart). Results: ``benchmarks/results/shift/`` (results.json, table.md, run.json).

    .venv/bin/python benchmarks/shift.py [--quick] [--threads 2] [--work /tmp/fedfreeze-shift-work]

Each arm's scores are cached under ``--work``: run the same command again to continue a stopped run.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from common import git_state, machine, write_run  # noqa: E402

RESULTS = HERE / "results" / "shift"


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes and 2 rounds: checks the harness (~3 min)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    parser.add_argument(
        "--work",
        type=Path,
        default=Path("/tmp/fedfreeze-shift-work"),
        help="work folder: manifests, federations and each arm's cached scores",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help=f"results folder (default {RESULTS.relative_to(HERE.parent)}; --quick: WORK/quick/results)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--bootstrap", type=int, default=None, help="replicates (default 2000; --quick 200)")
    parser.add_argument("--arms", default=None, help="comma-separated arm names (default: every available arm)")
    args = parser.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    import shift_arms
    import shift_report
    from shift_data import FULL, QUICK, load_sets, make_split

    started = time.perf_counter()
    mode = "quick" if args.quick else "full"
    sizes = QUICK if args.quick else FULL
    work = args.work / f"{mode}-seed{args.seed}"
    out = args.out or (work / "results" if args.quick else RESULTS)
    replicates = args.bootstrap or (200 if args.quick else 2000)
    command = "python " + " ".join(
        shlex.quote(a) for a in ["benchmarks/shift.py", *(argv if argv is not None else sys.argv[1:])]
    )

    split = make_split(work, sizes, args.seed)
    log(
        f"split ({mode}): "
        + ", ".join(
            f"{k} {v['images']} images / {v['patients']} patients ({v['normal']} normal)"
            for k, v in [*split["sites"].items(), ("held-out", split["held_out"]), ("NIH", split["nih"])]
        )
    )
    sets = load_sets(work, sizes.input_size, args.seed)
    log(f"{len(sets)} benchmark sets at {sizes.input_size} px: " + ", ".join(s.name for s in sets))
    sites = {name: work / "sites" / name for name in split["sites"]}

    chosen = [a for a in shift_arms.ARMS if args.arms is None or a.name in args.arms.split(",")]
    unavailable = {a.name: why for a in chosen if (why := shift_arms.available(a)) is not None}
    for name, why in unavailable.items():
        log(f"{name}: not available in this checkout ({why})")
    scorer = shift_arms.PrefixScorer(sizes.input_size)
    results: dict[str, Any] = {}
    arm_seconds: dict[str, Any] = {}
    for arm in chosen:
        if arm.name in unavailable:
            continue
        t0 = time.perf_counter()
        results[arm.name] = shift_arms.run_arm(
            arm,
            sizes=sizes,
            seed=args.seed,
            quick=args.quick,
            sites=sites,
            sets=sets,
            work=work,
            scorer=scorer,
            log=log,
        )
        arm_seconds[arm.name] = {"this_invocation": time.perf_counter() - t0, **results[arm.name]["seconds"]}

    log(f"bootstrap ({replicates} replicates) ...")
    figures = shift_report.evaluate(results, sets, replicates=replicates, seed=args.seed)
    wall = time.perf_counter() - started
    info = machine()
    site_text = ", ".join(f"{k} {v['images']} img ({v['normal']} normal)" for k, v in split["sites"].items())
    held, nih = split["held_out"], split["nih"]
    data_line = (
        f"training sites {site_text}; held-out Kermany {held['images']} img / {held['patients']} patients "
        f"({held['normal']} normal); NIH {nih['images']} img / {nih['patients']} patients"
    )

    # a resumed benchmark spans several invocations: each one's wall time and what it trained
    ledger = work / "invocations.json"
    invocations = json.loads(ledger.read_text()) if ledger.is_file() else []
    invocations.append(
        {
            "date": datetime.now(UTC).isoformat(timespec="seconds"),
            "wall_seconds": wall,
            "trained": [a for a, t in arm_seconds.items() if t["this_invocation"] > 1.0],
            "git": git_state(),
        }
    )
    ledger.write_text(json.dumps(invocations, indent=1) + "\n")
    meta = {
        "command": command,
        "input_size": sizes.input_size,
        "data_line": data_line,
        "wall_seconds": sum(i["wall_seconds"] for i in invocations),
        "invocations": len(invocations),
        "arm_seconds": sum(r["seconds"]["train"] + r["seconds"]["score"] for r in results.values()),
        "machine": f"{info['cpu']}, {args.threads} torch threads, no GPU",
        "unavailable": unavailable,
    }
    out.mkdir(parents=True, exist_ok=True)
    results_json = {
        "command": command,
        "mode": mode,
        "input_size": sizes.input_size,
        "split": split,
        "sets": [
            {
                "name": s.name,
                "group": s.group,
                "description": s.description,
                "images": len(s.labels),
                "patients": len(set(s.patient_ids)),
                "positives": int(s.labels.sum()),
            }
            for s in sets
        ],
        "arms_spec": {
            a.name: {
                "description": a.description,
                "kind": a.kind,
                "overrides": dict(a.overrides),
                "config": results.get(a.name, {}).get("config"),
                "rounds": results.get(a.name, {}).get("rounds"),
                "exported": results.get(a.name, {}).get("exported"),
            }
            for a in chosen
        },
        "unavailable": unavailable,
        **figures,
    }
    table = shift_report.markdown(figures, sets, meta)
    (out / "table.md").write_text(table)
    write_run(
        out,
        results_json,
        started,
        command=command,
        extra={
            "threads": args.threads,
            "wall_seconds_all_invocations": sum(i["wall_seconds"] for i in invocations),
            "invocations": invocations,
            "arm_seconds": arm_seconds,
            "arm_seconds_note": "train/score: measured when the arm was trained; "
            "this_invocation: this run (about 0 when cached)",
            "work": str(work),
            "bootstrap_replicates": replicates,
        },
    )
    print(table)
    log(f"wrote {out}/results.json, table.md, run.json ({wall:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
