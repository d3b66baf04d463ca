"""The ``fedfreeze`` command line: thin wrappers that parse arguments and call the library."""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
from collections.abc import Sequence
from pathlib import Path

from fedfreeze.errors import FedfreezeError


def _site_train(args: argparse.Namespace) -> int:
    from fedfreeze.config import load_site_config
    from fedfreeze.site import format_summary, site_train

    cfg = load_site_config(args.config)
    report = site_train(cfg, args.data, args.out, split=args.split, device=args.device, progress=not args.quiet)
    folds = len(report["folds"])
    print(f"site-train: {report['n_images']} images, {report['n_patients']} patients, {folds} folds "
          f"({report['seconds']:.0f} s)")
    print("cross-validated metrics (mean ± std over folds):")
    print(format_summary(report["summary"]))
    print(f"metrics: {Path(args.out) / 'metrics.json'}")
    if "model" in report:
        print(f"model:   {report['model']}  (score new data with: fedfreeze evaluate --model {args.out} --data ...)")
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    from fedfreeze.evaluate import evaluate_model

    result = evaluate_model(args.model, args.data, split=args.split, device=args.device)
    if args.json:
        print(json.dumps(result))
    else:
        for key in ("auroc", "balanced_accuracy", "f1", "sensitivity", "specificity", "threshold", "n"):
            if key in result:
                print(f"{key:<18} {result[key]:.4f}" if isinstance(result[key], float) else f"{key:<18} {result[key]}")
    return 0


def _models(args: argparse.Namespace) -> int:
    from fedfreeze.models.listing import describe_backbones

    rows = describe_backbones()
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(f"{'backbone':<20} {'parameters':>12} {'size bytes':>12} {'input':>10} {'classes':>7}  groups")
    for row in rows:
        shape = f"{row['in_channels']}x{row['input_size']}x{row['input_size']}"
        print(f"{row['name']:<20} {row['parameters']:>12,} {row['size_bytes']:>12,} {shape:>10} "
              f"{row['num_classes']:>7}  {' > '.join(row['groups'])}")
    return 0


def _print_federation(metrics: dict, out: Path) -> None:
    final = (metrics.get("final") or {}).get("pooled") or {}
    at = final.get("at_threshold_next") or final.get("at_threshold_used") or {}
    mean = (metrics.get("final") or {}).get("weighted_mean") or {}
    print(f"\nfederation {metrics['status']}: {metrics['completed_rounds']} rounds, "
          f"uplink {metrics['totals']['bytes_up'] / 1e6:.2f} MB in all, {metrics['totals']['seconds']:.0f} s")
    if at and "threshold" not in at:  # multi-class: pooled confusion matrices, arg-max decisions
        print(f"pooled validation metrics of the final global model (arg-max, n={at['n']}):")
        for key in ("accuracy", "balanced_accuracy", "f1"):
            print(f"  {key:<18} {at[key]:.4f}")
    elif at:
        print(f"pooled validation metrics of the final global model (threshold {at['threshold']:.3f}, n={at['n']}):")
        for key in ("auroc", "balanced_accuracy", "f1", "sensitivity", "specificity"):
            print(f"  {key:<18} {at[key]:.4f}")
    if "auroc" in mean:
        print(f"  (weighted mean of the sites' own AUROCs, what other frameworks report: {mean['auroc']:.4f})")
    print(f"report:  {out / 'metrics.json'}, {out / 'rounds.csv'}, {out / 'rounds.png'}")
    print(f"model:   {metrics['model']}  (score new data with: fedfreeze evaluate --model {metrics['model']} --data ...)")


def _simulate(args: argparse.Namespace) -> int:
    from fedfreeze.federation.simulate import simulate

    metrics = simulate(args.config, args.out, data=args.data, sites=args.sites, alpha=args.alpha,
                       resume=args.resume, cpus_per_site=args.cpus_per_site)
    _print_federation(metrics, Path(args.out))
    return 0


def _server(args: argparse.Namespace) -> int:
    from fedfreeze.federation import launch

    state = Path(args.state_dir)
    state.mkdir(parents=True, exist_ok=True)
    tls = launch.TLSFiles(args.tls_dir / "ca.pem", args.tls_dir / "server.pem", args.tls_dir / "server.key") \
        if args.tls_dir else None
    cmd = launch.superlink_command(host=args.host, port=args.port, database=state / "superlink.db", tls=tls,
                                   supernode_auth=args.auth)
    launch.show(cmd, sys.stdout)
    os.execvpe(cmd[0], cmd, launch.flower_env())
    return 0  # not reached


def _site(args: argparse.Namespace) -> int:
    from fedfreeze.federation import launch

    node = {"data-path": str(Path(args.data).resolve()), "site-name": args.name}
    if args.state_dir:
        node["state-dir"] = str(Path(args.state_dir).resolve())
    if args.weights:
        node["weights"] = str(Path(args.weights).resolve())
    if args.threads:
        node["threads"] = args.threads
    cmd = launch.supernode_command(superlink=args.superlink, node_config=node, port=args.port,
                                   root_certificates=args.root_cert, auth_key=args.auth_key)
    launch.show(cmd, sys.stdout)
    os.execvpe(cmd[0], cmd, launch.flower_env())
    return 0  # not reached


def _run(args: argparse.Namespace) -> int:
    import json as _json

    from fedfreeze.federation import launch
    from fedfreeze.federation.config import resolve_config_path

    out = Path(args.out).resolve()
    home = launch.write_flwr_home(Path(args.flwr_home or out / ".flwr-cli"),
                                  [launch.Connection("fedfreeze", args.superlink, args.root_cert)])
    env = launch.flower_env(home)
    run_config = {"out-dir": str(out), "resume": args.resume}
    config = resolve_config_path(args.config)
    if config is not None:
        run_config["config"] = str(config.resolve())
    code, run_id = launch.submit(launch.run_command(connection="fedfreeze", run_config=run_config,
                                                    app_dir=args.app or launch.APP_DIR), env)
    launch.require_completed("fedfreeze", run_id, env)
    metrics_path = out / "metrics.json"
    if metrics_path.is_file():
        metrics = _json.loads(metrics_path.read_text())
        if metrics.get("status") != "completed":
            raise launch.LaunchError(f"the federation {metrics.get('status')}: {metrics.get('reason')}")
        _print_federation(metrics, out)
    else:
        print(f"run {run_id} completed; its outputs are on the coordinator in {out}")
    return 0


def _register(args: argparse.Namespace) -> int:
    import tempfile

    from fedfreeze.federation import launch

    if not args.public_key.is_file():
        raise launch.LaunchError(f"no public key at {args.public_key}")
    name = args.name or args.public_key.name.removesuffix(".pub")
    with tempfile.TemporaryDirectory(prefix="fedfreeze-flwr-") as tmp:
        home = launch.write_flwr_home(Path(args.flwr_home or tmp),
                                      [launch.Connection("fedfreeze", args.superlink, args.root_cert)])
        cmd = launch.register_command(public_key=args.public_key, connection="fedfreeze", name=name)
        launch.show(cmd, sys.stdout)
        node_id = launch.register(cmd, launch.flower_env(home))
    print(f"{name}: registered, node id {node_id}" if node_id else
          f"{name}: this public key is registered already (a key once registered, even if unregistered since, "
          "cannot be registered again: make a new key pair)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedfreeze", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("site-train", help="cross-validate and fine-tune a pretrained CNN on one site's data")
    p.add_argument("--config", type=Path, default=None, help="site.toml (defaults when omitted)")
    p.add_argument("--data", required=True, help="manifest .csv, MedMNIST .npz, or a folder of MNIST IDX files")
    p.add_argument("--out", required=True, type=Path, help="run folder for metrics.json and the model")
    p.add_argument("--split", default=None, help="split inside an .npz/IDX source (default: train)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=_site_train)

    p = sub.add_parser("evaluate", help="score a saved model on labelled data it never saw")
    p.add_argument("--model", required=True, type=Path, help="a model folder (model.json + weights.pt)")
    p.add_argument("--data", required=True, help="manifest .csv, MedMNIST .npz, or IDX folder")
    p.add_argument("--split", default=None, help="split inside an .npz/IDX source")
    p.add_argument("--device", default="auto")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=_evaluate)

    p = sub.add_parser("simulate", help="split a dataset into sites and run the federation in Flower's simulation")
    p.add_argument("--config", default="fed-demo.toml", help="fed.toml (a path, or a config shipped with fedfreeze)")
    p.add_argument("--out", required=True, type=Path, help="output folder: metrics, report, model, site data")
    p.add_argument("--data", default=None, help="dataset to split (default: the shipped Kermany subset)")
    p.add_argument("--sites", type=int, default=None, help="number of sites (default: the manifest's site column)")
    p.add_argument("--alpha", type=float, default=None, help="Dirichlet label skew (default: IID split)")
    p.add_argument("--cpus-per-site", type=int, default=1, help="CPUs Ray gives each simulated site")
    p.add_argument("--resume", action="store_true", help="continue from the output folder's last checkpoint")
    p.set_defaults(func=_simulate)

    p = sub.add_parser("server", help="start the coordinator (a Flower SuperLink with safe defaults)")
    p.add_argument("--host", default="0.0.0.0")
    p.add_argument("--port", type=int, default=9093)
    p.add_argument("--state-dir", default="coordinator-state", help="keeps the SuperLink database across restarts")
    p.add_argument("--tls-dir", type=Path, default=None, help="folder with ca.pem, server.pem, server.key")
    p.add_argument("--auth", action="store_true", help="only registered sites may join (needs TLS)")
    p.set_defaults(func=_server)

    p = sub.add_parser("site", help="start a hospital site (a Flower SuperNode with its data)")
    p.add_argument("--data", required=True, help="the site's data: a folder with manifest.csv, a manifest, .npz")
    p.add_argument("--name", required=True, help="the site's name in reports")
    p.add_argument("--superlink", default="127.0.0.1:9093", help="the coordinator's address")
    p.add_argument("--port", type=int, default=9094, help="this SuperNode's local ClientApp port")
    p.add_argument("--state-dir", default=None, help="the site's caches (default ~/.cache/fedfreeze/NAME)")
    p.add_argument("--weights", default=None, help="the site's own copy of the pretrained checkpoint")
    p.add_argument("--root-cert", type=Path, default=None, help="the coordinator's CA certificate (TLS)")
    p.add_argument("--auth-key", type=Path, default=None, help="this site's private key (SuperNode authentication)")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads for training (set it when several sites share one machine)")
    p.set_defaults(func=_site)

    p = sub.add_parser("run", help="submit a federation to a running coordinator; fails unless it completes")
    p.add_argument("--superlink", default="127.0.0.1:9093")
    p.add_argument("--config", default="fed-demo.toml")
    p.add_argument("--out", required=True, help="output folder on the coordinator")
    p.add_argument("--root-cert", type=Path, default=None)
    p.add_argument("--flwr-home", default=None, help="where to keep the connection config (default OUT/.flwr-cli)")
    p.add_argument("--resume", action="store_true")
    p.add_argument("--app", type=Path, default=None,
                   help="the Flower app folder (pyproject.toml, server/, client/; default: this project's)")
    p.set_defaults(func=_run)

    p = sub.add_parser("register", help="let a site join: register its public key with the coordinator")
    p.add_argument("public_key", type=Path, help="the site's public key (NAME.pub, from docker/make-site-key.sh)")
    p.add_argument("--superlink", default="127.0.0.1:9093")
    p.add_argument("--root-cert", type=Path, required=True, help="the coordinator's CA certificate (TLS)")
    p.add_argument("--name", default=None, help="the site's name (default: the key file's name)")
    p.add_argument("--flwr-home", default=None, help="where to keep the connection config (default: a temporary one)")
    p.set_defaults(func=_register)

    p = sub.add_parser("models", help="list the backbones with parameters, groups and input size")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_models)

    p = sub.add_parser("experiment", help="compare named arms on the same repeated patient-level CV folds; "
                                          "paired tests and a report")
    p.add_argument("--config", required=True, type=Path, help="exp.toml: [experiment], shared tables, [arms.NAME]")
    p.add_argument("--out", required=True, type=Path, help="run folder (run again to continue a stopped experiment)")
    p.add_argument("--data", default=None, help="overrides experiment.data")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--report-only", action="store_true", help="rewrite the report from the finished folds only")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for training (1 is fastest on a busy machine)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=_experiment)
    return parser


def _experiment(args: argparse.Namespace) -> int:
    from fedfreeze.evaluation.cli import run_experiment_command

    return run_experiment_command(args)


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt  # so every `with` block stops the processes it started


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _interrupt)
    try:
        return int(args.func(args))
    except FedfreezeError as err:
        print(f"fedfreeze {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
