"""paxlike: a JAX/XLA SPMD training system for language models."""
