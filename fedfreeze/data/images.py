"""Decode one image file (PNG, JPEG or DICOM) into an 8-bit PIL image.

Chest X-rays arrive as 8-bit JPEGs, 16-bit PNGs and DICOMs with their own
grey-scale conventions; everything downstream sees the same thing: an 8-bit
'L' or 'RGB' image in which bone is bright.
"""

from __future__ import annotations

import struct
import warnings
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

from fedfreeze.errors import ConfigError, DataError

DICOM_SUFFIXES = (".dcm", ".dicom")

# What decoders raise on a broken file. Listed rather than `except Exception`
# so a bug in this module still surfaces as itself.
_DECODE_ERRORS: tuple[type[BaseException], ...] = (
    OSError,  # includes PIL.UnidentifiedImageError
    ValueError,
    RuntimeError,
    NotImplementedError,
    AttributeError,
    KeyError,
    TypeError,
    IndexError,
    EOFError,
    SyntaxError,
    struct.error,
    zlib.error,
    Image.DecompressionBombError,
)

_PIL_8BIT_MODES = {"1", "L", "LA", "RGB", "RGBA", "RGBX", "CMYK", "YCbCr"}


def check_channels(channels: int) -> None:
    """Reject a channel count other than 1 (grey) or 3 (RGB)."""
    if channels not in (1, 3):
        raise ConfigError(f"channels should be 1 (grey) or 3 (RGB), got {channels!r}")


def is_dicom(path: Path) -> bool:
    """True for a .dcm/.dicom name or a file with the 'DICM' magic at byte 128."""
    if path.suffix.lower() in DICOM_SUFFIXES:
        return True
    try:
        with path.open("rb") as handle:
            handle.seek(128)
            return handle.read(4) == b"DICM"
    except OSError:
        return False


def to_uint8_by_range(pixels: np.ndarray) -> np.ndarray:
    """Map the array's own min..max onto 0..255 (a constant image becomes all 0).

    Scaling by the real range, not the dtype's, keeps a 12-bit exposure stored
    in 16 bits from turning almost black.
    """
    values = pixels.astype(np.float64)
    low, high = float(values.min()), float(values.max())
    if high <= low:
        return np.zeros(values.shape, dtype=np.uint8)
    scaled = (values - low) * (255.0 / (high - low))
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def read_image(path: Path, channels: int) -> Image.Image:
    """Decode `path` into an 8-bit image with `channels` channels ('L' for 1, 'RGB' for 3).

    Grey sources become RGB by replicating the channel; colour sources become
    grey with PIL's ITU-R 601 luma. Raises DataError naming the file when it
    is missing or cannot be decoded.
    """
    check_channels(channels)
    path = Path(path)
    if not path.is_file():
        raise DataError(f"image file not found: {path}")
    try:
        image = _read_dicom(path) if is_dicom(path) else _read_pil(path)
    except DataError:
        raise
    except _DECODE_ERRORS as exc:
        reason = str(exc) or type(exc).__name__
        raise DataError(f"cannot decode image {path}: {reason}") from exc
    return image.convert("L" if channels == 1 else "RGB")


def _read_pil(path: Path) -> Image.Image:
    """PNG/JPEG (anything PIL opens); deeper-than-8-bit grey is scaled by its range."""
    with Image.open(path) as opened:
        opened.load()
        image = opened.copy()
    if image.mode in ("P", "PA"):
        # Palette to explicit colours; the final convert drops any alpha.
        return image.convert("RGBA")
    if image.mode in _PIL_8BIT_MODES:
        return image
    # 'I;16', 'I;16B', 'I', 'F': 16/32-bit grey.
    return Image.fromarray(to_uint8_by_range(np.asarray(image)), mode="L")


def _read_dicom(path: Path) -> Image.Image:
    """DICOM: modality LUT, then VOI LUT/window, MONOCHROME1 inverted, range to 0..255."""
    import pydicom  # here: most sites read PNG/JPEG, and pydicom costs 0.15 s to import
    from pydicom.errors import InvalidDicomError
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    try:
        dataset = pydicom.dcmread(path)
    except InvalidDicomError as exc:
        raise DataError(f"cannot decode image {path}: {exc}") from exc
    if "PixelData" not in dataset:
        raise DataError(f"cannot decode image {path}: DICOM file has no pixel data")
    frames = int(dataset.get("NumberOfFrames", 1) or 1)
    if frames != 1:
        raise DataError(
            f"cannot decode image {path}: DICOM has {frames} frames; only single-frame images are supported"
        )
    pixels = dataset.pixel_array
    photometric = str(dataset.get("PhotometricInterpretation", "MONOCHROME2")).upper()
    if not photometric.startswith("MONOCHROME"):
        # Colour DICOM: pydicom already converted YBR to RGB by default.
        if pixels.ndim != 3 or pixels.shape[-1] != 3:
            raise DataError(f"cannot decode image {path}: {photometric} pixel array has shape {pixels.shape}")
        return Image.fromarray(to_uint8_by_range(pixels), mode="RGB")
    _check_finite_tags(path, dataset)
    values = apply_modality_lut(pixels, dataset)
    values = apply_voi_lut(values, dataset)
    values = np.asarray(values, dtype=np.float64)
    if not np.isfinite(values).all():
        raise DataError(f"cannot decode image {path}: its DICOM rescale or window gives non-finite pixel values")
    if photometric == "MONOCHROME1":
        # Low values are bright in MONOCHROME1; flip so bone is bright as in MONOCHROME2.
        values = values.max() + values.min() - values
    return Image.fromarray(to_uint8_by_range(values), mode="L")


RESCALE_TAGS = ("RescaleSlope", "RescaleIntercept", "WindowCenter", "WindowWidth")


def _check_finite_tags(path: Path, dataset: object) -> None:
    """RescaleSlope NaN or 1e400 would make every pixel NaN or infinite, decoded as an all-black image:
    refused, naming the tag."""
    for tag in RESCALE_TAGS:
        with warnings.catch_warnings():  # pydicom warns about the value it reads: the error below says it once
            warnings.simplefilter("ignore")
            value = getattr(dataset, tag, None)
        if value is None:
            continue
        values = list(value) if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue" else [value]
        for item in values:
            try:
                number = float(item)
            except (TypeError, ValueError):
                raise DataError(f"cannot decode image {path}: DICOM {tag} {item!r} is not a number") from None
            if not np.isfinite(number):
                raise DataError(f"cannot decode image {path}: DICOM {tag} is {item}, expected a finite number")


def resize_square(image: Image.Image, image_size: int) -> Image.Image:
    """Bilinear, antialiased resize to image_size x image_size (aspect ratio not kept)."""
    if image.size == (image_size, image_size):
        return image
    return image.resize((image_size, image_size), Image.Resampling.BILINEAR)
