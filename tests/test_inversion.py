"""Inversion: DDIM inversion equals diffusers' DDIMInverseScheduler step for step, null-text
inversion equals the reference loop (torch Adam, early stop) and reconstructs, slerp's ends."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from conftest import f32_tol
from lcm_jax.diffusion import inversion, samplers
from lcm_jax.diffusion import schedule as sched

SCHEDULE = sched.make_schedule("scaled_linear", 1000, 0.00085, 0.012)
W = np.random.default_rng(0).standard_normal((4, 4)).astype(np.float32) * 0.5


def toy(x, t, lib=jnp):
    """A nonlinear 'network' of (x, t): the same math in jax and torch."""
    scale = (t.reshape(-1, 1, 1, 1) / 1000.0) if lib is jnp else (t / 1000.0)
    return lib.tanh(x @ (W if lib is jnp else torch.from_numpy(W))) * scale + 0.1 * x


@pytest.mark.parametrize("spacing,offset,alpha_one,prediction",
                         [("leading", 1, False, "epsilon"), ("trailing", 0, True, "v_prediction")])
def test_ddim_inversion_equals_diffusers(spacing, offset, alpha_one, prediction):
    from diffusers import DDIMInverseScheduler

    x0 = np.random.default_rng(1).standard_normal((2, 3, 4, 4)).astype(np.float32)
    ours = inversion.ddim_invert(lambda x, t: toy(x, t), jnp.asarray(x0), SCHEDULE, 10,
                                 prediction_type=prediction, timestep_spacing=spacing,
                                 steps_offset=offset, set_alpha_to_one=alpha_one)
    scheduler = DDIMInverseScheduler(beta_schedule="scaled_linear", beta_start=0.00085,
                                     beta_end=0.012, clip_sample=False, set_alpha_to_one=alpha_one,
                                     steps_offset=offset, timestep_spacing=spacing,
                                     prediction_type=prediction)
    scheduler.set_timesteps(10)
    x = torch.from_numpy(x0)
    np.testing.assert_array_equal(inversion.inverse_timesteps(10, 1000, spacing, offset),
                                  scheduler.timesteps.numpy())
    for i, t in enumerate(scheduler.timesteps):
        x = scheduler.step(toy(x, t.float(), torch), int(t), x).prev_sample
        np.testing.assert_allclose(ours[i + 1], x.numpy(), rtol=1e-4, atol=1e-5)


def test_ddim_generate_equals_sampler():
    x_T = jax.random.normal(jax.random.PRNGKey(0), (2, 3, 4, 4))
    model = lambda x, t: toy(x, t)
    ours = inversion.ddim_generate(lambda x, t, i: model(x, t), x_T, SCHEDULE, 20)
    # Two compiled scans of differently written DDIM steps: float32 reassociation, ~2 ulps of the
    # values' scale per step over 20 steps; another grid or formula is off by O(0.1).
    np.testing.assert_allclose(ours, samplers.ddim(model, x_T, SCHEDULE, 20), rtol=0,
                               atol=f32_tol(2 * 20, ours))


def reference_null_text(x_T, targets, null0, ts, abar_prev, guidance, inner_steps):
    """Mokady et al.'s loop as Smooth Diffusion's wrapper runs it, in torch."""
    alphas = torch.from_numpy(np.asarray(SCHEDULE.alphas_cumprod))
    latent, null, nulls, iterations = torch.from_numpy(x_T), torch.from_numpy(null0), [], []
    for i, t in enumerate(ts):
        null = null.detach().clone().requires_grad_(True)
        optimizer = torch.optim.Adam([null], lr=1e-2 * (1.0 - i / 100.0))
        a_t, a_prev = alphas[t], torch.tensor(float(abar_prev[i]))
        tt = torch.tensor(float(t))

        def step(out):
            x0 = (latent - (1 - a_t) ** 0.5 * out) / a_t ** 0.5
            return a_prev ** 0.5 * x0 + (1 - a_prev) ** 0.5 * out

        with torch.no_grad():
            cond = toy(latent, tt, torch)
        j = 0
        for j in range(inner_steps):
            u = toy(latent + null, tt, torch)
            loss = torch.nn.functional.mse_loss(step(u + guidance * (cond - u)), torch.from_numpy(targets[i]))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            if loss.item() < 1e-5 + i * 2e-5:
                break
        iterations.append(j + 1)
        nulls.append(null.detach().numpy().copy())
        with torch.no_grad():
            u = toy(latent + null, tt, torch)
            latent = step(u + guidance * (cond - u))
    return np.stack(nulls), iterations


def test_null_text_inversion_equals_reference_and_reconstructs():
    x0 = jax.random.normal(jax.random.PRNGKey(2), (2, 3, 4, 4))
    cond_fn = lambda x, t: toy(x, t)
    uncond_fn = lambda null, x, t: toy(x + null, t)  # the null input shifts what the model sees
    n, g = 8, 3.0
    path = inversion.ddim_invert(cond_fn, x0, SCHEDULE, n)
    null0 = jnp.zeros((4, 4))
    nulls, iterations = jax.jit(lambda p: inversion.null_text_inversion(
        cond_fn, uncond_fn, null0, p, SCHEDULE, n, g))(path)
    ts, abar_prev = samplers.ddim_grid(SCHEDULE, n)
    ref_nulls, ref_iterations = reference_null_text(np.asarray(path[-1]), np.asarray(path[::-1][1:]),
                                                    np.zeros((4, 4), np.float32), ts,
                                                    np.asarray(abar_prev), g, 10)
    np.testing.assert_array_equal(iterations, ref_iterations)
    # Adam divides each gradient by its own running size, so where one is near 0 the frameworks'
    # rounding moves that element's steps by a larger fraction: errors follow the nulls' overall
    # scale, not each element's value (3.6e-5 seen at scale 0.48; a wrong step is off by ~lr).
    np.testing.assert_allclose(nulls, ref_nulls, rtol=1e-3, atol=1e-4 * np.abs(ref_nulls).max())

    model = inversion.guided_with_null(cond_fn, uncond_fn, g)
    with_nulls = inversion.ddim_generate(lambda x, t, i: model(x, t, nulls[i]), path[-1], SCHEDULE, n)
    plain = inversion.ddim_generate(lambda x, t, i: model(x, t, null0), path[-1], SCHEDULE, n)
    err = lambda x: float(jnp.mean((x - x0) ** 2))
    assert err(with_nulls) < err(plain)  # guided DDIM drifts; the optimised nulls pull it back


def test_slerp():
    a = jax.random.normal(jax.random.PRNGKey(3), (2, 8))
    b = jax.random.normal(jax.random.PRNGKey(4), (2, 8))
    np.testing.assert_allclose(inversion.slerp(a, b, 0.0), a, atol=1e-6)
    np.testing.assert_allclose(inversion.slerp(a, b, 1.0), b, atol=1e-5)
    a, b = a / jnp.linalg.norm(a, axis=-1, keepdims=True), b / jnp.linalg.norm(b, axis=-1, keepdims=True)
    mid = inversion.slerp(a, b, 0.5)  # on the great circle: unit norm, equal angles to both ends
    np.testing.assert_allclose(jnp.linalg.norm(mid, axis=-1), 1.0, rtol=1e-5)
    cos = lambda u, v: jnp.sum(u * v, -1) / jnp.linalg.norm(u, axis=-1) / jnp.linalg.norm(v, axis=-1)
    np.testing.assert_allclose(cos(mid, a), cos(mid, b), rtol=1e-5)
    np.testing.assert_allclose(inversion.slerp(a, a * 1.0001, 0.25), a * 1.000025, rtol=1e-5)  # lerp


def test_latent_model_operations_on_a_toy_model():
    """editing.LatentModel's plumbing on the toy: per-image null sets reconstruct like each image
    inverted alone, shared sets interpolate, class labels refuse to be mixed."""
    from lcm_jax import editing

    model = editing.LatentModel(
        apply=lambda p, x, t, labels: toy(x, t) + 0.01 * labels.reshape(-1, 1, 1, 1),
        uncond_apply=lambda p, null, x, t: toy(x + null, t), params={"net": {}, "vae": {}},
        null=jnp.zeros((4, 4)), schedule=SCHEDULE, prediction_type="epsilon",
        encode=lambda p, x: x, decode=lambda p, z: z,
        condition=lambda labels: jnp.asarray(labels, jnp.float32), ddim=editing.SD_DDIM,
        latent_shape=(3, 4, 4), lerp_conditions=False)
    images = jax.random.normal(jax.random.PRNGKey(5), (2, 3, 4, 4))
    each = model.invert(images, [1, 1], num_steps=4, guidance_scale=3.0, null_text=True, shared_nulls=False)
    assert each.nulls.shape == (2, 4, 4, 4)
    alone = model.invert(images[1:], [1], num_steps=4, guidance_scale=3.0, null_text=True)
    # Batch 2 vs 1: two programs; Adam's rounding as in the null-text test above.
    np.testing.assert_allclose(each.nulls[1], alone.nulls, rtol=1e-4,
                               atol=1e-4 * np.abs(alone.nulls).max())
    np.testing.assert_allclose(model.reconstruct(each)[1], model.reconstruct(alone)[0], rtol=1e-4, atol=1e-5)
    shared = model.invert(images, [1, 1], num_steps=4, guidance_scale=3.0, null_text=True)
    frames = model.interpolate(shared.select(np.array([0])), shared.select(np.array([1])), etas=[0.0, 1.0])
    # Batch 1 vs batch 2: two programs. ~4 ulps per toy call, x 5 for CFG at g = 3, x 4 steps.
    reconstructed = model.reconstruct(shared)[1]
    np.testing.assert_allclose(frames[0, 1], reconstructed, rtol=0,
                               atol=f32_tol(4 * 5 * 4, reconstructed))
    with pytest.raises(ValueError, match="Class labels cannot be interpolated"):
        model.interpolate(shared.select(np.array([0])),
                          editing.Inversion(shared.trajectory[:, 1:], jnp.array([2.0]), shared.nulls, 3.0))
