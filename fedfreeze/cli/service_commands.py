"""The commands that start the long-running processes: ``server`` (the coordinator) and ``site`` (a
hospital's SuperNode), and ``app-hash`` for a site's list of approved apps. Their log and metrics
options, and ``service``, ``backup``, ``restore``, are added by fedfreeze/deploy/commands.py."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from fedfreeze.cli.options import OUTSIDE_HELP, ShowDefaults, Subcommands, tls_or_insecure

if TYPE_CHECKING:
    from fedfreeze.state.approval import ApprovedApps


def _server(args: argparse.Namespace) -> int:
    from fedfreeze.deploy import launch
    from fedfreeze.errors import ConfigError

    tls_or_insecure(
        args.insecure,
        args.tls_dir,
        "--tls-dir",
        "give --tls-dir DIR (ca.pem, server.pem, server.key from docker/make-certs.sh), "
        "or --insecure for a test on this machine only (no TLS, no site authentication)",
    )
    if args.insecure and args.auth:
        raise ConfigError("--auth needs TLS: give --tls-dir instead of --insecure")
    host = args.host or ("127.0.0.1" if args.insecure else "0.0.0.0")
    if launch.port_busy(args.port, host):
        raise ConfigError(
            f"--port {args.port}: {host}:{args.port} is in use (another coordinator?): stop it, "
            f"or give this one another port, e.g. --port {launch.free_port_from(args.port + 10, host)}"
        )
    state = Path(args.state_dir).resolve()
    state.mkdir(parents=True, exist_ok=True)
    tls = None
    if args.tls_dir:
        for name in ("ca.pem", "server.pem", "server.key"):
            if not (args.tls_dir / name).is_file():
                raise ConfigError(f"--tls-dir {args.tls_dir}: no {name} there (make it with docker/make-certs.sh)")
        tls = launch.TLSFiles(args.tls_dir / "ca.pem", args.tls_dir / "server.pem", args.tls_dir / "server.key")
    cmd = launch.superlink_command(
        host=host,
        port=args.port,
        database=state / "superlink.db",
        tls=tls,
        supernode_auth=tls is not None and args.auth is not False,
        insecure=args.insecure,
    )
    from fedfreeze.deploy import serve

    sink = serve.sink_for(args, "coordinator")
    if args.insecure:
        who = (
            "only processes on this machine"
            if host in ("127.0.0.1", "localhost", "::1")
            else f"anyone who reaches {host}:{args.port}"
        )
        sink.note(
            f"fedfreeze server: --insecure: no TLS (weights and metrics travel in clear text) and no site "
            f"authentication ({who} can join as a site or submit a federation); listening on {host}:{args.port}",
            "WARNING",
        )
    elif args.auth is False:
        sink.note(
            f"fedfreeze server: --no-auth: TLS on, but no site authentication (any site that trusts the CA and "
            f"reaches {host}:{args.port} can join)",
            "WARNING",
        )
    watch = serve.Watch(
        address=serve.loopback(host, args.port),
        ca=tls.ca if tls else None,
        certificates={"server.pem": tls.cert, "ca.pem": tls.ca} if tls and tls.cert else {},
        metrics_port=args.metrics_port,
        metrics_file=args.metrics_file,
    )
    return serve.run_coordinator(cmd, state, sink, watch)


SITE_HINTS = {  # what the SuperNode's own output says -> why a site with exit code 305 could not join
    "Failed to activate SuperNode": (
        "the coordinator refused this site: most likely its public key is not registered there (fix: at the "
        "coordinator run `fedfreeze register {name}.pub --superlink {superlink} --root-cert CA.pem`, the .pub of "
        "the key given here as --auth-key, then start this site again); or the coordinator still counts this "
        "key's node as online from a start less than a minute ago that did not stop cleanly (fix: start it "
        "again in a minute)"
    ),
    "CERTIFICATE_VERIFY_FAILED": (
        "the coordinator's TLS certificate was not signed by --root-cert {root_cert}, or the name in "
        "--superlink {superlink} is not in it: get the federation's ca.pem from the coordinator (check its "
        "fingerprint) or use a name the certificate holds"
    ),
}


def _site(args: argparse.Namespace) -> int:
    from fedfreeze.deploy import launch
    from fedfreeze.errors import ConfigError

    tls_or_insecure(
        args.insecure,
        args.root_cert,
        "--root-cert",
        "give --root-cert CA.pem (the federation's CA certificate, from the coordinator), "
        "or --insecure to join a coordinator started with --insecure (no TLS, no site key)",
    )
    if args.insecure and args.auth_key:
        raise ConfigError("--auth-key needs TLS: give --root-cert instead of --insecure")
    if not args.insecure and not args.auth_key and not args.no_auth:
        raise ConfigError(
            "give --auth-key SITE.key (this site's private key, from docker/make-site-key.sh), or "
            "--no-auth to join a coordinator that does not authenticate sites"
        )
    if launch.port_busy(args.port):
        raise ConfigError(
            f"--port {args.port}: 127.0.0.1:{args.port} is in use, probably by another site on this "
            f"machine; give each site its own port, e.g. --port "
            f"{launch.free_port_from(args.port + 1)}"
        )
    approved = None
    if args.approved_apps is not None:
        from fedfreeze.state.approval import load_approved

        approved = load_approved(args.approved_apps)  # a malformed line stops the site here, naming it
    state = Path(args.state_dir or Path.home() / ".cache" / "fedfreeze" / args.name).resolve()
    node = {"data-path": str(Path(args.data).resolve()), "site-name": args.name, "state-dir": str(state)}
    if args.weights:
        node["weights"] = str(Path(args.weights).resolve())
    if args.allow_outside_paths:
        node["allow-outside-paths"] = True
    if args.threads:
        node["threads"] = args.threads
    if args.share_operating_point:
        node["share-operating-point"] = "true"
    if args.share_site_figures:
        node["share-site-figures"] = "true"
    cmd = launch.supernode_command(
        superlink=args.superlink,
        node_config=node,
        port=args.port,
        root_certificates=args.root_cert,
        auth_key=args.auth_key,
        insecure=args.insecure,
    )
    from fedfreeze.deploy import serve

    sink = serve.sink_for(args, f"site {args.name}")
    if args.insecure:
        sink.note(
            f"fedfreeze site: --insecure: no TLS (this site's model weights and metrics travel to "
            f"{args.superlink} in clear text) and no site key (the coordinator cannot tell this site from any "
            "other)",
            "WARNING",
        )
    state.mkdir(parents=True, exist_ok=True)
    env = serve.guarded_env(state)  # FLWR_HOME in the state folder; Flower's children end with their parent
    if approved is None:
        sink.note(
            "fedfreeze site: warning: no --approved-apps: this site runs whatever app a job submitted to the "
            "coordinator brings (give --approved-apps FILE, the hashes `fedfreeze app-hash` prints, to run "
            "approved releases only)",
            "WARNING",
        )
    else:
        sink.note(_approve_apps_only(args, approved, state, env))
    watch = serve.Watch(
        address=f"127.0.0.1:{args.port}",
        ca=None,
        certificates={"ca.pem": args.root_cert} if args.root_cert else {},
        metrics_port=args.metrics_port,
    )
    outcome = serve.run_site(cmd, env, sink, [SUPERNODE_CONNECTION_ERROR, *SITE_HINTS], watch)
    code, seen = outcome.code, outcome.seen
    error = None
    if code != 0 and SUPERNODE_CONNECTION_ERROR in seen:
        hint = next(
            (SITE_HINTS[m] for m in SITE_HINTS if m in seen),
            "the coordinator at --superlink {superlink} did not answer: is it running, is the address "
            "right, does the firewall let this machine reach it?",
        )
        error = f"site {args.name} could not join (Flower exit code 305): " + hint.format(
            name=args.name, superlink=args.superlink, root_cert=args.root_cert
        )
    elif code < 0 and outcome.stop_signal is None:
        error = f"site {args.name}'s SuperNode ended by signal {-code}"
    if error is not None:
        sink.note(f"fedfreeze site: error: {error}", "ERROR", console=False)
        print(f"fedfreeze site: error: {error}", file=sys.stderr, flush=True)
    return outcome.exit_code()


def _approve_apps_only(args: argparse.Namespace, approved: ApprovedApps, state: Path, env: dict[str, str]) -> str:
    """Put fedfreeze's ClientApp runner first on the SuperNode's ``PATH`` and check that it starts;
    the line that says so (fedfreeze/state/approval.py, fedfreeze/flower/approval.py)."""
    from fedfreeze.state import approval

    runner = approval.write_runner(state / approval.RUNNER_FOLDER, approved.path, args.name)
    env["PATH"] = f"{runner}{os.pathsep}{env['PATH']}"
    approval.check_runner(runner, env)
    return (
        f"fedfreeze site: approved apps only: {len(approved)} app hash(es) in {approved.path} (read again for every "
        f"job); Flower starts each ClientApp through {runner / 'flwr-clientapp'}, which checks the app's hash "
        "before any of its code is unpacked"
    )


def _app_hash(args: argparse.Namespace) -> int:
    from fedfreeze.flower.approval import app_hash

    print(app_hash(args.app).line())
    return 0


# flwr's ExitCode.SUPERNODE_CONNECTION_ERROR, as the SuperNode prints it (the process itself exits 1)
SUPERNODE_CONNECTION_ERROR = "Exit Code: 305"


def add_parsers(sub: Subcommands) -> None:
    """``server``, ``site`` and ``app-hash``, in that order."""
    p = sub.add_parser(
        "server",
        formatter_class=ShowDefaults,
        help="start the coordinator (a Flower SuperLink with safe defaults)",
        description="Start the coordinator: a Flower SuperLink with TLS and site authentication. "
        "Sites, registrations and federations all use its one port. Without --tls-dir "
        "it refuses to start unless told --insecure.",
    )
    p.add_argument(
        "--host",
        default=None,
        help="listen address (default: 0.0.0.0, every interface, with TLS; 127.0.0.1 with --insecure)",
    )
    p.add_argument("--port", type=int, default=9093, help="the one port of sites, registrations and federations")
    p.add_argument(
        "--state-dir",
        default="coordinator-state",
        help="the SuperLink database (registered sites, runs: kept across restarts) and FLWR_HOME "
        "(STATE_DIR/flwr-home: the apps Flower installs for every run; nothing goes to ~/.flwr)",
    )
    p.add_argument(
        "--tls-dir", type=Path, default=None, help="folder with ca.pem, server.pem, server.key (docker/make-certs.sh)"
    )
    p.add_argument(
        "--auth",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="only sites whose public key is registered may join (default: on with TLS); "
        "--no-auth: any site that trusts the CA may join",
    )
    p.add_argument(
        "--insecure",
        action="store_true",
        help="no TLS and no site authentication, listening on 127.0.0.1 unless --host says otherwise: "
        "for a test on one machine",
    )
    p.set_defaults(func=_server)

    p = sub.add_parser(
        "site",
        formatter_class=ShowDefaults,
        help="start a hospital site (a Flower SuperNode with its data)",
        description="Start a hospital site: a Flower SuperNode that connects out to the "
        "coordinator over TLS with this site's key; its data never leaves this machine. "
        "It listens only on 127.0.0.1:PORT (Flower's ClientApp API, for its own "
        "training processes): several sites on one machine need one port each.",
    )
    p.add_argument("--data", required=True, help="the site's data: a folder with manifest.csv, a manifest, .npz")
    p.add_argument("--allow-outside-paths", action="store_true", help=OUTSIDE_HELP)
    p.add_argument("--name", required=True, help="the site's name in reports")
    p.add_argument("--superlink", default="127.0.0.1:9093", help="the coordinator's address, HOST:PORT")
    p.add_argument(
        "--port",
        type=int,
        default=9094,
        help="this SuperNode's local ClientApp API port on 127.0.0.1 (one per site on a machine)",
    )
    p.add_argument(
        "--state-dir",
        default=None,
        help="the site's caches and its FLWR_HOME (STATE_DIR/flwr-home: the apps Flower installs; "
        "nothing goes to ~/.flwr) (default: ~/.cache/fedfreeze/NAME)",
    )
    p.add_argument(
        "--weights",
        default=None,
        help="the site's own copy of the pretrained checkpoint: the only checkpoint file the site opens (a job "
        "whose model.weights names a file is refused without it)",
    )
    p.add_argument(
        "--share-operating-point",
        action="store_true",
        help="send the coordinator the operating point this site fits on its labelled validation patients at the "
        "final evaluation, so the model folder holds it (default: it stays in --state-dir)",
    )
    p.add_argument(
        "--share-site-figures",
        action="store_true",
        help="send the coordinator this site's own exact validation AUROC, balanced accuracy and F1 every round "
        "(with its class totals they fix its confusion counts at the threshold; default: none leaves the site)",
    )
    p.add_argument(
        "--root-cert",
        type=Path,
        default=None,
        help="the federation's CA certificate ca.pem (TLS); required unless --insecure",
    )
    p.add_argument(
        "--auth-key",
        type=Path,
        default=None,
        help="this site's private key (docker/make-site-key.sh); required unless --no-auth or --insecure",
    )
    p.add_argument(
        "--no-auth", action="store_true", help="join without a site key (a coordinator started with --no-auth)"
    )
    p.add_argument(
        "--insecure", action="store_true", help="no TLS and no site key: for a coordinator started with --insecure"
    )
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="CPU threads for training (set it when several sites share one machine)",
    )
    p.add_argument(
        "--approved-apps",
        type=Path,
        default=None,
        metavar="FILE",
        help="run a job's code only if its app's hash is in FILE (one per line, from `fedfreeze app-hash`; "
        "'#' starts a comment; read again for every job); other jobs are refused before any of their code "
        "is unpacked. Without it the site runs any job's code, and says so at start-up",
    )
    p.set_defaults(func=_site)

    p = sub.add_parser(
        "app-hash",
        help="print the hash of a Flower app, for a site's list of approved apps (--approved-apps)",
        description="Print the hash Flower gives this app when `flwr run` (or `fedfreeze run --app`) "
        "submits it: the SHA-256 of the app bundle (FAB) built from the folder, as the run's fab_hash "
        "(`flwr ls --format json`) and as a site checks it. The line printed is a line for a site's "
        "approved-apps file: the hash, then what it is in a comment. The app's code is read, never run.",
    )
    p.add_argument(
        "app",
        nargs="?",
        type=Path,
        default=Path("."),
        help="the app folder (pyproject.toml, server/, client/; default: the current folder), or a .fab file "
        "(e.g. one a site refused and kept)",
    )
    p.set_defaults(func=_app_hash)
