"""Held out means held out: evaluation data shares no image and no patient with training data.

A report may call a set "data no site trained on" only after this check: every image is compared by
the SHA-256 of its decoded pixels (so a copy under another name or patient id is caught), and
patient ids are compared where the data has real ones (a manifest's; array files number their
images, and the same number in two files says nothing). The record says how the check was made.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from typing import Any

from fedfreeze.data.imageset import ImageSet
from fedfreeze.errors import DataError


def image_hashes(data: ImageSet) -> list[str]:
    """SHA-256 of each image's decoded pixels (uint8, at the size it was loaded)."""
    return [hashlib.sha256(image.contiguous().numpy().tobytes()).hexdigest() for image in data.images]


def check_one_site_per_patient(patient_ids: Sequence[str], sites: Sequence[str], what: str) -> None:
    """A patient with images at two training sites would be validated at one and trained on at the other."""
    owner: dict[str, str] = {}
    for pid, site in zip(patient_ids, sites, strict=True):
        first = owner.setdefault(pid, site)
        if first != site:
            raise DataError(
                f"{what}: patient {pid!r} has images at training sites {first!r} and {site!r}; a patient must "
                "belong to one site"
            )


def check_held_out(
    training: ImageSet, training_sites: Sequence[str], evaluation: Mapping[str, ImageSet]
) -> dict[str, Any]:
    """Refuse an evaluation-only site that shares an image (by content) or a patient with any training
    site, and a patient at two training sites; return the record of how the check was made."""
    check_one_site_per_patient(training.patient_ids, training_sites, "training data")
    image_of = {digest: i for i, digest in enumerate(image_hashes(training))}
    site_of = dict(zip(training.patient_ids, training_sites, strict=True))
    patients_compared = training.patients_known
    for name, held in evaluation.items():
        for i, digest in enumerate(image_hashes(held)):
            if digest in image_of:
                j = image_of[digest]
                raise DataError(
                    f"evaluation-only site {name!r} is not held out: its image {held.sources[i]} has the same "
                    f"pixels as {training.sources[j]} of training site {training_sites[j]!r}"
                )
        if training.patients_known and held.patients_known:
            shared = sorted(set(held.patient_ids) & set(site_of))
            if shared:
                raise DataError(
                    f"evaluation-only site {name!r} is not held out: patient {shared[0]!r} also has images at "
                    f"training site {site_of[shared[0]]!r} ({len(shared)} shared patient(s))"
                )
        else:
            patients_compared = False
    held_images = sum(len(h) for h in evaluation.values())
    how = (
        f"{held_images} evaluation-only image(s) compared with {len(training)} training image(s) by the SHA-256 "
        "of their decoded pixels"
        + (
            ", and their patient ids"
            if patients_compared
            else " (patient ids not compared: array data numbers its images, it names no patients)"
        )
        + "; none shared"
    )
    return {"checked": True, "how": how, "patients_compared": patients_compared}


NOT_CHECKED = {
    "checked": False,
    "how": "not checked: the coordinator sees no site's images, so it cannot compare the evaluation-only sites' "
    "data with the training sites' (fedfreeze simulate, which holds all of it, does)",
    "patients_compared": False,
}


def check_distinct_patients_images(data: ImageSet, what: str) -> dict[str, Any]:
    """One image content under two patient ids could be tested in a fold that trains on its copy:
    refused; returns how the check was made."""
    owner: dict[str, int] = {}
    for i, digest in enumerate(image_hashes(data)):
        j = owner.setdefault(digest, i)
        if data.patient_ids[j] != data.patient_ids[i]:
            raise DataError(
                f"{what}: {data.sources[i]} (patient {data.patient_ids[i]!r}) has the same pixels as "
                f"{data.sources[j]} (patient {data.patient_ids[j]!r}): a test image could train the model in "
                "another patient's name; remove the copy or give both the same patient id"
            )
    return {
        "checked": True,
        "how": f"the {len(data)} images compared by the SHA-256 of their decoded pixels: no image under two "
        "patient ids, so no test fold shares an image with its training folds",
    }
