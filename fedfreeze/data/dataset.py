"""The loader that picks a reader (manifest, arrays) by path and returns one site's ``ImageSet``."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Literal

from fedfreeze.data.arrays import load_idx_folder, load_npz
from fedfreeze.data.images import check_channels
from fedfreeze.data.imageset import UNLABELLED, ImageSet  # noqa: F401 - re-exported: the loader's result type
from fedfreeze.data.labels import resolve_class_names
from fedfreeze.data.manifest import load_manifest
from fedfreeze.errors import ConfigError, DataError

MANIFEST_NAME = "manifest.csv"
ARRAYS_NAME = "data.npz"


def load_image_set(
    path: str | Path,
    *,
    image_size: int,
    channels: int = 1,
    split: str | None = None,
    class_names: Sequence[str] | None = None,
    num_classes: int | None = None,
    progress: bool = True,
    labels: Literal["required", "optional"] = "required",
    outside_paths: bool = False,
) -> ImageSet:
    """Load a site's images into memory, choosing the reader by what `path` is.

    `path` is a ``.csv`` manifest (see `fedfreeze.data.manifest`), a folder
    holding a ``manifest.csv`` or a ``data.npz`` (a site's data folder), a
    MedMNIST-style ``.npz`` or a folder of MNIST IDX files
    (`fedfreeze.data.arrays`); `split` picks the array split ("train" by
    default) and is refused for manifests, which hold one split per file.
    Every image is resized to image_size x image_size, bilinear and
    antialiased, without keeping the aspect ratio (as the Kermany uploader
    did), and converted to `channels` (1 grey, 3 RGB with grey replicated).
    Labels are integers in [0, num_classes) or names from `class_names`;
    `num_classes` defaults to 2, or to len(class_names); without `class_names`, a manifest's
    `label_name` column names the classes. A set with one class
    or none loads fine: callers that need two call `require_classes`.
    `labels="optional"` (an opt-in for readers that can use unlabelled images,
    such as ``fedfreeze adapt``) lets a manifest without a `label` column load
    with ``has_labels=False``; arrays always carry labels. A manifest's image
    paths must lie in its folder unless ``outside_paths`` (``--allow-outside-paths``).
    """
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
        raise ConfigError(f"image_size should be a positive integer, got {image_size!r}")
    check_channels(channels)
    names = resolve_class_names(class_names, num_classes)
    path = Path(path)
    if not path.exists():
        raise DataError(f"data path not found: {path}")
    if path.is_dir() and (path / MANIFEST_NAME).is_file():
        path = path / MANIFEST_NAME  # a site's data folder holding its manifest
    elif path.is_dir() and (path / ARRAYS_NAME).is_file():
        path = path / ARRAYS_NAME  # a site's data folder holding its images as arrays
    if path.is_dir():
        return load_idx_folder(
            path, split=split or "train", image_size=image_size, channels=channels, class_names=names, progress=progress
        )
    suffix = path.suffix.lower()
    if suffix == ".npz":
        return load_npz(
            path, split=split or "train", image_size=image_size, channels=channels, class_names=names, progress=progress
        )
    if suffix == ".csv":
        if split is not None:
            raise ConfigError(
                f"split={split!r} applies to .npz and MNIST IDX data only; {path} is a CSV manifest "
                "(write one manifest per split)"
            )
        return load_manifest(
            path,
            image_size=image_size,
            channels=channels,
            class_names=names,
            progress=progress,
            labels=labels,
            outside_paths=outside_paths,
            named_by_column=class_names is None,
        )
    raise DataError(
        f"cannot tell how to read {path}: expected a .csv manifest, a .npz file or a folder of MNIST IDX files"
    )
