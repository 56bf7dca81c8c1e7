"""Unmasked multi-head attention for the UNet, VAE and DiT / LEGO blocks, [B, L, H, D] layout.

Two implementations of softmax(q k^T / sqrt(D)) v, chosen by the models' `attention` field:

  xla      jax.nn.dot_product_attention: XLA (or cuDNN, where asked) picks the kernel, and autodiff
           keeps the [B, H, L, S] probabilities for the backward pass.
  chunked  memory-efficient attention (Rabe & Staats, arXiv 2112.05682, with FlashAttention's
           backward): queries in chunks of at most `query_chunk`, only the log-sum-exp of each row
           kept, the probabilities recomputed chunk by chunk in the backward pass. Peak memory per
           attention is O(chunk x S) instead of O(L x S) for the forward and the backward.
  auto     chunked on CPU, xla on GPU / TPU (whose programs it leaves unchanged).

`chunked` defines its own VJP, so it supports reverse mode (grad, vjp) only: forward mode through
a model (jax.jvp, jacfwd, e.g. continuous-time consistency training) needs attention="xla".

On XLA's CPU backend `chunked` is also the faster one: autodiff's softmax backward there spends
more time in the [B, H, L, S] reductions and relayouts than the recompute costs
(`python experiments/benchmark.py --suite lcd_breakdown`).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

IMPLEMENTATIONS = ("auto", "xla", "chunked")
QUERY_CHUNK = 1024


def resolve(implementation: str) -> str:
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"attention={implementation!r} is not one of {IMPLEMENTATIONS}; set "
                         f"config.model.attention to one of them.")
    if implementation == "auto":
        return "chunked" if jax.default_backend() == "cpu" else "xla"
    return implementation


def dot_product_attention(q, k, v, implementation: str = "auto", query_chunk: int = QUERY_CHUNK):
    """softmax(q k^T / sqrt(D)) v for q [B, L, H, D], k and v [B, S, H, D] -> [B, L, H, D]."""
    if resolve(implementation) == "xla":
        return jax.nn.dot_product_attention(q, k, v)
    return _chunked(q, k, v, _chunk_size(q.shape[1], query_chunk))


def _chunk_size(length: int, most: int) -> int:
    """The largest divisor of `length` that is <= `most` (4096 -> 1024, 9216 -> 1024, 77 -> 77);
    `length` itself (one chunk) when that divisor is too small to be worth a loop (a prime length)."""
    best = max(c for c in range(1, min(length, most) + 1) if length % c == 0)
    return best if best * 16 >= min(length, most) else length


def _split(x, chunk: int):
    """[B, L, ...] -> [L / chunk, B, chunk, ...], the leading axis scanned over."""
    b, length = x.shape[:2]
    return jnp.moveaxis(x.reshape(b, length // chunk, chunk, *x.shape[2:]), 1, 0)


def _merge(x):
    return jnp.moveaxis(x, 0, 1).reshape(x.shape[1], -1, *x.shape[3:])


def _logits(q, k):
    """Scaled logits [B, H, L, S] in float32 whatever the compute dtype."""
    q = q * jnp.asarray(q.shape[-1] ** -0.5, q.dtype)
    return jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32)


def _forward_chunk(q, k, v):
    s = _logits(q, k)
    m = jax.lax.stop_gradient(jnp.max(s, axis=-1, keepdims=True))
    p = jnp.exp(s - m)
    total = jnp.sum(p, axis=-1, keepdims=True)
    out = jnp.einsum("bhqk,bkhd->bqhd", p.astype(v.dtype), v, preferred_element_type=jnp.float32)
    out = out / jnp.swapaxes(total, 1, 2)  # normalised after the product: L x D divisions, not L x S
    return out.astype(v.dtype), m + jnp.log(total)  # and the row log-sum-exp, [B, H, chunk, 1]


def _forward(q, k, v, chunk):
    if chunk == q.shape[1]:
        return _forward_chunk(q, k, v)
    out, lse = jax.lax.map(lambda qc: _forward_chunk(qc, k, v), _split(q, chunk))
    n, b, h, c, _ = lse.shape  # [N, B, H, chunk, 1] -> [B, H, N * chunk, 1]
    return _merge(out), jnp.moveaxis(lse, 0, 2).reshape(b, h, n * c, 1)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _chunked(q, k, v, chunk):
    return _forward(q, k, v, chunk)[0]


def _chunked_fwd(q, k, v, chunk):
    out, lse = _forward(q, k, v, chunk)
    return out, (q, k, v, out, lse)


def _backward_chunk(k, v, q, out, lse, d_out):
    """One query chunk's dq, and its contributions to dk and dv (FlashAttention's backward)."""
    p = jnp.exp(_logits(q, k) - lse)  # the forward's probabilities, recomputed
    dv = jnp.einsum("bhqk,bqhd->bkhd", p.astype(d_out.dtype), d_out, preferred_element_type=jnp.float32)
    dp = jnp.einsum("bqhd,bkhd->bhqk", d_out, v, preferred_element_type=jnp.float32)
    delta = jnp.einsum("bqhd,bqhd->bhq", d_out.astype(jnp.float32), out.astype(jnp.float32))
    ds = (p * (dp - delta[..., None])).astype(q.dtype)
    scale = q.shape[-1] ** -0.5
    dq = jnp.einsum("bhqk,bkhd->bqhd", ds, k, preferred_element_type=jnp.float32) * scale
    dk = jnp.einsum("bhqk,bqhd->bkhd", ds, q, preferred_element_type=jnp.float32) * scale
    return dq, dk, dv


def _chunked_bwd(chunk, residuals, d_out):
    q, k, v, out, lse = residuals
    if chunk == q.shape[1]:
        dq, dk, dv = _backward_chunk(k, v, q, out, lse, d_out)
    else:
        def step(carry, xs):
            dq, dk, dv = _backward_chunk(k, v, *xs)
            return (carry[0] + dk, carry[1] + dv), dq

        lse_chunks = jnp.moveaxis(lse.reshape(*lse.shape[:2], -1, chunk, 1), 2, 0)
        zeros = jnp.zeros(k.shape, jnp.float32), jnp.zeros(v.shape, jnp.float32)
        (dk, dv), dq = jax.lax.scan(step, zeros, (_split(q, chunk), _split(out, chunk), lse_chunks,
                                                  _split(d_out, chunk)))
        dq = _merge(dq)
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype)


_chunked.defvjp(_chunked_fwd, _chunked_bwd)
