"""Ops graphopt rewrites regions of a model into (each with its own autograd)."""

from .chunked_cross_entropy import chunked_linear_cross_entropy

__all__ = ["chunked_linear_cross_entropy"]
