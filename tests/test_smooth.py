"""Smooth Diffusion: the fused step's penalty equals the one computed from the explicit Jacobian,
its gradient reaches the LoRA factors through the VJP, the running mean (from zero or bias
corrected) survives a resume, and the LoRA init the config names reaches the factors."""
import dataclasses
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import f32_tol
from lcm_jax import data as data_lib
from lcm_jax import train
from lcm_jax.models import convert, lora
from lcm_jax.objectives.smooth import SmoothObjective, variation_penalty
from support import lcd
from support.smooth import tiny_config


@pytest.fixture(scope="module")
def teacher():
    return lcd.tiny_teacher(tiny_config(), w_dim=8)


def objective_and_state(teacher, **smooth):
    objective = SmoothObjective(tiny_config(**smooth), teacher)
    state = objective.init_state(jax.random.PRNGKey(0), objective.frozen)
    if objective.lora:  # B starts at 0: make the adapters matter
        state = state.replace(params=lcd.randomized(state.params, jax.random.PRNGKey(5), 0.1))
    return objective, state


def explicit_loss(objective, params, mean, batch, frozen, rng):
    """The same loss with each example's Jacobian d x0_hat / d eps built as a [D, D] matrix."""
    d = objective.draws(rng, batch["image"].shape[0])
    z = objective.latent.encode(batch, frozen, d["posterior_noise"])
    labels = jnp.where(d["drop"], objective.conditioning.null_class, batch["label"])
    net_params = objective.network.params(params, frozen)
    # jacfwd is forward-mode: the chunked attention (a custom VJP, reverse mode only) is swapped
    # for XLA's, the same math.
    denoiser = objective.network.denoiser
    net = dataclasses.replace(denoiser, module=denoiser.module.clone(attention="xla"))
    alpha, sigma = objective.schedule.alpha_sigma(d["t"])
    shape, dim = z.shape[1:], int(np.prod(z.shape[1:]))

    def example(z, eps, probe, t, label, alpha, sigma):
        def x0_hat(eps_flat):
            x_t = alpha * z + sigma * eps_flat.reshape(shape)
            eps_pred = net.apply(net_params, x_t[None], t[None], label[None])[0]
            return ((x_t - sigma * eps_pred) / alpha).ravel(), eps_pred

        jacobian, eps_pred = jax.jacfwd(x0_hat, has_aux=True)(eps.ravel())  # [D, D]
        u = probe.ravel() * sigma / np.sqrt(dim)
        return jnp.linalg.norm(jacobian.T @ u), jnp.sum((eps_pred - eps) ** 2)

    lengths, mses = jax.vmap(example)(z, d["eps"], d["probe"], d["t"], labels, alpha, sigma)
    new_mean = mean + 0.01 * (jnp.mean(lengths) - mean)
    penalty = jnp.mean((lengths - new_mean) ** 2)
    mse = jnp.sum(mses) / (len(mses) * dim)
    return mse + objective.smooth.lambda_reg * penalty, (penalty, jax.lax.stop_gradient(new_mean))


def test_penalty_and_gradient_equal_explicit_jacobian(teacher):
    objective, state = objective_and_state(teacher, mean_init="zero")
    batch, rng, mean = lcd.batch(), jax.random.PRNGKey(7), jnp.float32(0.3)
    with_mean = state.replace(stats={"variation_mean": mean})
    fused = jax.jit(jax.value_and_grad(lambda p, b: objective.loss(p, with_mean, b, objective.frozen, rng),
                                       has_aux=True))
    explicit = jax.jit(jax.value_and_grad(lambda p, b: explicit_loss(
        objective, p, mean, b, objective.frozen, rng), has_aux=True))
    (loss, (metrics, stats)), grads = fused(state.params, batch)
    new_mean = stats["variation_mean"]
    (ref_loss, (ref_penalty, ref_mean)), ref_grads = explicit(state.params, batch)
    assert metrics["variation_penalty"] > 1e-3  # a real penalty, not a vanishing one
    np.testing.assert_allclose(metrics["variation_penalty"], ref_penalty, rtol=2e-5)
    np.testing.assert_allclose(loss, ref_loss, rtol=2e-5)
    np.testing.assert_allclose(new_mean, ref_mean, rtol=1e-6)
    flat, ref_flat = convert.flatten(grads), convert.flatten(ref_grads)
    # A second derivative through a VJP vs through explicit [D, D] Jacobians, summed in other
    # orders: near-zero elements are cancellations of terms of the gradient's scale, so the
    # absolute floor is 256 ulps of that scale (~50 seen), not a fixed 1e-5.
    for path in flat:
        np.testing.assert_allclose(flat[path], ref_flat[path], rtol=1e-3,
                                   atol=f32_tol(256, ref_flat[path]), err_msg=str(path))


def test_penalty_gradient_reaches_every_lora_factor(teacher):
    """The penalty's own gradient is nonzero in every LoRA factor: it flows through the VJP into
    the adapters, not only through the MSE."""
    objective, state = objective_and_state(teacher)
    penalty = lambda p: objective.loss(p, state, lcd.batch(), objective.frozen,
                                       jax.random.PRNGKey(1))[1][0]["variation_penalty"]
    grads = convert.flatten(jax.jit(jax.grad(penalty))(state.params))
    assert {p[-1] for p in grads} == {"lora_A", "lora_B"}
    assert {p[-2] for p in grads} == {"qkv", "proj"}  # the DiT's attention: ATTENTION_TARGETS
    for path, g in grads.items():
        assert float(jnp.max(jnp.abs(g))) > 0, path


@pytest.mark.slow
def test_running_mean_is_trained_and_restored(teacher, tmp_path):
    """A killed run resumes with the running mean it had: two steps, then the same run resumed
    from step 2, ends bit for bit like four straight steps."""
    config = tiny_config()
    config.checkpoint.update(every_steps=2, keep=2)
    config.sample.update(every_steps=10 ** 6, num_steps=1, num_images=2)
    config.wandb.mode = "disabled"
    objective = SmoothObjective(config, teacher)
    pipeline = lambda: data_lib.make_pipeline(config.data, global_batch_size=config.batch_size, seed=0)
    straight = train.run(config, str(tmp_path), objective, pipeline())
    assert config.smooth.mean_init == "bias_corrected"  # digits_smooth's: the count is restored too
    assert float(straight.stats["variation_mean"]) > 0 and int(straight.stats["variation_updates"]) == 4
    shutil.rmtree(os.path.join(tmp_path, "checkpoints", "4"))  # as if killed after step 2
    resumed = train.run(config, str(tmp_path), objective, pipeline())
    assert int(resumed.step) == 4
    for name in ("variation_mean", "variation_updates"):
        np.testing.assert_array_equal(resumed.stats[name], straight.stats[name])
    for a, b in zip(jax.tree.leaves(resumed.params), jax.tree.leaves(straight.params)):
        np.testing.assert_array_equal(a, b)


def test_bias_corrected_mean_is_the_batch_mean_after_one_update():
    """a_hat_1 = mean L_1 (the penalty is then the lengths' variance), a_hat_2 the two batch means
    weighted (1 - d, 1) / (2 - d); the stats hold the raw average and the count. "zero" is the
    formula it always was, bit for bit, and keeps its one stat."""
    decay, lengths = 0.01, jnp.asarray([[0.5, 0.75, 1.5, 1.25], [2.0, 1.0, 3.0, 2.0]])
    stats = {"variation_mean": jnp.float32(0), "variation_updates": jnp.int32(0)}
    penalty, a_hat, stats = variation_penalty(lengths[0], stats, decay)
    m1, m2 = float(jnp.mean(lengths[0])), float(jnp.mean(lengths[1]))
    np.testing.assert_allclose(a_hat, m1, rtol=1e-6)
    np.testing.assert_allclose(penalty, np.var(lengths[0]), rtol=1e-5)
    assert int(stats["variation_updates"]) == 1
    np.testing.assert_allclose(stats["variation_mean"], decay * m1, rtol=1e-6)  # raw, from 0
    _, a_hat, stats = variation_penalty(lengths[1], stats, decay)
    np.testing.assert_allclose(a_hat, ((1 - decay) * m1 + m2) / (2 - decay), rtol=1e-5)  # float32 powers
    mean = jnp.float32(0.3)
    penalty, a, zero_stats = variation_penalty(lengths[0], {"variation_mean": mean}, decay)
    old_mean = mean + decay * (jnp.mean(lengths[0]) - mean)  # the code before mean_init
    np.testing.assert_array_equal(a, old_mean)
    np.testing.assert_array_equal(penalty, jnp.mean((lengths[0] - old_mean) ** 2))
    assert set(zero_stats) == {"variation_mean"}


def test_configured_lora_init_and_mean_start_reach_the_state(teacher):
    """smooth.lora.init picks the factors' draw (digits_smooth: "gaussian"; "peft" as before);
    mean_init="bias_corrected" adds the update count to the stats, "zero" keeps one stat."""
    rng = jax.random.PRNGKey(0)
    for init, mean_init in (("gaussian", "bias_corrected"), ("peft", "zero")):
        config = tiny_config(mean_init=mean_init)
        config.smooth.lora.init = init
        objective = SmoothObjective(config, teacher)
        state = objective.init_state(rng, objective.frozen)
        expected = lora.init(jax.random.split(rng)[0], objective.frozen["base"],
                             lora.ATTENTION_TARGETS, config.smooth.lora.rank, init)
        assert jax.tree.all(jax.tree.map(np.array_equal, state.params, expected))
        assert set(state.stats) == ({"variation_mean", "variation_updates"}
                                    if mean_init == "bias_corrected" else {"variation_mean"})
    # Through the loss: after the first update a_hat_1 is the batch's mean L.
    config = tiny_config(mean_init="bias_corrected")
    objective = SmoothObjective(config, teacher)
    state = objective.init_state(rng, objective.frozen)
    metrics, stats = jax.jit(lambda p: objective.loss(p, state, lcd.batch(), objective.frozen,
                                                      jax.random.PRNGKey(1))[1])(state.params)
    np.testing.assert_allclose(metrics["variation_mean"], metrics["variation_length"], rtol=1e-6)
    assert int(stats["variation_updates"]) == 1 and float(metrics["variation_length"]) > 0
