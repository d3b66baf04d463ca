"""The commands that run a federation: ``simulate`` here, and ``run``, ``register``, ``sites``, ``runs``
against a running coordinator (``unregister`` is added by fedfreeze/deploy/commands.py)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from fedfreeze.cli.options import FORCE_HELP, OUTSIDE_HELP, ShowDefaults, Subcommands, check_client_tls
from fedfreeze.cli.report import print_federation
from fedfreeze.deploy.commands import connection_options


def _simulate(args: argparse.Namespace) -> int:
    from fedfreeze.deploy.simulate import simulate

    metrics = simulate(
        args.config,
        args.out,
        data=args.data,
        sites=args.sites,
        alpha=args.alpha,
        resume=args.resume,
        force=args.force,
        cpus_per_site=args.cpus_per_site,
        evaluation_sites=args.evaluation_site,
        outside_paths=args.allow_outside_paths,
        share_operating_points=args.share_operating_points,
        share_site_figures=args.share_site_figures,
    )
    print_federation(metrics, Path(args.out))
    return 0


def _run(args: argparse.Namespace) -> int:
    import json as _json
    import tempfile

    from fedfreeze.deploy import launch
    from fedfreeze.federation.config import resolve_config_path
    from fedfreeze.outputs import check_output, partial_path

    check_client_tls(args)
    # the coordinator's ServerApp holds --out and refuses it as this does; checked here first, in case
    # this machine sees the folder too
    out = check_output(args.out, force=args.force, resume=args.resume, resumable=True)
    with tempfile.TemporaryDirectory(prefix="fedfreeze-flwr-") as tmp:
        home = launch.write_flwr_home(
            Path(args.flwr_home or tmp), [launch.Connection("fedfreeze", args.superlink, args.root_cert)]
        )
        env = launch.flower_env(home)
        run_config = {"out-dir": str(out), "resume": args.resume, "force": args.force}
        config = resolve_config_path(args.config)
        if config is not None:
            run_config["config"] = str(config.resolve())
        code, run_id = launch.submit(
            launch.run_command(connection="fedfreeze", run_config=run_config, app_dir=args.app or launch.APP_DIR),
            env,
        )
        try:
            launch.require_completed("fedfreeze", run_id, env, args.superlink)
        except launch.LaunchError as err:
            from fedfreeze.deploy.operator import not_completed

            stopped = partial_path(out) / "metrics.json"
            interrupted = not_completed(partial_path(out), err)
            if interrupted is not err:  # metrics.json says how the coordinator's stop cut it short
                raise launch.LaunchError(f"{interrupted} ({stopped}; --resume continues it)") from None
            if stopped.is_file():
                report = _json.loads(stopped.read_text())
                why = report.get("reason") or f"{report.get('status')} after round {report.get('completed_rounds')}"
                raise launch.LaunchError(f"{err}; {stopped}: {why} (--resume continues it)") from None
            raise
    metrics_path = out / "metrics.json"
    if metrics_path.is_file():
        metrics = _json.loads(metrics_path.read_text())
        if metrics.get("status") != "completed":
            raise launch.LaunchError(f"the federation {metrics.get('status')}: {metrics.get('reason')}")
        print_federation(metrics, out)
    else:
        print(f"run {run_id} completed; its outputs are on the coordinator in {out}")
    return 0


def _register(args: argparse.Namespace) -> int:
    import tempfile

    from fedfreeze.deploy import launch

    if not args.public_key.is_file():
        raise launch.LaunchError(f"no public key at {args.public_key}")
    name = args.name or args.public_key.name.removesuffix(".pub")
    with tempfile.TemporaryDirectory(prefix="fedfreeze-flwr-") as tmp:
        home = launch.write_flwr_home(
            Path(args.flwr_home or tmp), [launch.Connection("fedfreeze", args.superlink, args.root_cert)]
        )
        cmd = launch.register_command(public_key=args.public_key, connection="fedfreeze", name=name)
        launch.show(cmd, sys.stdout)
        node_id = launch.register(cmd, launch.flower_env(home))
    print(
        f"{name}: registered, node id {node_id}"
        if node_id
        else f"{name}: this public key is registered already (a key once registered, even if unregistered since, "
        "cannot be registered again: make a new key pair)"
    )
    return 0


def _sites(args: argparse.Namespace) -> int:
    from fedfreeze.deploy.operator import sites_command

    check_client_tls(args)
    return sites_command(args)


def _runs(args: argparse.Namespace) -> int:
    from fedfreeze.deploy.operator import runs_command

    check_client_tls(args)
    return runs_command(args)


def add_simulate_parser(sub: Subcommands) -> None:
    """``simulate``."""
    p = sub.add_parser("simulate", help="split a dataset into sites and run the federation in Flower's simulation")
    p.add_argument("--config", default="fed-demo.toml", help="fed.toml (a path, or a config shipped with fedfreeze)")
    p.add_argument("--out", required=True, type=Path, help="output folder: metrics, report, model, site data")
    p.add_argument("--data", default=None, help="dataset to split (default: the shipped Kermany subset)")
    p.add_argument("--allow-outside-paths", action="store_true", help=OUTSIDE_HELP)
    p.add_argument("--sites", type=int, default=None, help="number of sites (default: the manifest's site column)")
    p.add_argument("--alpha", type=float, default=None, help="Dirichlet label skew (default: IID split)")
    p.add_argument("--cpus-per-site", type=int, default=1, help="CPUs Ray gives each simulated site")
    p.add_argument("--resume", action="store_true", help="continue from the output folder's last checkpoint")
    p.add_argument("--force", action="store_true", help=FORCE_HELP)
    p.add_argument(
        "--share-operating-points",
        action="store_true",
        help="every simulated site sends the coordinator the operating point it fits at the final evaluation",
    )
    p.add_argument(
        "--share-site-figures",
        action="store_true",
        help="every simulated site sends its own exact validation AUROC, balanced accuracy and F1 every round",
    )
    p.add_argument(
        "--evaluation-site",
        action="append",
        metavar="NAME=DATA",
        help="a site that only scores the global model every round (never trains); NAME must be in "
        "the config's federation.evaluation-sites; repeatable",
    )
    p.set_defaults(func=_simulate)


def add_coordinator_parsers(sub: Subcommands) -> None:
    """``run``, ``register``, ``sites`` and ``runs``, in that order."""
    p = sub.add_parser(
        "run",
        formatter_class=ShowDefaults,
        help="submit a federation to a running coordinator; fails unless it completes",
    )
    p.add_argument("--superlink", default="127.0.0.1:9093", help="the coordinator's address, HOST:PORT")
    p.add_argument("--config", default="fed-demo.toml", help="fed.toml (a path, or a config shipped with fedfreeze)")
    p.add_argument(
        "--out", required=True, help="output folder on the coordinator's machine (metrics.json, report, model)"
    )
    p.add_argument(
        "--root-cert",
        type=Path,
        default=None,
        help="the federation's CA certificate ca.pem (TLS); required unless --insecure",
    )
    p.add_argument("--insecure", action="store_true", help="for a coordinator started with --insecure")
    p.add_argument(
        "--flwr-home",
        default=None,
        help="the Flower CLI's config for this connection (default: a temporary folder; nothing goes to ~/.flwr)",
    )
    p.add_argument("--resume", action="store_true", help="continue from the output folder's last checkpoint")
    p.add_argument("--force", action="store_true", help=FORCE_HELP)
    p.add_argument(
        "--app",
        type=Path,
        default=None,
        help="the Flower app folder (pyproject.toml, server/, client/; default: this project's)",
    )
    p.set_defaults(func=_run)

    p = sub.add_parser(
        "register", formatter_class=ShowDefaults, help="let a site join: register its public key with the coordinator"
    )
    p.add_argument("public_key", type=Path, help="the site's public key (NAME.pub, from docker/make-site-key.sh)")
    p.add_argument("--superlink", default="127.0.0.1:9093", help="the coordinator's address, HOST:PORT")
    p.add_argument("--root-cert", type=Path, required=True, help="the federation's CA certificate ca.pem (TLS)")
    p.add_argument("--name", default=None, help="the site's name (default: the key file's name)")
    p.add_argument("--flwr-home", default=None, help="where to keep the connection config (default: a temporary one)")
    p.set_defaults(func=_register)

    for command, func, flwr, what in (
        (
            "sites",
            _sites,
            "flwr supernode ls",
            "list the sites (SuperNodes) registered with a coordinator: online, offline, unregistered",
        ),
        ("runs", _runs, "flwr ls", "list the federations submitted to a coordinator and their status"),
    ):
        p = sub.add_parser(
            command,
            formatter_class=ShowDefaults,
            help=what,
            description=f"{what[0].upper()}{what[1:]} (Flower's Control API, as `{flwr}` asks it).",
        )
        connection_options(p)
        if command == "runs":
            p.add_argument("--run-id", type=int, default=None, help="only this run")
        p.add_argument("--json", action="store_true", help="print the list as JSON")
        p.set_defaults(func=func)
