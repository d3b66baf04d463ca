"""Load one site's labelled images into memory and split them by patient."""

from fedfreeze.data.dataset import ImageSet, load_image_set
from fedfreeze.data.images import read_image
from fedfreeze.data.splits import Fold, patient_folds, split_patients

__all__ = ["Fold", "ImageSet", "load_image_set", "patient_folds", "read_image", "split_patients"]
