"""Plain diffusion training: eps / v / x0 targets, min-SNR weighting, condition dropout.

Trains teachers and, later, LEGO / DiT backbones from scratch. The network is a
`models.Denoiser` called as `model.apply(params, x_t, t, labels)`; dropped conditions use the
null class `num_classes` (classifier-free guidance at sampling time).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from lcm_jax.diffusion import samplers
from lcm_jax.diffusion import schedule as sched
from lcm_jax.objectives import common
from lcm_jax.train import TrainState


def schedule_from_config(diffusion_config) -> sched.Schedule:
    return sched.make_schedule(diffusion_config.beta_schedule, diffusion_config.num_train_timesteps,
                               diffusion_config.get("beta_start", 0.00085),
                               diffusion_config.get("beta_end", 0.012))


def min_snr_weight(snr, gamma, prediction_type: str):
    """Min-SNR-gamma (Hang et al. 2023) expressed for each target: the x0-loss weight
    min(snr, gamma) divided by the factor the target's MSE carries relative to x0's MSE."""
    if gamma is None:
        return jnp.ones_like(snr)
    clipped = jnp.minimum(snr, gamma)
    return {"epsilon": clipped / snr, "v_prediction": clipped / (snr + 1.0),
            "sample": clipped}[prediction_type]


class DiffusionObjective:
    def __init__(self, config, model, image_shape):
        self.config, self.model = config, model
        self.image_shape = tuple(image_shape)  # (H, W, C)
        self.diffusion = config.diffusion
        self.schedule = schedule_from_config(config.diffusion)
        self.null_class = config.model.num_classes
        self.tx = common.make_optimizer(config.optimizer, config.total_steps)
        self.frozen = {}  # nothing frozen: trained from scratch

    # -- what the loop needs ----------------------------------------------------------------
    def init_state(self, rng, frozen=None) -> TrainState:
        init_rng, rng = jax.random.split(rng)
        x = jnp.zeros((1,) + self.image_shape)
        params = self.model.init(init_rng, x, jnp.zeros((1,), jnp.int32), jnp.zeros((1,), jnp.int32))
        return TrainState.create(params, self.tx, rng)

    def train_step(self, state: TrainState, batch, frozen=None, axis_name: str | None = None):
        step_rng = jax.random.fold_in(state.rng, state.step)
        grad_fn = jax.value_and_grad(self.loss, has_aux=True)
        (loss, metrics), grads = grad_fn(state.params, batch, step_rng, axis_name)
        return common.apply_gradients(state, grads, metrics, self.tx, self.config.ema_decay,
                                      axis_name)

    def sample_fn(self, params, frozen, rng, num_images: int, sample_config):
        """Class-conditional samples cycling through the classes: (images in [-1, 1], labels)."""
        labels = jnp.arange(num_images, dtype=jnp.int32) % self.null_class
        return self.sample(params, rng, labels, sample_config), labels

    # -- the math ---------------------------------------------------------------------------
    def loss(self, params, batch, rng, axis_name=None):
        x0 = batch["image"]
        keys = common.example_keys(rng, x0.shape[0], axis_name)
        t = jax.vmap(lambda k: jax.random.randint(jax.random.fold_in(k, 0), (), 0,
                                                  self.schedule.num_train_timesteps))(keys)
        eps = jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, 1), x0.shape[1:]))(keys)
        drop = jax.vmap(lambda k: jax.random.bernoulli(jax.random.fold_in(k, 2),
                                                       self.diffusion.cond_drop_prob))(keys)
        labels = jnp.where(drop, self.null_class, batch["label"])
        alpha, sigma = self.schedule.alpha_sigma(t)
        x_t = sched.add_noise(x0, eps, alpha, sigma)
        out = self.model.apply(params, x_t, t, labels)
        target = sched.from_x0_eps(x0, eps, alpha, sigma, self.diffusion.prediction_type)
        mse = jnp.mean((out.astype(jnp.float32) - target) ** 2, axis=tuple(range(1, x0.ndim)))
        weight = min_snr_weight((alpha / sigma) ** 2, self.diffusion.get("min_snr_gamma"),
                                self.diffusion.prediction_type)
        loss = jnp.mean(weight * mse)
        return loss, {"loss": loss, "mse": jnp.mean(mse)}

    def apply_fn(self, params):
        return lambda x, t, labels: self.model.apply(params, x, t, labels)

    def sample(self, params, rng, labels, sample_config):
        x = jax.random.normal(rng, (labels.shape[0],) + self.image_shape)
        model_fn = samplers.guided(self.apply_fn(params), labels,
                                   jnp.full_like(labels, self.null_class),
                                   sample_config.guidance_scale)
        kwargs = {"rng": jax.random.fold_in(rng, 1)} if sample_config.sampler in ("lcm", "tcd") else {}
        if sample_config.sampler == "ddim":  # pixel-space DDPM teachers: no SD steps_offset
            kwargs.update(steps_offset=0, set_alpha_to_one=True)
        out = samplers.sample(sample_config.sampler, model_fn, x, self.schedule,
                              sample_config.num_steps,
                              prediction_type=self.diffusion.prediction_type, **kwargs)
        return jnp.clip(out, -1.0, 1.0)
