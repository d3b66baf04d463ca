"""Bad input, one line each: the table of docs/bad-input.md, run through the command line.

Every case gives exit code 2 and one line naming what is wrong (a case marked accepted gives exit
0 and the documented behaviour instead), and leaves every existing output as it was: where the
command writes a folder it is pointed, with ``--force``, at a finished one, which must come out
byte for byte unchanged, with nothing left beside it. One parametrised test per category.
"""

from __future__ import annotations

import contextlib
import io
import json
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from fedfreeze.cli import main
from fedfreeze.model_io import CARD_FILE, WEIGHTS_FILE
from fedfreeze.outputs import output_folder
from fedfreeze.sample_data import kermany_mini
from tests.shipped import site_folder

SIZE = 32
TINY = f"""
[model]
input-size = {SIZE}
[train]
probe-epochs = 1
epochs = 0
batch-size = 16
[cv]
folds = 2
"""


@dataclass(frozen=True)
class Case:
    """One row of the table: how to make the bad input (``args``: the command line, given the test's
    folder and the prepared site), the exit code and what the one line must say."""

    name: str
    args: Callable[[Path, Site], list[str]]
    message: str
    code: int = 2


@dataclass(frozen=True)
class Site:
    data: Path  # a site's data folder: manifest.csv and its images inside it
    model: Path  # a finished model folder (Lite0, untrained head: these cases never score it)


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Site:
    """16 shipped images (8 per class) copied into a site's data folder, and the model site-train makes
    of them (a few seconds: 32 px, one probe epoch)."""
    root = tmp_path_factory.mktemp("bad-input")
    data = site_folder(root / "site", per_class=8)
    config = write(root / "tiny.toml", TINY)
    code, _, err = run(["site-train", "--config", str(config), "--data", str(data), "--out", str(root / "model"),
                        "--quiet"])  # fmt: skip
    assert code == 0, err
    return Site(data=data, model=root / "model")


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` and every entry beside it (a partial folder or lock left behind shows)."""
    files = {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}
    files["<beside>"] = "\n".join(sorted(p.name for p in folder.parent.iterdir())).encode()
    return files


def run(args: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(args)
    return code, out.getvalue(), err.getvalue()


def check(case: Case, tmp_path: Path, site: Site) -> str:
    """Run the case against a finished folder ``tmp_path/previous`` and the site; assert the code,
    the one line, and that neither the folder nor the model changed. Returns stdout."""
    previous = tmp_path / "previous"
    shutil.copytree(site.model, previous)
    args = case.args(tmp_path, site)  # (writes the bad input first)
    watched = [previous, site.model, site.data]
    before = [snapshot(folder) for folder in watched]
    code, out, err = run(args)
    assert code == case.code, f"{case.name}: exit {code}\n{err}"
    if case.code == 2:
        lines = err.strip().splitlines()
        assert len(lines) == 1, f"{case.name}: not one line:\n{err}"
        assert lines[0].startswith("fedfreeze "), lines[0]
        assert re.search(case.message, lines[0]), f"{case.name}: {lines[0]!r} !~ {case.message!r}"
    else:
        assert re.search(case.message, out), f"{case.name}: {out!r} !~ {case.message!r}"
    assert [snapshot(folder) for folder in watched] == before, f"{case.name}: an existing output changed"
    return out


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def site_train(
    tmp: Path, site: Site, *extra: str, config: str = TINY, data: Path | None = None, out: Path | None = None
) -> list[str]:
    toml = write(tmp / "site.toml", config)
    out = out or tmp / "previous"
    return ["site-train", "--config", str(toml), "--data", str(data or site.data), "--out", str(out), "--quiet", *extra]


def edited_model(tmp: Path, site: Site, edit: Callable[[dict], None]) -> Path:
    """A copy of the model folder with ``model.json`` edited by hand."""
    folder = tmp / "edited"
    shutil.copytree(site.model, folder)
    card = json.loads((folder / CARD_FILE).read_text())
    edit(card)
    (folder / CARD_FILE).write_text(json.dumps(card, indent=2))
    return folder


def evaluate(model: Path, site: Site, *extra: str) -> list[str]:
    return ["evaluate", "--model", str(model), "--data", str(site.data), "--bootstrap", "0", *extra]


def manifest(tmp: Path, site: Site, row_path: str) -> Path:
    """The site's manifest with its first row naming ``row_path``, beside it in the site's folder."""
    text = (site.data / "manifest.csv").read_text().splitlines()
    text[1] = f"{row_path},0,P-X,site-a"
    return write(site.data / f"{tmp.name}-manifest.csv", "\n".join(text) + "\n")


def without_card(tmp: Path, site: Site) -> Path:
    """A model folder whose save stopped after weights.pt: no model.json."""
    folder = tmp / "half"
    shutil.copytree(site.model, folder)
    (folder / CARD_FILE).unlink()
    return folder


def altered_weights(tmp: Path, site: Site) -> Path:
    folder = tmp / "altered"
    shutil.copytree(site.model, folder)
    state = torch.load(folder / WEIGHTS_FILE, weights_only=True)
    last = sorted(k for k in state if k.startswith("head."))[0]
    state[last] = state[last] + 1.0
    torch.save(state, folder / WEIGHTS_FILE)
    return folder


# ------------------------------------------------------------------ model folder
MODEL_FOLDER = [
    Case(
        "weights.pt changed after model.json was written",
        lambda tmp, site: evaluate(altered_weights(tmp, site), site),
        r"evaluate: error: .*weights\.pt does not match model\.json: its SHA-256 is",
    ),
    Case(
        "threshold written as a string",
        lambda tmp, site: evaluate(edited_model(tmp, site, lambda c: c.update(threshold="0.3")), site),
        r"model\.json: threshold: Input should be a valid number \(got '0\.3'\)",
    ),
    Case(
        "calibration a = 1e308",
        lambda tmp, site: evaluate(
            edited_model(tmp, site, lambda c: c.update(calibration={"method": "platt", "a": 1e308, "b": 0.0})), site
        ),
        r"model\.json: calibration\.a: Input should be less than or equal to 1000",
    ),
    Case(
        "weights.pt without model.json (a save interrupted)",
        lambda tmp, site: evaluate(without_card(tmp, site), site),
        r"is not a model folder: model\.json is missing",
    ),
    Case(
        "threshold edited by hand (accepted: reported as an unrecorded change)",
        lambda tmp, site: evaluate(edited_model(tmp, site, lambda c: c.update(threshold=0.3)), site),
        r"threshold 0\.3 \(rule: youden-oof gave 0\.\d+; changed since without a record\)",
        code=0,
    ),
]


@pytest.mark.parametrize("case", MODEL_FOLDER, ids=lambda c: c.name)
def test_model_folder(case: Case, tmp_path: Path, site: Site) -> None:
    check(case, tmp_path, site)


# ------------------------------------------------------------------ manifest
MANIFEST = [
    Case(
        "a row climbing out of the manifest's folder",
        lambda tmp, site: site_train(tmp, site, "--force", data=manifest(tmp, site, "../../../../../etc/passwd")),
        r"line 2: path '(\.\./){5}etc/passwd' lies outside the manifest's folder",
    ),
    Case(
        "an absolute path elsewhere on the machine",
        lambda tmp, site: site_train(tmp, site, "--force", data=manifest(tmp, site, "/etc/hostname")),
        r"line 2: path '/etc/hostname' lies outside the manifest's folder .*--allow-outside-paths",
    ),
]


@pytest.mark.parametrize("case", MANIFEST, ids=lambda c: c.name)
def test_manifest(case: Case, tmp_path: Path, site: Site) -> None:
    check(case, tmp_path, site)


# ------------------------------------------------------------------ npz
def empty_images(tmp: Path) -> Path:
    path = tmp / "empty.npz"
    np.savez(path, train_images=np.zeros((4, 0, 0), np.uint8), train_labels=np.array([0, 1, 0, 1]))
    return path


NPZ = [
    Case(
        "images of shape (N, 0, 0)",
        lambda tmp, site: site_train(tmp, site, "--force", data=empty_images(tmp)),
        r"empty\.npz: train_images has shape \(4, 0, 0\): images of height 0 and width 0",
    ),
]


@pytest.mark.parametrize("case", NPZ, ids=lambda c: c.name)
def test_npz(case: Case, tmp_path: Path, site: Site) -> None:
    check(case, tmp_path, site)


# ------------------------------------------------------------------ DICOM
def dicom_site(tmp: Path, site: Site, slope: str) -> Path:
    """The site's manifest with its first image replaced by a DICOM whose RescaleSlope is ``slope``."""
    import warnings

    from tests.data.test_data_images import write_dicom

    pixels = (np.arange(64 * 64) % 4000).reshape(64, 64).astype(np.uint16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom warns about the very value the test writes
        write_dicom(site.data / f"{tmp.name}.dcm", pixels, "MONOCHROME2", RescaleSlope=slope, RescaleIntercept=0)
    return manifest(tmp, site, f"{tmp.name}.dcm")


DICOM = [
    Case(
        "RescaleSlope NaN",
        lambda tmp, site: site_train(tmp, site, "--force", data=dicom_site(tmp, site, "NaN")),
        r"line 2: cannot decode image .*\.dcm: DICOM RescaleSlope is NaN, expected a finite number",
    ),
    Case(
        "RescaleSlope 1e400",
        lambda tmp, site: site_train(tmp, site, "--force", data=dicom_site(tmp, site, "1e400")),
        r"line 2: cannot decode image .*\.dcm: DICOM RescaleSlope is 1e400, expected a finite number",
    ),
]


@pytest.mark.parametrize("case", DICOM, ids=lambda c: c.name)
def test_dicom(case: Case, tmp_path: Path, site: Site) -> None:
    check(case, tmp_path, site)


# ------------------------------------------------------------------ TOML and site-train options
TOML = [
    Case(
        "an unknown learning-rate group",
        lambda tmp, site: site_train(
            tmp, site, "--force", config=TINY.replace("[cv]", "lr = { head = 1e-3, bogus = 1.0 }\n[cv]")
        ),
        r"train\.lr names unknown group\(s\) \['bogus'\]; this backbone's groups are",
    ),
    Case(
        "probe-epochs = 0 and epochs = 0",
        lambda tmp, site: site_train(tmp, site, "--force", config=TINY.replace("probe-epochs = 1", "probe-epochs = 0")),
        r"train\.probe-epochs = 0 and train\.epochs = 0: nothing would train",
    ),
    Case(
        "probe-lr = inf",
        lambda tmp, site: site_train(tmp, site, "--force", config=TINY.replace("[cv]", "probe-lr = inf\n[cv]")),
        r"site\.toml: train\.probe-lr: Input should be a finite number \(got inf\)",
    ),
    Case(
        "cv.model-threshold = 1.5",
        lambda tmp, site: site_train(tmp, site, "--force", config=TINY + "model-threshold = 1.5\n"),
        r"cv\.model-threshold: .*should be a number in \(0, 1\) or 'youden-oof', got 1\.5",
    ),
    Case(
        "--device cuda without a GPU",
        lambda tmp, site: site_train(tmp, site, "--force", "--device", "cuda"),
        r"--device 'cuda': torch sees no CUDA GPU on this machine",
    ),
    Case(
        "--device tpu",
        lambda tmp, site: site_train(tmp, site, "--force", "--device", "tpu"),
        r"--device 'tpu': unknown device; use auto, cpu, cuda or cuda:N",
    ),
    Case(
        "--out naming an existing file",
        lambda tmp, site: site_train(tmp, site, out=site.model / CARD_FILE),
        r"--out .*model\.json is a file, not a folder",
    ),
    Case(
        "--out equal to --init (the source model would be overwritten)",
        lambda tmp, site: site_train(tmp, site, "--force", "--init", str(tmp / "previous")),
        r"--out .*previous is the --init folder: write to a new folder",
    ),
    Case(
        "--out an existing model folder, without --force",
        lambda tmp, site: site_train(tmp, site, config=TINY + "refit = false\n"),
        r"--out .*previous exists and is not empty: give --force to replace it, or a new folder",
    ),
    Case(
        "--out under a file (the system refuses the folder)",
        lambda tmp, site: site_train(tmp, site, out=site.model / CARD_FILE / "run"),
        r"--out .*model\.json/run: cannot create .*model\.json: (File exists|Not a directory)",
    ),
]


@pytest.mark.parametrize("case", TOML, ids=lambda c: c.name)
def test_toml_and_site_train(case: Case, tmp_path: Path, site: Site) -> None:
    check(case, tmp_path, site)


# ------------------------------------------------------------------ adapt
def adapt(tmp: Path, site: Site, *extra: str, out: Path | None = None) -> list[str]:
    return [
        "adapt",
        "--model",
        str(site.model),
        "--data",
        str(site.data),
        "--out",
        str(out or tmp / "previous"),
        *extra,
    ]


ADAPT = [
    Case(
        "--out an existing model folder, without --force",
        lambda tmp, site: adapt(tmp, site),
        r"adapt: error: --out .*previous exists and is not empty: give --force",
    ),
    Case(
        "--out equal to --model",
        lambda tmp, site: adapt(tmp, site, "--force", out=site.model),
        r"--out .*model is the --model folder: write to a new folder",
    ),
    Case(
        "--out naming an existing file",
        lambda tmp, site: adapt(tmp, site, out=site.model / WEIGHTS_FILE),
        r"--out .*weights\.pt is a file, not a folder",
    ),
    Case(
        "--device tpu",
        lambda tmp, site: adapt(tmp, site, "--force", "--device", "tpu"),
        r"--device 'tpu': unknown device",
    ),
]


@pytest.mark.parametrize("case", ADAPT, ids=lambda c: c.name)
def test_adapt(case: Case, tmp_path: Path, site: Site) -> None:
    check(case, tmp_path, site)


# ------------------------------------------------------------------ evaluate
EVALUATE = [
    Case(
        "--report naming an existing file",
        lambda tmp, site: evaluate(site.model, site, "--report", str(site.model / CARD_FILE)),
        r"evaluate: error: --report .*model\.json is a file, not a folder",
    ),
    Case(
        "--report an existing folder, without --force",
        lambda tmp, site: evaluate(site.model, site, "--report", str(tmp / "previous")),
        r"--report .*previous exists and is not empty: give --force to replace it, or a new folder",
    ),
    Case(
        "--device cuda without a GPU",
        lambda tmp, site: evaluate(site.model, site, "--report", str(tmp / "previous"), "--force", "--device", "cuda"),
        r"--device 'cuda': torch sees no CUDA GPU",
    ),
]


@pytest.mark.parametrize("case", EVALUATE, ids=lambda c: c.name)
def test_evaluate(case: Case, tmp_path: Path, site: Site) -> None:
    check(case, tmp_path, site)


# ------------------------------------------------------------------ simulate (refused before Flower starts)
FED = f"""
[model]
input-size = {SIZE}
[federation]
rounds = 1
probe-rounds = 1
min-sites = 1
evaluation-sites = ["held-out"]
"""


def simulate(
    tmp: Path, site: Site, *extra: str, data: Path | None = None, held: Path | None = None, out: Path | None = None
) -> list[str]:
    config = write(tmp / "fed.toml", FED)
    held_out = ["--evaluation-site", f"held-out={held}"] if held is not None else []
    out = out or tmp / "previous"
    return ["simulate", "--config", str(config), "--data", str(data or site.data), "--out", str(out),
            *held_out, *extra]  # fmt: skip


def two_sites_one_patient(tmp: Path, site: Site) -> Path:
    lines = (site.data / "manifest.csv").read_text().splitlines()
    first = lines[1].split(",")
    lines.append(",".join([first[0].replace(".jpeg", "-copy.jpeg"), first[1], first[2], "site-z"]))
    shutil.copyfile(site.data / first[0], site.data / first[0].replace(".jpeg", "-copy.jpeg"))
    return write(site.data / f"{tmp.name}-two-sites.csv", "\n".join(lines) + "\n")


def renamed_copy(tmp: Path, site: Site) -> Path:
    """One of the training images under another name and another patient id: caught by its pixels."""
    shutil.copyfile(site.data / "images" / "3.jpeg", site.data / "images" / f"{tmp.name}.jpeg")
    return write(site.data / f"{tmp.name}-held.csv", f"path,label,patient_id\nimages/{tmp.name}.jpeg,0,NEW-1\n")


SIMULATE = [
    Case(
        "the evaluation-only site is the training manifest",
        lambda tmp, site: simulate(tmp, site, "--force", held=site.data / "manifest.csv"),
        r"evaluation-only site 'held-out' is not held out: its image .*0\.jpeg has the same pixels as .*0\.jpeg",
    ),
    Case(
        "the evaluation-only site holds a renamed copy of a training image",
        lambda tmp, site: simulate(tmp, site, "--force", held=renamed_copy(tmp, site)),
        r"is not held out: its image .*\.jpeg has the same pixels as .*3\.jpeg of training site",
    ),
    Case(
        "a patient at two training sites",
        lambda tmp, site: simulate(tmp, site, "--force", data=two_sites_one_patient(tmp, site)),
        r"training data: patient '[^']+' has images at training sites 'site-[a-z]' and 'site-z'",
    ),
    Case(
        "--out an existing folder, without --force or --resume",
        lambda tmp, site: simulate(tmp, site),
        r"--out .*previous exists and is not empty: give --force to replace it or --resume to continue it",
    ),
    Case(
        "--out naming an existing file",
        lambda tmp, site: simulate(tmp, site, out=site.model / CARD_FILE),
        r"--out .*model\.json is a file, not a folder",
    ),
]


@pytest.mark.parametrize("case", SIMULATE, ids=lambda c: c.name)
def test_simulate(case: Case, tmp_path: Path, site: Site) -> None:
    check(case, tmp_path, site)


# ------------------------------------------------------------------ concurrency
CONCURRENCY = [
    Case(
        "site-train while another run writes the same --out",
        lambda tmp, site: site_train(tmp, site, "--force"),
        r"site-train: error: --out .*previous is being written by another fedfreeze run \(process \d+\)",
    ),
    Case(
        "adapt while another run writes the same --out",
        lambda tmp, site: adapt(tmp, site, "--force"),
        r"adapt: error: --out .*previous is being written by another fedfreeze run",
    ),
]


@pytest.mark.parametrize("case", CONCURRENCY, ids=lambda c: c.name)
def test_concurrency(case: Case, tmp_path: Path, site: Site) -> None:
    """While another run holds --out (its lock taken here, as that run's would be), the second is
    refused at once and the first run's partial folder is left alone."""
    with output_folder(tmp_path / "previous", force=True) as other:
        (other.work / "being-written").write_text("the other run's file")
        check(case, tmp_path, site)
        assert (other.work / "being-written").read_text() == "the other run's file"


# ------------------------------------------------------------------ interruption
@pytest.mark.process
def test_interruption_leaves_the_previous_folder_untouched(tmp_path: Path, site: Site) -> None:
    """SIGINT while site-train re-runs with --force: exit 130, 'interrupted', the finished folder as it
    was, no partial folder or lock left beside it."""
    previous = tmp_path / "previous"
    shutil.copytree(site.model, previous)
    # 300 images and 20 fine-tuning epochs: a run far longer than a loaded machine's delay between two polls
    slow = TINY.replace("epochs = 0", "epochs = 20")
    args = site_train(tmp_path, site, "--force", config=slow, data=kermany_mini("train"))
    before = snapshot(previous)
    process = subprocess.Popen(
        [sys.executable, "-m", "fedfreeze.cli", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        # a shell's background job ignores SIGINT, and Python keeps an ignored SIGINT ignored: give it back
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    partial = tmp_path / ".previous.partial"
    deadline = time.monotonic() + 120
    while not partial.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert process.poll() is None, "site-train ended before it could be interrupted"
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 130, err
    assert err.strip().splitlines()[-1] == "interrupted"
    assert snapshot(previous) == before
