"""Flax NNX models whose weights and activations carry logical axis names."""
