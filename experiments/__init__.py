"""Experiments for twophase_optax: models, data, training scripts and benchmarks."""
