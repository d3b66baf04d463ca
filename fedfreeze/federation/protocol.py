"""Names of the records in fedfreeze's messages (shared by the ServerApp and the ClientApp)."""

ARRAYS = "arrays"    # ArrayRecord: the round's trainable arrays (down and up)
METRICS = "metrics"  # MetricRecord: example counts, timings, validation figures and statistics
CONFIG = "config"    # ConfigRecord: the coordinator's orders for the round
PROOF = "proof"      # ConfigRecord: the site's name and the hash of its frozen weights
BASE = "base"        # ArrayRecord, down only: frozen arrays a site cannot rebuild (merged rounds of train.recipe = "dual")
