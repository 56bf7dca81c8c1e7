"""LCD: the fused train step equals the same math written out plainly (separate cond / uncond
teacher calls, explicit DDIM, c_skip / c_out, pseudo-Huber, optax, EMA), in full and LoRA mode;
the CFG-augmented solver step is exact for eps AND v teachers with every solver; the w-embedding's
own learning rate (lcd.cond_proj_lr_scale) and init (lcd.zero_init_cond_proj), issue 24."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from lcm_jax.diffusion import consistency
from lcm_jax.diffusion import schedule as sched
from lcm_jax.errors import UserError
from lcm_jax.models import lora
from lcm_jax.objectives import common, conditioning
from lcm_jax.objectives.parts import Base
from conftest import fast_compile
from support.lcd import (B, NULL, batch, max_diff, plain_update, randomized, step_tol, tiny_config,
                         tiny_teacher)
from support.lcd import objective as lcd_objective


# ----------------------------------------------------------------------------------------------
# The same math, unfused and written out
# ----------------------------------------------------------------------------------------------

def reference_step(objective, state, batch, frozen):
    c, teacher = objective.config, objective.base
    abar = jnp.asarray(teacher.schedule.alphas_cumprod)
    rng = jax.random.fold_in(state.rng, state.step)
    keys = [jax.random.fold_in(rng, i) for i in range(B)]  # the per-example draw contract
    shape = teacher.latent_shape
    n = jnp.stack([jax.random.randint(jax.random.fold_in(k, 0), (), 0, 50) for k in keys])
    w = jnp.stack([jax.random.uniform(jax.random.fold_in(k, 1), (), jnp.float32, c.lcd.w_min,
                                      c.lcd.w_max) for k in keys])
    noise = jnp.stack([jax.random.normal(jax.random.fold_in(k, 2), shape) for k in keys])
    posterior = jnp.stack([jax.random.normal(jax.random.fold_in(k, 3), shape) for k in keys])

    mean, logvar = teacher.vae.apply({"params": frozen["vae"]}, batch["image"], method="encode")
    z = (mean + jnp.exp(0.5 * logvar) * posterior) * teacher.vae.config.scaling_factor
    t = 20 * (n + 1) - 1
    s = jnp.maximum(t - 20, 0)
    col = lambda a: a[:, None, None, None]
    a_t, a_s = col(abar[t]), col(abar[s])
    x_t = jnp.sqrt(a_t) * z + jnp.sqrt(1 - a_t) * noise
    labels = batch["label"]

    eps_c = teacher.net.apply(frozen["base"], x_t, t, labels)  # two separate calls
    eps_u = teacher.net.apply(frozen["base"], x_t, t, jnp.full_like(labels, NULL))
    x0_c = (x_t - jnp.sqrt(1 - a_t) * eps_c) / jnp.sqrt(a_t)
    x0_u = (x_t - jnp.sqrt(1 - a_t) * eps_u) / jnp.sqrt(a_t)
    x0_w = x0_c + col(w) * (x0_c - x0_u)
    eps_w = eps_c + col(w) * (eps_c - eps_u)
    x_s = jnp.sqrt(a_s) * x0_w + jnp.sqrt(1 - a_s) * eps_w  # DDIM

    lora_mode = bool(c.lcd.get("lora"))
    net = teacher.net if lora_mode else teacher.student_net
    full = (lambda p: lora.merge(frozen["base"], p, c.lcd.lora.alpha)) if lora_mode else (lambda p: p)
    w_emb = None if lora_mode else consistency.guidance_scale_embedding(w, 256)

    def f(params, x, tt):
        a = col(abar[tt])
        x0 = (x - jnp.sqrt(1 - a) * net.apply(full(params), x, tt, labels, w_emb)) / jnp.sqrt(a)
        st = col(10.0 * tt.astype(jnp.float32))
        return 0.25 / (st ** 2 + 0.25) * x + st / jnp.sqrt(st ** 2 + 0.25) * x0

    target_params = state.params if c.lcd.target == "online" else state.ema_params
    target = f(target_params, x_s, s)
    return plain_update(state, lambda p: jnp.mean(jnp.sqrt((f(p, x_t, t) - target) ** 2 + 0.001 ** 2) - 0.001))


@pytest.mark.parametrize("mode", ["full", "lora"])
def test_fused_step_equals_unfused_math(mode):
    lora_config = dict(rank=4, alpha=4.0, targets=("qkv", "fc1", "fc2")) if mode == "lora" else None
    config = tiny_config(lora=lora_config, target="online" if mode == "lora" else "ema")
    objective = lcd_objective(config, tiny_teacher(config))
    frozen = objective.frozen
    state = jax.jit(objective.init_state)(jax.random.PRNGKey(0), frozen)
    # A state whose online and EMA networks differ, and whose LoRA B is non-zero.
    state = state.replace(params=randomized(state.params, jax.random.PRNGKey(5), 0.02),
                          step=jnp.asarray(3, jnp.int32))
    new_state, metrics = fast_compile(objective.train_step, state, batch(), frozen)
    loss, params, ema = fast_compile(functools.partial(reference_step, objective), state, batch(), frozen)

    assert float(metrics["loss"]) > 0
    np.testing.assert_allclose(float(metrics["loss"]), float(loss), rtol=1e-5)  # 84 ulps
    assert max_diff(new_state.params, params) <= step_tol(params)
    assert max_diff(new_state.ema_params, ema) <= step_tol(ema)
    assert max_diff(new_state.params, state.params) > 1e-4  # the step really moved the params
    if mode == "lora":  # ONE base network: the state holds only the adapters
        assert set(jax.tree.leaves(jax.tree.map(lambda x: x.ndim, state.params))) <= {2}
        assert sum(x.size for x in jax.tree.leaves(state.params)) < 0.2 * sum(
            x.size for x in jax.tree.leaves(frozen["base"]))


def test_student_starts_as_the_teacher():
    config = tiny_config()
    objective = lcd_objective(config, tiny_teacher(config))
    state = jax.jit(objective.init_state)(jax.random.PRNGKey(0), objective.frozen)
    x = jax.random.normal(jax.random.PRNGKey(1), (B, 4, 4, 4))
    t, labels = jnp.asarray([19, 259, 499, 999]), jnp.asarray([1, 2, 3, NULL])
    w_emb = consistency.guidance_scale_embedding(jnp.asarray([1.0, 2.0, 3.0, 4.0]), 256)
    student = objective.network.denoiser.apply(state.params, x, t, labels, w_emb)
    teacher = objective.base.net.apply(objective.frozen["base"], x, t, labels)
    np.testing.assert_allclose(student, teacher, atol=1e-6)
    assert float(jnp.max(jnp.abs(teacher))) > 1e-2


# ----------------------------------------------------------------------------------------------
# The solver step is exact, for eps and v teachers (the official code's v bug is not repeated)
# ----------------------------------------------------------------------------------------------

class PointMassTeacher:
    """The exact denoiser of a point mass at x0_c (labels < NULL) or x0_u (the null class), giving
    its output as eps or v. On such data the PF-ODE moves along alpha_t x0 + sigma_t eps with a
    constant eps, so every solver's step is exact."""

    def __init__(self, x0_c, x0_u, schedule, prediction_type):
        self.x0_c, self.x0_u, self.schedule, self.pt = x0_c, x0_u, schedule, prediction_type

    def apply(self, params, x, t, labels, w_emb=None):
        n = self.x0_c.shape[0]
        x0 = jnp.where((labels == NULL)[:, None, None, None], jnp.concatenate([self.x0_u] * (x.shape[0] // n)),
                       jnp.concatenate([self.x0_c] * (x.shape[0] // n)))
        alpha, sigma = (sched.broadcast(a, x) for a in self.schedule.alpha_sigma(t))
        eps = (x - alpha * x0) / sigma
        return eps if self.pt == "epsilon" else alpha * eps - sigma * x0


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("solver", ["ddim", "dpm_solver", "dpm_solver_pp"])
def test_cfg_solver_step_is_exact(prediction_type, solver):
    config = tiny_config(solver=solver)
    schedule = sched.make_schedule("scaled_linear", 1000, 0.00085, 0.012)
    rng = np.random.default_rng(0)
    x0_c, x0_u, eps = (jnp.asarray(rng.standard_normal((B, 4, 4, 4)), jnp.float32) for _ in range(3))
    fake = PointMassTeacher(x0_c, x0_u, schedule, prediction_type)
    teacher = Base(fake, {}, schedule, prediction_type, conditioning.ClassConditioning(NULL),
                      (4, 4, 4), student_net=fake)
    objective = lcd_objective(config, teacher)
    t, s = jnp.asarray([999, 519, 259, 39]), jnp.asarray([979, 499, 239, 19])
    w = jnp.asarray([0.0, 1.0, 3.0, 7.5])
    col = lambda a: a[:, None, None, None]
    a_t, s_t = (col(v) for v in schedule.alpha_sigma(t))
    a_s, s_s = (col(v) for v in schedule.alpha_sigma(s))
    x_t = a_t * x0_c + s_t * eps  # on the conditional trajectory
    labels = jnp.asarray([0, 1, 2, 3])
    got = jax.jit(objective.solve)({}, x_t, t, s, labels, jnp.full_like(labels, NULL), w)

    eps_u = (x_t - a_t * x0_u) / s_t  # the unconditional branch's (constant) noise
    want = (1 + col(w)) * (a_s * x0_c + s_s * eps) - col(w) * (a_s * x0_u + s_s * eps_u)
    np.testing.assert_allclose(got, want, atol=2e-4 if solver == "dpm_solver" else 2e-5)

    if prediction_type == "v_prediction":  # the official LCD script's bug: raw v used as noise
        v = fake.apply({}, x_t, t, labels)
        buggy = a_s * ((x_t - s_t * v) / a_t) + s_s * v
        assert float(jnp.max(jnp.abs(buggy - a_s * x0_c - s_s * eps))) > 0.1


# ----------------------------------------------------------------------------------------------
# Conditioning
# ----------------------------------------------------------------------------------------------

def test_sdxl_unconditional_branch_is_zeros_with_the_same_time_ids():
    from lcm_jax.models import clip_text

    enc_config = dict(vocab_size=60, hidden_size=8, intermediate_size=16, num_hidden_layers=2,
                      num_attention_heads=2, max_position_embeddings=12, eos_token_id=59)
    encoders = [clip_text.CLIPTextModel(clip_text.TextEncoderConfig.from_dict(enc_config)),
                clip_text.CLIPTextModelWithProjection(clip_text.TextEncoderConfig.from_dict(
                    dict(enc_config, hidden_size=12, projection_dim=6)))]
    ids = jnp.ones((2, 12), jnp.int32)
    params = [e.init(jax.random.PRNGKey(i), ids)["params"] for i, e in enumerate(encoders)]

    class Tok:  # tokenizer stand-in: the test feeds ids directly
        model_max_length = 12

    cond = conditioning.SDXLConditioning(encoders, params, [Tok(), Tok()], image_size=64)
    batch = cond.prepare_batch({"input_ids": np.ones((2, 12), np.int32),
                                "input_ids_2": np.ones((2, 12), np.int32)})
    np.testing.assert_array_equal(batch["time_ids"], [[64, 64, 0, 0, 64, 64]] * 2)
    c, u = cond.encode({k: jnp.asarray(v) for k, v in batch.items()}, cond.frozen)
    assert c["encoder_hidden_states"].shape == (2, 12, 8 + 12)
    assert c["added_cond"]["text_embeds"].shape == (2, 6)
    assert float(jnp.abs(c["encoder_hidden_states"]).max()) > 0
    assert float(jnp.abs(u["encoder_hidden_states"]).max()) == 0
    assert float(jnp.abs(u["added_cond"]["text_embeds"]).max()) == 0
    np.testing.assert_array_equal(u["added_cond"]["time_ids"], c["added_cond"]["time_ids"])


def test_bfloat16_storage_keeps_a_float32_master():
    """model.param_dtype=bfloat16: the frozen teacher and VAE are stored in bf16, the trained
    params (and their EMA and Adam moments) stay float32, and the step's loss is the fp32 one's
    up to the teacher's rounding."""
    from lcm_jax import train

    losses = {}
    for param_dtype in ("float32", "bfloat16"):
        config = tiny_config()
        config.model.param_dtype = param_dtype
        config.batch_size = B
        program = train.Program(config, lcd_objective(config, tiny_teacher(config)), batch())
        state = program.init_fn(jax.random.PRNGKey(0))
        frozen_dtypes = {x.dtype for x in jax.tree.leaves(program.frozen)}
        assert frozen_dtypes == {jnp.dtype(param_dtype)}, frozen_dtypes
        assert {x.dtype for x in jax.tree.leaves((state.params, state.ema_params, state.opt_state))
                if jnp.issubdtype(x.dtype, jnp.floating)} == {jnp.dtype(jnp.float32)}
        state, metrics = program.step_fn(state, program.device_batch(batch()))
        assert {x.dtype for x in jax.tree.leaves(state.params)} == {jnp.dtype(jnp.float32)}
        losses[param_dtype] = float(metrics["loss"])
    assert np.isfinite(losses["bfloat16"]) and losses["bfloat16"] != losses["float32"]
    np.testing.assert_allclose(losses["bfloat16"], losses["float32"], rtol=0.05)


# ----------------------------------------------------------------------------------------------
# The w-embedding's learning rate (lcd.cond_proj_lr_scale) and init (issue 24)
# ----------------------------------------------------------------------------------------------

def _opt_config(**kw):
    import ml_collections

    return ml_collections.ConfigDict(dict(dict(lr=1e-2, warmup_steps=2, decay="cosine", b1=0.9,
                                               b2=0.99, eps=1e-6, weight_decay=0.1, grad_clip=1.0),
                                          **kw))


def _toy_params():
    """A DiT-like and a UNet-like cond_proj beside ordinary params."""
    rng = np.random.default_rng(0)
    arr = lambda *shape: jnp.asarray(rng.standard_normal(shape), jnp.float32)
    return {"cond_proj": {"kernel": arr(6, 4)},
            "t_embedder": {"linear_1": {"kernel": arr(4, 5), "bias": arr(5)}},
            "time_embedding": {"cond_proj": {"kernel": arr(6, 3)}, "linear_1": {"kernel": arr(3, 3)}}}


def _toy_grads(n, scale=3.0):
    """n gradient trees whose global norm is well above the clip (1.0)."""
    rng = np.random.default_rng(1)
    return [jax.tree.map(lambda p: jnp.asarray(scale * rng.standard_normal(p.shape), jnp.float32),
                         _toy_params()) for _ in range(n)]


def _run(tx, params, grads):
    state = tx.init(params)
    for g in grads:
        updates, state = tx.update(g, state, params)
        params = optax.apply_updates(params, updates)
    return params, state


@pytest.mark.parametrize("scales", [None, {}, {"cond_proj": 1.0}, {"cond_proj": 1}])
def test_lr_scale_one_is_todays_optimizer_bit_for_bit(scales):
    c = _opt_config()
    today = optax.chain(optax.clip_by_global_norm(c.grad_clip),
                        optax.adamw(common.learning_rate(c, 20), b1=c.b1, b2=c.b2, eps=c.eps,
                                    weight_decay=c.weight_decay))
    tx = common.make_optimizer(c, 20, scales)
    params, grads = _toy_params(), _toy_grads(4)
    want, want_state = _run(today, params, grads)
    got, got_state = _run(tx, params, grads)
    assert jax.tree.structure(got_state) == jax.tree.structure(want_state)  # no multi_transform
    for a, b in zip(jax.tree.leaves((got, got_state)), jax.tree.leaves((want, want_state))):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("k", [1, 2])
def test_cond_proj_lr_scale_is_adamw_at_lr_times_scale_after_the_shared_clip(k):
    """Two optimizer updates: the cond_proj params (both nestings) move as AdamW at lr * s, the
    others as AdamW at lr, both on the gradient clipped by the norm over ALL params (and under
    accumulate_steps = k the same, each gradient given k times)."""
    s, lr = 30.0, 1e-2
    c = _opt_config(warmup_steps=0, decay="constant", lr=lr, accumulate_steps=k)
    tx = common.make_optimizer(c, 20, {"cond_proj": s})
    params, grads = _toy_params(), _toy_grads(2)
    got, state = _run(tx, params, [g for g in grads for _ in range(k)])
    if k > 1:
        assert isinstance(state, optax.MultiStepsState)

    is_w = lambda tree: {"cond_proj": tree["cond_proj"],
                         "time_embedding": {"cond_proj": tree["time_embedding"]["cond_proj"]}}
    rest = lambda tree: {"t_embedder": tree["t_embedder"],
                         "time_embedding": {"linear_1": tree["time_embedding"]["linear_1"]}}
    clip = optax.clip_by_global_norm(1.0)
    clipped = [clip.update(g, clip.init(params))[0] for g in grads]
    assert float(optax.global_norm(grads[0])) > 2  # the clip is active, and per group it differs
    assert max_diff(is_w(clipped[0]), is_w(clip.update(is_w(grads[0]), None)[0])) > 1e-2
    adamw = lambda rate: optax.adamw(rate, b1=c.b1, b2=c.b2, eps=c.eps, weight_decay=c.weight_decay)
    want_w, _ = _run(adamw(lr * s), is_w(params), [is_w(g) for g in clipped])
    want_rest, _ = _run(adamw(lr), rest(params), [rest(g) for g in clipped])

    for got_tree, want_tree in ((is_w(got), want_w), (rest(got), want_rest)):
        for a, b in zip(jax.tree.leaves(got_tree), jax.tree.leaves(want_tree)):
            np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    # The scale matters: the w-embedding moved ~s times as far as at lr.
    at_lr, _ = _run(adamw(lr), is_w(params), [is_w(g) for g in clipped])
    assert max_diff(want_w, is_w(params)) > 10 * max_diff(at_lr, is_w(params))


def test_lr_scales_are_checked():
    c = _opt_config()
    with pytest.raises(ValueError, match="match no param"):
        common.make_optimizer(c, 20, {"cond_prj": 10.0}).init(_toy_params())
    with pytest.raises(ValueError, match="several"):
        common.make_optimizer(c, 20, {"cond_proj": 10.0, "proj": 2.0}).init(_toy_params())
    for bad in (-1.0, float("nan"), True, "10"):
        with pytest.raises(ValueError, match="finite real"):
            common.make_optimizer(c, 20, {"cond_proj": bad})


def test_objective_scales_the_w_embedding_and_can_init_it_as_diffusers():
    """lcd.cond_proj_lr_scale reaches the student's cond_proj (and only it) through the objective's
    optimizer; lcd.zero_init_cond_proj=False draws cond_proj as torch's nn.Linear (non-zero,
    |k| <= 1/sqrt(256)), every other param still the teacher's."""
    s = 100.0
    config = tiny_config(cond_proj_lr_scale=s, zero_init_cond_proj=False)
    objective = lcd_objective(config, tiny_teacher(config))
    default = lcd_objective(tiny_config(), objective.base)
    state = jax.jit(objective.init_state)(jax.random.PRNGKey(0), objective.frozen)
    kernel = state.params["cond_proj"]["kernel"]
    assert kernel.shape == (256, 256)
    assert 0.9 / 16 < float(jnp.max(jnp.abs(kernel))) <= 1 / 16
    np.testing.assert_allclose(float(jnp.std(kernel)), 1 / (16 * np.sqrt(3)), rtol=0.02)
    rest = {k: v for k, v in state.params.items() if k != "cond_proj"}
    assert max_diff(rest, {k: objective.frozen["base"][k] for k in rest}) == 0

    grads = jax.tree.map(lambda p: jnp.full_like(p, 0.01), state.params)
    moved = {}
    for name, obj in (("scaled", objective), ("default", default)):
        st = state.replace(opt_state=obj.tx.init(state.params))
        new, _ = common.apply_gradients(st, grads, {}, obj.tx, obj.config.ema_decay)
        moved[name] = jax.tree.map(jnp.subtract, new.params, state.params)
    np.testing.assert_allclose(moved["scaled"]["cond_proj"]["kernel"],
                               s * moved["default"]["cond_proj"]["kernel"], rtol=1e-5)
    assert float(jnp.max(jnp.abs(moved["default"]["cond_proj"]["kernel"]))) > 0
    others = lambda m: {k: v for k, v in m.items() if k != "cond_proj"}
    assert max_diff(others(moved["scaled"]), others(moved["default"])) == 0

    with pytest.raises(UserError, match="LoRA mode"):
        lcd_objective(tiny_config(cond_proj_lr_scale=s, lora=dict(rank=4, alpha=4.0), target="online"),
                      objective.base)
