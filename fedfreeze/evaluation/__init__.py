"""Evaluation a clinical paper can stand on: experiment folds, DeLong, bootstrap, analysis, report."""
