"""What a site reads from its state folder runs no code, and the job names no file for it to open.

Whoever can write a site's state folder (its caches, its FedBN state) must not be able to make the
site run anything: a pickle planted at each path is read with ``weights_only=True`` and runs
nothing (the shell command it carries would leave a file), and the site decodes its images again.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from pathlib import Path

import pytest
import torch

from fedfreeze.config import ModelConfig
from fedfreeze.errors import CheckpointError, DataError, ProtocolError
from fedfreeze.federation.config import load_fed_config
from fedfreeze.federation.coordinator import Coordinator
from fedfreeze.federation.site_runtime import SiteRuntime
from fedfreeze.training.features import read_cached_features

CFG = ModelConfig(input_size=32, weights="none")


class Planted:
    """Unpickling this runs ``touch MARKER`` (what an attacker's file would do, harmlessly)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def plant(path: Path, marker: Path, as_torch_file: bool) -> None:
    """A plain pickle, or one inside torch's zip format, that runs a command when loaded."""
    import pickle

    path.parent.mkdir(parents=True, exist_ok=True)
    if as_torch_file:
        torch.save({"images": Planted(marker)}, path)
    else:
        path.write_bytes(pickle.dumps(Planted(marker)))
    assert path.is_file() and not marker.exists()


@pytest.fixture()
def site(tmp_path: Path, site_folders: dict[str, Path]) -> Path:
    """site-a's data folder with its images copied in (so that one can be replaced)."""
    folder = tmp_path / "site-a"
    shutil.copytree(site_folders["site-a"], folder, symlinks=False)
    return folder


@pytest.mark.parametrize("as_torch_file", [False, True], ids=["pickle", "torch-zip"])
def test_a_pickle_planted_in_the_image_cache_runs_nothing(site: Path, tmp_path: Path, as_torch_file: bool) -> None:
    runtime = SiteRuntime(site, "site-a", tmp_path / "state")
    marker = tmp_path / "ran"
    cache = tmp_path / "state" / "data" / f"{runtime._data_key(CFG)}.pt"
    plant(cache, marker, as_torch_file)
    data = runtime._decoded(CFG)
    assert not marker.exists()  # nothing ran
    assert len(data) == 120 and data.images.shape[1:] == (3, 32, 32)  # site-a, decoded again
    assert torch.equal(runtime._decoded(CFG).images, data.images)  # and cached anew, readably
    assert not marker.exists()


@pytest.mark.parametrize("as_torch_file", [False, True], ids=["pickle", "torch-zip"])
def test_a_pickle_planted_in_the_feature_cache_or_fedbn_state_runs_nothing(tmp_path: Path, as_torch_file: bool):
    marker = tmp_path / "ran"
    features = tmp_path / "features" / "key.pt"
    plant(features, marker, as_torch_file)
    assert read_cached_features(features, 10) is None and not features.exists()  # a miss, removed
    bn = tmp_path / "local_batchnorm.pt"
    plant(bn, marker, as_torch_file)
    runtime = SiteRuntime(tmp_path, "site-a", tmp_path)
    with pytest.raises(CheckpointError, match="local_batchnorm.pt is not a readable fedfreeze weights file"):
        runtime._local_bn(dataclasses.replace(_plan(), local=("groups.x.bn.weight",)))
    assert not marker.exists()


def _plan():
    from fedfreeze.federation.exchange import ExchangePlan

    fields = {f.name: () for f in dataclasses.fields(ExchangePlan)}
    return ExchangePlan(**fields)


def test_an_image_replaced_under_the_same_name_is_decoded_again(site: Path, tmp_path: Path) -> None:
    runtime = SiteRuntime(site, "site-a", tmp_path / "state")
    first = runtime._decoded(CFG)
    key = runtime._data_key(CFG)
    image = site / Path(first.sources[0]).relative_to(site)
    other = site / Path(first.sources[1]).relative_to(site)
    shutil.copyfile(other, image)  # same name, another image's pixels
    assert runtime._data_key(CFG) != key
    assert torch.equal(runtime._decoded(CFG).images[0], first.images[1])


def test_a_manifest_row_outside_the_sites_folder_is_refused_unless_the_site_allows_it(tmp_path: Path, site: Path):
    manifest = site / "manifest.csv"
    lines = manifest.read_text().splitlines()
    lines[1] = "/etc/hostname," + lines[1].split(",", 1)[1]
    manifest.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match="lies outside the manifest's folder"):
        SiteRuntime(site, "site-a", tmp_path / "state")._decoded(CFG)


def test_a_job_cannot_name_a_checkpoint_file_for_a_site_to_open(tmp_path: Path) -> None:
    cfg = load_fed_config(None, {"model.input-size": 32, "federation.rounds": 1, "federation.probe-rounds": 1})
    coordinator = Coordinator(cfg, tmp_path / "coordinator")
    orders = coordinator.orders(1)
    arrays = coordinator.arrays_for(coordinator.plan(orders))
    job = dataclasses.replace(orders, model=orders.model.model_copy(update={"weights": "/etc/passwd"}))
    site = SiteRuntime(tmp_path, "site-a", tmp_path / "state")
    with pytest.raises(ProtocolError, match=r"the job's model\.weights names a file \(/etc/passwd\) for this site"):
        site.model(job, arrays)
    pinned = SiteRuntime(tmp_path, "site-a", tmp_path / "state", weights="package")  # the site's own choice wins
    model, _ = pinned.model(job, arrays)
    assert model is not None
