"""``site-train --init MODEL_DIR`` on the shipped real subset: start from a trained model folder,
adapt it, and compare it with itself un-adapted on the same folds."""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch

import fedfreeze.site as site_module
from fedfreeze.cli import main
from fedfreeze.config import SiteConfig, TrainConfig, load_site_config
from fedfreeze.data.dataset import load_image_set
from fedfreeze.errors import ConfigError
from fedfreeze.evaluation.delong import FoldScores, delong_test_over_folds
from fedfreeze.init_from import check_init_config, load_init
from fedfreeze.metrics import classification_metrics
from fedfreeze.model_io import ModelCard, ScoreCalibration, load_model, make_card, read_card, save_model
from fedfreeze.sample_data import kermany_mini
from fedfreeze.training.engine import extract_features, predict_scores, train_phase
from tests.shipped import beside

pytestmark = pytest.mark.slow  # its tests share a trained model folder, minutes to make on 2 cores

ADAPT_TOML = """
[model]
input-size = 96
[train]
probe-epochs = 2
epochs = 0
[cv]
folds = 2
"""

NO_TRAINING_TOML = """
[model]
input-size = 96
[train]
probe-epochs = 0
epochs = 0
[cv]
folds = 2
"""

EARLIER = {"kind": "calibration", "from": "somewhere", "note": "written by the test fixture"}


def _run(args: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(args)
    return code, out.getvalue(), err.getvalue()


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    return torch.load(folder / "weights.pt", map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("init")


def _subset(root: Path, per_class: int) -> Path:
    """The first ``per_class`` images of each class of the shipped train split (through a link in ``root``)."""
    with kermany_mini("train").open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    picked = [r for r in rows if r["label"] == "0"][:per_class] + [r for r in rows if r["label"] == "1"][:per_class]
    path = root / f"subset-{per_class}.csv"
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "label", "patient_id"])
        for r in picked:
            writer.writerow([beside(root, r["path"]), r["label"], r["patient_id"]])
    return path


@pytest.fixture(scope="module")
def small_data(root) -> Path:
    return _subset(root, 60)


@pytest.fixture(scope="module")
def small_images(small_data):
    return load_image_set(small_data, image_size=96, channels=3, class_names=["normal", "pneumonia"], progress=False)


@pytest.fixture(scope="module")
def init_dir(root) -> Path:
    """A model folder trained elsewhere (ImageNet Lite0, head and layer4 trained on held-out
    patients), with a Platt calibration and an earlier adaptation record, as a federated model
    adapted once might carry."""
    cfg = SiteConfig.model_validate(
        {"model": {"input-size": 96}, "train": {"augment": False, "cutmix-prob": 0.0, "batch-size": 16}}
    )
    data = load_image_set(kermany_mini("test"), image_size=96, channels=3, progress=False)
    model = site_module.new_model(cfg, seed=0)
    train_phase(
        model,
        data.images[::2],
        data.labels[::2],
        frozenset({"head", "layer4"}),
        cfg.train,
        epochs=1,
        rng=np.random.default_rng(0),
        device=torch.device("cpu"),
    )
    card = make_card(
        model,
        cfg.model,
        threshold=0.4,
        class_names=["normal", "pneumonia"],
        trained_by="the test",
        calibration=ScoreCalibration(method="platt", a=0.7, b=0.3, fitted_on="test fixture"),
        adaptations=[EARLIER],
    )
    return save_model(root / "init-model", model, card)


@pytest.fixture(scope="module")
def adapted(root, init_dir, small_data) -> dict:
    """``site-train --init`` with a short probe; ``fit`` is wrapped to record what each fold and the
    refit start from (the model's weights and the probe's features) before training."""
    config = root / "adapt.toml"
    config.write_text(ADAPT_TOML)
    out = root / "adapted"
    starts: list[dict] = []
    real_fit = site_module.fit

    def recording_fit(model, images, labels, cfg, **kw):
        starts.append(
            {
                "state": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
                "pretrained": model.pretrained,
                "n": len(labels),
                "features": kw.get("probe_features"),
            }
        )
        return real_fit(model, images, labels, cfg, **kw)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(site_module, "fit", recording_fit)
        code, stdout, err = _run(
            [
                "site-train",
                "--config",
                str(config),
                "--data",
                str(small_data),
                "--out",
                str(out),
                "--init",
                str(init_dir),
                "--quiet",
            ]
        )
    assert code == 0, err
    return {"out": out, "starts": starts, "stdout": stdout, "metrics": json.loads((out / "metrics.json").read_text())}


def test_every_fold_and_the_refit_start_from_the_folders_weights(adapted, init_dir, small_images):
    saved = _weights(init_dir)
    assert len(adapted["starts"]) == 3  # two folds and the refit
    for start in adapted["starts"]:
        assert start["state"].keys() == saved.keys()
        for key, tensor in saved.items():
            assert torch.equal(start["state"][key], tensor), key
        assert start["pretrained"] is True  # bn-stats "auto" keeps the trained statistics frozen
    # the probe trained on the init model's features, not on the ImageNet backbone's
    model, card = load_model(init_dir)
    some = small_images.images[::6]
    ours = extract_features(model, some, torch.device("cpu"))
    refit = adapted["starts"][-1]
    assert refit["n"] == len(small_images)
    assert torch.allclose(refit["features"][::6], ours, atol=1e-5)
    imagenet = site_module.new_model(
        load_site_config(None).model_copy(update={"model": card.model.model_copy(update={"weights": "package"})}), 0
    )
    assert not torch.allclose(extract_features(imagenet, some, torch.device("cpu")), ours, atol=1e-3)
    assert adapted["metrics"]["feature_cache"] == {"hits": 2, "misses": 1}


def test_baseline_is_the_calibrated_init_model_at_its_own_threshold(adapted, init_dir, small_images):
    model, card = load_model(init_dir)
    raw = predict_scores(model, small_images.images[::6], torch.device("cpu"))
    # predictions.csv names each image relative to the manifest's folder
    expected = dict(zip(small_images.source_names()[::6], card.calibration.apply(raw).tolist(), strict=True))
    rows = list(csv.DictReader((adapted["out"] / "predictions.csv").open()))
    assert len(rows) == len(small_images)  # one repeat: every image tested once
    checked = [row for row in rows if row["source"] in expected]
    assert len(checked) == len(expected)
    for row in checked:
        assert float(row["init_score"]) == pytest.approx(expected[row["source"]], abs=1e-6)
    for fold in adapted["metrics"]["baseline"]["folds"]:
        mine = [r for r in rows if int(r["fold"]) == fold["fold"]]
        direct = classification_metrics(
            np.array([int(r["label"]) for r in mine]), np.array([float(r["init_score"]) for r in mine]), card.threshold
        )
        assert fold["threshold"] == card.threshold
        for key in ("auroc", "balanced_accuracy", "sensitivity", "specificity"):
            assert fold[key] == pytest.approx(direct[key], abs=1e-12), key


def test_comparison_equals_delong_on_the_written_predictions(adapted):
    rows = list(csv.DictReader((adapted["out"] / "predictions.csv").open()))
    folds = []
    for key in sorted({(r["repeat"], r["fold"]) for r in rows}):
        mine = [r for r in rows if (r["repeat"], r["fold"]) == key]
        folds.append(
            FoldScores(
                labels=np.array([int(r["label"]) for r in mine]),
                scores_a=np.array([float(r["score"]) for r in mine]),
                scores_b=np.array([float(r["init_score"]) for r in mine]),
                case_ids=[r["patient_id"] for r in mine],
            )
        )
    direct = delong_test_over_folds(folds).to_dict()
    written = adapted["metrics"]["comparison"]["delong"]
    assert written.keys() == direct.keys()
    for key, value in direct.items():
        assert written[key] == (pytest.approx(value, abs=1e-12) if isinstance(value, float) else value), key
    m = adapted["metrics"]
    diffs = m["comparison"]["differences"]
    for key in ("auroc", "balanced_accuracy"):
        paired = [a[key] - b[key] for a, b in zip(m["folds"], m["baseline"]["folds"], strict=True)]
        assert diffs[key]["difference_mean"] == pytest.approx(np.mean(paired), abs=1e-12)
        assert diffs[key]["difference_std"] == pytest.approx(np.std(paired, ddof=1), abs=1e-12)
    # the two-row table and the one-line verdict, with the test's p
    out = adapted["stdout"]
    assert "init (as given)" in out and "adapted (site-train)" in out
    assert f"DeLong p = {written['p_value']:.3g}" in out


def test_refit_card_records_the_adaptation_after_the_earlier_ones(adapted, init_dir, small_data):
    card = read_card(adapted["out"])
    m = adapted["metrics"]
    assert card.adaptations[0] == EARLIER
    assert len(card.adaptations) == 2
    record = card.adaptations[1]
    assert record["kind"] == "site-train --init"
    assert record["from"] == str(init_dir.resolve())
    assert record["from_weights_sha256"] == hashlib.sha256((init_dir / "weights.pt").read_bytes()).hexdigest()
    assert (record["data"], record["n_images"], record["n_patients"]) == (str(small_data), 120, m["n_patients"])
    assert record["cv"]["adapted"] == m["summary"] and record["cv"]["init"] == m["baseline"]["summary"]
    assert record["comparison_p"] == m["comparison"]["delong"]["p_value"]
    assert card.calibration is None  # fitted to the init model's scores, not the adapted model's
    assert card.threshold == pytest.approx(m["model_threshold"]["value"])


def test_without_training_the_refit_is_the_folder_and_the_comparison_is_null(root, init_dir):
    config = root / "none.toml"
    config.write_text(NO_TRAINING_TOML)
    out = root / "no-training"
    code, _, err = _run(
        [
            "site-train",
            "--config",
            str(config),
            "--data",
            str(_subset(root, 16)),
            "--out",
            str(out),
            "--init",
            str(init_dir),
            "--quiet",
        ]
    )
    assert code == 0, err
    saved, refit = _weights(init_dir), _weights(out)
    assert refit.keys() == saved.keys()
    for key, tensor in saved.items():
        assert torch.equal(refit[key], tensor), key
    delong = json.loads((out / "metrics.json").read_text())["comparison"]["delong"]
    # the same network ranks the same way (the calibration is monotone): no difference, p = 1
    assert delong["difference"] == 0.0 and delong["p_value"] == 1.0


@pytest.mark.parametrize(
    ("line", "field", "ours", "theirs"),
    [
        ('backbone = "resnet18"', "model.backbone", "'resnet18'", "'efficientnet_lite0'"),
        ("input-size = 128", "model.input-size", "128", "96"),
        ("input-size = 96\nin-channels = 1", "model.in-channels", "1", "3"),
    ],
)
def test_a_config_that_disagrees_with_the_folder_exits_2_naming_the_field(
    root, init_dir, small_data, line, field, ours, theirs
):
    config = root / f"bad-{field}.toml"
    config.write_text(f"[model]\n{line}\n")
    code, _, err = _run(
        [
            "site-train",
            "--config",
            str(config),
            "--data",
            str(small_data),
            "--out",
            str(root / "never"),
            "--init",
            str(init_dir),
            "--quiet",
        ]
    )
    assert code == 2
    assert len(err.strip().splitlines()) == 1, err
    assert err.startswith(
        f"fedfreeze site-train: error: {field}: the config has {ours} but the --init model {init_dir} has {theirs}"
    ), err
    assert not (root / "never").exists()  # refused before anything was loaded or written


def test_a_folder_that_is_not_a_model_exits_2(root, small_data):
    code, _, err = _run(
        ["site-train", "--data", str(small_data), "--out", str(root / "never2"), "--init", str(root), "--quiet"]
    )
    assert code == 2 and "model.json is missing" in err


def _card_with(init_dir: Path, **update) -> ModelCard:
    return read_card(init_dir).model_copy(update=update)


def test_adapter_rule(init_dir):
    folder = Path("/models/global")
    cfg = SiteConfig.model_validate({"model": {"input-size": 96}})
    plain = read_card(init_dir)
    assert check_init_config(plain, cfg, folder) == ()
    adapters = cfg.model_copy(
        update={"train": TrainConfig(method="adapters", unfreeze={"layer4": 0.0, "layer3": 0.5}, adapter_rank=4)}
    )
    # the folder has none: the schedule's adapters are new, zero-initialised
    assert check_init_config(plain, adapters, folder) == ("layer4", "layer3")
    # the folder's adapters are kept; only missing ones are added, at the folder's one rank
    with_layer4 = _card_with(init_dir, adapter_groups=["layer4"], adapter_rank=4)
    assert check_init_config(with_layer4, adapters, folder) == ("layer3",)
    with pytest.raises(
        ConfigError,
        match=r"^train\.adapter-rank: the config has 8 but the --init model "
        r"/models/global has 4",
    ):
        check_init_config(
            with_layer4,
            adapters.model_copy(update={"train": adapters.train.model_copy(update={"adapter_rank": 8})}),
            folder,
        )
    # method "unfreeze" keeps the folder's adapters frozen: no rank to agree on
    assert check_init_config(with_layer4, cfg.model_copy(update={"train": TrainConfig(adapter_rank=8)}), folder) == ()
    with pytest.raises(ConfigError, match=r"^train\.recipe: 'dual' builds its model from scratch"):
        check_init_config(plain, cfg.model_copy(update={"train": TrainConfig(recipe="dual")}), folder)
    with pytest.raises(ConfigError, match=r"^model\.mean: the config has \[0\.1, 0\.1, 0\.1\]"):
        check_init_config(plain, SiteConfig.model_validate({"model": {"input-size": 96, "mean": [0.1] * 3}}), folder)
    with pytest.raises(ConfigError, match=r"^model\.num-classes: the config has 3 but"):
        check_init_config(plain, SiteConfig.model_validate({"model": {"input-size": 96, "num-classes": 3}}), folder)


def test_new_adapters_leave_the_function_unchanged_and_bn_stats_stay_frozen(init_dir, small_images):
    cfg = SiteConfig.model_validate(
        {
            "model": {"input-size": 96},
            "train": {
                "method": "both",
                "unfreeze": {"layer4": 0.0},
                "augment": False,
                "cutmix-prob": 0.0,
                "batch-size": 8,
            },
        }
    )
    init = load_init(init_dir, cfg)
    model = init.start_model()
    assert list(model.adapters) == ["layer4"] and not init.model.adapters
    images, labels = small_images.images[::8], small_images.labels[::8]
    cpu = torch.device("cpu")
    assert np.allclose(predict_scores(model, images, cpu), predict_scores(init.model, images, cpu), atol=1e-6)
    train_phase(
        model,
        images,
        labels,
        frozenset({"head", "layer4", "layer4.adapters"}),
        cfg.train,
        epochs=1,
        rng=np.random.default_rng(0),
        device=cpu,
    )
    saved = _weights(init_dir)
    after = model.state_dict()
    stats = [k for k in saved if k.startswith("groups.layer4.") and k.endswith(("running_mean", "running_var"))]
    assert stats and all(torch.equal(after[k], saved[k]) for k in stats)  # trained groups keep the statistics
    assert not torch.equal(after["groups.layer4.0._expand_conv.weight"], saved["groups.layer4.0._expand_conv.weight"])
