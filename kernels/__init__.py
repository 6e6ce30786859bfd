"""Self-contained compute kernels (no imports from paxlike or models)."""
