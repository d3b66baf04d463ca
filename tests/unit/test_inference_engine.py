"""The inference engine (fedfreeze/inference/engine.py) against torch on real shipped chest X-rays: the
same features and scores within the stated tolerance, histogram equalisation included; the same training
steps when the frozen prefix runs in it; one export per weights, kept as a graph file (never a pickle);
and torch, with one line in the log, when the export fails or a cached graph was altered."""

from __future__ import annotations

import logging
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import fedfreeze
from fedfreeze.config import ModelConfig, TrainConfig
from fedfreeze.data import load_image_set
from fedfreeze.inference import engine as engine_module
from fedfreeze.inference.engine import (
    MIN_WORK_PIXELS,
    REFERENCE_FILE,
    TOLERANCE,
    InferenceSettings,
    compile_frozen,
    wants_engine,
)
from fedfreeze.inference.openvino_graph import COMPILED_DIR, GRAPH_FILE
from fedfreeze.models.registry import build_model
from fedfreeze.training.engine import extract_features, predict_scores, train_phase
from fedfreeze.training.freezing import apply_parts

SHIPPED = Path(fedfreeze.__file__).parent / "sample_data" / "kermany_mini" / "test.csv"
SIZE = 128
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def xrays() -> tuple[torch.Tensor, torch.Tensor]:
    data = load_image_set(SHIPPED, image_size=SIZE, channels=3, progress=False)
    pick = np.r_[np.flatnonzero(data.labels.numpy() == 0)[:6], np.flatnonzero(data.labels.numpy() == 1)[:6]]
    return data.images[pick], data.labels[pick]


@pytest.fixture(scope="module")
def shared_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One cache for the tests that compare outputs: the pretrained Lite0 graph is exported once."""
    return tmp_path_factory.mktemp("engine")


def lite0(**fields: object) -> torch.nn.Module:
    torch.manual_seed(0)
    model, _ = build_model(ModelConfig(input_size=SIZE, **fields))  # type: ignore[arg-type]
    return model


def graphs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if not p.name.startswith(".")) if folder.is_dir() else []


@pytest.mark.parametrize("intensity", ["as-is", "equalize"])
def test_engine_features_and_scores_equal_torchs_on_real_xrays(intensity: str, xrays, shared_cache: Path) -> None:
    images, _ = xrays
    model = lite0(intensity=intensity)
    engine = InferenceSettings("openvino", cache_dir=shared_cache)
    torch_path = InferenceSettings("torch")
    expected = extract_features(model, images, CPU, inference=torch_path)
    got = extract_features(model, images, CPU, inference=engine)
    assert len(graphs(shared_cache)) == 1
    scale = max(1.0, float(expected.abs().max()))
    assert float((got - expected).abs().max()) <= TOLERANCE["fp32"] * scale
    assert float((got - expected).abs().max()) > 0  # the engine ran: torch twice gives equal bits
    scores = predict_scores(model, images, CPU, inference=engine)
    assert np.abs(scores - predict_scores(model, images, CPU, inference=torch_path)).max() < 1e-4


def test_equalisation_runs_before_the_engine(xrays, shared_cache: Path) -> None:
    """One graph serves both intensities (normalisation stays in torch), and the features differ as they should."""
    images, _ = xrays
    engine = InferenceSettings("openvino", cache_dir=shared_cache)
    plain = extract_features(lite0(), images, CPU, inference=engine)
    equalised = extract_features(lite0(intensity="equalize"), images, CPU, inference=engine)
    assert len(graphs(shared_cache)) == 1
    assert float((plain - equalised).abs().max()) > 0.1


def test_graph_is_cached_by_weights_and_stored_without_pickles(xrays, tmp_path: Path, monkeypatch) -> None:
    images, _ = xrays
    engine = InferenceSettings("openvino", cache_dir=tmp_path)
    model = lite0()
    first = extract_features(model, images, CPU, inference=engine)
    [folder] = graphs(tmp_path)
    files = sorted(p.relative_to(folder).parts[0] for p in folder.rglob("*") if p.is_file())
    assert set(files) == {"model.bin", "model.xml", REFERENCE_FILE, COMPILED_DIR}
    assert (folder / GRAPH_FILE).read_bytes().lstrip().startswith(b"<?xml")
    assert np.load(folder / REFERENCE_FILE, allow_pickle=False).shape == (2, 1280)  # a plain array

    def no_export(*args: object) -> None:
        raise AssertionError("exported again")

    monkeypatch.setattr(engine_module, "export_graph", no_export)
    assert torch.equal(extract_features(model, images, CPU, inference=engine), first)  # the cached graph
    with torch.no_grad():
        model.groups["layer1"][0]._bn1.running_mean.add_(0.5)
    extract_features(model, images, CPU, inference=engine)  # other weights: a new export, refused here
    assert len(graphs(tmp_path)) == 1


def test_failed_export_falls_back_to_torch_with_one_line(xrays, tmp_path: Path, monkeypatch, caplog) -> None:
    images, _ = xrays
    model = lite0()

    def broken(*args: object) -> None:
        raise RuntimeError("cannot convert this\noperator")

    monkeypatch.setattr(engine_module, "export_graph", broken)
    with caplog.at_level(logging.WARNING, logger="fedfreeze.engine"):
        got = extract_features(model, images, CPU, inference=InferenceSettings("openvino", cache_dir=tmp_path))
    assert torch.equal(got, extract_features(model, images, CPU, inference=InferenceSettings("torch")))
    [record] = caplog.records
    assert "running them in torch" in record.getMessage() and "\n" not in record.getMessage()
    assert "cannot convert this operator" in record.getMessage()
    assert graphs(tmp_path) == []


def test_foreign_cached_graph_is_refused_and_removed(xrays, tmp_path: Path, caplog) -> None:
    """A graph file swapped for another model's (same layout, other weights) fails the check against torch."""
    images, _ = xrays
    model, other = lite0(), lite0()
    with torch.no_grad():
        other.groups["layer2"][0]._bn1.running_var.mul_(4.0)
    engine = InferenceSettings("openvino", cache_dir=tmp_path / "a")
    extract_features(model, images[:2], CPU, inference=engine)
    extract_features(other, images[:2], CPU, inference=InferenceSettings("openvino", cache_dir=tmp_path / "b"))
    [folder], [foreign] = graphs(tmp_path / "a"), graphs(tmp_path / "b")
    (folder / "model.bin").write_bytes((foreign / "model.bin").read_bytes())
    shutil.rmtree(folder / COMPILED_DIR)  # else OpenVINO runs its compiled copy of the true graph (also checked)
    with caplog.at_level(logging.WARNING, logger="fedfreeze.engine"):
        got = extract_features(model, images, CPU, inference=engine)
    assert torch.equal(got, extract_features(model, images, CPU, inference=InferenceSettings("torch")))
    assert "differ from torch's" in caplog.text
    assert not folder.exists()  # exported anew next time


def test_frozen_prefix_in_the_engine_trains_as_torch_does(xrays, tmp_path: Path) -> None:
    """layer4 + head train in torch with autograd on what the engine's stem..layer3 give them."""
    images, labels = xrays
    cfg = TrainConfig(batch_size=4, cutmix_prob=0.5, augment=True)
    results = []
    for engine in ("openvino", "torch"):
        model = lite0()
        torch.manual_seed(1)
        logs = train_phase(
            model,
            images[:8],
            labels[:8],
            frozenset({"layer4", "head"}),
            cfg.model_copy(update={"engine": engine}),
            epochs=1,
            rng=np.random.default_rng(0),
            device=CPU,
            engine_cache=tmp_path,
        )
        results.append(([log.loss for log in logs], model.state_dict()))
    assert len(graphs(tmp_path)) == 1  # stem..layer3 ran in the engine
    (losses, state), (torch_losses, torch_state) = results
    assert losses == pytest.approx(torch_losses, abs=1e-4)
    trained = [k for k in state if k.startswith(("groups.layer4", "head"))]
    assert max(float((state[k].float() - torch_state[k].float()).abs().max()) for k in trained) < 1e-4
    assert any(not torch.equal(state[k], lite0().state_dict()[k]) for k in trained)  # it did train


def test_engine_rule(lite0_random) -> None:
    small = torch.zeros(8, 3, 224, 224, dtype=torch.uint8)
    large = torch.zeros(MIN_WORK_PIXELS // (224 * 224), 3, 224, 224, dtype=torch.uint8)
    auto = InferenceSettings()
    assert not wants_engine(auto, lite0_random, CPU, small)
    assert wants_engine(auto, lite0_random, CPU, small, passes=len(large) // 8)  # epochs count
    assert wants_engine(auto, lite0_random, CPU, large)
    assert wants_engine(InferenceSettings("openvino"), lite0_random, CPU, small)
    assert not wants_engine(InferenceSettings("torch"), lite0_random, CPU, large)
    assert not wants_engine(auto, lite0_random, torch.device("cuda"), large)  # a GPU runs torch
    assert not wants_engine(InferenceSettings("openvino"), lite0_random, CPU, small[:0])


def test_prefix_runner_hands_on_to_the_trainable_groups(xrays, tmp_path: Path) -> None:
    images, _ = xrays
    model = lite0()
    apply_parts(model, {"layer3", "layer4", "head"})
    x = images[:4].float().div(255.0)
    runner = compile_frozen(model, model.frozen_prefix(), x, InferenceSettings("openvino", cache_dir=tmp_path))
    assert runner is not None and runner.groups == ("stem", "layer1", "layer2") and not runner.pooled
    model.eval()
    with torch.no_grad():
        assert torch.allclose(runner.features(x), model.features(x), atol=1e-4)
    with pytest.raises(ValueError, match="not the leading groups"):
        model.pooled_after(x, ["layer1"])


@pytest.mark.process
def test_openvino_is_loaded_with_its_telemetry_off() -> None:
    """A site must not call out: OpenVINO's converter falls back to its no-op stub."""
    code = (
        "import sys; from fedfreeze.inference.openvino_graph import load_openvino; load_openvino(); "
        "import openvino.tools.ovc.telemetry_utils as t; "
        "assert sys.modules['openvino_telemetry'] is None, 'telemetry module loaded'; "
        "assert t.tm.__name__.endswith('telemetry_stub'), t.tm.__name__"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
