"""Smooth Diffusion: the fused step's penalty equals the one computed from the explicit Jacobian,
its gradient reaches the LoRA factors through the VJP, and the running mean survives a resume."""
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
from lcm_jax.models import convert
from lcm_jax.objectives.smooth import SmoothObjective
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
    objective, state = objective_and_state(teacher)
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
    assert float(straight.stats["variation_mean"]) > 0
    shutil.rmtree(os.path.join(tmp_path, "checkpoints", "4"))  # as if killed after step 2
    resumed = train.run(config, str(tmp_path), objective, pipeline())
    assert int(resumed.step) == 4
    np.testing.assert_array_equal(resumed.stats["variation_mean"], straight.stats["variation_mean"])
    for a, b in zip(jax.tree.leaves(resumed.params), jax.tree.leaves(straight.params)):
        np.testing.assert_array_equal(a, b)
