"""The chunked attention equals jax.nn.dot_product_attention (values and gradients) and holds
O(chunk x S) of the [B, H, L, S] probabilities."""
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
    assert attention.resolve("auto") == ("chunked" if jax.default_backend() == "cpu" else "xla")
    with pytest.raises(ValueError, match="config.model.attention"):
        attention.resolve("flash")
