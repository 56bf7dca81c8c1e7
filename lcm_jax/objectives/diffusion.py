"""Plain diffusion training: eps / v / x0 targets, min-SNR weighting, condition dropout.

Trains teachers and, later, LEGO / DiT backbones from scratch. The network is a
`models.Denoiser` called as `model.apply(params, x_t, t, labels)`; dropped conditions use the
null class `num_classes` (classifier-free guidance at sampling time).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from lcm_jax import config_rules as rules
from lcm_jax.diffusion import samplers
from lcm_jax.diffusion import schedule as sched
from lcm_jax.objectives import common
from lcm_jax.objectives.parts import Network
from lcm_jax.train import TrainState

# Every objective on a DDPM noise schedule (all but edm) reads these.
REQUIRED = ("diffusion.prediction_type", "diffusion.num_train_timesteps")
SAMPLERS = samplers.SAMPLERS
EXPORT = None  # a plain diffusion model has no diffusers form here
DIGITS_EVALUATION = "samples"


def build(config, workdir: str, pipeline) -> "DiffusionObjective":
    from lcm_jax import models, train

    image_shape = train.image_shape(config, pipeline)
    return DiffusionObjective(config, models.make_model(config.model, image_shape[-1]), image_shape)


def config_problems(config):
    """The `diffusion` section: the noise schedule, the prediction type, dropout, weighting."""
    if rules.get(config, "diffusion.beta_schedule", None) is None and \
            rules.get(config, "diffusion.trained_betas", None) is None:
        yield (f"config.diffusion.beta_schedule is missing; set it to one of "
               f"{sched.BETA_SCHEDULES} (or give diffusion.trained_betas).")
    yield from rules.choice(config, "diffusion.prediction_type", sched.PREDICTION_TYPES,
                            "prediction type")
    if rules.get(config, "diffusion.trained_betas", None) is None:
        yield from rules.choice(config, "diffusion.beta_schedule", sched.BETA_SCHEDULES,
                                "beta schedule")
    yield from rules.at_least(config, "diffusion.num_train_timesteps", 2,
                              fix="set it to an integer >= 2, e.g. 1000")
    yield from rules.in_unit_interval(config, "diffusion.cond_drop_prob",
                                      "the probability of dropping the condition", 0.1)
    yield from rules.positive(config, "diffusion.min_snr_gamma", allow_none=True)


def schedule_from_config(diffusion_config) -> sched.Schedule:
    return sched.make_schedule(diffusion_config.get("beta_schedule", "linear"),
                               diffusion_config.num_train_timesteps,
                               diffusion_config.get("beta_start", 0.00085),
                               diffusion_config.get("beta_end", 0.012),
                               trained_betas=diffusion_config.get("trained_betas", None))


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
        self.config, self.network = config, Network(model)
        self.image_shape = tuple(image_shape)  # (H, W, C)
        self.diffusion = config.diffusion
        self.schedule = schedule_from_config(config.diffusion)
        self.null_class = config.model.num_classes
        self.tx = common.make_optimizer(config.optimizer, config.total_steps)
        self.frozen = {}  # nothing frozen: trained from scratch

    # -- what the loop needs ----------------------------------------------------------------
    def prepare_batch(self, batch: dict) -> dict:
        return batch

    def init_state(self, rng, frozen=None) -> TrainState:
        init_rng, rng = jax.random.split(rng)
        x = jnp.zeros((1,) + self.image_shape)
        params = self.network.denoiser.init(init_rng, x, jnp.zeros((1,), jnp.int32),
                                            jnp.zeros((1,), jnp.int32))
        return TrainState.create(params, self.tx, rng)

    def train_step(self, state: TrainState, batch, frozen=None, axis_name: str | None = None):
        return common.train_step(self.loss, state, batch, frozen, axis_name, self.tx,
                                 self.config.ema_decay)

    def sample_fn(self, params, frozen, rng, num_images: int, sample_config):
        """Class-conditional samples cycling through the classes: (images in [-1, 1], labels)."""
        labels = jnp.arange(num_images, dtype=jnp.int32) % self.null_class
        return self.sample_images(params, frozen, rng, labels, sample_config), labels

    def sample_images(self, params, frozen, rng, labels, sample_config, shape=None):
        """Images in [-1, 1] for `labels` on a canvas `shape` (H, W, C; default the training one;
        a DiT computes its positions from the canvas)."""
        return self.sample(params, rng, labels, sample_config, shape)

    def save_outputs(self, workdir: str, params) -> None:
        """Nothing beyond the checkpoints."""

    # -- the math ---------------------------------------------------------------------------
    def loss(self, params, state, batch, frozen, rng, axis_name=None):
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
        out = self.network.denoiser.apply(params, x_t, t, labels)
        target = sched.from_x0_eps(x0, eps, alpha, sigma, self.diffusion.prediction_type)
        mse = jnp.mean((out.astype(jnp.float32) - target) ** 2, axis=tuple(range(1, x0.ndim)))
        weight = min_snr_weight((alpha / sigma) ** 2, self.diffusion.get("min_snr_gamma"),
                                self.diffusion.prediction_type)
        loss = jnp.mean(weight * mse)
        return loss, ({"loss": loss, "mse": jnp.mean(mse)}, state.stats)

    def sample(self, params, rng, labels, sample_config, shape=None):
        x = jax.random.normal(rng, (labels.shape[0],) + tuple(shape or self.image_shape))
        model_fn = samplers.guided(lambda x, t, y: self.network.denoiser.apply(params, x, t, y),
                                   labels, jnp.full_like(labels, self.null_class),
                                   sample_config.guidance_scale)
        # Pixel-space DDPM teachers: DDIM without SD's steps_offset, ending at abar = 1.
        defaults = dict(steps_offset=0, set_alpha_to_one=True) if sample_config.sampler == "ddim" else {}
        out = common.run_sampler(sample_config, model_fn, x, self.schedule,
                                 self.diffusion.prediction_type, rng, **defaults)
        return jnp.clip(out, -1.0, 1.0)
