"""DiT (adaLN-zero) and the sinusoidal embeddings, on a tiny model (8x8x1, width 32, depth 2)."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import f32_tol
from configs.digits_diffusion import get_config
from lcm_jax.models import dit
from lcm_jax.models.embeddings import sincos_2d, timestep_embedding

B, S, C, K = 2, 8, 1, 3  # batch, image size, channels, classes


def run(f, *args):
    """f(*args) jitted at XLA's backend optimisation level 0: about half the CPU compile time, and
    tiny shapes run in microseconds either way. Each test compiles one program (the model calls
    it compares go in one function): compilation is nearly all of this file's time."""
    return jax.jit(f).lower(*args).compile({"xla_backend_optimization_level": 0})(*args)


def perturb(params, seed=0, scale=0.1):
    """Add noise to every leaf: the zero-init layers make the model at init a constant zero.
    (numpy noise: a jax.random draw per leaf costs seconds of compilation here)."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda p: p + scale * rng.standard_normal(p.shape, np.float32), params)


@pytest.fixture(scope="module")
def setup():
    model = dit.DiT(patch_size=2, width=32, depth=2, num_heads=2, num_classes=K)
    x = jnp.asarray(np.random.default_rng(1).standard_normal((B, S, S, C), np.float32))
    t = jnp.array([0, 999], jnp.int32)
    labels = jnp.array([0, 2], jnp.int32)
    params = run(model.init, jax.random.key(0), x, t, labels)
    return model, params, perturb(params), x, t, labels


def test_shape_dtype(setup):
    model, params, _, x, t, labels = setup
    for m, channels in [(model, C), (model.clone(dtype=jnp.bfloat16, out_channels=3), 3)]:
        p = jax.eval_shape(m.init, jax.random.key(0), x, t, labels)
        assert {a.dtype for a in jax.tree.leaves(p)} == {jnp.dtype(jnp.float32)}  # params fp32
        out = jax.eval_shape(m.apply, p, x, t, labels)
        assert out.shape == (B, S, S, channels) and out.dtype == jnp.float32  # even in bf16


def test_zero_at_init_then_nonzero(setup):
    model, params, pert, x, t, labels = setup
    out0, out1 = run(lambda p, q: (model.apply(p, x, t, labels), model.apply(q, x, t, labels)),
                     params, pert)
    assert out0.shape == (B, S, S, C)
    assert np.all(np.asarray(out0) == 0)  # adaLN-zero + zero final layer
    assert np.abs(np.asarray(out1)).max() > 1e-3


def test_labels(setup):
    model, _, pert, x, t, labels = setup
    null = jnp.full((B,), model.null_class, jnp.int32)
    apply = lambda p, y: model.apply(p, x, t, y)
    none, nulls, a, b = run(lambda p: (apply(p, None), apply(p, null), apply(p, labels),
                                       apply(p, (labels + 1) % K)), pert)
    np.testing.assert_array_equal(none, nulls)
    assert np.abs(np.asarray(a - b)).max() > 1e-4


def test_other_resolution(setup):
    model, _, pert, _, t, labels = setup
    x = jnp.asarray(np.random.default_rng(3).standard_normal((B, 2 * S, 2 * S, C), np.float32))
    out = np.asarray(run(model.apply, pert, x, t + 0.5, labels))  # params built at S x S
    assert out.shape == (B, 2 * S, 2 * S, C) and np.isfinite(out).all() and np.abs(out).max() > 0


def test_remat_same_output_and_grads(setup):
    model, _, pert, x, t, labels = setup

    def value_and_grad(m, params):
        return jax.value_and_grad(lambda p: jnp.mean(m.apply(p, x, t, labels) ** 2))(params)

    (l0, g0), (l1, g1) = run(
        lambda p: (value_and_grad(model, p), value_and_grad(model.clone(remat=True), p)), pert)
    # remat recomputes the forward inside the backward: another graph, which XLA may fuse and
    # sum in another order, so equal to float32 reassociation (64 ulps of the values' scale).
    np.testing.assert_allclose(l0, l1, rtol=0, atol=f32_tol(64, l0))
    assert jax.tree.structure(g0) == jax.tree.structure(g1)
    for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1)):
        np.testing.assert_allclose(a, b, rtol=0, atol=f32_tol(64, a))


@pytest.mark.parametrize("flip", [True, False])
@pytest.mark.parametrize("shift", [0, 1])
def test_timestep_embedding_matches_diffusers(flip, shift):
    torch = pytest.importorskip("torch")
    embeddings = pytest.importorskip("diffusers.models.embeddings")
    t = np.array([0, 1, 10, 999], np.float32)
    for dim in (256, 33):  # 33: the odd-dim zero column
        ours = np.asarray(timestep_embedding(t, dim, flip_sin_to_cos=flip,
                                             downscale_freq_shift=shift))
        ref = embeddings.get_timestep_embedding(torch.tensor(t), dim, flip_sin_to_cos=flip,
                                                downscale_freq_shift=shift).numpy()
        assert ours.shape == ref.shape == (4, dim)
        # Our frequencies are correctly rounded; torch's float32 exp is 1 ulp off in a few of them
        # (3 of 128 at dim 256), an argument error of up to t * ulp(freq) <= t * 2^-23: ~3e-5 rad
        # at t = 999. The sines themselves agree to ~3e-8, so small t is held to 1e-6.
        tol = np.where(t <= 10, 1e-6, t * 2.0 ** -23)[:, None]
        assert np.all(np.abs(ours - ref) <= tol), np.abs(ours - ref).max(axis=1)


def test_sincos_2d():
    d = 16
    emb = sincos_2d(3, 5, d)  # 3 rows x 5 columns, row-major tokens
    assert emb.shape == (15, d) and emb.dtype == np.float32
    q = d // 4  # [sin(col), cos(col), sin(row), cos(row)], q channels each
    np.testing.assert_array_equal(emb[0], np.r_[np.zeros(q), np.ones(q), np.zeros(q), np.ones(q)])
    col1, row1 = emb[1], emb[5]  # (row 0, col 1) and (row 1, col 0)
    np.testing.assert_allclose([col1[0], col1[q], row1[2 * q], row1[3 * q]],
                               [math.sin(1), math.cos(1), math.sin(1), math.cos(1)], rtol=1e-6)
    np.testing.assert_allclose(col1[1], math.sin(10000 ** (-1 / q)), rtol=1e-6)


def test_sincos_2d_matches_diffusers():
    pytest.importorskip("torch")
    embeddings = pytest.importorskip("diffusers.models.embeddings")
    # diffusers' DiT/PixArt positions with base_size = grid size are MAE's arange grid.
    ref = embeddings.get_2d_sincos_pos_embed(32, 6, base_size=6).numpy()
    np.testing.assert_allclose(sincos_2d(6, 6, 32), ref, atol=1e-6)


def test_from_config():
    cfg = get_config().model
    model = dit.from_config(cfg, in_channels=1)
    x, t = jnp.zeros((B, 16, 16, 1)), jnp.zeros((B,), jnp.int32)
    params = jax.eval_shape(model.init, jax.random.key(0), x, t, jnp.zeros((B,), jnp.int32))
    assert sum(p.size for p in jax.tree.leaves(params)) == 1_275_408  # the digits teacher (patch 4)
    assert model.null_class == 10 and model.out_channels == 1
    bad = cfg.copy_and_resolve_references()
    bad.width = 130
    with pytest.raises(ValueError, match=r"config\.model\.width"):
        dit.from_config(bad, in_channels=1)
