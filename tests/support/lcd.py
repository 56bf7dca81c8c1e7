"""The tiny LCD setup: a digits config shrunk to seconds, a random DiT teacher with a random VAE
(8x8x1 images, 4x4x4 latents), a batch, and one plain AdamW + EMA step to compare fused steps
with (test_lcd, test_tcd_lcf, test_smooth, parallel_check)."""
import jax
import jax.numpy as jnp
import numpy as np
import optax

from configs import digits_lcd
from conftest import f32_tol, fast_compile
from lcm_jax import models
from lcm_jax.diffusion import schedule as sched
from lcm_jax.models import vae as vae_lib
from lcm_jax.objectives import conditioning
from lcm_jax import objectives
from lcm_jax.objectives.consistency import ConsistencyObjective
from lcm_jax.objectives.parts import Base

B, IMAGE, NULL = 4, (8, 8, 1), 10


def tiny_config(**lcd):
    c = digits_lcd.get_config("tiny")
    c.model.update(patch_size=2, width=32, depth=1, num_heads=2)
    c.optimizer.update(lr=1e-3, warmup_steps=0, decay="constant", eps=1e-4)
    c.lcd.update(w_min=1.0, w_max=5.0, sample_posterior=True, **lcd)  # the reference draws
    return c


def randomized(params, rng, scale=0.05):
    """DiT starts as an exact zero function: perturb every param so the test sees real math.
    numpy noise (seeded by the key): one jax.random call per leaf costs seconds of compiles."""
    gen = np.random.default_rng(int(np.asarray(jax.random.key_data(rng)).ravel()[-1]))
    return jax.tree.map(lambda p: p + scale * gen.standard_normal(p.shape).astype(p.dtype), params)


def tiny_teacher(config, prediction_type="epsilon", with_vae=True, w_dim=None):
    vae_module = vae_lib.from_config(dict(in_channels=1, out_channels=1, block_out_channels=[8, 16],
                                          latent_channels=4, norm_num_groups=4, sample_size=8,
                                          scaling_factor=0.7))
    # One initialisation program each, at XLA O0 (eager init compiles op by op: ~50 s).
    vae_params = randomized(fast_compile(lambda: vae_module.init(
        jax.random.PRNGKey(1), jnp.zeros((1,) + IMAGE))["params"]), jax.random.PRNGKey(2))
    latent_shape = (4, 4, 4) if with_vae else IMAGE
    net = models.make_model(config.model, latent_shape[-1])
    x = jnp.zeros((1,) + latent_shape)
    params = randomized(fast_compile(lambda: net.init(jax.random.PRNGKey(3), x, jnp.zeros((1,), jnp.int32),
                                                      jnp.zeros((1,), jnp.int32))), jax.random.PRNGKey(4), 0.2)
    student = models.make_model(config.model, latent_shape[-1], w_dim or config.lcd.w_embedding_dim)
    schedule = sched.make_schedule("scaled_linear", 1000, 0.00085, 0.012)
    return Base(net, params, schedule, prediction_type, conditioning.ClassConditioning(NULL),
                   latent_shape, vae_module if with_vae else None,
                   vae_params if with_vae else None, student)


def objective(config, teacher, name=None):
    """The consistency objective `name` (default: config.objective) on `teacher`."""
    return ConsistencyObjective(config, teacher, objectives.module(name or config.objective).STRATEGY)


def batch():
    rng = np.random.default_rng(0)
    return {"image": rng.uniform(-1, 1, (B,) + IMAGE).astype(np.float32),
            "label": np.asarray([0, 3, 7, 9], np.int32)}


LR, ADAM_EPS = 1e-3, 1e-4


def plain_update(state, loss_fn):
    """(loss, params, ema) after one clipped AdamW step on loss_fn(params) and the 0.95 EMA."""
    loss, grads = jax.value_and_grad(loss_fn)(state.params)
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(LR, eps=ADAM_EPS, weight_decay=0.0))
    updates, _ = tx.update(grads, tx.init(state.params), state.params)
    params = optax.apply_updates(state.params, updates)
    ema = jax.tree.map(lambda e, p: 0.95 * e + 0.05 * p, state.ema_params, params)
    return loss, params, ema


def max_diff(a, b):
    return max(float(jnp.max(jnp.abs(x - y))) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def step_tol(params):
    """Params after the fused step vs plain_update's: two programs, so float32 reassociation, not
    bit equality. 16 ulps of gradient rounding (clipping keeps each gradient <= 1) move Adam's
    first step lr g / (|g| + eps) by up to lr / eps = 10 times that, plus the params' own
    rounding; a wrong step is off by ~lr = 1e-3."""
    return f32_tol(16 * (1 + LR / ADAM_EPS), *jax.tree.leaves(params))
