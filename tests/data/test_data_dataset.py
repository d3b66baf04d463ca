"""ImageSet behaviour, the load_image_set dispatcher, and the shipped sample data."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fedfreeze.data import ImageSet, load_image_set
from fedfreeze.errors import ConfigError, DataError
from fedfreeze.sample_data import kermany_mini
from tests.shipped import beside

CLASSES = ["normal", "pneumonia"]


def test_shipped_train_split_numbers(kermany_train: ImageSet) -> None:
    assert kermany_train.class_counts() == [120, 180]
    assert kermany_train.num_classes == 2 and kermany_train.class_names == CLASSES
    assert kermany_train.sites is not None
    by_site = {site: [0, 0] for site in ("site-a", "site-b", "site-c")}
    for site, label in zip(kermany_train.sites, kermany_train.labels.tolist(), strict=False):
        by_site[site][label] += 1
    assert {site: sum(n) for site, n in by_site.items()} == {"site-a": 120, "site-b": 100, "site-c": 80}
    assert all(min(counts) > 0 for counts in by_site.values())
    # Patients belong to one site, and grouping matters: some have several images.
    site_of: dict[str, set[str]] = {}
    for patient, site in zip(kermany_train.patient_ids, kermany_train.sites, strict=False):
        site_of.setdefault(patient, set()).add(site)
    assert all(len(sites) == 1 for sites in site_of.values())
    assert len(site_of) < len(kermany_train) - 40


def test_shipped_test_split_is_held_out(kermany_train: ImageSet) -> None:
    test = load_image_set(kermany_mini("test"), image_size=32, class_names=CLASSES, progress=False)
    assert test.class_counts() == [50, 50]
    assert test.sites is None
    assert not set(test.patient_ids) & set(kermany_train.patient_ids)
    assert not set(test.sources) & set(kermany_train.sources)


def test_shipped_files_are_small_224px_jpegs(train_manifest: Path) -> None:
    folder = train_manifest.parent
    files = [p for p in folder.rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) < 4_000_000
    jpegs = sorted((folder / "images").rglob("*.jpeg"))
    assert len(jpegs) == 400
    for path in jpegs[::50]:
        with Image.open(path) as image:
            assert (image.format, image.size) == ("JPEG", (224, 224))
    assert (folder / "ATTRIBUTION.md").is_file()


def test_kermany_mini_rejects_unknown_split() -> None:
    with pytest.raises(ValueError, match=r"split should be one of train, test, got 'val'"):
        kermany_mini("val")


def test_resize_matches_pil_bilinear_and_channels(train_manifest: Path, tmp_path: Path) -> None:
    with train_manifest.open(newline="") as handle:
        first = next(csv.DictReader(handle))
    source = train_manifest.parent / first["path"]
    manifest = tmp_path / "one.csv"
    manifest.write_text(f"path,label\n{source},{first['label']}\n")
    grey = load_image_set(manifest, image_size=100, progress=False, outside_paths=True)
    expected = np.asarray(Image.open(source).convert("L").resize((100, 100), Image.Resampling.BILINEAR))
    assert grey.images.shape == (1, 1, 100, 100) and grey.images.dtype == torch.uint8
    assert np.array_equal(grey.images[0, 0].numpy(), expected)
    rgb = load_image_set(manifest, image_size=100, channels=3, progress=False, outside_paths=True)
    assert rgb.images.shape == (1, 3, 100, 100)
    assert all(torch.equal(rgb.images[0, c], grey.images[0, 0]) for c in range(3))


def test_subset_keeps_rows_aligned(kermany_train: ImageSet) -> None:
    picked = [299, 0, 150, 150]
    assert kermany_train.sites is not None
    for indices in (picked, np.array(picked), torch.tensor(picked)):
        part = kermany_train.subset(indices)
        assert len(part) == 4
        assert torch.equal(part.images, kermany_train.images[picked])
        assert part.labels.tolist() == [kermany_train.labels[i].item() for i in picked]
        assert part.patient_ids == [kermany_train.patient_ids[i] for i in picked]
        assert part.sites == [kermany_train.sites[i] for i in picked]
        assert part.sources == [kermany_train.sources[i] for i in picked]
    mask = kermany_train.labels == 0
    normals = kermany_train.subset(mask)
    assert len(normals) == 120 and normals.class_counts() == [120, 0]
    assert kermany_train.subset([-1]).sources == [kermany_train.sources[-1]]
    part.images[0].zero_()  # a subset owns its pixels
    assert int(kermany_train.images[299].sum()) > 0


def test_subset_rejects_bad_indices(kermany_train: ImageSet) -> None:
    with pytest.raises(IndexError, match=r"subset index 300 is out of range for 300 images"):
        kermany_train.subset([1, 300])
    with pytest.raises(IndexError, match=r"boolean subset mask has shape \(3,\), expected \(300,\)"):
        kermany_train.subset(np.array([True, False, True]))
    with pytest.raises(IndexError, match=r"1-D integer sequence, got float64"):
        kermany_train.subset(np.array([0.5]))


def test_require_classes_and_nonempty(kermany_train: ImageSet) -> None:
    kermany_train.require_classes()
    kermany_train.require_nonempty()
    assert kermany_train.sites is not None
    pairs = zip(kermany_train.sites, kermany_train.labels.tolist(), strict=False)
    site_c_normals = [i for i, (site, label) in enumerate(pairs) if site == "site-c" and label == 0]
    one_class = kermany_train.subset(site_c_normals)
    message = r"site 'site-c': only class 'normal' \(n=27\) present.*; AUROC needs both classes"
    with pytest.raises(DataError, match=message):
        one_class.require_classes()
    empty = kermany_train.subset([])
    assert empty.images.shape == (0, 1, 32, 32) and empty.class_counts() == [0, 0]
    with pytest.raises(DataError, match=r"holds no images; nothing to validate on"):
        empty.require_nonempty(why="nothing to validate on")
    with pytest.raises(DataError, match=r"holds no images"):
        empty.require_classes()
    message = r"only classes 'normal' \(n=120\), 'pneumonia' \(n=180\) present, need at least 3"
    with pytest.raises(DataError, match=message):
        kermany_train.require_classes(3, why="three-way split")


def test_imageset_checks_its_own_shape() -> None:
    images = torch.zeros((2, 1, 4, 4), dtype=torch.uint8)
    with pytest.raises(DataError, match=r"ImageSet.patient_ids has 1 entries for 2 images"):
        ImageSet(images, torch.tensor([0, 1]), ["a"], None, ["x", "y"], CLASSES)
    with pytest.raises(DataError, match=r"ImageSet.labels span 0\.\.2, outside 0\.\.1"):
        ImageSet(images, torch.tensor([0, 2]), ["a", "b"], None, ["x", "y"], CLASSES)
    with pytest.raises(DataError, match=r"ImageSet.images should be uint8"):
        ImageSet(images.float(), torch.tensor([0, 1]), ["a", "b"], None, ["x", "y"], CLASSES)


def test_dispatcher_rejects_unknown_inputs(tmp_path: Path, train_manifest: Path) -> None:
    with pytest.raises(DataError, match=r"data path not found: .*nothing\.csv"):
        load_image_set(tmp_path / "nothing.csv", image_size=32)
    other = tmp_path / "data.txt"
    other.write_text("x")
    with pytest.raises(DataError, match=r"cannot tell how to read .*data\.txt: expected a \.csv manifest"):
        load_image_set(other, image_size=32)
    with pytest.raises(ConfigError, match=r"image_size should be a positive integer, got 0"):
        load_image_set(train_manifest, image_size=0)
    with pytest.raises(ConfigError, match=r"channels should be 1 \(grey\) or 3 \(RGB\), got 4"):
        load_image_set(train_manifest, image_size=32, channels=4)
    with pytest.raises(ConfigError, match=r"num_classes is 3 but class_names has 2 names"):
        load_image_set(train_manifest, image_size=32, class_names=CLASSES, num_classes=3)
    with pytest.raises(ConfigError, match=r"num_classes should be an integer >= 2, got 1"):
        load_image_set(train_manifest, image_size=32, num_classes=1)
    with pytest.raises(ConfigError, match=r"class_names should be unique"):
        load_image_set(train_manifest, image_size=32, class_names=["a", "a"])


def test_default_class_names_come_from_the_label_name_column(train_manifest: Path) -> None:
    loaded = load_image_set(train_manifest, image_size=8, progress=False)
    assert loaded.class_names == ["normal", "pneumonia"]  # the shipped manifest's label_name column
    assert loaded.class_counts() == [120, 180]


def test_default_class_names_are_indices_without_a_label_name_column(tmp_path: Path) -> None:
    manifest = tmp_path / "manifest.csv"
    manifest.write_text("path,label\n" + f"{beside(tmp_path, 'images/normal/IM-0199-0001.jpeg')},0\n")
    assert load_image_set(manifest, image_size=8, progress=False).class_names == ["0", "1"]
