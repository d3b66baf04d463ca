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

from fedfreeze import __version__
from fedfreeze.errors import FedfreezeError

if TYPE_CHECKING:
    from fedfreeze.state.approval import ApprovedApps


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
            site=args.site,
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
        site=args.site,
        allow_unverified=args.allow_unverified,
        prevalence=args.prevalence,
        train_prior=args.train_prior,
        objective=args.objective,
        refit=args.refit,
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


def _suggest(args: argparse.Namespace) -> int:
    from fedfreeze.adaptation.suggest import suggest_for_site, write_suggestions

    if args.out.exists() and not args.force:
        raise FedfreezeError(f"--out {args.out} exists; choose another file or --force to replace it")
    picked, data = suggest_for_site(
        args.model, args.data, args.n, seed=args.seed, device=args.device, outside_paths=args.allow_outside_paths
    )
    written = write_suggestions(args.out, picked, data)
    images = sum(len(s.images) for s in picked)
    print(
        f"suggest: {len(picked)} of {len(set(data.patient_ids))} patients ({images} images), one from each of "
        f"{len(picked)} equal strata of the model's scores (seed {args.seed}); scores {picked[0].score:.3f} to "
        f"{picked[-1].score:.3f}"
    )
    print(
        f"wrote {written}: fill in its label column, then: fedfreeze adapt --model {args.model} --data {written} "
        "--labels use --out ..."
    )
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
    (AUROC takes none; a multi-class decision is the arg-max), and an estimate from cells is shown to
    the decimals its range supports."""
    from fedfreeze.federation.estimates import decimals_for
    from fedfreeze.federation.report import rounds_done

    exported = metrics.get("exported") or {}
    final = exported.get("pooled") or (metrics.get("final") or {}).get("pooled") or {}
    at = final.get("at_threshold_next") or final.get("at_threshold_used") or {}
    mean = (metrics.get("final") or {}).get("weighted_mean") or {}
    print(
        f"\nfederation {metrics['status']}: {rounds_done(metrics)}, "
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
        cells = final.get("cells") or {}
        # what the sites' cells fix exactly (federation.min-cell-count); exact counts (a secure sum) need none
        ranges = at.get("ranges") or {} if cells.get("min_cell_count", 1) > 1 else {}
        for key in ("auroc", "balanced_accuracy", "f1", "sensitivity", "specificity"):
            where = "(over all thresholds)" if key == "auroc" else f"at threshold {at['threshold']:.3f}"
            span = f"  [cells allow {ranges[key][0]:.3f}-{ranges[key][1]:.3f}]" if key in ranges else ""
            digits = decimals_for(ranges[key][1] - ranges[key][0] if key in ranges else None)
            print(f"  {key:<18} {at[key]:.{digits}f}  {where}{span}")
        if cells.get("min_cell_count", 1) > 1:
            print(
                f"  (estimated from the sites' cells of at least {cells['min_cell_count']} validation cases each, "
                "federation.min-cell-count: the exact figures lie in the bracketed ranges)"
            )
        elif "secure_sum" in cells:
            print(
                f"  (exact: the coordinator learnt only the sum of the {len(cells['secure_sum']['sites'])} training "
                "sites' validation histograms, federation.secure-aggregation)"
            )
    if "auroc" in mean:
        source = mean.get("from", "")
        print(
            f"  (weighted mean of the sites' own AUROCs{f' ({source})' if source else ''}, over all thresholds, "
            f"what other frameworks report: {mean['auroc']:.{2 if 'cells' in source else 4}f})"
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
        about = evaluators.get("cells") or {}
        spans = ext.get("ranges") or {} if about.get("min_cell_count", 1) > 1 else {}
        for key in ("auroc", "balanced_accuracy", "sensitivity", "specificity"):
            where = "(over all thresholds)" if key == "auroc" else f"at threshold {ext['threshold']:.3f}"
            span = f"  [cells allow {spans[key][0]:.3f}-{spans[key][1]:.3f}]" if key in spans else ""
            digits = decimals_for(spans[key][1] - spans[key][0] if key in spans else None)
            print(f"  {key:<18} {ext[key]:.{digits}f}  {where}{span}")
    if at and "threshold" in at:
        shared = exported.get("operating_points") or []
        print(
            f"threshold in use: the global {at['threshold']:.3f} at every site without its own (not validated there); "
            + (
                f"site operating points in the model folder: {', '.join(shared)} (evaluate --site NAME)"
                if shared
                else "no site shared its operating point (each keeps its own in its state folder)"
            )
        )
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
        share_operating_points=args.share_operating_points,
        share_site_figures=args.share_site_figures,
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


def _sites(args: argparse.Namespace) -> int:
    from fedfreeze.deploy.operator import sites_command

    _check_client_tls(args)
    return sites_command(args)


def _runs(args: argparse.Namespace) -> int:
    from fedfreeze.deploy.operator import runs_command

    _check_client_tls(args)
    return runs_command(args)


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
    from fedfreeze.adaptation.threshold_rules import RULES

    parser = argparse.ArgumentParser(prog="fedfreeze", description=__doc__)
    parser.add_argument("--version", action="version", version=f"fedfreeze {__version__}")
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
    p.add_argument(
        "--site",
        default=None,
        help="score at this site's operating point (default: the folder's own site, set by adapt; a site "
        "without one gets the global threshold and a line saying it was not validated there)",
    )
    p.set_defaults(func=_evaluate)

    p = sub.add_parser(
        "suggest",
        help="list the patients of an unlabelled site whose labels would best set its operating point",
    )
    p.add_argument("--model", required=True, type=Path, help="the model folder the site will run")
    p.add_argument("--data", required=True, help="the site's images: a manifest .csv (path[,patient_id])")
    p.add_argument("--n", type=int, default=30, help="how many patients to label (default 30)")
    p.add_argument("--out", required=True, type=Path, help="the manifest to write, with an empty label column")
    p.add_argument("--force", action="store_true", help="replace --out if it exists")
    p.add_argument("--seed", type=int, default=0, help="which patient of each stratum (the list is fixed per seed)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--allow-outside-paths", action="store_true", help=OUTSIDE_HELP)
    p.set_defaults(func=_suggest)

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
        "--site",
        default=None,
        help="the site's name for its operating point (default: the data's folder, or the manifest's file name)",
    )
    p.add_argument(
        "--allow-unverified",
        action="store_true",
        help="without labels: store a step the label-free check cannot vouch for (flagged in the record) "
        "instead of refusing it",
    )
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
        "--refit",
        choices=("none", "head"),
        default=None,
        help="with labels: head refits the linear head on the labelled patients' features (class-balanced, kept "
        "close to the source head) and runs it at 0.5: for a site whose patients the model ranks poorly "
        "(default none: threshold and calibration only)",
    )
    p.add_argument(
        "--calibrate",
        choices=("temperature", "platt", "none"),
        default=None,
        help="with labels: recalibration fitted on them (default temperature)",
    )
    p.add_argument(
        "--threshold-rule",
        choices=RULES,
        default=None,
        help="with labels: how the site's threshold is chosen (default binormal: the balanced-accuracy "
        "threshold of normal fits to each class's logit scores, sound at small n; target-sensitivity-lcb: "
        "the target holds for a 95%% lower confidence bound)",
    )
    p.add_argument(
        "--target-sensitivity",
        type=float,
        default=None,
        help="with --threshold-rule target-sensitivity or target-sensitivity-lcb (default 0.9)",
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
        p.add_argument("--json", action="store_true", help="print the list as JSON")
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

    # running a federation as a service (fedfreeze/deploy/commands.py): log and metrics options of
    # server and site, runs --state-dir, and the subcommands unregister, service, backup, restore
    from fedfreeze.deploy.commands import add_operations

    add_operations(sub, ShowDefaults, _check_client_tls)
    return parser


def _experiment(args: argparse.Namespace) -> int:
    from fedfreeze.experiment.command import run_experiment_command
    from fedfreeze.flower.inprocess import run_in_process

    return run_experiment_command(args, run_federation=run_in_process)


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
