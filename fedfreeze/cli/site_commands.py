"""The commands of one site's own work: ``site-train``, ``evaluate``, ``suggest``, ``adapt``, ``models``."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from fedfreeze.cli.options import FORCE_HELP, OUTSIDE_HELP, Subcommands
from fedfreeze.errors import FedfreezeError


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


def add_parsers(sub: Subcommands) -> None:
    """``site-train``, ``evaluate``, ``suggest`` and ``adapt``, in that order."""
    from fedfreeze.adaptation.threshold_rules import RULES

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


def add_models_parser(sub: Subcommands) -> None:
    """``models``."""
    p = sub.add_parser("models", help="list the backbones with parameters, groups and input size")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_models)
