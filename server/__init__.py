"""The coordinator's ServerApp."""
