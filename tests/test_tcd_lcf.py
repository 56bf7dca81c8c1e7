"""TCD and LCF: each fused step equals its math written out plainly (the draws of LCD's contract,
two separate teacher calls, the DDIM jump in its x0 / eps form, optax AdamW, EMA); f(x, t, t) = x;
TCD with a one-step grid and s = 0 is LCD's objective; LCF's starting state is the LCM itself.
The consistency family's skip curriculum (lcd.k_schedule): the traced grid is skip_grid's,
N(step) follows iCT's doubling stages, one compiled program draws each step's grid (LCF's and
LCD's), and the fused LCF step at a small N (EMA or online target) equals the written-out step
on that N's grid."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lcm_jax.diffusion import consistency
from lcm_jax.diffusion import schedule as sched
from lcm_jax.models import lora
from lcm_jax.objectives.parts import Base
from conftest import f32_tol, fast_compile
from support.lcd import (B, NULL, batch, max_diff, plain_update, randomized, step_tol, tiny_config,
                         tiny_teacher)
from support.lcd import objective as consistency_objective


def plain_draws(objective, state, images, frozen, num_points=None):
    """LCD's per-example draws and latents, written out: n, w, noise, posterior noise, u
    (n ~ U{0..N-1}, N = `num_points`, default the fixed grid's size)."""
    c, teacher = objective.config, objective.base
    rng = jax.random.fold_in(state.rng, state.step)
    keys = [jax.random.fold_in(rng, i) for i in range(B)]
    shape = teacher.latent_shape
    num_points = num_points or len(objective.grid.timesteps)
    n = jnp.stack([jax.random.randint(jax.random.fold_in(k, 0), (), 0, num_points) for k in keys])
    w = jnp.stack([jax.random.uniform(jax.random.fold_in(k, 1), (), jnp.float32, c.lcd.w_min,
                                      c.lcd.w_max) for k in keys])
    noise = jnp.stack([jax.random.normal(jax.random.fold_in(k, 2), shape) for k in keys])
    posterior = jnp.stack([jax.random.normal(jax.random.fold_in(k, 3), shape) for k in keys])
    u = jnp.stack([jax.random.uniform(jax.random.fold_in(k, 4), ()) for k in keys])
    mean, logvar = teacher.vae.apply({"params": frozen["vae"]}, images, method="encode")
    z = (mean + jnp.exp(0.5 * logvar) * posterior) * teacher.vae.config.scaling_factor
    return n, w, noise, u, z


col = lambda a: a[:, None, None, None]


def ddim_jump(abar, x, x0, t, s):
    """alpha_s x0 + sigma_s eps_hat, eps_hat = (x - alpha_t x0) / sigma_t (the DDIM form)."""
    a_t, a_s = col(abar[t]), col(abar[s])
    eps = (x - jnp.sqrt(a_t) * x0) / jnp.sqrt(1 - a_t)
    return jnp.sqrt(a_s) * x0 + jnp.sqrt(1 - a_s) * eps


def reference_step(objective, state, batch, frozen, kind, num_points=None):
    """kind 'tcd': teacher CFG-DDIM pair point, trajectory function to s_end; 'lcf': the forward
    process on the same sample and noise, LCD's c_skip / c_out consistency function.
    `num_points`: the grid's N at this step (a curriculum's), default lcd.num_ddim_timesteps."""
    c, teacher = objective.config, objective.base
    abar = jnp.asarray(teacher.schedule.alphas_cumprod)
    num_points = num_points or c.lcd.num_ddim_timesteps
    n, w, noise, u, z = plain_draws(objective, state, batch["image"], frozen, num_points)
    k = 1000 // num_points
    t = k * (n + 1) - 1
    s = jnp.maximum(t - k, 0)
    x_t = jnp.sqrt(col(abar[t])) * z + jnp.sqrt(1 - col(abar[t])) * noise
    labels = batch["label"]
    x0_of = lambda out, x, tt: (x - jnp.sqrt(1 - col(abar[tt])) * out) / jnp.sqrt(col(abar[tt]))

    if kind == "tcd":
        eps_c = teacher.net.apply(frozen["base"], x_t, t, labels)
        eps_u = teacher.net.apply(frozen["base"], x_t, t, jnp.full_like(labels, NULL))
        x0_c, x0_u = x0_of(eps_c, x_t, t), x0_of(eps_u, x_t, t)
        eps_w = eps_c + col(w) * (eps_c - eps_u)
        x_s = jnp.sqrt(col(abar[s])) * (x0_c + col(w) * (x0_c - x0_u)) + jnp.sqrt(1 - col(abar[s])) * eps_w
        j = jnp.floor(u * (n + 1)).astype(jnp.int32)
        end = jnp.maximum(k * (j + 1) - 1 - k, 0)
    else:
        x_s = jnp.sqrt(col(abar[s])) * z + jnp.sqrt(1 - col(abar[s])) * noise

    lora_mode = bool(c.lcd.get("lora"))
    net = teacher.net if lora_mode else teacher.student_net
    full = (lambda p: lora.merge(frozen["base"], p, c.lcd.lora.alpha)) if lora_mode else (lambda p: p)
    w_emb = None if lora_mode else consistency.guidance_scale_embedding(w, 256)

    def f(params, x, tt):
        x0 = x0_of(net.apply(full(params), x, tt, labels, w_emb), x, tt)
        if kind == "tcd":
            return ddim_jump(abar, x, x0, tt, end)
        st = col(10.0 * tt.astype(jnp.float32))
        return 0.25 / (st ** 2 + 0.25) * x + st / jnp.sqrt(st ** 2 + 0.25) * x0

    target_params = state.params if c.lcd.target == "online" else state.ema_params
    target = f(target_params, x_s, s)
    if kind == "tcd":  # L2
        return plain_update(state, lambda p: jnp.mean((f(p, x_t, t) - target) ** 2))
    return plain_update(state, lambda p: jnp.mean(jnp.sqrt((f(p, x_t, t) - target) ** 2 + 0.001 ** 2) - 0.001))


def lcm_record(config):
    """A 'distilled LCM': the tiny teacher's student network with every param (cond_proj too)
    non-zero, as LCF receives it."""
    teacher = tiny_teacher(config)
    shape = (1,) + teacher.latent_shape
    params = teacher.student_net.init(jax.random.PRNGKey(7), jnp.zeros(shape), jnp.zeros((1,), jnp.int32),
                                      jnp.zeros((1,), jnp.int32), jnp.zeros((1, 256)))
    params = randomized(params, jax.random.PRNGKey(8), 0.2)
    return Base(teacher.student_net, params, teacher.schedule, teacher.prediction_type,
                teacher.conditioning, teacher.latent_shape, teacher.vae, teacher.vae_params,
                student_net=teacher.student_net)  # an LCM: its own network is the student


@pytest.mark.parametrize("kind", ["tcd", "tcd_lora", "lcf"])
def test_fused_step_equals_unfused_math(kind):
    lora_config = dict(rank=4, alpha=4.0, targets=("qkv", "fc1", "fc2")) if kind == "tcd_lora" else None
    config = tiny_config(lora=lora_config, target="online" if lora_config else "ema",
                         loss="l2" if kind.startswith("tcd") else "huber", num_ddim_timesteps=20)
    if kind == "lcf":
        objective = consistency_objective(config, lcm_record(config), "lcf")
        assert not objective.strategy.teacher  # no teacher: nothing to call
    else:
        objective = consistency_objective(config, tiny_teacher(config), "tcd")
    frozen = objective.frozen
    state = jax.jit(objective.init_state)(jax.random.PRNGKey(0), frozen)
    if kind == "lcf":  # the fine-tune starts as the LCM, cond_proj included
        assert max_diff(state.params, frozen["base"]) == 0
    state = state.replace(params=randomized(state.params, jax.random.PRNGKey(5), 0.02),
                          step=jnp.asarray(3, jnp.int32))
    new_state, metrics = fast_compile(objective.train_step, state, batch(), frozen)
    loss, params, ema = fast_compile(functools.partial(reference_step, objective, kind=kind[:3]),
                                     state, batch(), frozen)
    assert float(metrics["loss"]) > 0
    np.testing.assert_allclose(float(metrics["loss"]), float(loss), rtol=1e-5)  # 84 ulps
    assert max_diff(new_state.params, params) <= step_tol(params)  # two programs: see step_tol
    assert max_diff(new_state.ema_params, ema) <= step_tol(ema)
    assert max_diff(new_state.params, state.params) > 1e-4


# ----------------------------------------------------------------------------------------------
# The skip curriculum (lcd.k_schedule): large skips first, one compiled step
# ----------------------------------------------------------------------------------------------

DIVISORS = [n for n in range(1, 1001) if 1000 % n == 0]


def test_traced_skip_pair_is_skip_grid():
    """schedule.skip_pair (N a traced int32) equals skip_grid's arrays for every N dividing T."""
    pair = jax.jit(lambda num, n: sched.skip_pair(1000, num, n))
    n = jnp.arange(1000, dtype=jnp.int32)
    for num in DIVISORS:
        grid = sched.skip_grid(1000, num)
        for t, s in (pair(jnp.int32(num), n), sched.skip_pair(1000, num, n)):  # traced, static N
            np.testing.assert_array_equal(t[:num], grid.timesteps)
            np.testing.assert_array_equal(s[:num], grid.prev_timesteps)
            assert t.dtype == s.dtype == jnp.int32
    assert pair._cache_size() == 1  # N is an argument: one program for every grid


def test_doubling_curriculum_follows_icts_stages():
    """N(step) = min(s0 2^floor(step / K'), s1), K' = floor(K / (log2(floor(s1 / s0)) + 1)):
    hand-computed at the stage boundaries, on this repository's default and on iCT's own
    numbers (s0 = 10, s1 = 1280, K = 400,000: K' = 400,000 / 8 = 50,000); 'constant' keeps
    N = s0."""
    # s0 = 5, s1 = 50, K = 6000: K' = floor(6000 / (log2(10) + 1)) = floor(1388.27) = 1388.
    assert sched.doubling_stages(5, 50, 6000) == ([5, 10, 20, 40, 50], 1388)
    points = jax.jit(sched.skip_curriculum("doubling", 5, 50, 6000))
    expected = {0: 5, 1387: 5, 1388: 10, 2775: 10, 2776: 20, 4163: 20, 4164: 40, 5551: 40,
                5552: 50, 5999: 50, 6000: 50, 10 ** 9: 50}
    assert {step: int(points(jnp.int32(step))) for step in expected} == expected
    ict = sched.skip_curriculum("doubling", 10, 1280, 400_000)
    expected = {0: 10, 49_999: 10, 50_000: 20, 100_000: 40, 149_999: 40, 300_000: 640,
                349_999: 640, 350_000: 1280, 399_999: 1280}
    assert {step: int(ict(step)) for step in expected} == expected
    # Fewer steps than stages: one stage per step (K' >= 1); s0 = s1: the fixed grid throughout.
    assert sched.doubling_stages(5, 50, 4) == ([5, 10, 20, 40, 50], 1)
    assert [int(sched.skip_curriculum("doubling", 5, 50, 4)(k)) for k in range(6)] == [5, 10, 20, 40, 50, 50]
    assert sched.doubling_stages(50, 50, 3000) == ([50], 3000)
    constant = jax.jit(sched.skip_curriculum("constant", 1, 50, 6000))
    assert [int(constant(jnp.int32(k))) for k in (0, 5999, 10 ** 9)] == [1, 1, 1]


def curriculum_config(n_start=5, total_steps=3000, objective="lcf", **lcd):
    """tiny_config with the curriculum: N = 5, 10, 20 (k = 200, 100, 50), K' = 3000 / 3 = 1000."""
    config = tiny_config(loss="huber", num_ddim_timesteps=20, k_schedule="doubling",
                         n_start=n_start, **lcd)
    config.objective, config.total_steps = objective, total_steps
    return config


@pytest.fixture(scope="module")
def lcm():
    return lcm_record(tiny_config(num_ddim_timesteps=20))


def test_curriculum_draws_each_steps_grid_in_one_program(lcm):
    """One jitted draw, the step traced: n < N(step), (t, s) on N(step)'s skip grid, all of it
    visited, for LCF and LCD alike; in the last stage the draws are the fixed grid's bit for bit;
    unset, no curriculum; TCD's end times follow the step's grid."""
    from lcm_jax.objectives import consistency as family

    fixed = consistency_objective(tiny_config(loss="huber", num_ddim_timesteps=20), lcm, "lcf")
    assert fixed.grid_points is None and fixed.config.lcd.k_schedule is None  # today's step
    assert family.curriculum(fixed.config, 1000) is None
    objective = consistency_objective(curriculum_config(), lcm, "lcf")
    rng = jax.random.PRNGKey(11)
    for name in ("lcd", "tcd"):  # the family's: TCD's end times on the step's grid too
        member = consistency_objective(curriculum_config(objective=name), lcm, name).draws
        d = jax.jit(lambda step: member(rng, 512, None, step))(jnp.int32(0))
        np.testing.assert_array_equal(d["t"], sched.skip_grid(1000, 5).timesteps[d["n"]])
    grid = sched.skip_grid(1000, 5)  # end = t_j, j <= n, every such j drawn
    assert np.isin(d["end"], grid.prev_timesteps).all() and (d["end"] <= d["s"]).all()
    assert set(np.asarray(d["end"]).tolist()) == set(grid.prev_timesteps.tolist())
    draws = jax.jit(lambda step: objective.draws(rng, 512, None, step))
    for step, num in ((0, 5), (999, 5), (1000, 10), (1999, 10), (2000, 20), (2999, 20)):
        d = draws(jnp.int32(step))
        grid = sched.skip_grid(1000, num)
        assert int(d["n"].max()) == num - 1 and int(d["n"].min()) == 0
        np.testing.assert_array_equal(d["t"], grid.timesteps[d["n"]])
        np.testing.assert_array_equal(d["s"], grid.prev_timesteps[d["n"]])
    assert draws._cache_size() == 1
    last, today = draws(jnp.int32(2500)), jax.jit(lambda: fixed.draws(rng, 512))()
    assert max_diff(last, today) == 0 and set(last) == set(today)
    with pytest.raises(ValueError, match="train step"):
        objective.draws(rng, 4)


@pytest.mark.parametrize("target", ["ema", "online"])
def test_fused_lcf_step_with_curriculum_equals_unfused_math(lcm, target):
    """At step 3 of 3000, N = 5 (k = 200): the fused step equals the written-out LCF step on the
    5-point grid {199, 399, ..., 999} (t_n = t - 200), with the EMA or the online target (full
    parameters: theta^- = stop_gradient(theta))."""
    objective = consistency_objective(curriculum_config(target=target), lcm, "lcf")
    assert objective.target == target
    frozen = objective.frozen
    state = jax.jit(objective.init_state)(jax.random.PRNGKey(0), frozen)
    state = state.replace(params=randomized(state.params, jax.random.PRNGKey(5), 0.02),
                          step=jnp.asarray(3, jnp.int32))
    new_state, metrics = fast_compile(objective.train_step, state, batch(), frozen)
    loss, params, ema = fast_compile(functools.partial(reference_step, objective, kind="lcf",
                                                       num_points=5), state, batch(), frozen)
    assert float(metrics["skip"]) == 200.0
    assert float(metrics["loss"]) > 0
    np.testing.assert_allclose(float(metrics["loss"]), float(loss), rtol=1e-5)
    assert max_diff(new_state.params, params) <= step_tol(params)
    assert max_diff(new_state.ema_params, ema) <= step_tol(ema)
    assert max_diff(new_state.params, state.params) > 1e-4


def test_curriculum_config_problems():
    from lcm_jax.objectives import consistency as family, lcf, tcd

    problems = lambda **kw: [p for p in lcf.config_problems(curriculum_config(**kw))
                             if "lcf.lcm_workdir" not in p]
    assert problems() == []
    [line] = problems(n_start=2)
    assert "config.lcd.n_start=2 gives the grid sizes N = [2, 4, 8, 16, 20]" in line
    assert "[16] do not divide num_train_timesteps=1000" in line and "use one of [5, 10, 20]" in line
    [line] = problems(n_start=30)
    assert "must be an integer in [1, lcd.num_ddim_timesteps=20]" in line
    config = curriculum_config()
    config.lcd.k_schedule = "linear"
    assert any("config.lcd.k_schedule='linear' is not a known skip schedule" in p
               for p in lcf.config_problems(config))
    assert [p for p in tcd.config_problems(curriculum_config(objective="tcd"))] == []
    config = curriculum_config()
    config.lcf = dict(k_schedule="doubling")  # the field's old home
    assert any("config.lcf.k_schedule moved to config.lcd.k_schedule" in p
               for p in lcf.config_problems(config))
    with pytest.raises(Exception, match="do not divide"):
        family.curriculum(curriculum_config(n_start=2), 1000)


def test_trajectory_function_is_the_identity_at_its_own_time():
    schedule = sched.make_schedule("scaled_linear", 1000, 0.00085, 0.012)
    x, x0 = (jax.random.normal(jax.random.PRNGKey(i), (4, 4, 4, 4)) for i in range(2))
    t = jnp.asarray([0, 19, 499, 999])
    np.testing.assert_array_equal(consistency.trajectory_consistency_fn(x, x0, t, t, schedule), x)
    # ... and s = 0 on a schedule with abar_0 = 1 gives x0 itself (the data end).
    betas = sched.make_betas("scaled_linear", 1000, 0.00085, 0.012)
    betas[0] = 0.0
    clean = sched.make_schedule(trained_betas=betas)
    np.testing.assert_allclose(consistency.trajectory_consistency_fn(
        x[1:], x0[1:], t[1:], jnp.zeros(3, jnp.int32), clean), x0[1:], atol=1e-6)
    np.testing.assert_array_equal(consistency.trajectory_consistency_fn(x, x0, t * 0, t * 0, clean), x)


def test_tcd_with_a_one_step_grid_and_s_zero_is_lcd():
    """N = 1: t = 999, t_n = 0, so every end is s = 0. With abar_0 = 1, TCD's f(x, 999, 0) = x0_theta
    and f(x_hat, 0, 0) = x_hat; LCD's c_skip(999) = 2.5e-9, c_out(999) = 1 - 1.3e-9 and
    f(x_hat, 0) = x_hat: the two objectives agree to float32 rounding."""
    config = tiny_config(num_ddim_timesteps=1, loss="l2")
    teacher = tiny_teacher(config)
    betas = sched.make_betas("scaled_linear", 1000, 0.00085, 0.012)
    betas[0] = 0.0
    teacher.schedule = sched.make_schedule(trained_betas=betas)
    tcd, lcd = (consistency_objective(config, teacher, name) for name in ("tcd", "lcd"))
    state = jax.jit(tcd.init_state)(jax.random.PRNGKey(0), tcd.frozen)
    state = state.replace(params=randomized(state.params, jax.random.PRNGKey(5), 0.02))
    rng = jax.random.PRNGKey(3)
    ((a, _), grad_a), ((b, _), grad_b) = (fast_compile(
        lambda p, o=o: jax.value_and_grad(o.loss, has_aux=True)(p, state, batch(), o.frozen, rng),
        state.params) for o in (tcd, lcd))
    assert float(a) > 0 and max_diff(grad_a, jax.tree.map(jnp.zeros_like, grad_a)) > 1e-4
    np.testing.assert_allclose(float(a), float(b), rtol=1e-5)
    # Two programs (and c_skip, c_out 1e-9 off 0, 1): 64 ulps of the gradients' scale (~700).
    assert max_diff(grad_a, grad_b) <= f32_tol(64, *jax.tree.leaves(grad_b))


# ----------------------------------------------------------------------------------------------
# Configs and data: checked before anything compiles
# ----------------------------------------------------------------------------------------------

def test_lcf_config_needs_a_distilled_student(tmp_path):
    from configs import digits_lcf
    from lcm_jax import config_checks, teachers

    config = digits_lcf.get_config("tiny")
    config.data.path = str(tmp_path)
    config.lcf.lcm_workdir = str(tmp_path / "W")
    with pytest.raises(config_checks.ConfigError, match=r"lcf.lcm_workdir=.*run README command 1"):
        config_checks.validate(config, device_count=1, process_count=1)
    teachers.save_params(teachers.student_path(str(tmp_path / "W")), {"a": np.zeros(2)})
    config_checks.validate(config, device_count=1, process_count=1)
    config.lcd.lora = dict(rank=4, alpha=4.0)
    config.sample.gamma = 1.5
    with pytest.raises(config_checks.ConfigError) as error:
        config_checks.validate(config, device_count=1, process_count=1)
    assert "config.lcd.lora" in str(error.value) and "LCF fine-tunes the full LCM" in str(error.value)
    assert "config.sample.gamma=1.5 must be in [0, 1]" in str(error.value)


def test_class_conditioning_reads_captions_that_name_classes():
    from lcm_jax.data import digits
    from lcm_jax.objectives.conditioning import ClassConditioning

    cond = ClassConditioning(10, digits.captions(np.arange(10)))
    batch = cond.prepare_batch({"image": np.zeros((2, 1)), "caption": np.asarray(
        [digits.caption(3), digits.caption(7)])})
    np.testing.assert_array_equal(batch["label"], [3, 7])
    assert "caption" not in batch
    with pytest.raises(ValueError, match="name no class"):
        cond.prepare_batch({"caption": np.asarray(["a cat"])})
