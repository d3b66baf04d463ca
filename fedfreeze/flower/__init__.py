"""Flower adapters: the only place fedfreeze's library meets Flower's Message API.

``server`` runs the coordinator's rounds over a Flower ``Grid``; ``client`` answers each message with the site
runtime; ``local_grid`` and ``inprocess`` run both in one process for tests and the evaluation harness.
"""

import warnings

# Set before anything here imports Flower. ``import flwr`` imports typer (Flower's CLI), which reaches for
# two Click functions that Click 8.2 deprecated: nothing fedfreeze or its user can act on, and shown
# wherever Flower turns deprecation warnings on (its simulation runtime sets them to "once").
warnings.filterwarnings("ignore", category=DeprecationWarning, module="typer$")
