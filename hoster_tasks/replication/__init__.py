"""Replication: the data path (pipeline) and the per-dataset run (replicator)."""
