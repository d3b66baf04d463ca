"""Manifest CSV reading: columns, rows, paths, labels and the errors that name them."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fedfreeze.data import ImageSet, load_image_set
from fedfreeze.errors import ConfigError, DataError

CLASSES = ["normal", "pneumonia"]
WriteManifest = Callable[..., Path]


def load(manifest: Path, **kwargs: object) -> ImageSet:
    # these manifests name the shipped images where they lie, outside the test's folder; confinement
    # to the manifest's folder (the default) has tests of its own below
    options: dict[str, object] = {"image_size": 32, "progress": False, "outside_paths": True, **kwargs}
    return load_image_set(manifest, **options)  # type: ignore[arg-type]


def test_missing_required_column_names_found_columns(write_manifest: WriteManifest, sample_images: list[Path]) -> None:
    manifest = write_manifest([["path", "patient_id"], [sample_images[0], "p1"]])
    found = r" line 1: missing required column\(s\) label; found columns: 'path', 'patient_id'"
    message = re.escape(str(manifest)) + found
    with pytest.raises(DataError, match=message):
        load(manifest)


def test_empty_manifest_file(write_manifest: WriteManifest) -> None:
    manifest = write_manifest([])
    with pytest.raises(DataError, match=r"manifest .*manifest\.csv is empty: expected a header line"):
        load(manifest)


def test_header_without_rows(write_manifest: WriteManifest) -> None:
    manifest = write_manifest([["path", "label"]])
    with pytest.raises(DataError, match=r"manifest\.csv is empty: it has a header but no rows"):
        load(manifest)


def test_duplicate_path_names_both_lines(write_manifest: WriteManifest, sample_images: list[Path]) -> None:
    a, b = sample_images[:2]
    manifest = write_manifest([["path", "label"], [a, 0], [b, 0], [a, 1]])
    with pytest.raises(DataError, match=r"line 4: duplicate path .*IM-.*, already listed on line 2"):
        load(manifest)


def test_duplicate_detected_through_different_spellings(
    write_manifest: WriteManifest, sample_images: list[Path], tmp_path: Path
) -> None:
    (tmp_path / "imgs").mkdir()
    copy = tmp_path / "imgs" / "a.jpeg"
    copy.write_bytes(sample_images[0].read_bytes())
    spelled = write_manifest([["path", "label"], ["imgs/a.jpeg", 0], [sample_images[1], 1], [copy, 0]], name="s.csv")
    with pytest.raises(DataError, match=r"s\.csv line 4: duplicate path .*a\.jpeg.*, already listed on line 2"):
        load(spelled)
    dotted = write_manifest([["path", "label"], ["./imgs/../imgs/a.jpeg", 0], ["imgs/a.jpeg", 0]], name="d.csv")
    with pytest.raises(DataError, match=r"d\.csv line 3: duplicate path 'imgs/a\.jpeg', already listed on line 2"):
        load(dotted)


def test_missing_file_names_line_and_path(write_manifest: WriteManifest, sample_images: list[Path]) -> None:
    manifest = write_manifest([["path", "label"], [sample_images[0], 0], ["nowhere/gone.png", 1]])
    with pytest.raises(DataError, match=r"manifest .* line 3: image file not found: .*nowhere/gone\.png"):
        load(manifest)


def test_corrupt_png_names_file_and_reason(write_manifest: WriteManifest, tmp_path: Path) -> None:
    (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"not really a png" * 10)
    manifest = write_manifest([["path", "label"], ["bad.png", 0]])
    with pytest.raises(DataError, match=r"manifest .* line 2: cannot decode image .*bad\.png: .+"):
        load(manifest)


def test_truncated_jpeg_is_an_error_not_a_grey_image(
    write_manifest: WriteManifest, sample_images: list[Path], tmp_path: Path
) -> None:
    (tmp_path / "cut.jpeg").write_bytes(sample_images[0].read_bytes()[:1500])
    manifest = write_manifest([["path", "label"], [sample_images[1], 1], ["cut.jpeg", 0]])
    with pytest.raises(DataError, match=r"line 3: cannot decode image .*cut\.jpeg: .*truncated"):
        load(manifest)


def test_unknown_label_lists_allowed_values(write_manifest: WriteManifest, sample_images: list[Path]) -> None:
    manifest = write_manifest([["path", "label"], [sample_images[0], "normal"], [sample_images[1], "cat"]])
    message = r"line 3: unknown label value 'cat'; allowed: 'normal', 'pneumonia' or their indices 0\.\.1"
    with pytest.raises(DataError, match=message):
        load(manifest, class_names=CLASSES)


def test_out_of_range_integer_label(write_manifest: WriteManifest, sample_images: list[Path]) -> None:
    manifest = write_manifest([["path", "label"], [sample_images[0], 2]])
    with pytest.raises(DataError, match=r"line 2: unknown label value '2'; allowed: integers 0\.\.1"):
        load(manifest)


def test_empty_cells_are_errors(write_manifest: WriteManifest, sample_images: list[Path]) -> None:
    no_path = write_manifest([["path", "label"], ["", 0]], name="a.csv")
    with pytest.raises(DataError, match=r"a\.csv line 2: empty path cell"):
        load(no_path)
    no_patient = write_manifest([["path", "label", "patient_id"], [sample_images[0], 0, ""]], name="b.csv")
    with pytest.raises(DataError, match=r"b\.csv line 2: empty patient_id cell"):
        load(no_patient)


def test_row_with_wrong_cell_count(write_manifest: WriteManifest, sample_images: list[Path]) -> None:
    manifest = write_manifest([["path", "label", "site"], [sample_images[0], 0, "a"], [sample_images[1], 1]])
    with pytest.raises(DataError, match=r"line 3: has 2 cells, the header has 3"):
        load(manifest)


def test_split_is_refused_for_manifests(train_manifest: Path) -> None:
    with pytest.raises(ConfigError, match=r"split='train' applies to \.npz and MNIST IDX data only"):
        load(train_manifest, split="train")


def test_label_names_and_indices_give_the_same_labels(
    write_manifest: WriteManifest, train_rows: list[dict[str, str]], train_manifest: Path
) -> None:
    rows = train_rows[:40] + train_rows[-40:]
    folder = train_manifest.parent
    by_name = write_manifest([["path", "label"], *[[folder / r["path"], r["label_name"]] for r in rows]], name="n.csv")
    by_index = write_manifest([["path", "label"], *[[folder / r["path"], r["label"]] for r in rows]], name="i.csv")
    named, indexed = load(by_name, class_names=CLASSES), load(by_index, class_names=CLASSES)
    assert named.labels.tolist() == indexed.labels.tolist() == [int(r["label"]) for r in rows]
    assert named.class_counts() == [40, 40]
    assert named.class_names == CLASSES


def test_relative_and_absolute_paths_load_the_same_pixels(
    write_manifest: WriteManifest, sample_images: list[Path], tmp_path: Path
) -> None:
    copies = tmp_path / "site" / "imgs"
    copies.mkdir(parents=True)
    for image in sample_images:
        (copies / image.name).write_bytes(image.read_bytes())
    rows = [["path", "label"], *[[f"imgs/{p.name}", 0] for p in sample_images]]
    relative = write_manifest(rows, folder=tmp_path / "site")
    absolute = write_manifest([["path", "label"], *[[p, 0] for p in sample_images]], name="abs.csv")
    from_relative, from_absolute = load(relative), load(absolute)
    assert torch.equal(from_relative.images, from_absolute.images)
    assert from_relative.sources == [str(copies / p.name) for p in sample_images]


def test_without_patient_id_each_row_is_its_own_patient(
    write_manifest: WriteManifest, sample_images: list[Path]
) -> None:
    manifest = write_manifest([["path", "label", "note"], *[[p, 0, "x"] for p in sample_images]])
    loaded = load(manifest)
    assert loaded.patient_ids == [str(p) for p in sample_images]
    assert loaded.sites is None


def test_shipped_train_manifest_columns(kermany_train: ImageSet, train_rows: list[dict[str, str]]) -> None:
    assert len(kermany_train) == 300
    assert kermany_train.patient_ids == [r["patient_id"] for r in train_rows]
    assert kermany_train.sites == [r["site"] for r in train_rows]
    assert kermany_train.images.shape == (300, 1, 32, 32)
    # Every decoded image is a real picture, not a blank placeholder.
    per_image_std = kermany_train.images.float().flatten(1).std(dim=1)
    assert float(per_image_std.min()) > 10


def test_progress_bar_on_stderr_only_when_asked(train_manifest: Path, capsys: pytest.CaptureFixture[str]) -> None:
    load_image_set(train_manifest, image_size=16, progress=True, class_names=CLASSES)
    assert "decoding train.csv" in capsys.readouterr().err
    load_image_set(train_manifest, image_size=16, progress=False, class_names=CLASSES)
    assert capsys.readouterr().err == ""


def test_manifest_pixels_match_a_direct_decode(sample_images: list[Path], write_manifest: WriteManifest) -> None:
    manifest = write_manifest([["path", "label"], [sample_images[0], 0]])
    loaded = load(manifest, image_size=224)
    direct = np.asarray(Image.open(sample_images[0]).convert("L"))
    assert np.array_equal(loaded.images[0, 0].numpy(), direct)


@pytest.mark.parametrize("row_path", ["../../etc/passwd", "/etc/passwd", "../missing-anyway.png", "a/../../b.png"])
def test_a_path_outside_the_manifests_folder_is_refused_before_it_is_opened(
    write_manifest: WriteManifest, tmp_path: Path, row_path: str
) -> None:
    """An existing file and a missing one get the same line: the refusal says nothing about the file."""
    manifest = write_manifest([["path", "label"], [row_path, 0]], folder=tmp_path / "site")
    message = rf"line 2: path '{re.escape(row_path)}' lies outside the manifest's folder .*--allow-outside-paths"
    with pytest.raises(DataError, match=message):
        load(manifest, outside_paths=False)


def test_paths_inside_the_folder_load_and_outputs_name_them_relative_to_it(
    write_manifest: WriteManifest, sample_images: list[Path], tmp_path: Path
) -> None:
    folder = tmp_path / "site"
    (folder / "imgs").mkdir(parents=True)
    for i, source in enumerate(sample_images[:2]):
        (folder / "imgs" / f"{i}.jpeg").write_bytes(source.read_bytes())
    manifest = write_manifest([["path", "label"], ["imgs/0.jpeg", 0], [folder / "imgs" / "1.jpeg", 1]], folder=folder)
    data = load(manifest, outside_paths=False)
    assert data.sources == [str(folder / "imgs" / "0.jpeg"), str(folder / "imgs" / "1.jpeg")]
    assert data.source_names() == ["imgs/0.jpeg", "imgs/1.jpeg"]
    outside = load(write_manifest([["path", "label"], [sample_images[0], 0]], name="out.csv", folder=folder))
    assert outside.source_names() == [str(sample_images[0])]  # allowed outside: named in full


def test_label_name_column_names_the_classes_when_none_are_configured(
    write_manifest: WriteManifest, sample_images: list[Path]
) -> None:
    normal, pneumonia = sample_images[0], sample_images[3]
    manifest = write_manifest([["path", "label", "label_name"], [normal, 0, "normal"], [pneumonia, 1, "pneumonia"]])
    assert load(manifest).class_names == CLASSES
    configured = ["healthy", "sick"]  # model.class-names wins over the column
    assert load(manifest, class_names=configured).class_names == configured


def test_label_name_column_that_contradicts_itself_is_refused(
    write_manifest: WriteManifest, sample_images: list[Path]
) -> None:
    a, b, c = sample_images[:3]
    two_names = write_manifest([["path", "label", "label_name"], [a, 0, "normal"], [b, 0, "healthy"]], name="a.csv")
    with pytest.raises(DataError, match=r"line 3: label 0 is named 'healthy', but 'normal' on line 2"):
        load(two_names)
    one_name = write_manifest([["path", "label", "label_name"], [a, 0, "x"], [c, 1, "x"]], name="b.csv")
    with pytest.raises(DataError, match=r"names two classes alike: \['x', 'x'\]"):
        load(one_name)
