"""Smooth Diffusion (arXiv 2312.04410): fine-tune a diffusion model so that equal steps in the
initial noise make equal steps in the predicted image, as ONE compiled train step.

Per example (eps ~ N(0, I), t ~ U{0..T-1}, z the latents, c the condition):
  x_t = alpha_t z + sigma_t eps,   e = net(x_t, t, c),   x0_hat(eps) = the x0 that e implies;
  the eps-MSE (the target of the model's prediction type) plus lambda * the step-wise
  variation penalty: with a probe u = N(0, I) sigma_t / sqrt(C H W),
    g = d/d eps <x0_hat(eps), u>    (a VJP through x_t AND the network, inside jax.grad:
                                     reverse over reverse, never a Jacobian),
    L_i = ||g_i||_2,   a' = a + decay (mean_i L_i - a),   penalty = mean_i (L_i - a')^2.
The running mean a lives in the TrainState (`stats["variation_mean"]`, starting at 0): it is
averaged over the whole global batch (the reference keeps one per process, unsynchronised) and
is checkpointed with the params, so a resumed run continues exactly. As in the reference (and
StyleGAN2's path-length penalty it follows), a' carries the gradient of mean_i L_i in the step
and is stored without it. Differences from the reference: x0_hat is converted for the model's
prediction type (the reference applies the eps formula to a v-prediction output too).

What is trained: LoRA factors (`smooth.lora`, the recipe: rank 8 on the attention projections;
the base is the frozen input, never copied) or every parameter (`smooth.lora=None`). The network
is any `models.Denoiser` with its frozen conditioning and VAE: the SD UNet from a diffusers
folder, the digits teacher of README command 1.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from lcm_jax.diffusion import samplers
from lcm_jax.diffusion import schedule as sched
from lcm_jax.models import lora
from lcm_jax.objectives import common
from lcm_jax.objectives.lcd import Teacher
from lcm_jax.train import TrainState


def variation_penalty(lengths, mean, decay: float, axis_name: str | None = None):
    """(penalty, new running mean) from the per-example lengths L_i: a' = a + decay (mean L - a)
    with mean L over the global batch; penalty = mean_i (L_i - a')^2."""
    batch_mean = common.cross_replica_mean(jnp.mean(lengths), axis_name)
    new_mean = mean + decay * (batch_mean - mean)
    return jnp.mean((lengths - new_mean) ** 2), jax.lax.stop_gradient(new_mean)


class SmoothObjective:
    def __init__(self, config, base: Teacher):
        self.config, self.base = config, base
        self.smooth = config.smooth
        self.net, self.schedule = base.net, base.schedule
        self.prediction_type = base.prediction_type
        self.conditioning = base.conditioning
        self.lora = self.smooth.get("lora") or None
        self.tx = common.make_optimizer(config.optimizer, config.total_steps)
        self.frozen = {"base": base.params, **self.conditioning.frozen}
        if base.vae is not None:
            self.frozen["vae"] = base.vae_params

    # -- what the loop needs ----------------------------------------------------------------
    def prepare_batch(self, batch: dict) -> dict:
        return self.conditioning.prepare_batch(batch)

    def init_state(self, rng, frozen) -> TrainState:
        init_rng, rng = jax.random.split(rng)
        if self.lora:
            params = lora.init(init_rng, frozen["base"],
                               self.lora.get("targets", lora.ATTENTION_TARGETS), self.lora.rank)
        else:
            params = frozen["base"]
        return TrainState.create(params, self.tx, rng, stats={"variation_mean": jnp.zeros((), jnp.float32)})

    def train_step(self, state: TrainState, batch, frozen, axis_name: str | None = None):
        rng = jax.random.fold_in(state.rng, state.step)
        (loss, (metrics, mean)), grads = jax.value_and_grad(self.loss, has_aux=True)(
            state.params, state.stats["variation_mean"], batch, frozen, rng, axis_name)
        state, metrics = common.apply_gradients(state, grads, metrics, self.tx,
                                                self.config.ema_decay, axis_name)
        return state.replace(stats={"variation_mean": mean}), metrics

    def sample_fn(self, params, frozen, rng, num_images: int, sample_config):
        """Samples of the fine-tuned model under classifier-free guidance, decoded."""
        cond, uncond, labels = self.conditioning.sample_conditions(frozen, num_images)
        z = jax.random.normal(rng, (num_images,) + self.base.latent_shape)
        model_fn = samplers.guided(self.apply_fn(self.model_params(params, frozen)), cond, uncond,
                                   sample_config.guidance_scale)
        kwargs = dict(sample_config.get("sampler_kwargs", None) or {})
        if sample_config.sampler in ("tcd", "lcm"):
            kwargs["rng"] = jax.random.fold_in(rng, 1)
        latents = samplers.sample(sample_config.sampler, model_fn, z, self.schedule,
                                  sample_config.num_steps, prediction_type=self.prediction_type,
                                  **kwargs)
        return self.decode(frozen, latents), labels

    # -- the math ---------------------------------------------------------------------------
    def model_params(self, params, frozen):
        """The network's parameters (LoRA: the base with the adapters, lora.adapted)."""
        if not self.lora:
            return params
        return lora.adapted(frozen["base"], params, self.lora)

    def apply_fn(self, params):
        return lambda x, t, cond: self.net.apply(params, x, t, cond)

    def draws(self, rng, batch_size: int, axis_name=None) -> dict:
        """Per example: t, eps, the probe's normal draw, condition dropout, VAE posterior noise;
        keyed by the example's global index (the same on any device layout)."""
        shape = self.base.latent_shape
        keys = common.example_keys(rng, batch_size, axis_name)
        one = lambda k: dict(
            t=jax.random.randint(jax.random.fold_in(k, 0), (), 0, self.schedule.num_train_timesteps),
            eps=jax.random.normal(jax.random.fold_in(k, 1), shape),
            probe=jax.random.normal(jax.random.fold_in(k, 2), shape),
            drop=jax.random.bernoulli(jax.random.fold_in(k, 3), self.smooth.get("cond_drop_prob", 0.0)),
            posterior_noise=jax.random.normal(jax.random.fold_in(k, 4), shape))
        return jax.vmap(one)(keys)

    def latents(self, batch, frozen, posterior_noise):
        """Cached latents, the VAE's (a posterior draw or the mean), or pixels (no VAE)."""
        if "latents" in batch:
            return batch["latents"]
        if self.base.vae is None:
            return batch["image"]
        noise = posterior_noise if self.smooth.get("sample_posterior", True) else None
        return self.base.vae.encode_to_latents(frozen["vae"], batch["image"], noise=noise)

    def loss(self, params, variation_mean, batch, frozen, rng, axis_name=None):
        """eps-MSE + lambda * penalty; aux: (metrics, the new running mean)."""
        batch_size = next(iter(batch.values())).shape[0]
        d = self.draws(rng, batch_size, axis_name)
        z = self.latents(batch, frozen, d["posterior_noise"])
        cond, uncond = self.conditioning.encode(batch, frozen)
        drop = lambda c: d["drop"].reshape(d["drop"].shape + (1,) * (c.ndim - 1))
        cond = jax.tree.map(lambda c, u: jnp.where(drop(c), u, c), cond, uncond)
        alpha, sigma = self.schedule.alpha_sigma(d["t"])
        net_params = self.model_params(params, frozen)

        def x0_hat(eps):  # the map eps -> x_t -> x0_hat whose VJP the penalty measures
            x_t = sched.add_noise(z, eps, alpha, sigma)
            out = self.net.apply(net_params, x_t, d["t"], cond)
            x0, _ = sched.to_x0_eps(out, x_t, alpha, sigma, self.prediction_type)
            return x0, out

        _, pullback, out = jax.vjp(x0_hat, d["eps"], has_aux=True)
        probe = d["probe"] * sched.broadcast(sigma, z) / math.sqrt(math.prod(z.shape[1:]))
        (g,) = pullback(probe)
        lengths = jnp.sqrt(jnp.sum(g.astype(jnp.float32) ** 2, axis=tuple(range(1, z.ndim))))
        penalty, new_mean = variation_penalty(lengths, variation_mean,
                                              self.smooth.get("decay", 0.01), axis_name)
        target = sched.from_x0_eps(z, d["eps"], alpha, sigma, self.prediction_type)
        mse = jnp.mean((out.astype(jnp.float32) - target) ** 2)
        loss = mse + self.smooth.lambda_reg * penalty
        metrics = {"loss": loss, "mse": mse, "variation_penalty": penalty,
                   "variation_length": jnp.mean(lengths), "variation_mean": new_mean}
        return loss, (metrics, new_mean)

    def decode(self, frozen, latents):
        if self.base.vae is None:
            return jnp.clip(latents, -1.0, 1.0)
        return jnp.clip(self.base.vae.decode_latents(frozen["vae"], latents), -1.0, 1.0)
