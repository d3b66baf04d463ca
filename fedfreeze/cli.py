"""The ``fedfreeze`` command line: thin wrappers that parse arguments and call the library."""

from __future__ import annotations

import argparse
import json
import sys
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
    print(f"{'backbone':<20} {'parameters':>12} {'size MB':>8} {'input':>6}  groups")
    for row in rows:
        print(f"{row['name']:<20} {row['parameters']:>12,} {row['size_mb']:>8.2f} {row['input_size']:>6}  "
              f"{' > '.join(row['groups'])}")
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

    p = sub.add_parser("models", help="list the backbones with parameters, groups and input size")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_models)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
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
