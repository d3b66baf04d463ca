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
from typing import TYPE_CHECKING

from fedfreeze.errors import FedfreezeError

if TYPE_CHECKING:
    from fedfreeze.deploy.approval import ApprovedApps


def _site_train(args: argparse.Namespace) -> int:
    from fedfreeze.config import load_site_config
    from fedfreeze.site import format_comparison, format_summary, site_train

    cfg = load_site_config(args.config)
    report = site_train(
        cfg,
        args.data,
        args.out,
        split=args.split,
        device=args.device,
        progress=not args.quiet,
        init=args.init,
        force=args.force,
        outside_paths=args.allow_outside_paths,
    )
    folds = len(report["folds"])
    print(
        f"site-train: {report['n_images']} images, {report['n_patients']} patients, {folds} folds "
        f"({report['seconds']:.0f} s)"
    )
    print("cross-validated metrics (mean ± std over folds):")
    print(format_summary(report["summary"]))
    if "comparison" in report:
        print(f"against the --init model {report['init']['model']}, on the same test folds (mean ± std over folds):")
        print(format_comparison(report))
    print(f"metrics: {Path(args.out) / 'metrics.json'}")
    if "model" in report:
        print(f"model:   {report['model']}  (score new data with: fedfreeze evaluate --model {args.out} --data ...)")
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    from fedfreeze.evaluate import evaluate_model, format_text, require_binary_model, single_class_message
    from fedfreeze.outputs import output_folder

    def score() -> dict:
        return evaluate_model(
            args.model,
            args.data,
            split=args.split,
            device=args.device,
            bootstrap=args.bootstrap,
            seed=args.seed,
            allow_single_class=True,
            outside_paths=args.allow_outside_paths,
        )

    written: list[Path] = []
    if args.report is None:
        result = score()
    else:
        from fedfreeze.evaluation.external_report import write_external_report

        require_binary_model(args.model, "--report")
        inputs = {"--model": args.model, "--data": args.data}
        with output_folder(args.report, "--report", force=args.force, inputs=inputs) as report:
            result = score()
            written = [report.final / path.name for path in write_external_report(report.work, result)]
    print(json.dumps(result) if args.json else format_text(result))
    if written and not args.json:
        print(f"report: {', '.join(str(path) for path in written)}")
    if result.get("single_class") is not None:
        print(f"fedfreeze evaluate: error: {single_class_message(result)}", file=sys.stderr)
        return 2
    return 0


def _adapt(args: argparse.Namespace) -> int:
    from fedfreeze.adaptation.adapt import AdaptOptions, adapt_model

    options = AdaptOptions(
        bn=args.bn,
        labels=args.labels,
        prevalence=args.prevalence,
        train_prior=args.train_prior,
        objective=args.objective,
        calibrate=args.calibrate,
        threshold_rule=args.threshold_rule,
        target_sensitivity=args.target_sensitivity,
        replicates=args.bootstrap,
        confidence=args.confidence,
        seed=args.seed,
        split=args.split,
        device=args.device,
        outside_paths=args.allow_outside_paths,
    )
    result = adapt_model(args.model, args.data, args.out, options, progress=not args.quiet, force=args.force)
    print("\n".join(result.lines))
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
        print(
            f"{row['name']:<20} {row['parameters']:>12,} {row['size_bytes']:>12,} {shape:>10} "
            f"{row['num_classes']:>7}  {' > '.join(row['groups'])}"
        )
    return 0


def _print_federation(metrics: dict, out: Path) -> None:
    """The pooled figures of the exported model; every line names the threshold it was computed at
    (AUROC takes none; a multi-class decision is the arg-max)."""
    exported = metrics.get("exported") or {}
    final = exported.get("pooled") or (metrics.get("final") or {}).get("pooled") or {}
    at = final.get("at_threshold_next") or final.get("at_threshold_used") or {}
    mean = (metrics.get("final") or {}).get("weighted_mean") or {}
    print(
        f"\nfederation {metrics['status']}: {metrics['completed_rounds']} rounds, "
        f"uplink {metrics['totals']['bytes_up'] / 1e6:.2f} MB in all, {metrics['totals']['seconds']:.0f} s"
    )
    which = (
        f"the global model after round {exported['round']} ({exported['rule']})"
        if exported
        else "the final global model"
    )
    if at and "threshold" not in at:  # multi-class: pooled confusion matrices, arg-max decisions
        print(f"pooled validation metrics of {which}, n={at['n']}:")
        for key in ("accuracy", "balanced_accuracy", "f1"):
            print(f"  {key:<18} {at[key]:.4f}  (arg-max class, no threshold)")
    elif at:
        rule = str(metrics.get("threshold_rule"))
        if _is_number(rule):  # federation.threshold = a number: set by the config, not fitted to these data
            how = f"its stored threshold {at['threshold']:.3f} is the config's (federation.threshold = {rule})"
        else:
            interval = exported.get("threshold_interval")
            spread = f", bootstrap 95% interval {interval[0]:.3f}-{interval[1]:.3f}" if interval else ""
            how = (
                f"its stored threshold {at['threshold']:.3f} was chosen ({rule}{spread}) on these same "
                "validation data, so the figures at it are optimistic"
            )
        print(f"pooled validation metrics of {which}, n={at['n']}; {how}:")
        ranges = at.get("ranges") or {}  # what the sites' cells fix exactly (federation.min-cell-count)
        for key in ("auroc", "balanced_accuracy", "f1", "sensitivity", "specificity"):
            where = "(over all thresholds)" if key == "auroc" else f"at threshold {at['threshold']:.3f}"
            span = f"  [cells allow {ranges[key][0]:.3f}-{ranges[key][1]:.3f}]" if key in ranges else ""
            print(f"  {key:<18} {at[key]:.4f}  {where}{span}")
        cells = final.get("cells") or {}
        if cells.get("min_cell_count", 1) > 1:
            print(
                f"  (estimated from the sites' cells of at least {cells['min_cell_count']} validation cases each, "
                "federation.min-cell-count: the exact figures lie in the bracketed ranges)"
            )
    if "auroc" in mean:
        print(
            f"  (weighted mean of the sites' own AUROCs, over all thresholds, what other frameworks report: "
            f"{mean['auroc']:.4f})"
        )
    evaluators = (metrics.get("final") or {}).get("evaluation_sites") or {}
    ext = evaluators.get("at_threshold_next") or evaluators.get("at_threshold_used")
    if ext and "auroc" in ext:
        check = metrics.get("held_out_check") or {}
        held = (
            f"held out: {check['how']}"
            if check.get("checked")
            else "not checked to be held out from the training sites' data"
        )
        print(
            f"evaluation-only sites ({', '.join(evaluators['sites'])}; {held}), the final global model, n={ext['n']}:"
        )
        for key in ("auroc", "balanced_accuracy", "sensitivity", "specificity"):
            where = "(over all thresholds)" if key == "auroc" else f"at threshold {ext['threshold']:.3f}"
            print(f"  {key:<18} {ext[key]:.4f}  {where}")
    print(f"report:  {out / 'metrics.json'}, {out / 'rounds.csv'}, {out / 'rounds.png'}")
    print(
        f"model:   {metrics['model']}  (score new data with: fedfreeze evaluate --model {metrics['model']} --data ...)"
    )


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


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
    )
    _print_federation(metrics, Path(args.out))
    return 0


def _server(args: argparse.Namespace) -> int:
    from fedfreeze.deploy import launch
    from fedfreeze.errors import ConfigError

    _tls_or_insecure(
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
    if args.insecure:
        who = (
            "only processes on this machine"
            if host in ("127.0.0.1", "localhost", "::1")
            else f"anyone who reaches {host}:{args.port}"
        )
        print(
            f"fedfreeze server: --insecure: no TLS (weights and metrics travel in clear text) and no site "
            f"authentication ({who} can join as a site or submit a federation); listening on {host}:{args.port}",
            flush=True,
        )
    elif args.auth is False:
        print(
            f"fedfreeze server: --no-auth: TLS on, but no site authentication (any site that trusts the CA and "
            f"reaches {host}:{args.port} can join)",
            flush=True,
        )
    launch.show(cmd, sys.stdout)
    env = launch.flower_env(launch.flwr_home_in(state))  # Flower's installed apps go in the state folder
    os.execvpe(cmd[0], cmd, env)
    return 0  # not reached


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

    _tls_or_insecure(
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
        from fedfreeze.deploy.approval import load_approved

        approved = load_approved(args.approved_apps)  # a malformed line stops the site here, naming it
    state = Path(args.state_dir or Path.home() / ".cache" / "fedfreeze" / args.name).resolve()
    node = {"data-path": str(Path(args.data).resolve()), "site-name": args.name, "state-dir": str(state)}
    if args.weights:
        node["weights"] = str(Path(args.weights).resolve())
    if args.allow_outside_paths:
        node["allow-outside-paths"] = True
    if args.threads:
        node["threads"] = args.threads
    cmd = launch.supernode_command(
        superlink=args.superlink,
        node_config=node,
        port=args.port,
        root_certificates=args.root_cert,
        auth_key=args.auth_key,
        insecure=args.insecure,
    )
    if args.insecure:
        print(
            f"fedfreeze site: --insecure: no TLS (this site's model weights and metrics travel to "
            f"{args.superlink} in clear text) and no site key (the coordinator cannot tell this site from any "
            "other)",
            flush=True,
        )
    state.mkdir(parents=True, exist_ok=True)
    env = launch.flower_env(launch.flwr_home_in(state))  # Flower's installed apps go in the state folder
    if approved is None:
        print(
            "fedfreeze site: warning: no --approved-apps: this site runs whatever app a job submitted to the "
            "coordinator brings (give --approved-apps FILE, the hashes `fedfreeze app-hash` prints, to run "
            "approved releases only)",
            flush=True,
        )
    else:
        print(_approve_apps_only(args, approved, state, env), flush=True)
    launch.show(cmd, sys.stdout)
    code, seen = launch.run_supervised(cmd, env, markers=[SUPERNODE_CONNECTION_ERROR, *SITE_HINTS])
    if code != 0 and SUPERNODE_CONNECTION_ERROR in seen:
        hint = next(
            (SITE_HINTS[m] for m in SITE_HINTS if m in seen),
            "the coordinator at --superlink {superlink} did not answer: is it running, is the address "
            "right, does the firewall let this machine reach it?",
        )
        print(
            f"fedfreeze site: error: site {args.name} could not join (Flower exit code 305): "
            + hint.format(name=args.name, superlink=args.superlink, root_cert=args.root_cert),
            file=sys.stderr,
            flush=True,
        )
    elif code < 0:
        print(
            f"fedfreeze site: error: site {args.name}'s SuperNode ended by signal {-code}", file=sys.stderr, flush=True
        )
        return 128 - code  # the shell's convention
    return code


def _approve_apps_only(args: argparse.Namespace, approved: ApprovedApps, state: Path, env: dict[str, str]) -> str:
    """Put fedfreeze's ClientApp runner first on the SuperNode's ``PATH`` and check that it starts;
    the line that says so (fedfreeze/deploy/approval.py, fedfreeze/flower/approval.py)."""
    from fedfreeze.deploy import approval

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


def _run(args: argparse.Namespace) -> int:
    import json as _json
    import tempfile

    from fedfreeze.deploy import launch
    from fedfreeze.federation.config import resolve_config_path
    from fedfreeze.outputs import check_output, partial_path

    _check_client_tls(args)
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
            launch.require_completed("fedfreeze", run_id, env)
        except launch.LaunchError as err:
            stopped = partial_path(out) / "metrics.json"
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
        _print_federation(metrics, out)
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


def _check_client_tls(args: argparse.Namespace) -> None:
    """An operator's command talks TLS unless told otherwise, like ``fedfreeze server`` and ``site``."""
    _tls_or_insecure(
        args.insecure,
        args.root_cert,
        "--root-cert",
        "give --root-cert CA.pem (the federation's CA certificate), or --insecure for a "
        "coordinator started with --insecure",
    )


def _tls_or_insecure(insecure: bool, given: object, option: str, missing: str) -> None:
    """Exactly one of a TLS option and ``--insecure``: the one rule of server, site and the operator's
    commands (``missing`` says what to give when neither is)."""
    from fedfreeze.errors import ConfigError

    if insecure and given:
        raise ConfigError(f"--insecure and {option} contradict each other: give one of them")
    if not insecure and not given:
        raise ConfigError(missing)


def _flwr_listing(args: argparse.Namespace, flwr_args: list[str]) -> dict:
    """``flwr ARGS fedfreeze --format json`` with a private FLWR_HOME holding only this connection."""
    import tempfile

    from fedfreeze.deploy import launch

    _check_client_tls(args)
    with tempfile.TemporaryDirectory(prefix="fedfreeze-flwr-") as tmp:
        home = launch.write_flwr_home(Path(tmp), [launch.Connection("fedfreeze", args.superlink, args.root_cert)])
        answer = launch.flwr_json([*flwr_args, "fedfreeze"], launch.flower_env(home))
    if not answer.get("success", False):
        message = str(answer.get("error-message", answer)).strip().splitlines()
        raise launch.LaunchError(
            f"`flwr {' '.join(flwr_args)}` at {args.superlink} failed: {message[-1] if message else answer}"
        )
    return answer


def _sites(args: argparse.Namespace) -> int:
    answer = _flwr_listing(args, ["supernode", "ls"])
    if args.json:
        print(json.dumps(answer, indent=1))
        return 0
    nodes = answer.get("nodes", [])
    print(f"{'node id':<22} {'status':<12} since (UTC)")
    for node in nodes:
        status = str(node.get("status", ""))
        since = {
            "online": node.get("online-at"),
            "offline": node.get("offline-at"),
            "unregistered": node.get("deleted-at"),
        }.get(status) or node.get("created-at")
        print(f"{node.get('node-id', ''):<22} {status:<12} {since}")
    online = sum(n.get("status") == "online" for n in nodes)
    registered = sum(n.get("status") != "unregistered" for n in nodes)
    print(
        f"{online} of {registered} registered sites online (Flower's `flwr supernode ls`; Flower 1.42 does not "
        "list the names given at registration: `fedfreeze register` printed each site's node id)"
    )
    return 0


def _runs(args: argparse.Namespace) -> int:
    flwr_args = ["ls"] + (["--run-id", str(args.run_id)] if args.run_id is not None else [])
    answer = _flwr_listing(args, flwr_args)
    if args.json:
        print(json.dumps(answer, indent=1))
        return 0
    runs = sorted(answer.get("runs", []), key=lambda r: str(r.get("pending-at", "")))
    print(f"{'run id':<22} {'status':<22} {'submitted (UTC)':<22} {'elapsed':>9}  details")
    for run in runs:
        elapsed = run.get("elapsed")
        seconds = f"{float(elapsed):.0f} s" if isinstance(elapsed, (int, float)) else str(elapsed or "")
        details = run.get("status-details") or ""
        print(
            f"{run.get('run-id', ''):<22} {run.get('status', ''):<22} {run.get('pending-at', ''):<22} "
            f"{seconds:>9}  {'' if details == 'N/A' else details}"
        )
    print(
        f"{len(runs)} run(s) (Flower's `flwr ls`); finished:failed is a federation that did not complete "
        "(its metrics.json says why)"
    )
    return 0


FORCE_HELP = "replace an existing non-empty --out (the new folder takes its place only when the run has finished)"


OUTSIDE_HELP = (
    "let a manifest name images outside its own folder (absolute paths, ../); by default such a row is refused"
)


class ShowDefaults(argparse.ArgumentDefaultsHelpFormatter):
    """``--help`` shows each option's default, except where there is none to show (None, off flags)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or action.default is False or "(default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedfreeze", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("site-train", help="cross-validate and fine-tune a pretrained CNN on one site's data")
    p.add_argument("--config", type=Path, default=None, help="site.toml (defaults when omitted)")
    p.add_argument("--data", required=True, help="manifest .csv, MedMNIST .npz, or a folder of MNIST IDX files")
    p.add_argument("--allow-outside-paths", action="store_true", help=OUTSIDE_HELP)
    p.add_argument("--out", required=True, type=Path, help="run folder for metrics.json and the model")
    p.add_argument("--force", action="store_true", help=FORCE_HELP)
    p.add_argument("--split", default=None, help="split inside an .npz/IDX source (default: train)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument(
        "--init",
        type=Path,
        default=None,
        metavar="MODEL_DIR",
        help="start every fold and the refit from this model folder (e.g. a federated global model) "
        "and compare the adapted models with it",
    )
    p.set_defaults(func=_site_train)

    p = sub.add_parser("evaluate", help="score a saved model on labelled data it never saw")
    p.add_argument("--model", required=True, type=Path, help="a model folder (model.json + weights.pt)")
    p.add_argument("--data", required=True, help="manifest .csv, MedMNIST .npz, or IDX folder")
    p.add_argument("--allow-outside-paths", action="store_true", help=OUTSIDE_HELP)
    p.add_argument("--split", default=None, help="split inside an .npz/IDX source")
    p.add_argument("--device", default="auto")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument(
        "--report",
        type=Path,
        default=None,
        help="folder for evaluation.json, reliability.png and scores.png (binary models)",
    )
    p.add_argument("--force", action="store_true", help="replace an existing non-empty --report folder")
    p.add_argument(
        "--bootstrap",
        type=int,
        default=1000,
        help="patient-level bootstrap replicates for the 95%% intervals (0: no intervals)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the bootstrap")
    p.set_defaults(func=_evaluate)

    p = sub.add_parser(
        "adapt",
        help="adapt a saved model to a new site's data (which never leaves the site); "
        "writes a new model folder recording what changed",
    )
    p.add_argument("--model", required=True, type=Path, help="the source model folder (model.json + weights.pt)")
    p.add_argument(
        "--data",
        required=True,
        help="the site's images: a manifest .csv (path[,patient_id], label optional), .npz or IDX folder",
    )
    p.add_argument("--allow-outside-paths", action="store_true", help=OUTSIDE_HELP)
    p.add_argument("--out", required=True, type=Path, help="the new model folder")
    p.add_argument("--force", action="store_true", help=FORCE_HELP)
    p.add_argument(
        "--bn",
        choices=("keep", "reestimate"),
        default="keep",
        help="reestimate: every BatchNorm layer's running statistics from the site's images (AdaBN)",
    )
    p.add_argument(
        "--labels",
        choices=("auto", "use", "ignore"),
        default="auto",
        help="auto: use labels when the data has a label column",
    )
    p.add_argument(
        "--prevalence",
        choices=("em", "none"),
        default=None,
        help="without labels: estimate the site's prevalence by EM and shift the scores to it (default em)",
    )
    p.add_argument(
        "--train-prior",
        type=float,
        default=None,
        help="without labels: the prevalence the model's scores are for (default 0.5: fedfreeze trains "
        "with class-balanced sampling, so its scores are for a balanced prior)",
    )
    p.add_argument(
        "--objective",
        choices=("balanced-accuracy", "accuracy"),
        default=None,
        help="without labels: balanced-accuracy keeps every decision (the threshold moves with the "
        "shift); accuracy puts the threshold at 0.5 on the corrected posterior (default "
        "balanced-accuracy)",
    )
    p.add_argument(
        "--calibrate",
        choices=("temperature", "platt", "none"),
        default=None,
        help="with labels: recalibration fitted on them (default temperature)",
    )
    p.add_argument(
        "--threshold-rule",
        choices=("youden", "target-sensitivity"),
        default=None,
        help="with labels: how the threshold is chosen (default youden)",
    )
    p.add_argument(
        "--target-sensitivity", type=float, default=None, help="with --threshold-rule target-sensitivity (default 0.9)"
    )
    p.add_argument("--bootstrap", type=int, default=1000, help="patient-level bootstrap replicates")
    p.add_argument("--confidence", type=float, default=0.95, help="level of the bootstrap intervals")
    p.add_argument("--seed", type=int, default=0, help="seed of the bootstrap")
    p.add_argument("--split", default=None, help="split inside an .npz/IDX source")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=_adapt)

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
        "--evaluation-site",
        action="append",
        metavar="NAME=DATA",
        help="a site that only scores the global model every round (never trains); NAME must be in "
        "the config's federation.evaluation-sites; repeatable",
    )
    p.set_defaults(func=_simulate)

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
            description=f"{what[0].upper()}{what[1:]} (`{flwr}` with a temporary Flower config "
            "holding this one connection).",
        )
        p.add_argument("--superlink", default="127.0.0.1:9093", help="the coordinator's address, HOST:PORT")
        p.add_argument(
            "--root-cert",
            type=Path,
            default=None,
            help="the federation's CA certificate ca.pem (TLS); required unless --insecure",
        )
        p.add_argument("--insecure", action="store_true", help="for a coordinator started with --insecure")
        if command == "runs":
            p.add_argument("--run-id", type=int, default=None, help="only this run")
        p.add_argument("--json", action="store_true", help="print Flower's JSON answer")
        p.set_defaults(func=func)

    p = sub.add_parser("models", help="list the backbones with parameters, groups and input size")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_models)

    p = sub.add_parser(
        "experiment", help="compare named arms on the same repeated patient-level CV folds; paired tests and a report"
    )
    p.add_argument("--config", required=True, type=Path, help="exp.toml: [experiment], shared tables, [arms.NAME]")
    p.add_argument("--out", required=True, type=Path, help="run folder (written aside, published when the report is)")
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue a stopped experiment (its finished folds are kept), or add to a finished one",
    )
    p.add_argument("--force", action="store_true", help=FORCE_HELP)
    p.add_argument("--data", default=None, help="overrides experiment.data")
    p.add_argument("--allow-outside-paths", action="store_true", help=OUTSIDE_HELP)
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--report-only", action="store_true", help="rewrite the report from the finished folds only")
    p.add_argument(
        "--threads", type=int, default=None, help="CPU threads for training (1 is fastest on a busy machine)"
    )
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
    except OSError as err:  # a file the run writes or reads that the system refuses: full disk, permissions
        where = f": {err.filename}" if err.filename else ""
        print(f"fedfreeze {args.command}: error: {err.strerror or err}{where}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
