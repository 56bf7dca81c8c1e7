"""Gradient accumulation (`optimizer.accumulate_steps`, objectives/common.py): k train steps of
batch B are one optimizer update of batch k B, params AND EMA, with the learning-rate schedule
counting updates; nothing moves on the steps in between. A toy loss goes through the helpers
every objective's train step uses (make_optimizer, TrainState.create, apply_gradients)."""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from conftest import f32_tol
from lcm_jax.objectives import common
from lcm_jax.train import TrainState

UPDATES, K, MICRO_BATCH, EMA, WARMUP = 4, 4, 2, 0.9, 2


def opt_config(k: int):
    # Warmup, cosine decay, clipping (active on 3 of the 4 updates: the toy's gradient norms
    # are 0.26-0.42) and weight decay all depend on the update count or the mean gradient, so a
    # schedule counting train steps, or clipping micro-batch gradients, would show.
    return ml_collections.ConfigDict(dict(lr=0.05, warmup_steps=WARMUP * k, decay="cosine",
                                          grad_clip=0.3, weight_decay=0.01, accumulate_steps=k))


def loss_fn(params, batch):
    pred = jnp.tanh(batch["x"] @ params["w"] + params["b"])
    return jnp.mean((pred - batch["y"]) ** 2)  # a mean over examples, as every objective's loss


def train(k: int, batches):
    """len(batches) train steps with accumulate_steps=k."""
    rng = np.random.default_rng(0)
    params = {"w": jnp.asarray(rng.normal(size=(3, 4)), jnp.float32),
              "b": jnp.asarray(rng.normal(size=(4,)), jnp.float32)}
    tx = common.make_optimizer(opt_config(k), total_steps=UPDATES * k)
    state = TrainState.create(params, tx, jax.random.key(0))

    @jax.jit
    def step(state, batch):
        grads = jax.grad(loss_fn)(state.params, batch)
        return common.apply_gradients(state, grads, {}, tx, EMA)[0]

    states = [state]
    for batch in batches:
        states.append(step(states[-1], batch))
    return states  # [the initial state, then the state after each train step]


def test_k_steps_of_batch_b_equal_one_step_of_batch_kb():
    rng = np.random.default_rng(1)
    big = [{"x": rng.normal(size=(K * MICRO_BATCH, 3)).astype(np.float32),
            "y": rng.uniform(-1, 1, size=(K * MICRO_BATCH, 4)).astype(np.float32)}
           for _ in range(UPDATES)]
    micro = [{n: b[n][i * MICRO_BATCH:(i + 1) * MICRO_BATCH] for n in b} for b in big for i in range(K)]

    one = train(1, big)
    acc = train(K, micro)
    assert isinstance(acc[0].opt_state, optax.MultiStepsState)
    assert not isinstance(one[0].opt_state, optax.MultiStepsState)  # k = 1: no wrapper

    for u in range(UPDATES):
        last = acc[u * K]  # after u updates
        for s in acc[u * K + 1:u * K + K]:  # micro-steps 1..K-1: params and EMA bit for bit
            for a, b in ((s.params, last.params), (s.ema_params, last.ema_params)):
                jax.tree.map(np.testing.assert_array_equal, a, b)
            assert int(s.opt_state.gradient_step) == u
        s = acc[(u + 1) * K]
        assert int(s.opt_state.gradient_step) == u + 1 and int(s.step) == (u + 1) * K
        adam = s.opt_state.inner_opt_state[1][0]
        assert int(adam.count) == u + 1  # AdamW (and its schedule) counted updates only
        # Budget: the mean of K micro-batch means (optax's running mean) and the mean over K B
        # examples round differently (~1 ulp of the gradient); clipping and AdamW's m / sqrt(v)
        # are scale-free, so that stays ~1 ulp of the update (lr << |p|); p + u and the EMA
        # (fused differently in the two programs) round at the params' scale, |p| ~ 2.3: about
        # 1 ulp there per update, 4 updates, x4 margin -> 16 ulps (measured: 0.9).
        for a, b in ((s.params, one[u + 1].params), (s.ema_params, one[u + 1].ema_params)):
            for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
                np.testing.assert_allclose(x, y, rtol=0, atol=f32_tol(16, y))
        if u > 0:  # (the warmup's first update has lr 0) both moved on the K-th micro-step
            for a, b in ((s.params, last.params), (s.ema_params, last.ema_params)):
                assert not np.allclose(a["w"], b["w"])


@pytest.mark.parametrize("k", [0, -1, 2.0, True, "4"])
def test_accumulate_steps_must_be_a_positive_int(k):
    with pytest.raises(ValueError, match="accumulate_steps"):
        common.make_optimizer(ml_collections.ConfigDict(dict(lr=1e-3, accumulate_steps=k)), 8)
