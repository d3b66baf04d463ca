"""Array datasets: MedMNIST-style .npz files and folders of MNIST IDX files.

These hold no patient information, so each image is its own patient
("<split>-<index>"). Images are resized in batches with torch (bilinear,
antialiased) rather than one PIL call per image.
"""

from __future__ import annotations

import gzip
import sys
import zipfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from fedfreeze.data.imageset import ImageSet
from fedfreeze.data.labels import check_label_array
from fedfreeze.errors import DataError

IDX_IMAGES_MAGIC = 2051
IDX_LABELS_MAGIC = 2049
IDX_PREFIX = {"train": "train", "test": "t10k"}
RESIZE_CHUNK = 1024
# ITU-R 601 luma, the weights PIL's convert("L") uses, so arrays and files agree.
LUMA_WEIGHTS = (0.299, 0.587, 0.114)


def load_npz(
    path: Path,
    *,
    split: str,
    image_size: int,
    channels: int,
    class_names: Sequence[str],
    progress: bool = True,
) -> ImageSet:
    """Read `<split>_images` (N,H,W) or (N,H,W,3) uint8 and `<split>_labels` (N,1) or (N,)."""
    images_key, labels_key = f"{split}_images", f"{split}_labels"
    keys, images, labels = _read_npz_arrays(path, images_key, labels_key)
    if images is None:
        splits = sorted(key[: -len("_images")] for key in keys if key.endswith("_images"))
        raise DataError(f"{path}: no split {split!r}; splits in the file: {', '.join(splits) or 'none'} (keys: {keys})")
    if labels is None:
        raise DataError(f"{path}: has {images_key} but no {labels_key!r} key (keys: {keys})")

    if images.dtype != np.uint8:
        raise DataError(f"{path}: {images_key} has dtype {images.dtype}; expected uint8")
    if images.ndim == 4 and images.shape[-1] == 1:
        images = images[..., 0]
    if not (images.ndim == 3 or (images.ndim == 4 and images.shape[-1] == 3)):
        raise DataError(f"{path}: {images_key} has shape {images.shape}; expected (N, H, W) or (N, H, W, 3)")
    check_image_sides(images.shape, f"{path}: {images_key}")
    if labels.ndim == 2 and labels.shape[1] == 1:
        labels = labels[:, 0]
    if labels.ndim != 1:
        raise DataError(
            f"{path}: {labels_key} has shape {labels.shape}; expected (N,) or (N, 1) "
            "(multi-label data is not supported)"
        )
    if len(labels) != len(images):
        raise DataError(f"{path}: {images_key} holds {len(images)} images but {labels_key} holds {len(labels)} labels")
    sources = [f"{path}[{split}][{index}]" for index in range(len(images))]
    return ImageSet(
        images=images_to_tensor(images, image_size=image_size, channels=channels, progress=progress),
        labels=torch.from_numpy(check_label_array(labels, class_names, sources)),
        patient_ids=[f"{split}-{index}" for index in range(len(images))],
        sites=None,
        sources=sources,
        class_names=list(class_names),
        patients_known=False,
    )


_NPZ_ERRORS = (OSError, ValueError, EOFError, zipfile.BadZipFile)


def _read_npz_arrays(
    path: Path, images_key: str, labels_key: str
) -> tuple[list[str], np.ndarray | None, np.ndarray | None]:
    """The archive's keys and the two arrays (None where a key is absent)."""
    try:
        with path.open("rb") as handle:  # our own handle: np.load leaks its own on a broken zip
            loaded = np.load(handle, allow_pickle=False)
            if not isinstance(loaded, np.lib.npyio.NpzFile):
                raise DataError(f"{path} holds a single array, not a .npz archive of <split>_images/<split>_labels")
            with loaded as archive:
                keys = list(archive.keys())
                images = archive[images_key] if images_key in keys else None
                labels = archive[labels_key] if labels_key in keys else None
    except DataError:
        raise
    except _NPZ_ERRORS as exc:
        raise DataError(f"cannot read {path} as a .npz file: {exc}") from exc
    return keys, images, labels


def load_idx_folder(
    folder: Path,
    *,
    split: str,
    image_size: int,
    channels: int,
    class_names: Sequence[str],
    progress: bool = True,
) -> ImageSet:
    """Read `<prefix>-images-idx3-ubyte[.gz]` and `<prefix>-labels-idx1-ubyte[.gz]` (prefix train or t10k)."""
    if split not in IDX_PREFIX:
        raise DataError(f"MNIST IDX folder {folder}: split should be 'train' or 'test', got {split!r}")
    prefix = IDX_PREFIX[split]
    images_file = _find_idx_file(folder, f"{prefix}-images-idx3-ubyte")
    labels_file = _find_idx_file(folder, f"{prefix}-labels-idx1-ubyte")
    images = read_idx(images_file, IDX_IMAGES_MAGIC)
    check_image_sides(images.shape, f"IDX file {images_file}")
    labels = read_idx(labels_file, IDX_LABELS_MAGIC)
    if len(images) != len(labels):
        raise DataError(f"{images_file} holds {len(images)} images but {labels_file} holds {len(labels)} labels")
    sources = [f"{images_file}[{index}]" for index in range(len(images))]
    return ImageSet(
        images=images_to_tensor(images, image_size=image_size, channels=channels, progress=progress),
        labels=torch.from_numpy(check_label_array(labels, class_names, sources)),
        patient_ids=[f"{split}-{index}" for index in range(len(images))],
        sites=None,
        sources=sources,
        class_names=list(class_names),
        patients_known=False,
    )


def check_image_sides(shape: tuple[int, ...], where: str) -> None:
    """Images of zero height or width cannot be resized to anything: refused before any is."""
    if shape[1] == 0 or shape[2] == 0:
        raise DataError(
            f"{where} has shape {shape}: images of height {shape[1]} and width {shape[2]}; expected both >= 1"
        )


def _find_idx_file(folder: Path, stem: str) -> Path:
    """The uncompressed file if present, else the .gz one."""
    for candidate in (folder / stem, folder / f"{stem}.gz"):
        if candidate.is_file():
            return candidate
    raise DataError(f"MNIST IDX folder {folder}: neither {stem} nor {stem}.gz found")


def read_idx(path: Path, magic: int) -> np.ndarray:
    """Parse an IDX file of unsigned bytes: magic (2051 images, 2049 labels), big-endian dims, data."""
    try:
        data = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError, gzip.BadGzipFile) as exc:
        raise DataError(f"cannot read IDX file {path}: {exc}") from exc
    ndim = {IDX_IMAGES_MAGIC: 3, IDX_LABELS_MAGIC: 1}[magic]
    header_size = 4 * (1 + ndim)
    if len(data) >= 4:
        found = int(np.frombuffer(data, dtype=">u4", count=1)[0])
        if found != magic:
            raise DataError(f"IDX file {path}: bad magic number {found}, expected {magic}")
    if len(data) < header_size:
        raise DataError(f"IDX file {path} is truncated: {len(data)} bytes, shorter than its {header_size}-byte header")
    dims = tuple(int(d) for d in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    expected = int(np.prod(dims, dtype=np.int64))
    actual = len(data) - header_size
    if actual != expected:
        problem = "truncated" if actual < expected else "longer than its header says"
        raise DataError(
            f"IDX file {path} is {problem}: header gives shape {dims} = {expected} bytes of data, found {actual}"
        )
    return np.frombuffer(data, dtype=np.uint8, offset=header_size).reshape(dims)


def images_to_tensor(images: np.ndarray, *, image_size: int, channels: int, progress: bool = True) -> torch.Tensor:
    """uint8 (N,H,W) or (N,H,W,3) -> uint8 [N, channels, image_size, image_size], resized in chunks.

    Chunks keep the float intermediate small (60000 MNIST digits at 224 px
    would need 12 GB as one float tensor).
    """
    count = images.shape[0]
    out = torch.empty((count, channels, image_size, image_size), dtype=torch.uint8)
    starts = range(0, count, RESIZE_CHUNK)
    show = progress and count > RESIZE_CHUNK
    for start in tqdm(starts, desc="resizing images", unit="chunk", disable=not show, file=sys.stderr):
        chunk = torch.from_numpy(images[start : start + RESIZE_CHUNK].astype(np.float32))
        chunk = chunk.unsqueeze(1) if chunk.ndim == 3 else chunk.permute(0, 3, 1, 2)
        if chunk.shape[1] == 3 and channels == 1:
            weights = torch.tensor(LUMA_WEIGHTS, dtype=torch.float32).view(1, 3, 1, 1)
            chunk = (chunk * weights).sum(dim=1, keepdim=True)
        if tuple(chunk.shape[-2:]) != (image_size, image_size):
            chunk = F.interpolate(
                chunk, size=(image_size, image_size), mode="bilinear", align_corners=False, antialias=True
            )
        chunk = chunk.round().clamp(0, 255).to(torch.uint8)
        out[start : start + RESIZE_CHUNK] = chunk.expand(-1, channels, -1, -1) if chunk.shape[1] == 1 else chunk
    return out
