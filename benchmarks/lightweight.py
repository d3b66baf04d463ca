"""Lightweight CNN (``lwcnn``, 14,154 parameters) with the dual recipe on real MNIST and Fashion-MNIST.

Three measurements (printed, not asserted), on the official train/test splits in ../shared/data:

* ``central``: test accuracy, parameters, bytes, training time and CPU inference latency of
  ``train.recipe = "dual"`` (the dual-input-output stage, the merge, then progressive unfreezing
  from the head back), and of plain training of the same model for the same number of epochs:
  ``plain`` (original images only) and ``plain-aug`` (each batch twice, original and augmented by
  the same pipeline as sub-model B: the same images the dual stage sees, without two sub-models).
* ``federated``: the same recipe over ``--sites`` sites holding a label-skewed (Dirichlet
  ``--alpha``) split of the training set, through the real ServerApp loop and ClientApp with real
  serialised messages (``LocalGrid`` stands in for the SuperLink); test accuracy of the exported
  model, wall time and bytes.
* ``simulate``: ``fedfreeze simulate`` (Flower's simulation runtime on Ray) with 10, 25 and 50
  sites on the same data, wall time per run: how time grows with the number of sites.

    .venv/bin/python benchmarks/lightweight.py central --dataset mnist [--arms dual,plain,plain-aug]
    .venv/bin/python benchmarks/lightweight.py federated --dataset fashion_mnist --sites 10 --alpha 0.5
    .venv/bin/python benchmarks/lightweight.py simulate --sites 10,25,50 --rounds 10 --images 12000

Figures: ``benchmarks/results/lightweight-<what>-<dataset>[-limitN]/`` (``results.json``: the
setup and each arm's / run's figures, accuracies also in percent; ``run.json``: command, commit,
machine, wall time); ``--results DIR`` chooses another folder, ``--results ''`` writes none.

The machine's load (``/proc/loadavg``) is printed with every timing: on a shared machine timings
move with it. ``--threads`` (default 1) sets torch's intra-op threads: on 2 cores shared with other
work, a second OpenMP thread waiting for a descheduled partner made training several times slower.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import RESULTS, SHARED, write_run

CONFIGS = Path(__file__).resolve().parents[1] / "fedfreeze" / "configs"
SITE_CONFIG = {"mnist": CONFIGS / "lightweight-mnist.toml", "fashion_mnist": CONFIGS / "lightweight-fashion.toml"}
FED_CONFIG = CONFIGS / "lightweight-fed.toml"
# federation settings the ``federated`` command line may override (``--dual-rounds 34`` -> federation.dual-rounds)
FED_OVERRIDES = (
    "rounds",
    "dual-rounds",
    "probe-rounds",
    "local-epochs",
    "dual-local-epochs",
    "strategy",
    "proximal-mu",
    "server-lr",
    "server-momentum",
)


def load() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def dataset(name: str, split: str):
    from fedfreeze.data import load_image_set

    folder = SHARED / name
    if not folder.is_dir():
        raise SystemExit(f"benchmark data not found: {folder} (set FEDFREEZE_SHARED_DATA)")
    return load_image_set(folder, split=split, image_size=28, channels=1, num_classes=10, progress=False)


def accuracy(model, data) -> float:
    import torch

    from fedfreeze.training.engine import predict_scores

    scores = predict_scores(model, data.images, torch.device("cpu"), batch_size=1000)
    return float((scores.argmax(1) == data.labels.numpy()).mean())


def latency(model, data, batch: int, repeats: int = 3) -> float:
    """Milliseconds per image of the model's forward pass in eval mode (best of ``repeats``)."""
    import torch

    from fedfreeze.training.engine import to_unit

    model.eval()
    count = min(len(data), 2000 if batch > 1 else 300)
    x = to_unit(data.images[:count], torch.device("cpu"))
    best = float("inf")
    with torch.no_grad():
        model(x[:batch])
        for _ in range(repeats):
            start = time.perf_counter()
            for i in range(0, count, batch):
                model(x[i : i + batch])
            best = min(best, (time.perf_counter() - start) / count)
    return best * 1000


def model_bytes(model) -> tuple[int, int]:
    """Bytes of the state dict's tensors, and of the saved ``weights.pt``."""
    import torch

    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "weights.pt"
        torch.save(state, path)
        return sum(t.numel() * t.element_size() for t in state.values()), path.stat().st_size


# ---------------------------------------------------------------------------------------- central
def train_plain(model, images, labels, cfg, *, epochs: int, augmented: bool, rng, device):
    """Plain training of the single-input model from scratch: every layer, one AdamW + one-cycle at
    ``train.dual.lr`` (as the dual stage), original batches, or original and augmented ones together."""
    import torch

    from fedfreeze.training.dual import augment_settings
    from fedfreeze.training.dual_augment import augment_dual
    from fedfreeze.training.engine import loss_fn, targets_for, to_unit
    from fedfreeze.training.freezing import apply_parts

    model.update_bn_stats = True
    apply_parts(model, model.parts)
    model.to(device).train()
    settings = augment_settings(cfg.dual)
    n, batch = len(labels), cfg.batch_size
    steps = n // batch
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.dual.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.dual.lr,
    )
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer,
        max_lr=cfg.dual.lr,
        total_steps=steps * epochs,
        pct_start=0.3,
        anneal_strategy="cos",
        cycle_momentum=False,
    )
    targets_all = targets_for(labels, model.num_classes)
    for epoch in range(epochs):
        start, losses = time.perf_counter(), []
        order = rng.permutation(n)
        for step in range(steps):
            idx = torch.from_numpy(order[step * batch : (step + 1) * batch])
            x, y = to_unit(images[idx], device), targets_all[idx]
            if augmented:
                x, y = torch.cat([x, augment_dual(x, rng, settings)]), torch.cat([y, y])
            loss = loss_fn(model(x), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            losses.append(loss.item())
        print(
            f"    epoch {epoch}: loss {np.mean(losses):.4f}, {time.perf_counter() - start:.0f} s (load {load()})",
            flush=True,
        )


def run_central(args: argparse.Namespace) -> dict:
    import torch

    from fedfreeze.config import load_site_config
    from fedfreeze.models.dual import build_dual
    from fedfreeze.models.registry import build_model
    from fedfreeze.training.dual import fit_dual

    cfg = load_site_config(args.config or SITE_CONFIG[args.dataset])
    if args.dual_epochs is not None:
        cfg.train.dual.epochs = args.dual_epochs
    if args.epochs is not None:
        cfg.train.epochs = args.epochs
    train, test = dataset(args.dataset, "train"), dataset(args.dataset, "test")
    if args.limit:
        train = train.subset(np.arange(args.limit))
    total_epochs = cfg.train.dual.epochs + cfg.train.probe_epochs + cfg.train.epochs
    print(
        f"{args.dataset}: {len(train)} training and {len(test)} test images; dual {cfg.train.dual.epochs} + "
        f"probe {cfg.train.probe_epochs} + fine-tuning {cfg.train.epochs} epochs; plain arms {total_epochs} epochs; "
        f"{torch.get_num_threads()} thread(s)",
        flush=True,
    )
    device = torch.device("cpu")
    results = {}
    for arm in args.arms.split(","):
        torch.manual_seed(args.seed)
        rng = np.random.default_rng(args.seed)
        print(f"  {arm} (load {load()})", flush=True)
        started = time.perf_counter()
        if arm == "dual":

            def show(log) -> None:
                print(
                    f"    epoch {log.epoch} [{getattr(log, 'stage', '')}] {'+'.join(log.parts)}: loss {log.loss:.4f}, "
                    f"{log.seconds:.0f} s (load {load()})",
                    flush=True,
                )

            model, _ = fit_dual(
                build_dual(cfg.model), train.images, train.labels, cfg.train, rng=rng, device=device, on_epoch=show
            )
        elif arm in ("plain", "plain-aug"):
            model, _ = build_model(cfg.model)
            train_plain(
                model,
                train.images,
                train.labels,
                cfg.train,
                epochs=total_epochs,
                augmented=arm == "plain-aug",
                rng=rng,
                device=device,
            )
        else:
            raise SystemExit(f"unknown arm {arm!r}: dual, plain or plain-aug")
        seconds = time.perf_counter() - started
        state_bytes, file_bytes = model_bytes(model)
        results[arm] = {
            "test_accuracy": accuracy(model, test),
            "n_train": len(train),
            "n_test": len(test),
            "parameters": sum(p.numel() for p in model.parameters()),
            "state_bytes": state_bytes,
            "weights_file_bytes": file_bytes,
            "train_seconds": seconds,
            "epochs": total_epochs,
            "stage_epochs": {
                "dual": cfg.train.dual.epochs if arm == "dual" else 0,
                "probe": cfg.train.probe_epochs if arm == "dual" else 0,
                "fine_tuning": cfg.train.epochs if arm == "dual" else total_epochs,
            },
            "latency_ms_batch1": latency(model, test, 1),
            "latency_ms_batch256": latency(model, test, 256),
            "load_after": load(),
        }
        results[arm]["test_accuracy_percent"] = 100 * results[arm]["test_accuracy"]
        print(f"  {arm}: {json.dumps(results[arm])}", flush=True)
    print(f"\n{args.dataset} test accuracy ({len(test)} images), {torch.get_num_threads()} thread(s):")
    print(
        f"{'arm':<10} {'accuracy':>9} {'params':>7} {'bytes':>7} {'file':>7} {'train s':>8} "
        f"{'ms/img b1':>10} {'ms/img b256':>12}"
    )
    for arm, r in results.items():
        print(
            f"{arm:<10} {r['test_accuracy']:>9.4f} {r['parameters']:>7,} {r['state_bytes']:>7,} "
            f"{r['weights_file_bytes']:>7,} {r['train_seconds']:>8.0f} {r['latency_ms_batch1']:>10.3f} "
            f"{r['latency_ms_batch256']:>12.4f}"
        )
    if "dual" in results:
        for arm in ("plain", "plain-aug"):
            if arm in results:
                delta = results["dual"]["test_accuracy"] - results[arm]["test_accuracy"]
                print(f"dual stage vs {arm} (same model, {total_epochs} epochs): {100 * delta:+.2f} points")
                results["dual"][f"points_vs_{arm}"] = 100 * delta
    return results


# -------------------------------------------------------------------------------------- federated
def run_federated(args: argparse.Namespace) -> dict:
    import torch
    from flwr.app import Context, RecordDict

    from client.app import app as client_app
    from fedfreeze.data.partition import assign_sites, write_sites
    from fedfreeze.evaluate import evaluate_model
    from fedfreeze.flower.federate import run_federation
    from fedfreeze.flower.local_grid import LocalGrid

    root = args.out or Path(tempfile.mkdtemp(prefix="lightweight-fed-"))
    train = dataset(args.dataset, "train")
    if args.limit:
        train = train.subset(np.arange(args.limit))
    index = assign_sites(train.labels.numpy(), train.patient_ids, args.sites, alpha=args.alpha, seed=args.seed)
    summary = write_sites(train, index, root / "sites", as_manifest=False)
    for site in summary:
        print(f"  {site['site']}: {site['images']} images, class counts {site['class_counts']}")
    nodes = {
        i + 1: {
            "data-path": str(root / "sites" / f"site-{i}" / "data"),
            "site-name": f"site-{i}",
            "state-dir": str(root / "state" / f"site-{i}"),
        }
        for i in range(args.sites)
    }
    run_config = {"config": str(args.config or FED_CONFIG), "out-dir": str(root / "out"), "resume": args.resume}
    for key in FED_OVERRIDES:
        value = getattr(args, key.replace("-", "_"))
        if value is not None:
            run_config[f"federation.{key}"] = value
    run_config["federation.min-sites"] = args.sites
    print(
        f"{args.dataset}: {args.sites} sites, Dirichlet alpha {args.alpha}, config {run_config['config']}, "
        f"{torch.get_num_threads()} thread(s), load {load()}",
        flush=True,
    )
    started = time.perf_counter()
    run_federation(
        LocalGrid(client_app, nodes, run_config),
        Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=run_config),
    )
    seconds = time.perf_counter() - started
    metrics = json.loads((root / "out" / "metrics.json").read_text())
    val_by_round = []
    for r in metrics["rounds"]:
        pooled = r["pooled"]["at_threshold_used"]
        val_by_round.append({"round": r["round"], "parts": r["parts"], "val_accuracy_before": pooled["accuracy"]})
        print(
            f"  round {r['round']} {'+'.join(r['parts'])}: pooled val accuracy of the model before it "
            f"{pooled['accuracy']:.4f}, down {r['bytes_down']:,} B, up {r['bytes_up']:,} B, {r['round_seconds']:.0f} s"
        )
    result = evaluate_model(metrics["model"], SHARED / args.dataset, split="test")
    out = {
        "test_accuracy": result["accuracy"],
        "test_accuracy_percent": 100 * result["accuracy"],
        "balanced_accuracy": result["balanced_accuracy"],
        "rounds": metrics["completed_rounds"],
        "wall_seconds": seconds,
        "bytes_down": sum(r["bytes_down"] for r in metrics["rounds"]),
        "bytes_up": sum(r["bytes_up"] for r in metrics["rounds"]),
        "mb_up": sum(r["bytes_up"] for r in metrics["rounds"]) / 1e6,
        "val_by_round": val_by_round,
        "load_after": load(),
        "out": str(root),
    }
    print(f"{args.dataset}, {args.sites} sites (alpha {args.alpha}): {json.dumps(out)}")
    return out


# --------------------------------------------------------------------------------------- simulate
def run_simulate(args: argparse.Namespace) -> dict:
    from fedfreeze.evaluate import evaluate_model

    root = args.out or Path(tempfile.mkdtemp(prefix="lightweight-sim-"))
    root.mkdir(parents=True, exist_ok=True)
    train = dataset(args.dataset, "train")
    rows = np.random.default_rng(args.seed).permutation(len(train))[: args.images]
    data = root / f"{args.dataset}-{args.images}.npz"
    np.savez_compressed(data, train_images=train.images[rows, 0].numpy(), train_labels=train.labels[rows].numpy())
    text = (args.config or FED_CONFIG).read_text()
    overrides = {"rounds": args.rounds, "dual-rounds": args.dual_rounds, "probe-rounds": args.probe_rounds}
    results = {}
    for sites in [int(s) for s in args.sites_list.split(",")]:
        out = root / f"sites-{sites}"
        config_text = text
        # every site keeps a tenth of its images (at least one per class) for the pooled validation figures
        fixed = {"min-sites": sites, "val-fraction": args.val_fraction}
        for key, value in {**{k: v for k, v in overrides.items() if v is not None}, **fixed}.items():
            config_text = _set_federation_key(config_text, key, value)
        config = root / f"fed-{sites}.toml"
        config.write_text(config_text)
        cmd = [
            sys.executable,
            "-m",
            "fedfreeze",
            "simulate",
            "--config",
            str(config),
            "--out",
            str(out),
            "--data",
            str(data),
            "--sites",
            str(sites),
            "--cpus-per-site",
            str(args.cpus_per_site),
        ]
        if args.alpha is not None:
            cmd += ["--alpha", str(args.alpha)]
        print(f"$ {' '.join(cmd)}   (load {load()})", flush=True)
        started = time.perf_counter()
        proc = subprocess.run(cmd, check=False, capture_output=True, text=True)
        seconds = time.perf_counter() - started
        (root / f"sites-{sites}.log").write_text(proc.stdout + proc.stderr)
        if proc.returncode != 0:
            print(proc.stdout[-3000:], proc.stderr[-3000:])
            raise SystemExit(f"fedfreeze simulate with {sites} sites failed (exit {proc.returncode})")
        metrics = json.loads((out / "metrics.json").read_text())
        test = evaluate_model(metrics["model"], SHARED / args.dataset, split="test")
        rounds = metrics["rounds"]
        results[sites] = {
            "wall_seconds": seconds,
            "federation_seconds": metrics["totals"]["seconds"],
            "first_round_seconds": rounds[0]["round_seconds"],
            "later_round_seconds": float(np.mean([r["round_seconds"] for r in rounds[1:]])),
            "site_train_seconds": float(np.mean([s.get("train_seconds", 0.0) for r in rounds for s in r["sites"]])),
            "test_accuracy": test["accuracy"],
            "test_accuracy_percent": 100 * test["accuracy"],
            "images": args.images,
            "images_per_site": args.images / sites,
            "load_after": load(),
        }
        print(f"  {sites} sites: {json.dumps(results[sites])}", flush=True)
    print(
        f"\nfedfreeze simulate, {args.images} {args.dataset} training images split over N sites, {args.rounds} rounds:"
    )
    print(f"{'sites':>5} {'wall s':>7} {'fed s':>6} {'round 1 s':>9} {'later round s':>13} {'test acc':>8}")
    for sites, r in results.items():
        print(
            f"{sites:>5} {r['wall_seconds']:>7.0f} {r['federation_seconds']:>6.0f} {r['first_round_seconds']:>9.1f} "
            f"{r['later_round_seconds']:>13.1f} {r['test_accuracy']:>8.4f}"
        )
    return results


def _set_federation_key(text: str, key: str, value: object) -> str:
    """Set ``key = value`` in the ``[federation]`` table of a TOML text (replacing a line that sets it)."""
    lines = text.splitlines()
    start = lines.index("[federation]")
    end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("[")), len(lines))
    for i in range(start + 1, end):
        if lines[i].split("=")[0].strip() == key:
            lines[i] = f"{key} = {value}"
            return "\n".join(lines) + "\n"
    lines.insert(start + 1, f"{key} = {value}")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="what", required=True)
    for name in ("central", "federated", "simulate"):
        p = sub.add_parser(name)
        p.add_argument("--dataset", default="mnist", choices=["mnist", "fashion_mnist"])
        p.add_argument("--config", type=Path, default=None)
        p.add_argument("--threads", type=int, default=1)
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--out", type=Path, default=None)
        p.add_argument("--json", type=Path, default=None, help="write the results here too")
        p.add_argument("--results", default=None, help="results folder ('' : not written)")
    central = sub.choices["central"]
    central.add_argument("--arms", default="dual,plain,plain-aug")
    central.add_argument("--dual-epochs", type=int, default=None)
    central.add_argument("--epochs", type=int, default=None, help="fine-tuning epochs after the probe")
    for name in ("central", "federated"):
        sub.choices[name].add_argument("--limit", type=int, default=None, help="first N training images only")
    for name in ("federated", "simulate"):
        p = sub.choices[name]
        p.add_argument("--rounds", type=int, default=None)
        p.add_argument("--dual-rounds", type=int, default=None)
        p.add_argument("--probe-rounds", type=int, default=None)
    fed = sub.choices["federated"]
    fed.add_argument("--sites", type=int, default=10)
    fed.add_argument("--alpha", type=float, default=0.5)
    fed.add_argument("--resume", action="store_true")
    fed.add_argument("--local-epochs", type=int, default=None, help="fine-tuning rounds' local epochs")
    fed.add_argument("--dual-local-epochs", type=int, default=None)
    fed.add_argument("--strategy", default=None, help="federation.strategy (e.g. fedprox)")
    fed.add_argument("--proximal-mu", type=float, default=None)
    fed.add_argument("--server-lr", type=float, default=None, help="fedavgm")
    fed.add_argument("--server-momentum", type=float, default=None, help="fedavgm")
    sim = sub.choices["simulate"]
    sim.add_argument("--sites", dest="sites_list", default="10,25,50")
    sim.add_argument(
        "--alpha",
        type=float,
        default=None,
        help="default: IID (50 sites leave too few digits of a class per site for a Dirichlet split)",
    )
    sim.add_argument("--images", type=int, default=12000)
    sim.add_argument("--val-fraction", type=float, default=0.1)
    sim.add_argument("--cpus-per-site", type=int, default=1)
    args = parser.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    started = time.perf_counter()
    load_before = load()
    print(f"load before: {load_before}", flush=True)
    runner = {"central": run_central, "federated": run_federated, "simulate": run_simulate}[args.what]
    results = runner(args)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2, default=str))
    if args.results != "":
        name = f"lightweight-{args.what}-{args.dataset}" + (
            f"-limit{args.limit}" if getattr(args, "limit", None) else ""
        )
        setup = {k: (v if isinstance(v, (int, float, str, type(None))) else str(v)) for k, v in vars(args).items()}
        setup["torch_threads"] = torch.get_num_threads()
        setup["load_before"] = load_before
        out = write_run(Path(args.results) if args.results else RESULTS / name, {"setup": setup, **results}, started)
        print(f"results: {out}/results.json, run.json")


if __name__ == "__main__":
    main()
