"""The chunked attention equals jax.nn.dot_product_attention (values and gradients) and holds
O(chunk x S) of the [B, H, L, S] probabilities; "auto" picks cuDNN / the Pallas TPU kernel where
they can run (the backend mocked), and the TPU kernel, run in interpret mode on CPU, equals XLA's."""
import functools
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lcm_jax.models import attention


def _qkv(rng, length, keys, dtype=jnp.float32, heads=3, dim=8):
    shapes = ((2, length, heads, dim), (2, keys, heads, dim), (2, keys, heads, dim), (2, length, heads, dim))
    return [jnp.asarray(rng.standard_normal(s) * 2, dtype) for s in shapes]


@pytest.mark.parametrize("length,keys,chunk,dtype,tol", [
    (64, 64, 1024, jnp.float32, 2e-6),   # one chunk
    (96, 16, 32, jnp.float32, 2e-6),     # three query chunks, cross-attention
    (64, 64, 16, jnp.bfloat16, 3e-2),    # bf16 compute, fp32 logits and softmax
])
def test_chunked_equals_xla(length, keys, chunk, dtype, tol):
    q, k, v, d_out = _qkv(np.random.default_rng(0), length, keys, dtype)
    loss = lambda impl: lambda q, k, v: jnp.sum(
        (impl(q, k, v) * d_out).astype(jnp.float32))
    xla = lambda q, k, v: attention.dot_product_attention(q, k, v, "xla")
    ours = lambda q, k, v: attention.dot_product_attention(q, k, v, "chunked", query_chunk=chunk)
    assert attention._chunk_size(length, chunk) == min(length, chunk)
    pairs = [(xla(q, k, v), ours(q, k, v))]
    pairs += zip(jax.grad(loss(xla), (0, 1, 2))(q, k, v), jax.grad(loss(ours), (0, 1, 2))(q, k, v))
    for want, got in pairs:
        assert got.dtype == want.dtype and got.shape == want.shape
        scale = float(jnp.max(jnp.abs(want.astype(jnp.float32))))
        np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32),
                                   atol=tol * scale, rtol=0)


def test_chunked_holds_less_than_the_probabilities():
    """The backward of a 2048-token attention: XLA's keeps [B, H, L, S]; chunks of 256 don't."""
    spec = jax.ShapeDtypeStruct((1, 2048, 2, 16), jnp.float32)
    temporaries = {}
    for impl in ("xla", "chunked"):
        grad = jax.grad(lambda q, k, v: jnp.sum(attention.dot_product_attention(q, k, v, impl, 256)),
                        (0, 1, 2))
        temporaries[impl] = jax.jit(grad).lower(spec, spec, spec).compile().memory_analysis().temp_size_in_bytes
    probabilities = 2 * 2048 * 2048 * 4  # measured: xla 101 MB, chunked 18 MB
    assert temporaries["chunked"] < probabilities < temporaries["xla"], temporaries


def test_chunk_sizes_and_choices():
    assert attention._chunk_size(4096, 1024) == 1024
    assert attention._chunk_size(9216, 1024) == 1024  # SD 2.1 at 768^2: 96 x 96 tokens
    assert attention._chunk_size(77, 1024) == 77
    assert attention._chunk_size(4099, 1024) == 4099  # prime: one chunk, not 4099 loop steps
    assert attention.resolve("auto") in (("chunked",) if jax.default_backend() == "cpu"
                                         else ("cudnn", "pallas_tpu", "xla"))
    with pytest.raises(ValueError, match="config.model.attention"):
        attention.resolve("flash")


def _spec(length, keys, dim, dtype=jnp.bfloat16, heads=2):
    return (jax.ShapeDtypeStruct((2, length, heads, dim), dtype),
            *[jax.ShapeDtypeStruct((2, keys, heads, dim), dtype)] * 2)


H200, A100, T4 = ("cuda", "9.0", 1), ("cuda", "8.0", 1), ("cuda", "7.5", 1)
V5E = ("tpu", "TPU v5 lite", 1)


@pytest.mark.parametrize("backend,shapes,want", [
    (("cpu", "", 1), _spec(256, 256, 64), "chunked"),
    (H200, _spec(4096, 4096, 64), "cudnn"),                         # bf16 self-attention
    (H200, _spec(4096, 64, 40, jnp.float16), "cudnn"),              # fp16, short keys
    (H200, _spec(4096, 77, 40), "xla"),                             # SD's 77 text tokens: odd
    (H200, _spec(4096, 4096, 64, jnp.float32), "xla"),              # cuDNN has no fp32 flash
    (H200, _spec(1024, 1024, 160), "cudnn"),                        # <= 256 from Hopper on
    (A100, _spec(1024, 1024, 160), "xla"),                          # <= 128 before
    (H200, _spec(4096, 4096, 512, heads=1), "xla"),                 # the VAE's one wide head
    (H200, _spec(256, 256, 36), "xla"),                             # not a multiple of 8
    (T4, _spec(256, 256, 64), "xla"),                               # pre-Ampere
    (("rocm", "", 1), _spec(256, 256, 64), "xla"),
    (V5E, _spec(4096, 4096, 72, jnp.float32), "pallas_tpu"),        # head dim padded, any dtype
    (V5E, _spec(4096, 77, 64), "xla"),                              # keys would need padding
    (("tpu", "TPU v5 lite", 8), _spec(4096, 4096, 64), "xla"),      # jit can't partition Mosaic
    (("tpu", "TPU v3", 1), _spec(4096, 4096, 64), "xla"),
])
def test_auto_dispatch(monkeypatch, backend, shapes, want):
    monkeypatch.setattr(attention, "_backend", lambda: backend)
    assert attention.resolve("auto", *shapes) == want
    for name in ("xla", "chunked"):
        assert attention.resolve(name, *shapes) == name


def test_named_kernels_refuse_what_they_cannot_run(monkeypatch):
    for backend, name, shapes, why in [
            (("cpu", "", 1), "cudnn", _spec(128, 128, 64), "NVIDIA GPU"),
            (H200, "cudnn", _spec(128, 128, 64, jnp.float32), "float16 / bfloat16"),
            (A100, "cudnn", _spec(128, 128, 160), "<= 128"),
            (("cpu", "", 1), "pallas_tpu", _spec(128, 128, 64), "needs a TPU")]:
        monkeypatch.setattr(attention, "_backend", lambda: backend)
        with pytest.raises(ValueError, match=f"attention='{name}'.*{why}.*config.model.attention"):
            attention.resolve(name, *shapes)
    monkeypatch.setattr(attention, "_backend", lambda: H200)
    assert attention.resolve("cudnn", *_spec(128, 78, 40)) == "cudnn"
    with pytest.raises(ValueError, match="even sequence lengths, not query 128, keys 77"):
        attention.resolve("cudnn", *_spec(128, 77, 40))
    monkeypatch.setattr(attention, "_backend", lambda: ("tpu", "TPU v5 lite", 8))
    assert attention.resolve("pallas_tpu", *_spec(100, 77, 40)) == "pallas_tpu"  # padded; pmap runs it


def test_cudnn_is_asked_for(monkeypatch):
    """On a (pretend) Hopper, bf16 attention asks jax.nn.dot_product_attention for cuDNN, fp32 not."""
    asked = []
    monkeypatch.setattr(attention, "_backend", lambda: H200)
    monkeypatch.setattr(jax.nn, "dot_product_attention",
                        lambda q, k, v, implementation=None: asked.append(implementation) or q)
    q, k, v, _ = _qkv(np.random.default_rng(0), 8, 8, jnp.bfloat16, dim=16)
    attention.dot_product_attention(q, k, v)
    attention.dot_product_attention(q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32))
    assert asked == ["cudnn", None]


def test_pallas_tpu_equals_xla(monkeypatch):
    """The splash kernel in Pallas' interpret mode, through dot_product_attention on a pretend TPU:
    100 queries, 77 keys and head dim 40 are all padded to 128 and the padded keys masked."""
    monkeypatch.setattr(attention, "_backend", lambda: V5E)
    monkeypatch.setattr(attention, "_pallas_tpu", functools.partial(attention._pallas_tpu, interpret=True))
    q, k, v, d_out = [x[:1] for x in _qkv(np.random.default_rng(1), 100, 77, heads=2, dim=40)]
    loss = lambda impl: lambda q, k, v: jnp.sum(attention.dot_product_attention(q, k, v, impl) * d_out)
    want = [attention.dot_product_attention(q, k, v, "xla"), *jax.grad(loss("xla"), (0, 1, 2))(q, k, v)]
    got = [attention.dot_product_attention(q, k, v, "pallas_tpu"),
           *jax.grad(loss("pallas_tpu"), (0, 1, 2))(q, k, v)]
    for w, g in zip(want, got):
        assert g.shape == w.shape and g.dtype == w.dtype
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=0,
                                   atol=2e-6 * float(jnp.max(jnp.abs(w))))


def test_cpu_imports_no_tpu_kernel():
    """The Pallas TPU modules are imported inside _pallas_tpu, so a CPU run never loads them."""
    code = ("import sys, jax.numpy as jnp; from lcm_jax.models import attention; "
            "x = jnp.ones((1, 4, 1, 8)); attention.dot_product_attention(x, x, x); "
            "assert not [m for m in sys.modules if 'pallas' in m], 'pallas imported'")
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ, "JAX_PLATFORMS": "cpu"})
