"""One site's images held in memory (``ImageSet``): its own module, so the readers (manifest, arrays)
and the loader that picks a reader by path (``dataset.py``) import it without importing each other."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from fedfreeze.errors import DataError

UNLABELLED = -1  # the label of every image of a set read without labels (``has_labels=False``)


@dataclass
class ImageSet:
    """Labelled images of one site, decoded once into memory (uint8), so training epochs never touch the disk."""

    images: torch.Tensor  # uint8 [N, C, H, W], C = 1 (grey) or 3 (RGB), H = W = image_size
    labels: torch.Tensor  # int64 [N]
    patient_ids: list[str]  # one per image; for npz/IDX each image is its own patient ("<split>-<index>")
    sites: list[str] | None  # from the manifest's optional `site` column, else None
    sources: list[str]  # where each image came from, for error messages: file path, or "x.npz[train][17]"
    class_names: list[str]  # index -> name
    # False only for a manifest read with labels="optional" that has no label column: every label is
    # UNLABELLED (-1), so an unlabelled set can never pass for a labelled one of class 0
    has_labels: bool = True
    # the folder image files are named relative to in outputs (a manifest's folder); "" for arrays
    root: str = ""
    # False for arrays (npz, IDX), whose patient ids ("train-17") are only positions: the same id in
    # two such sets says nothing about a patient
    patients_known: bool = True

    def __post_init__(self) -> None:
        if self.images.ndim != 4 or self.images.dtype != torch.uint8:
            raise DataError(
                f"ImageSet.images should be uint8 [N, C, H, W], got {self.images.dtype} {tuple(self.images.shape)}"
            )
        count = self.images.shape[0]
        if self.labels.dtype != torch.int64 or tuple(self.labels.shape) != (count,):
            raise DataError(
                f"ImageSet.labels should be int64 [{count}], got {self.labels.dtype} {tuple(self.labels.shape)}"
            )
        named_lists = {"patient_ids": self.patient_ids, "sources": self.sources}
        if self.sites is not None:
            named_lists["sites"] = self.sites
        for name, values in named_lists.items():
            if len(values) != count:
                raise DataError(f"ImageSet.{name} has {len(values)} entries for {count} images")
        if len(self.class_names) < 1:
            raise DataError("ImageSet.class_names is empty")
        if not self.has_labels:
            if count and bool((self.labels != UNLABELLED).any()):
                raise DataError(f"ImageSet without labels should hold only {UNLABELLED} as labels")
        elif count and (int(self.labels.min()) < 0 or int(self.labels.max()) >= len(self.class_names)):
            raise DataError(
                f"ImageSet.labels span {int(self.labels.min())}..{int(self.labels.max())}, "
                f"outside 0..{len(self.class_names) - 1} for class_names {self.class_names!r}"
            )

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def class_counts(self) -> list[int]:
        """Images per class, indexed like `class_names` (zeros included)."""
        if not self.has_labels:
            raise DataError(f"{self.describe()} has no labels (its manifest has no label column)")
        return [int(n) for n in torch.bincount(self.labels, minlength=self.num_classes).tolist()]

    def subset(self, indices: Sequence[int] | np.ndarray | torch.Tensor) -> ImageSet:
        """A new ImageSet holding the given rows (integer indices, or a boolean mask of length N)."""
        index = _as_index_array(indices, len(self))
        rows = index.tolist()
        return ImageSet(
            images=self.images[torch.from_numpy(index)],
            labels=self.labels[torch.from_numpy(index)],
            patient_ids=[self.patient_ids[i] for i in rows],
            sites=None if self.sites is None else [self.sites[i] for i in rows],
            sources=[self.sources[i] for i in rows],
            class_names=list(self.class_names),
            has_labels=self.has_labels,
            root=self.root,
            patients_known=self.patients_known,
        )

    def source_names(self) -> list[str]:
        """Each image's file as outputs record it: relative to ``root`` (the manifest's folder) when it
        lies there, so a ``predictions.csv`` names no path of the machine it was made on."""
        if not self.root:
            return list(self.sources)
        return [os.path.relpath(s, self.root) if Path(s).is_relative_to(self.root) else s for s in self.sources]

    def describe(self) -> str:
        """Short origin for messages: the site name when there is one, else the first source."""
        if self.sites and len(set(self.sites)) == 1:
            return f"site {self.sites[0]!r}"
        if self.sources:
            return f"image set of {len(self)} images (first: {self.sources[0]})"
        return "empty image set"

    def require_nonempty(self, why: str = "there is nothing to train or evaluate on") -> None:
        """Raise DataError when the set holds no images."""
        if len(self) == 0:
            raise DataError(f"{self.describe()} holds no images; {why}")

    def require_classes(self, min_classes: int = 2, *, why: str = "AUROC needs both classes") -> None:
        """Raise DataError when fewer than `min_classes` classes have at least one image."""
        self.require_nonempty(why)
        counts = self.class_counts()
        present = [(name, n) for name, n in zip(self.class_names, counts, strict=False) if n > 0]
        if len(present) >= min_classes:
            return
        listed = ", ".join(f"{name!r} (n={n})" for name, n in present)
        noun = "class" if len(present) == 1 else "classes"
        raise DataError(
            f"{self.describe()}: only {noun} {listed} present, need at least {min_classes} of "
            f"{self.class_names!r}; {why}"
        )


def _as_index_array(indices: Sequence[int] | np.ndarray | torch.Tensor, length: int) -> np.ndarray:
    """Integer indices (or a boolean mask) as an int64 array, bounds-checked."""
    array = indices.detach().cpu().numpy() if isinstance(indices, torch.Tensor) else np.asarray(indices)
    if array.dtype == np.bool_:
        if array.shape != (length,):
            raise IndexError(f"boolean subset mask has shape {array.shape}, expected ({length},)")
        return np.flatnonzero(array).astype(np.int64)
    if array.size == 0:
        return np.zeros(0, dtype=np.int64)
    if array.ndim != 1 or not np.issubdtype(array.dtype, np.integer):
        raise IndexError(f"subset indices should be a 1-D integer sequence, got {array.dtype} {array.shape}")
    outside = array[(array < -length) | (array >= length)]
    if outside.size:
        raise IndexError(f"subset index {int(outside[0])} is out of range for {length} images")
    return np.where(array < 0, array + length, array).astype(np.int64)
