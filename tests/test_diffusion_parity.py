"""The diffusion math against its PyTorch peers (diffusers' schedulers and pipelines), fp32.

Whole sampling loops are driven by the same analytic fake model in both frameworks, with the
same noise fed in (diffusers' `randn_tensor` is patched to return the noise that our samplers
draw at step i), for eps, v and x0 prediction over 1, 2, 4, 8 and 50 steps. A 1-step loop is one
`step()` call; longer loops check every step transitively.
"""
import contextlib
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from conftest import F32_EPS  # noqa: E402
from lcm_jax.diffusion import consistency, samplers, schedule as sched, solvers  # noqa: E402

STEPS = (1, 2, 4, 8, 50)
PREDICTIONS = ("epsilon", "v_prediction", "sample")
SHAPE = (2, 4, 8, 8)  # NCHW for torch; the fake model is elementwise so layout is irrelevant
X_T = np.random.default_rng(0).standard_normal(SHAPE).astype(np.float32)
# Both sides take the same float32 betas: the schedule itself is compared in test_alphas_cumprod
# (torch's float32 linspace rounds some betas differently: abar differs by ~1.3e-6 relative,
# which the x0 = (x - sigma eps) / alpha conversion at t = 999 amplifies ~15x).
BETAS = sched.make_betas().astype(np.float32)
SD = dict(trained_betas=BETAS, num_train_timesteps=1000)


ABAR = np.asarray(sched.make_schedule(trained_betas=BETAS).alphas_cumprod)
# JAX vs torch, each rounding its own way (torch's vectorised tanh / exp depend on the CPU): the
# samplers' x0 = (x - sigma eps) / alpha at t = 999 lifts intermediates to max|x_T| / alpha_999
# ~ 57, where one float32 ulp is ~7e-6 (the worst loop seen: 7.2e-6). 8 ulps of that scale.
TOL = 8 * F32_EPS * float(np.abs(X_T).max()) / float(np.sqrt(ABAR[999]))


def fake_model(x, t, lib, prediction_type="epsilon"):
    """A network with a bounded denoiser D(x, t), as a trained one has, in each output type.

    D = tanh(x) (0.5 + 0.5 t') + 0.1 x cos(3 t'); the output is the eps, v or x0 that D implies
    at x = alpha D + sigma eps. Elementwise, so both frameworks evaluate it alike.
    """
    if lib is torch:
        t = torch.as_tensor(t).long().reshape(-1)
        abar = torch.from_numpy(ABAR)[t]
        col = lambda v: v.float().reshape(-1, *([1] * (x.ndim - 1)))
    else:
        t = jnp.asarray(t).astype(jnp.int32).reshape(-1)
        abar = jnp.asarray(ABAR)[t]
        col = lambda v: v.astype(jnp.float32).reshape(-1, *([1] * (x.ndim - 1)))
    tt, alpha, sigma = col(t) / 1000.0, col(abar) ** 0.5, col(1 - abar) ** 0.5
    d = lib.tanh(x) * (0.5 + 0.5 * tt) + 0.1 * x * lib.cos(3.0 * tt)
    if prediction_type == "sample":
        return d
    eps = (x - alpha * d) / sigma
    return eps if prediction_type == "epsilon" else alpha * eps - sigma * d


def jax_model(prediction_type):
    return lambda x, t: fake_model(x, t, jnp, prediction_type)


@pytest.fixture(scope="module")
def schedule():
    return sched.make_schedule(trained_betas=BETAS)


@pytest.fixture(scope="module")
def x_T():
    return X_T


def noises(rng, n, shape=SHAPE):
    x = jnp.zeros(shape, jnp.float32)
    return [np.asarray(samplers.step_noise(rng, i, x)) for i in range(n)]


@contextlib.contextmanager
def fed_noise(module, values):
    """Make diffusers' scheduler `module` draw `values[i]` at its i-th randn_tensor call."""
    it = iter(values)
    original = module.randn_tensor
    module.randn_tensor = lambda shape, **kw: torch.from_numpy(next(it)).reshape(shape)
    try:
        yield
    finally:
        module.randn_tensor = original


def torch_loop(scheduler, x_T, num_steps, step_kwargs=None, noise_module=None, noise=None):
    pred = scheduler.config.prediction_type
    scheduler.set_timesteps(num_steps)
    x = torch.from_numpy(x_T)
    ctx = fed_noise(noise_module, noise) if noise_module is not None else contextlib.nullcontext()
    with ctx, torch.no_grad():
        for i, t in enumerate(scheduler.timesteps):
            out = fake_model(x, t, torch, pred)
            x = scheduler.step(out, t, x, **(step_kwargs or {})).prev_sample
    return x.numpy()


MEASURED = {}  # test id -> max abs error, written out when LCM_JAX_PARITY_REPORT names a file


@pytest.fixture(autouse=True, scope="module")
def parity_report():
    yield
    path = os.environ.get("LCM_JAX_PARITY_REPORT")
    if path:
        with open(path, "a") as f:
            for name, err in MEASURED.items():
                if name == "_current":
                    continue
                f.write(f"{name}\t{err:.3g}\n")


@pytest.fixture(autouse=True)
def _current_test(request):
    MEASURED["_current"] = request.node.name
    yield


def assert_close(ours, theirs, tol=TOL):
    err = float(np.max(np.abs(np.asarray(ours) - theirs)))
    name = MEASURED.get("_current", "?")
    MEASURED[name] = max(err, MEASURED.get(name, 0.0))
    assert err <= tol, f"max abs error {err:.3g} > {tol}"
    return err


# ------------------------------------------------------------------------------------------------
# Schedules, conversions, grids
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", sched.BETA_SCHEDULES)
def test_alphas_cumprod(kind):
    ours = sched.make_schedule(kind, beta_start=0.0001 if kind == "linear" else 0.00085,
                               beta_end=0.02 if kind == "linear" else 0.012)
    theirs = diffusers.DDPMScheduler(beta_schedule=kind, beta_start=0.0001 if kind == "linear"
                                     else 0.00085, beta_end=0.02 if kind == "linear" else 0.012)
    ref = theirs.alphas_cumprod.numpy()
    rel = np.max(np.abs(np.asarray(ours.alphas_cumprod) / ref - 1))
    assert rel <= (0 if kind == "squaredcos_cap_v2" else 2e-6)  # float32 vs float64 linspace


@pytest.mark.parametrize("prediction_type", PREDICTIONS)
def test_conversions_roundtrip(schedule, prediction_type):
    rng = np.random.default_rng(1)
    x0, eps = rng.standard_normal((2, 3, 4, 4, 2)).astype(np.float32)
    t = jnp.array([10, 900, 500])
    alpha, sigma = schedule.alpha_sigma(t)
    x_t = sched.add_noise(x0, eps, alpha, sigma)
    out = sched.from_x0_eps(x0, eps, alpha, sigma, prediction_type)
    x0_hat, eps_hat = sched.to_x0_eps(out, x_t, alpha, sigma, prediction_type)
    assert_close(x0_hat, x0, 2e-4)  # x0 from eps divides by alpha_900 ~ 0.07
    assert_close(eps_hat, eps, 2e-4)


def test_skip_grid_matches_reference_lcd_solver(schedule):
    """The reference LCD scripts' DDIMSolver and their t_n = max(t_{n+k} - k, 0)."""
    abar = schedule.alphas_cumprod
    T, N = 1000, 50
    step_ratio = T // N
    ref_ts = (np.arange(1, N + 1) * step_ratio).round().astype(np.int64) - 1
    ref_prev_abar = np.asarray([abar[0]] + list(np.asarray(abar)[ref_ts[:-1]]))
    grid = sched.skip_grid(T, N)
    np.testing.assert_array_equal(grid.timesteps, ref_ts)
    np.testing.assert_array_equal(grid.timesteps[[0, 1, -1]], [19, 39, 999])
    np.testing.assert_array_equal(grid.prev_timesteps, np.maximum(ref_ts - 20, 0))
    # abar at t_n is exactly the reference's ddim_alpha_cumprods_prev (incl. abar[0] at index 0).
    assert_close(schedule.abar(grid.prev_timesteps), ref_prev_abar, 0)


def test_skip_grid_rejects_non_divisor():
    with pytest.raises(ValueError, match="must divide"):
        sched.skip_grid(1000, 30)


@pytest.mark.parametrize("n", [1, 2, 3, 4, 8, 50])
def test_lcm_tcd_timesteps(n):
    for cls in (diffusers.LCMScheduler, diffusers.TCDScheduler):
        s = cls(**SD)
        s.set_timesteps(n)
        np.testing.assert_array_equal(sched.lcm_timesteps(n), s.timesteps.numpy())
    assert list(sched.lcm_timesteps(4)) == [999, 759, 499, 259]


def test_lcm_timesteps_original_steps_and_strength():
    s = diffusers.LCMScheduler(**SD)
    s.set_timesteps(4, original_inference_steps=100, strength=0.5)
    np.testing.assert_array_equal(
        sched.lcm_timesteps(4, original_inference_steps=100, strength=0.5), s.timesteps.numpy())


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("n", STEPS)
def test_ddim_and_dpm_timesteps(spacing, n):
    s = diffusers.DDIMScheduler(**SD, timestep_spacing=spacing, steps_offset=1)
    s.set_timesteps(n)
    np.testing.assert_array_equal(sched.ddim_timesteps(n, 1000, spacing, 1), s.timesteps.numpy())
    s = diffusers.DPMSolverMultistepScheduler(**SD, timestep_spacing=spacing, steps_offset=1)
    s.set_timesteps(n)
    np.testing.assert_array_equal(sched.dpm_solver_timesteps(n, 1000, spacing, 1), s.timesteps.numpy())


# ------------------------------------------------------------------------------------------------
# Consistency pieces
# ------------------------------------------------------------------------------------------------

def test_boundary_scalings_match_lcm_scheduler():
    ref = diffusers.LCMScheduler(**SD)
    t = np.array([0, 1, 19, 259, 999])
    c_skip, c_out = consistency.boundary_scalings(t)
    for i, ti in enumerate(t):
        rs, ro = ref.get_scalings_for_boundary_condition_discrete(int(ti))
        assert abs(float(c_skip[i]) - rs) <= 1e-7 and abs(float(c_out[i]) - ro) <= 1e-6
    assert float(c_skip[0]) == 1.0 and float(c_out[0]) == 0.0
    assert 6e-6 < float(c_skip[2]) < 8e-6  # ~7e-6 already at t = 19 (REFERENCE.md)


@pytest.mark.parametrize("dim", [256, 32, 33])
def test_guidance_embedding_matches_lcm_pipeline(dim):
    """Against diffusers' LCM pipeline embedding and the float64 truth of the same formula.

    At w = 14 the arguments are ~1.4e4 rad, where fp32 rounding alone moves them by ~1e-3 rad:
    no fp32 implementation (torch's included, off by 5e-4) can be within 1e-5 of another there.
    So: 1e-5 where the arguments are small; elsewhere the fp32 conditioning bound
    |err| <= 4 eps32 |arg| against the truth, and twice that against the peer.
    """
    import math
    from diffusers import LatentConsistencyModelPipeline as P
    w = np.array([0.0, 0.004, 1.0, 2.5, 7.0, 14.0], np.float32)
    ref = P.get_guidance_scale_embedding(None, torch.from_numpy(w), embedding_dim=dim).numpy()
    ours = np.asarray(consistency.guidance_scale_embedding(w, dim))
    half = dim // 2
    args = (w.astype(np.float64) * 1000)[:, None] * np.exp(
        np.arange(half) * -(math.log(1e4) / (half - 1)))[None]
    truth = np.concatenate([np.sin(args), np.cos(args)] + ([np.zeros((6, 1))] if dim % 2 else []), 1)
    assert ours.shape == (6, dim)
    assert_close(ours[:2], ref[:2], 1e-5)
    bound = 4 * np.finfo(np.float32).eps * np.abs(np.tile(args, 2)) + 1e-6
    assert np.all(np.abs(ours - truth)[:, :2 * half] <= bound)
    assert np.all(np.abs(ours - ref)[:, :2 * half] <= 2 * bound)  # both within it of the truth


def test_trajectory_consistency_fn_is_tcd_jump(schedule):
    rng = np.random.default_rng(3)
    x, x0 = rng.standard_normal((2, 2, 4, 4, 1)).astype(np.float32)
    t, s = jnp.array([999, 500]), jnp.array([300, 500])
    out = consistency.trajectory_consistency_fn(x, x0, t, s, schedule)
    a_t, s_t = schedule.alpha_sigma(t)
    eps = (x - sched.broadcast(a_t, x) * x0) / sched.broadcast(s_t, x)
    assert_close(out, sched.add_noise(x0, eps, *schedule.alpha_sigma(s)), 1e-5)
    assert_close(out[1], x[1], 1e-6)  # f(x, t, t) = x


# ------------------------------------------------------------------------------------------------
# Whole sampling loops
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("prediction_type", PREDICTIONS)
@pytest.mark.parametrize("n", STEPS)
def test_ddim_loop(schedule, x_T, prediction_type, n):
    ref = diffusers.DDIMScheduler(**SD, prediction_type=prediction_type, clip_sample=False,
                                  set_alpha_to_one=False, steps_offset=1)
    ours = samplers.ddim(jax_model(prediction_type), jnp.asarray(x_T), schedule, n, prediction_type=prediction_type)
    assert_close(ours, torch_loop(ref, x_T, n))


@pytest.mark.parametrize("n", [2, 8])
def test_ddim_eta_loop(schedule, x_T, n):
    import diffusers.schedulers.scheduling_ddim as m
    rng = jax.random.key(7)
    ref = diffusers.DDIMScheduler(**SD, clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    theirs = torch_loop(ref, x_T, n, {"eta": 0.7}, m, noises(rng, n))
    ours = samplers.ddim(jax_model("epsilon"), jnp.asarray(x_T), schedule, n, eta=0.7, rng=rng)
    assert_close(ours, theirs)


@pytest.mark.parametrize("algorithm", ["dpmsolver++", "dpmsolver"])
@pytest.mark.parametrize("prediction_type", PREDICTIONS)
@pytest.mark.parametrize("n", STEPS)
def test_dpm_solver_multistep_loop(schedule, x_T, algorithm, prediction_type, n):
    final = "zero" if algorithm == "dpmsolver++" else "sigma_min"
    ref = diffusers.DPMSolverMultistepScheduler(**SD, prediction_type=prediction_type,
                                                algorithm_type=algorithm, solver_order=2,
                                                final_sigmas_type=final)
    ours = samplers.dpm_solver_multistep(jax_model(prediction_type), jnp.asarray(x_T), schedule, n,
                                         prediction_type=prediction_type, algorithm=algorithm,
                                         final_sigmas_type=final)
    assert_close(ours, torch_loop(ref, x_T, n))


@pytest.mark.parametrize("algorithm", ["dpmsolver++", "dpmsolver"])
@pytest.mark.parametrize("prediction_type", PREDICTIONS)
@pytest.mark.parametrize("n", STEPS + (5,))
def test_dpm_solver_singlestep_loop(schedule, x_T, algorithm, prediction_type, n):
    final = "zero" if algorithm == "dpmsolver++" else "sigma_min"
    ref = diffusers.DPMSolverSinglestepScheduler(**SD, prediction_type=prediction_type,
                                                 algorithm_type=algorithm, solver_order=2,
                                                 final_sigmas_type=final)
    ours = samplers.dpm_solver_singlestep(jax_model(prediction_type), jnp.asarray(x_T), schedule, n,
                                          prediction_type=prediction_type, algorithm=algorithm,
                                          final_sigmas_type=final)
    # With n = 2 the noise-form solver takes ONE second-order step from t = 999 to sigma_min:
    # (alpha_e / alpha_s) x ~ 14.6 x and sigma_e (e^h - 1) eps nearly cancel (terms ~50, result
    # ~1), so fp32 rounding of the two implementations differs by ~17 ulps of those terms.
    assert_close(ours, torch_loop(ref, x_T, n), 1e-4 if (algorithm, n) == ("dpmsolver", 2) else TOL)


@pytest.mark.parametrize("prediction_type", PREDICTIONS)
@pytest.mark.parametrize("n", STEPS)
def test_lcm_loop(schedule, x_T, prediction_type, n):
    import diffusers.schedulers.scheduling_lcm as m
    rng = jax.random.key(11)
    ref = diffusers.LCMScheduler(**SD, prediction_type=prediction_type)
    theirs = torch_loop(ref, x_T, n, None, m, noises(rng, n))
    ours = samplers.lcm(jax_model(prediction_type), jnp.asarray(x_T), schedule, n, prediction_type=prediction_type,
                        rng=rng)
    assert_close(ours, theirs)


@pytest.mark.parametrize("gamma", [0.0, 0.3, 0.7, 1.0])
@pytest.mark.parametrize("prediction_type", PREDICTIONS)
@pytest.mark.parametrize("n", STEPS)
def test_tcd_loop(schedule, x_T, gamma, prediction_type, n):
    import diffusers.schedulers.scheduling_tcd as m
    rng = jax.random.key(13)
    ref = diffusers.TCDScheduler(**SD, prediction_type=prediction_type)
    theirs = torch_loop(ref, x_T, n, {"eta": gamma}, m, noises(rng, n))
    ours = samplers.tcd(jax_model(prediction_type), jnp.asarray(x_T), schedule, n, gamma=gamma,
                        prediction_type=prediction_type, rng=rng)
    assert_close(ours, theirs)


def test_guided_model_fn_is_one_batched_call():
    calls = []

    def apply_fn(x, t, cond):
        calls.append(x.shape[0])
        return x * cond[:, None]

    x = jnp.ones((3, 2))
    out = samplers.guided(apply_fn, jnp.full((3,), 2.0), jnp.full((3,), 0.5), 7.5)(x, jnp.zeros(3))
    assert calls == [6]
    assert_close(out, np.full((3, 2), 0.5 + 7.5 * 1.5), 0)


# ------------------------------------------------------------------------------------------------
# One-step solvers Psi (LCD): checked against diffusers' singlestep DPM-Solver on a 2-point grid
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("solver,algorithm", [("dpm_solver", "dpmsolver"),
                                              ("dpm_solver_pp", "dpmsolver++")])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_psi_second_order_matches_singlestep_update(schedule, x_T, solver, algorithm,
                                                    prediction_type):
    """Psi from t to s through the midpoint m equals diffusers' singlestep 2nd-order update."""
    t, s = 519, 499
    m = (t + s) // 2
    ref = diffusers.DPMSolverSinglestepScheduler(**SD, prediction_type=prediction_type,
                                                 algorithm_type=algorithm,
                                                 final_sigmas_type="sigma_min")  # unused here
    ref.set_timesteps(timesteps=[t, m, s])  # sigmas at t, m, s (+ final)
    x = torch.from_numpy(x_T)
    ref._step_index = 0
    out0 = ref.convert_model_output(fake_model(x, t, torch, prediction_type), sample=x)
    x_m = ref.dpm_solver_first_order_update(out0, sample=x)
    ref._step_index = 1
    out1 = ref.convert_model_output(fake_model(x_m, m, torch, prediction_type), sample=x_m)
    theirs = ref.singlestep_dpm_solver_second_order_update([out0, out1], sample=x).numpy()

    def denoise(z, tt):
        return sched.to_x0_eps(jax_model(prediction_type)(z, tt), z, *schedule.alpha_sigma(tt),
                               prediction_type)

    tt, ss = jnp.full((2,), t), jnp.full((2,), s)
    x0, eps = denoise(jnp.asarray(x_T), tt)
    ours = solvers.psi(solver, jnp.asarray(x_T), tt, ss, x0, eps, denoise, schedule)
    assert_close(ours, theirs)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_psi_ddim_is_reference_ddim_step(schedule, x_T, prediction_type):
    """The reference LCD DDIMSolver step (with v converted to eps first, not used raw)."""
    t, s = jnp.array([999, 19]), jnp.array([979, 0])
    x = jnp.asarray(x_T)
    out = jax_model(prediction_type)(x, t)
    x0, eps = sched.to_x0_eps(out, x, *schedule.alpha_sigma(t), prediction_type)
    abar_prev = schedule.abar(s)[:, None, None, None]
    ref = jnp.sqrt(abar_prev) * x0 + jnp.sqrt(1 - abar_prev) * eps
    assert_close(solvers.psi("ddim", x, t, s, x0, eps, None, schedule), ref)
