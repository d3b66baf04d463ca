"""Statistics a clinical paper can stand on: experiment folds, DeLong, bootstrap, analysis, calibration,
external validation, and the pooled statistics of released cells (the harness is ``fedfreeze.experiment``)."""
