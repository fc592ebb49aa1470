"""Logit-space curvature kernels (softmax cross-entropy)."""

from curvwatch.kernels.cross_entropy import cross_entropy_logit_hvp

__all__ = ["cross_entropy_logit_hvp"]
