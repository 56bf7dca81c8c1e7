"""Gaussian feature statistics and the Fréchet distance between them, computed in JAX.

FD = |mu1 - mu2|^2 + Tr(S1) + Tr(S2) - 2 Tr(sqrtm(S1 S2)).

S1 S2 is not symmetric, so a general sqrtm (scipy's Schur method) can return complex noise. Instead
Tr(sqrtm(S1 S2)) = Tr(sqrtm(A)) with A = sqrt(S1) S2 sqrt(S1), which is symmetric PSD (similar to
S1 S2), so two symmetric eighs suffice; round-off negatives are clipped to 0 before the square root.
Everything runs in float64 (scoped with `jax.enable_x64`, so the rest of the process stays float32):
in float32 the trace terms cancel badly once FD is small relative to Tr(S1) + Tr(S2).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def gaussian_stats(features) -> tuple[np.ndarray, np.ndarray]:
    """Mean [D] and unbiased covariance [D, D] (float64) of features [N, D], N >= 2."""
    features = np.asarray(features, dtype=np.float64)
    if features.ndim != 2:
        raise ValueError(f"gaussian_stats expects features [N, D], got shape {features.shape}.")
    if features.shape[0] < 2:
        raise ValueError(f"gaussian_stats needs at least 2 feature vectors, got {features.shape[0]}.")
    if not np.all(np.isfinite(features)):
        raise ValueError("gaussian_stats got non-finite features (NaN/inf in the images?).")
    return features.mean(axis=0), np.cov(features, rowvar=False).reshape(features.shape[1], -1)


class RunningStats:
    """`gaussian_stats` of features streamed in batches: float64 sums of x and x x^T, so FID-50K
    never holds 50k x 2048 features."""

    def __init__(self):
        self.count, self.total, self.outer = 0, None, None

    def update(self, features) -> None:
        f = np.asarray(features, np.float64)
        if not np.all(np.isfinite(f)):
            raise ValueError("RunningStats got non-finite features (NaN/inf in the images?).")
        if self.total is None:
            self.total, self.outer = np.zeros(f.shape[1]), np.zeros((f.shape[1], f.shape[1]))
        self.count, self.total, self.outer = self.count + len(f), self.total + f.sum(0), self.outer + f.T @ f

    def stats(self) -> tuple[np.ndarray, np.ndarray]:
        """Mean [D] and unbiased covariance [D, D], as gaussian_stats gives."""
        if self.count < 2:
            raise ValueError(f"RunningStats needs at least 2 feature vectors, got {self.count}.")
        mu = self.total / self.count
        return mu, (self.outer - self.count * np.outer(mu, mu)) / (self.count - 1)


def _psd_sqrt(matrix):
    """Symmetric square root of a symmetric PSD matrix via eigh (negative round-off clipped)."""
    eigvals, eigvecs = jnp.linalg.eigh((matrix + matrix.T) / 2)
    return (eigvecs * jnp.sqrt(jnp.clip(eigvals, 0.0))) @ eigvecs.T


@jax.jit
def _frechet_distance(mu1, sigma1, mu2, sigma2):
    diff = mu1 - mu2
    sqrt_sigma1 = _psd_sqrt(sigma1)
    inner = sqrt_sigma1 @ sigma2 @ sqrt_sigma1
    inner_eigvals = jnp.linalg.eigvalsh((inner + inner.T) / 2)
    trace_sqrt_product = jnp.sum(jnp.sqrt(jnp.clip(inner_eigvals, 0.0)))
    return diff @ diff + jnp.trace(sigma1) + jnp.trace(sigma2) - 2.0 * trace_sqrt_product


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2); mu [D], sigma [D, D]."""
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    dim = mu1.shape[0]
    if mu1.shape != (dim,) or mu2.shape != (dim,) or sigma1.shape != (dim, dim) or sigma2.shape != (dim, dim):
        raise ValueError(
            f"frechet_distance shape mismatch: mu1 {mu1.shape}, sigma1 {sigma1.shape}, "
            f"mu2 {mu2.shape}, sigma2 {sigma2.shape}; expected mu [D] and sigma [D, D] with one D.")
    with jax.enable_x64(True):
        distance = float(_frechet_distance(mu1, sigma1, mu2, sigma2))
    # Exact value is >= 0; tiny negatives are round-off on identical or near-identical inputs.
    return max(distance, 0.0)
