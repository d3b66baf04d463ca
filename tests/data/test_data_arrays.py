"""MedMNIST-style .npz files and MNIST IDX folders, written from real shipped images."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fedfreeze.data import load_image_set
from fedfreeze.data.arrays import read_idx
from fedfreeze.errors import DataError


@pytest.fixture(scope="module")
def small_grey(sample_images: list[Path]) -> np.ndarray:
    """The 6 sample X-rays as (6, 28, 28) uint8, like PneumoniaMNIST."""
    small = [Image.open(p).convert("L").resize((28, 28), Image.Resampling.BILINEAR) for p in sample_images]
    return np.stack([np.asarray(image) for image in small])


LABELS = np.array([0, 0, 0, 1, 1, 1], dtype=np.uint8)


def write_npz(path: Path, **arrays: np.ndarray) -> Path:
    np.savez(path, **arrays)  # type: ignore[arg-type]
    return path


def test_npz_reads_split_images_labels_and_ids(tmp_path: Path, small_grey: np.ndarray) -> None:
    rgb = np.repeat(small_grey[..., None], 3, axis=-1)
    path = write_npz(
        tmp_path / "mini.npz",
        train_images=small_grey,
        train_labels=LABELS[:, None],
        val_images=rgb[:4],
        val_labels=LABELS[:4],
    )
    train = load_image_set(path, image_size=28, progress=False)
    assert torch.equal(train.images[:, 0], torch.from_numpy(small_grey))
    assert train.labels.tolist() == LABELS.tolist()
    assert train.patient_ids == [f"train-{i}" for i in range(6)]
    assert train.sources[2] == f"{path}[train][2]"
    assert train.sites is None
    val = load_image_set(path, image_size=28, split="val", progress=False)
    assert torch.equal(val.images[:, 0], torch.from_numpy(small_grey[:4]))  # equal RGB bands -> same grey
    assert val.patient_ids[0] == "val-0"
    as_rgb = load_image_set(path, image_size=28, channels=3, progress=False)
    assert as_rgb.images.shape == (6, 3, 28, 28)
    assert torch.equal(as_rgb.images[:, 1], as_rgb.images[:, 0])
    assert torch.equal(as_rgb.images[:, 2], as_rgb.images[:, 0])


def test_npz_unknown_split_lists_the_splits(tmp_path: Path, small_grey: np.ndarray) -> None:
    path = write_npz(
        tmp_path / "m.npz", train_images=small_grey, train_labels=LABELS, val_images=small_grey, val_labels=LABELS
    )
    with pytest.raises(DataError, match=r"m\.npz: no split 'test'; splits in the file: train, val"):
        load_image_set(path, image_size=28, split="test", progress=False)


def test_npz_missing_labels_and_length_mismatch(tmp_path: Path, small_grey: np.ndarray) -> None:
    no_labels = write_npz(tmp_path / "a.npz", train_images=small_grey)
    with pytest.raises(DataError, match=r"a\.npz: has train_images but no 'train_labels' key"):
        load_image_set(no_labels, image_size=28, progress=False)
    short = write_npz(tmp_path / "b.npz", train_images=small_grey, train_labels=LABELS[:5])
    with pytest.raises(DataError, match=r"b\.npz: train_images holds 6 images but train_labels holds 5 labels"):
        load_image_set(short, image_size=28, progress=False)


def test_npz_bad_label_names_the_image(tmp_path: Path, small_grey: np.ndarray) -> None:
    labels = LABELS.copy()
    labels[4] = 7
    path = write_npz(tmp_path / "c.npz", train_images=small_grey, train_labels=labels)
    with pytest.raises(DataError, match=r"c\.npz\[train\]\[4\]: unknown label value 7 .*allowed: integers 0\.\.1"):
        load_image_set(path, image_size=28, progress=False)
    assert load_image_set(path, image_size=28, num_classes=8, progress=False).labels[4] == 7


def test_npz_wrong_dtype_and_multilabel(tmp_path: Path, small_grey: np.ndarray) -> None:
    floats = write_npz(tmp_path / "f.npz", train_images=small_grey.astype(np.float32), train_labels=LABELS)
    with pytest.raises(DataError, match=r"f\.npz: train_images has dtype float32; expected uint8"):
        load_image_set(floats, image_size=28, progress=False)
    multi = write_npz(tmp_path / "g.npz", train_images=small_grey, train_labels=np.zeros((6, 14), np.uint8))
    with pytest.raises(DataError, match=r"train_labels has shape \(6, 14\); expected \(N,\) or \(N, 1\)"):
        load_image_set(multi, image_size=28, progress=False)
    garbage = tmp_path / "h.npz"
    garbage.write_bytes(b"PK\x03\x04 definitely not a zip")
    with pytest.raises(DataError, match=r"cannot read .*h\.npz as a \.npz file"):
        load_image_set(garbage, image_size=28, progress=False)


def test_array_resize_is_antialiased_like_pil(tmp_path: Path, sample_images: list[Path]) -> None:
    full = np.stack([np.asarray(Image.open(p).convert("L")) for p in sample_images])  # 224 px
    path = write_npz(tmp_path / "full.npz", train_images=full, train_labels=LABELS)
    resized = load_image_set(path, image_size=32, progress=False).images[:, 0].numpy().astype(float)
    pil = np.stack([np.asarray(Image.fromarray(a).resize((32, 32), Image.Resampling.BILINEAR)) for a in full])
    pil = pil.astype(float)
    aliased = full[:, 3::7, 3::7].astype(float)  # nearest-style subsampling, what no antialias looks like
    assert np.abs(resized - pil).mean() < 1.5
    assert np.abs(resized - pil).mean() < np.abs(aliased - pil).mean() / 2


def idx_bytes(array: np.ndarray, magic: int) -> bytes:
    return struct.pack(">I", magic) + struct.pack(f">{array.ndim}I", *array.shape) + array.astype(np.uint8).tobytes()


def write_idx_folder(folder: Path, images: np.ndarray, labels: np.ndarray, prefix: str, gz: bool) -> None:
    folder.mkdir(exist_ok=True)
    for kind, array, magic in (("images-idx3", images, 2051), ("labels-idx1", labels, 2049)):
        data = idx_bytes(array, magic)
        name = f"{prefix}-{kind}-ubyte"
        if gz:
            (folder / f"{name}.gz").write_bytes(gzip.compress(data))
        else:
            (folder / name).write_bytes(data)


def test_idx_folder_plain_and_gz(tmp_path: Path, small_grey: np.ndarray) -> None:
    folder = tmp_path / "mnist"
    write_idx_folder(folder, small_grey, LABELS, "train", gz=False)
    write_idx_folder(folder, small_grey[::-1], LABELS[::-1], "t10k", gz=True)
    train = load_image_set(folder, image_size=28, progress=False)
    test = load_image_set(folder, image_size=28, split="test", progress=False)
    assert torch.equal(train.images[:, 0], torch.from_numpy(small_grey))
    assert torch.equal(test.images[:, 0], torch.from_numpy(small_grey[::-1].copy()))
    assert test.labels.tolist() == LABELS[::-1].tolist()
    assert train.patient_ids[5] == "train-5" and test.patient_ids[0] == "test-0"
    assert test.sources[1] == f"{folder / 't10k-images-idx3-ubyte.gz'}[1]"
    resized = load_image_set(folder, image_size=56, channels=3, progress=False)
    assert resized.images.shape == (6, 3, 56, 56)


def test_idx_errors_name_the_file(tmp_path: Path, small_grey: np.ndarray) -> None:
    bad_magic = tmp_path / "swapped"
    bad_magic.write_bytes(idx_bytes(LABELS, 2049))
    with pytest.raises(DataError, match=r"IDX file .*swapped: bad magic number 2049, expected 2051"):
        read_idx(bad_magic, 2051)
    truncated = tmp_path / "cut.gz"
    truncated.write_bytes(gzip.compress(idx_bytes(small_grey, 2051)[:-100]))
    message = r"IDX file .*cut\.gz is truncated: header gives shape \(6, 28, 28\) = 4704 bytes of data, found 4604"
    with pytest.raises(DataError, match=message):
        read_idx(truncated, 2051)
    tiny = tmp_path / "tiny"
    tiny.write_bytes(b"\x00\x00")
    with pytest.raises(DataError, match=r"IDX file .*tiny is truncated: 2 bytes"):
        read_idx(tiny, 2049)
    not_gzip = tmp_path / "fake.gz"
    not_gzip.write_bytes(idx_bytes(LABELS, 2049))
    with pytest.raises(DataError, match=r"cannot read IDX file .*fake\.gz"):
        read_idx(not_gzip, 2049)


def test_idx_folder_split_and_missing_files(tmp_path: Path, small_grey: np.ndarray) -> None:
    folder = tmp_path / "digits"
    write_idx_folder(folder, small_grey, LABELS[:5], "train", gz=True)
    with pytest.raises(DataError, match=r"split should be 'train' or 'test', got 'val'"):
        load_image_set(folder, image_size=28, split="val", progress=False)
    with pytest.raises(DataError, match=r"neither t10k-images-idx3-ubyte nor t10k-images-idx3-ubyte\.gz found"):
        load_image_set(folder, image_size=28, split="test", progress=False)
    message = r"train-images-idx3-ubyte\.gz holds 6 images but .*train-labels-idx1-ubyte\.gz holds 5 labels"
    with pytest.raises(DataError, match=message):
        load_image_set(folder, image_size=28, progress=False)


def test_ten_class_labels_need_num_classes(tmp_path: Path, small_grey: np.ndarray) -> None:
    folder = tmp_path / "ten"
    digits = np.array([0, 9, 3, 1, 2, 8], dtype=np.uint8)
    write_idx_folder(folder, small_grey, digits, "train", gz=False)
    with pytest.raises(DataError, match=r"\[1\]: unknown label value 9 \(4 labels out of range\)"):
        load_image_set(folder, image_size=28, progress=False)
    loaded = load_image_set(folder, image_size=28, num_classes=10, progress=False)
    assert loaded.labels.tolist() == digits.tolist()
    assert loaded.class_counts() == [1, 1, 1, 1, 0, 0, 0, 0, 1, 1]
