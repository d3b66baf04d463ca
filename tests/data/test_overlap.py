"""Held out means held out (fedfreeze/data/overlap.py): images by their pixels, patients by id."""

from __future__ import annotations

import pytest
import torch

from fedfreeze.data.imageset import ImageSet
from fedfreeze.data.overlap import check_distinct_patients_images, check_held_out
from fedfreeze.errors import DataError


def image_set(seeds: list[int], patients: list[str], *, known: bool = True) -> ImageSet:
    """Images whose pixels are fixed by ``seeds`` (the same seed, the same image)."""
    images = torch.stack([torch.randint(0, 256, (1, 8, 8), generator=torch.Generator().manual_seed(s)) for s in seeds])
    return ImageSet(
        images=images.to(torch.uint8),
        labels=torch.tensor([i % 2 for i in range(len(seeds))]),
        patient_ids=patients,
        sites=None,
        sources=[f"img-{s}.png" for s in seeds],
        class_names=["a", "b"],
        patients_known=known,
    )


TRAIN = image_set([1, 2, 3, 4], ["p1", "p1", "p2", "p3"])
SITES = ["site-a", "site-a", "site-b", "site-b"]


def test_disjoint_data_passes_and_the_record_says_how_it_was_checked() -> None:
    record = check_held_out(TRAIN, SITES, {"held-out": image_set([5, 6], ["q1", "q2"])})
    assert record["checked"] and record["patients_compared"]
    assert record["how"] == (
        "2 evaluation-only image(s) compared with 4 training image(s) by the SHA-256 of their decoded pixels, "
        "and their patient ids; none shared"
    )


def test_a_copied_image_is_caught_whatever_its_name_and_patient() -> None:
    with pytest.raises(DataError, match=r"'held-out' is not held out: its image img-3\.png has the same pixels as "):
        check_held_out(TRAIN, SITES, {"held-out": image_set([9, 3], ["q1", "q2"])})


def test_a_shared_patient_is_caught_and_named_with_the_training_site() -> None:
    with pytest.raises(DataError, match=r"patient 'p2' also has images at training site 'site-b'"):
        check_held_out(TRAIN, SITES, {"held-out": image_set([9], ["p2"])})


def test_array_data_numbers_its_images_so_their_ids_are_not_compared() -> None:
    arrays = image_set([1, 2], ["train-0", "train-1"], known=False)
    held = image_set([7, 8], ["train-0", "train-1"], known=False)  # same numbers, other images
    record = check_held_out(arrays, ["s", "s"], {"held-out": held})
    assert not record["patients_compared"] and "patient ids not compared" in record["how"]


def test_a_patient_at_two_training_sites_is_refused() -> None:
    with pytest.raises(DataError, match=r"patient 'p1' has images at training sites 'site-a' and 'site-b'"):
        check_held_out(TRAIN, ["site-a", "site-b", "site-b", "site-b"], {})


def test_one_image_under_two_patient_ids_is_refused_for_an_experiment() -> None:
    assert check_distinct_patients_images(TRAIN, "d.csv")["checked"]
    same_patient_twice = image_set([1, 1], ["p1", "p1"])  # one patient's image listed twice: not a leak
    assert check_distinct_patients_images(same_patient_twice, "d.csv")["checked"]
    with pytest.raises(DataError, match=r"d\.csv: img-1\.png \(patient 'p9'\) has the same pixels as img-1\.png"):
        check_distinct_patients_images(image_set([1, 2, 1], ["p1", "p2", "p9"]), "d.csv")
