"""Single-file decoding: DICOM grey conventions, 16-bit PNGs, channels, broken files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

from fedfreeze.data import read_image
from fedfreeze.data.images import is_dicom, to_uint8_by_range
from fedfreeze.errors import ConfigError, DataError

MONO1 = "Fake_MONOHR1.dcm"
MONO2 = "siim_monochrome2.dcm"
NIH_PNG = "00000001_000.png"


def write_dicom(path: Path, pixels: np.ndarray, photometric: str, **elements: object) -> Path:
    """Save an uncompressed single-frame DICOM holding `pixels`, plus extra elements."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    dataset = Dataset()
    dataset.file_meta = meta
    dataset.SOPClassUID = SecondaryCaptureImageStorage
    dataset.Modality = "CR"
    dataset.set_pixel_data(pixels, photometric_interpretation=photometric, bits_stored=8 * pixels.itemsize)
    for keyword, value in elements.items():
        setattr(dataset, keyword, value)
    dataset.save_as(path, enforce_file_format=True)
    return path


def grey(path: Path) -> np.ndarray:
    return np.asarray(read_image(path, channels=1))


def nih_pixels(fixtures_dir: Path) -> np.ndarray:
    return np.asarray(Image.open(fixtures_dir / NIH_PNG).convert("L"))


def test_shipped_dicoms_hold_the_same_stored_pixels(fixtures_dir: Path) -> None:
    # The premise of the next test: only the Photometric Interpretation differs.
    mono1 = pydicom.dcmread(fixtures_dir / MONO1)
    mono2 = pydicom.dcmread(fixtures_dir / MONO2)
    assert (mono1.PhotometricInterpretation, mono2.PhotometricInterpretation) == ("MONOCHROME1", "MONOCHROME2")
    assert np.array_equal(mono1.pixel_array, mono2.pixel_array)


def test_monochrome1_is_read_as_the_negative_of_monochrome2(fixtures_dir: Path) -> None:
    mono1, mono2 = grey(fixtures_dir / MONO1), grey(fixtures_dir / MONO2)
    assert mono1.shape == mono2.shape == (1024, 1024)
    for pixels in (mono1, mono2):
        assert (int(pixels.min()), int(pixels.max())) == (0, 255)
    # 255 - x up to one grey level of rounding at exact .5 ties.
    difference = np.abs(mono1.astype(int) - (255 - mono2.astype(int)))
    assert int(difference.max()) <= 1
    assert float(np.mean(difference == 0)) > 0.99


def test_monochrome2_keeps_stored_order_and_stretches_range(fixtures_dir: Path) -> None:
    raw = pydicom.dcmread(fixtures_dir / MONO2).pixel_array
    assert (int(raw.min()), int(raw.max())) == (0, 254)  # stored range is not quite 0..255
    assert np.array_equal(grey(fixtures_dir / MONO2), to_uint8_by_range(raw))


def test_monochrome1_built_from_a_real_image_is_inverted_back(fixtures_dir: Path, tmp_path: Path) -> None:
    original = nih_pixels(fixtures_dir)
    path = write_dicom(tmp_path / "m1.dcm", 255 - original, "MONOCHROME1")
    assert np.array_equal(grey(path), original)


def test_rescale_and_window_are_applied(fixtures_dir: Path, tmp_path: Path) -> None:
    stored = nih_pixels(fixtures_dir).astype(np.uint16) * 16  # 12-bit-like values 0..4080
    center, width = 0.0, 1000.0  # window over the middle of rescaled values -1024..3056
    path = write_dicom(
        tmp_path / "ct_like.dcm",
        stored,
        "MONOCHROME2",
        RescaleSlope=1,
        RescaleIntercept=-1024,
        WindowCenter=center,
        WindowWidth=width,
    )
    pixels = grey(path).astype(float)
    # DICOM PS3.3 C.11.2.1.2 linear window, computed here independently of pydicom.
    rescaled = stored.astype(float) - 1024
    expected = np.clip((rescaled - (center - 0.5)) / (width - 1) + 0.5, 0, 1) * 255
    assert 0 < float(np.mean(expected == 0)) < 1 and 0 < float(np.mean(expected == 255)) < 1
    assert float(np.abs(pixels - expected).max()) <= 1
    # Without the window the same stored values would simply be stretched.
    plain = write_dicom(tmp_path / "plain.dcm", stored, "MONOCHROME2")
    assert np.array_equal(grey(plain), to_uint8_by_range(stored))


def test_dicom_found_by_magic_without_suffix(fixtures_dir: Path, tmp_path: Path) -> None:
    renamed = tmp_path / "scan.bin"
    renamed.write_bytes((fixtures_dir / MONO2).read_bytes())
    assert is_dicom(renamed)
    assert not is_dicom(fixtures_dir / NIH_PNG)
    assert np.array_equal(grey(renamed), grey(fixtures_dir / MONO2))


def test_sixteen_bit_png_is_scaled_by_its_range_not_clipped(fixtures_dir: Path, tmp_path: Path) -> None:
    original = nih_pixels(fixtures_dir)
    deep = original.astype(np.uint16) * 4 + 1000  # 1000..2020, as a 10-bit detector might store it
    path = tmp_path / "deep.png"
    Image.fromarray(deep).save(path)
    with Image.open(path) as written:
        assert written.mode in ("I;16", "I")
    pixels = grey(path)
    assert pixels.dtype == np.uint8
    assert np.array_equal(pixels, original)


def test_grey_and_rgb_channels(fixtures_dir: Path, sample_images: list[Path]) -> None:
    rgb = read_image(fixtures_dir / NIH_PNG, channels=3)
    assert rgb.mode == "RGB"
    bands = np.asarray(rgb)
    assert np.array_equal(bands[..., 0], bands[..., 1]) and np.array_equal(bands[..., 0], bands[..., 2])
    assert np.array_equal(bands[..., 0], nih_pixels(fixtures_dir))
    # Kermany JPEGs store 3 equal grey channels; grey conversion must give that channel back.
    with Image.open(sample_images[0]) as jpeg:
        assert jpeg.mode == "RGB"
        first_band = np.asarray(jpeg)[..., 0]
    assert np.array_equal(grey(sample_images[0]), first_band)


def test_bad_channels_rejected(fixtures_dir: Path) -> None:
    with pytest.raises(ConfigError, match=r"channels should be 1 \(grey\) or 3 \(RGB\), got 2"):
        read_image(fixtures_dir / NIH_PNG, channels=2)


@pytest.mark.filterwarnings("ignore:End of file reached:UserWarning")
def test_missing_and_broken_files_name_the_file(tmp_path: Path, fixtures_dir: Path) -> None:
    with pytest.raises(DataError, match=r"image file not found: .*absent\.png"):
        read_image(tmp_path / "absent.png", channels=1)
    broken_dicom = tmp_path / "broken.dcm"
    broken_dicom.write_bytes((fixtures_dir / MONO2).read_bytes()[:4000])
    with pytest.raises(DataError, match=r"cannot decode image .*broken\.dcm: .+"):
        read_image(broken_dicom, channels=1)
    text = tmp_path / "notes.jpg"
    text.write_text("not an image")
    with pytest.raises(DataError, match=r"cannot decode image .*notes\.jpg: cannot identify image file"):
        read_image(text, channels=1)
