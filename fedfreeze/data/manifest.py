"""CSV manifests: one row per image file, `path,label[,patient_id][,site][,label_name]`.

A header line is required; other columns are ignored. Paths are relative to
the manifest's folder and must stay inside it: an absolute path or one that
climbs out (``../../etc/passwd``) is refused before anything is opened, unless
the caller allows it (``outside_paths``, ``--allow-outside-paths``), so a
manifest cannot make fedfreeze read, or say whether there is, a file
elsewhere on the machine. Without a `patient_id` column every
row is its own patient (its resolved path is the id), so patient-level splits
degrade to image-level ones. Every row is checked before any image is
decoded, and nothing is skipped: a bad row is a DataError naming the
manifest and its line number (the header is line 1).

An optional `label_name` column names each row's class (`0,normal`): where no class names are
configured (``model.class-names``), the classes take their names from it, so outputs a person reads
say "pneumonia", not "1". Two names for one label, or one name for two labels, is a DataError.

A missing `label` column is an error, except for a reader that can use
unlabelled images (``fedfreeze adapt`` at a new site) and opts in with
``labels="optional"``: its manifest may hold `path[,patient_id][,site]` only.
"""

from __future__ import annotations

import csv
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, TextIO

import numpy as np
import torch
from tqdm import tqdm

from fedfreeze.data.images import read_image, resize_square
from fedfreeze.data.imageset import UNLABELLED, ImageSet
from fedfreeze.data.labels import allowed_labels, parse_label
from fedfreeze.errors import DataError

REQUIRED_COLUMNS = ("path", "label")
OPTIONAL_COLUMNS = ("patient_id", "site")
NAME_COLUMN = "label_name"  # optional, and may be empty: the class names where none are configured
LabelPolicy = Literal["required", "optional"]
PROGRESS_MIN_IMAGES = 50


@dataclass(frozen=True)
class ManifestRow:
    """One checked manifest row."""

    line: int  # 1-based line number in the manifest file (header = 1)
    path: Path  # absolute, normalised
    label: int | None  # None only for a manifest read with labels="optional" that has no label column
    patient_id: str
    site: str | None
    label_name: str | None = None  # the optional `label_name` column


def read_manifest(
    manifest: Path, class_names: Sequence[str], *, labels: LabelPolicy = "required", outside_paths: bool = False
) -> list[ManifestRow]:
    """Parse and check every row: columns, empty cells, labels, paths, duplicate and missing files.

    ``labels="optional"`` accepts a manifest without a `label` column (every row's label is None);
    a manifest that has the column is checked as always. ``outside_paths``: rows may name images
    outside the manifest's folder.
    """
    manifest = Path(manifest)
    if labels not in ("required", "optional"):
        raise ValueError(f"labels should be 'required' or 'optional', got {labels!r}")
    try:
        with manifest.open(newline="", encoding="utf-8-sig") as handle:
            return _read_rows(manifest, handle, class_names, labels, outside_paths)
    except UnicodeDecodeError as exc:
        raise DataError(f"manifest {manifest} is not UTF-8 text: {exc}") from exc
    except csv.Error as exc:
        raise DataError(f"manifest {manifest}: malformed CSV: {exc}") from exc
    except FileNotFoundError as exc:
        raise DataError(f"manifest not found: {manifest}") from exc


def _read_rows(
    manifest: Path, handle: TextIO, class_names: Sequence[str], labels: LabelPolicy, outside_paths: bool
) -> list[ManifestRow]:
    reader = csv.reader(handle)
    header = next(reader, None)
    if header is None or not any(cell.strip() for cell in header):
        raise DataError(
            f"manifest {manifest} is empty: expected a header line with columns "
            f"{', '.join(REQUIRED_COLUMNS if labels == 'required' else ('path', '[label]'))}"
        )
    columns = [name.strip() for name in header]
    required = REQUIRED_COLUMNS if labels == "required" or "label" in columns else ("path",)
    missing = [name for name in required if name not in columns]
    if missing:
        raise DataError(
            f"manifest {manifest} line 1: missing required column(s) {', '.join(missing)}; "
            f"found columns: {', '.join(repr(c) for c in columns)}"
        )
    repeated = sorted({name for name in columns if name and columns.count(name) > 1})
    if repeated:
        raise DataError(f"manifest {manifest} line 1: column(s) {', '.join(repeated)} appear more than once")
    known = (*REQUIRED_COLUMNS, *OPTIONAL_COLUMNS, NAME_COLUMN)
    position = {name: columns.index(name) for name in known if name in columns}

    rows: list[ManifestRow] = []
    first_line_of: dict[Path, int] = {}
    for cells in reader:
        line = reader.line_num
        if not any(cell.strip() for cell in cells):
            continue  # a blank line holds no row
        where = f"manifest {manifest} line {line}"
        if len(cells) != len(columns):
            raise DataError(f"{where}: has {len(cells)} cells, the header has {len(columns)}")
        values = {name: cells[index].strip() for name, index in position.items()}
        rows.append(_check_row(manifest, where, line, values, class_names, first_line_of, outside_paths))
    if not rows:
        raise DataError(f"manifest {manifest} is empty: it has a header but no rows")
    return rows


def _check_row(
    manifest: Path,
    where: str,
    line: int,
    values: dict[str, str],
    class_names: Sequence[str],
    first_line_of: dict[Path, int],
    outside_paths: bool,
) -> ManifestRow:
    if not values["path"]:
        raise DataError(f"{where}: empty path cell")
    folder = Path(os.path.normpath(manifest.parent.absolute()))
    path = Path(os.path.normpath(folder / values["path"]))
    if not outside_paths and not path.is_relative_to(folder):
        raise DataError(
            f"{where}: path {values['path']!r} lies outside the manifest's folder {folder}; image paths are "
            "relative to it (give --allow-outside-paths to read images elsewhere)"
        )
    if path in first_line_of:
        raise DataError(f"{where}: duplicate path {values['path']!r}, already listed on line {first_line_of[path]}")
    first_line_of[path] = line
    label = parse_label(values["label"], class_names) if "label" in values else None
    if "label" in values and label is None:
        raise DataError(f"{where}: unknown label value {values['label']!r}; allowed: {allowed_labels(class_names)}")
    for column in OPTIONAL_COLUMNS:
        if column in values and not values[column]:
            raise DataError(f"{where}: empty {column} cell")
    if not path.is_file():
        raise DataError(f"{where}: image file not found: {path}")
    return ManifestRow(
        line=line,
        path=path,
        label=label,
        patient_id=values.get("patient_id") or str(path),
        site=values.get("site"),
        label_name=values.get(NAME_COLUMN) or None,
    )


def names_from_column(manifest: Path, rows: Sequence[ManifestRow], defaults: Sequence[str]) -> list[str]:
    """The class names a manifest's `label_name` column gives (a class no row names keeps its default)."""
    names = list(defaults)
    first: dict[int, ManifestRow] = {}
    for row in rows:
        if row.label is None or row.label_name is None:
            continue
        seen = first.setdefault(row.label, row)
        if seen.label_name != row.label_name:
            raise DataError(
                f"manifest {manifest} line {row.line}: label {row.label} is named {row.label_name!r}, "
                f"but {seen.label_name!r} on line {seen.line}"
            )
        names[row.label] = row.label_name
    if len(set(names)) != len(names):
        raise DataError(f"manifest {manifest}: its label_name column names two classes alike: {names}")
    return names


def load_manifest(
    manifest: str | Path,
    *,
    image_size: int,
    channels: int,
    class_names: Sequence[str],
    progress: bool = True,
    labels: LabelPolicy = "required",
    outside_paths: bool = False,
    named_by_column: bool = False,
) -> ImageSet:
    """Decode every image listed in `manifest` into an ImageSet (see `load_image_set`).

    ``named_by_column``: no class names were configured; the `label_name` column, if any, gives them."""
    manifest = Path(manifest)
    rows = read_manifest(manifest, class_names, labels=labels, outside_paths=outside_paths)
    if named_by_column:
        class_names = names_from_column(manifest, rows, class_names)
    images = torch.empty((len(rows), channels, image_size, image_size), dtype=torch.uint8)
    show = progress and len(rows) > PROGRESS_MIN_IMAGES
    bar = tqdm(rows, desc=f"decoding {manifest.name}", unit="img", disable=not show, file=sys.stderr)
    for index, row in enumerate(bar):
        try:
            image = read_image(row.path, channels)
        except DataError as exc:
            raise DataError(f"manifest {manifest} line {row.line}: {exc}") from exc
        pixels = np.array(resize_square(image, image_size), dtype=np.uint8)
        pixels = pixels[None] if pixels.ndim == 2 else pixels.transpose(2, 0, 1)
        images[index] = torch.from_numpy(np.ascontiguousarray(pixels))
    has_sites = rows[0].site is not None
    has_labels = rows[0].label is not None
    return ImageSet(
        images=images,
        labels=torch.tensor([row.label if has_labels else UNLABELLED for row in rows], dtype=torch.int64),
        patient_ids=[row.patient_id for row in rows],
        sites=[row.site for row in rows if row.site is not None] if has_sites else None,
        sources=[str(row.path) for row in rows],
        class_names=list(class_names),
        has_labels=has_labels,
        root=os.path.normpath(manifest.parent.absolute()),
    )
