"""Class names and label parsing shared by the manifest and array readers."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from fedfreeze.errors import ConfigError, DataError


def resolve_class_names(class_names: Sequence[str] | None, num_classes: int | None) -> list[str]:
    """The index -> name list: `class_names` if given, else "0".."num_classes-1" (default 2 classes).

    Both may be given only when they agree, so a 10-name list never meets a
    stale `num_classes=2` silently.
    """
    if class_names is None:
        count = 2 if num_classes is None else num_classes
        if isinstance(count, bool) or not isinstance(count, int) or count < 2:
            raise ConfigError(f"num_classes should be an integer >= 2, got {num_classes!r}")
        return [str(index) for index in range(count)]
    if isinstance(class_names, str):
        raise ConfigError(f"class_names should be a list of names, got the string {class_names!r}")
    names = [str(name).strip() for name in class_names]
    if len(names) < 2:
        raise ConfigError(f"class_names should hold at least 2 names, got {names!r}")
    if any(not name for name in names):
        raise ConfigError(f"class_names should not contain empty names, got {names!r}")
    if len(set(names)) != len(names):
        raise ConfigError(f"class_names should be unique, got {names!r}")
    if num_classes is not None and num_classes != len(names):
        raise ConfigError(f"num_classes is {num_classes!r} but class_names has {len(names)} names: {names!r}")
    return names


def allowed_labels(class_names: Sequence[str]) -> str:
    """Human-readable list of accepted label values, for error messages."""
    indices = f"0..{len(class_names) - 1}"
    if list(class_names) == [str(index) for index in range(len(class_names))]:
        return f"integers {indices}"
    names = ", ".join(repr(name) for name in class_names)
    return f"{names} or their indices {indices}"


def parse_label(value: str, class_names: Sequence[str]) -> int | None:
    """Index of a label cell: a class name, or an integer index in range; None when neither."""
    text = value.strip()
    if text in class_names:
        return list(class_names).index(text)
    try:
        index = int(text)
    except ValueError:
        return None
    return index if 0 <= index < len(class_names) else None


def check_label_array(labels: np.ndarray, class_names: Sequence[str], sources: Sequence[str]) -> np.ndarray:
    """Integer labels from an array file as int64, each in [0, len(class_names))."""
    if labels.size and not np.issubdtype(labels.dtype, np.integer):
        if not np.all(np.equal(np.mod(labels, 1), 0)):
            bad = int(np.flatnonzero(np.mod(labels, 1) != 0)[0])
            raise DataError(
                f"{sources[bad]}: label {labels[bad].item()!r} is not an integer; "
                f"allowed: {allowed_labels(class_names)}"
            )
    as_int = labels.astype(np.int64)
    outside = np.flatnonzero((as_int < 0) | (as_int >= len(class_names)))
    if outside.size:
        bad = int(outside[0])
        raise DataError(
            f"{sources[bad]}: unknown label value {labels[bad].item()!r} ({outside.size} labels out of range); "
            f"allowed: {allowed_labels(class_names)} (set num_classes or class_names to match the data)"
        )
    return as_int
