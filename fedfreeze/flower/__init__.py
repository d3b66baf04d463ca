"""Flower adapters: the only place fedfreeze's library meets Flower's Message API.

``server`` runs the coordinator's rounds over a Flower ``Grid``; ``client`` answers each message with the site
runtime; ``local_grid`` and ``inprocess`` run both in one process for tests and the evaluation harness.
"""
