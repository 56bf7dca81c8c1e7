"""A KL autoencoder (diffusers' AutoencoderKL layout) trained from scratch: the latent space of
small latent-diffusion teachers (the digits chain).

Loss: mean squared reconstruction error of a posterior draw + kl_weight x the KL to N(0, I)
(summed over latent elements, averaged over the batch). No perceptual or GAN terms: at 16x16
they buy nothing. After training, per-channel `latents_mean` / `latents_std` are measured on the
training set (the per-channel form of how Stable Diffusion's 0.18215 was chosen; diffusers'
`latents_mean` / `latents_std` config fields), so the diffusion model sees standardized latents.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from lcm_jax.models import vae as vae_lib
from lcm_jax.objectives import common
from lcm_jax.train import TrainState


class AutoencoderObjective:
    def __init__(self, config, image_shape, examples: np.ndarray):
        self.config = config
        self.vae_config = dict(config.vae, in_channels=image_shape[-1],
                               out_channels=image_shape[-1], sample_size=image_shape[0])
        self.module = vae_lib.from_config(self.vae_config)
        self.image_shape = tuple(image_shape)
        self.examples = np.asarray(examples, np.float32)  # reconstructed in the sample grids
        self.tx = common.make_optimizer(config.optimizer, config.total_steps)
        self.frozen = {}

    def prepare_batch(self, batch: dict) -> dict:
        return batch

    def init_state(self, rng, frozen=None) -> TrainState:
        init_rng, rng = jax.random.split(rng)
        params = self.module.init(init_rng, jnp.zeros((1,) + self.image_shape))["params"]
        return TrainState.create(params, self.tx, rng)

    def loss(self, params, state, batch, frozen, rng, axis_name=None):
        x = batch["image"]
        mean, logvar = self.module.apply({"params": params}, x, method="encode")
        keys = common.example_keys(rng, x.shape[0], axis_name)
        noise = jax.vmap(lambda k: jax.random.normal(k, mean.shape[1:]))(keys)
        recon = self.module.apply({"params": params}, mean + jnp.exp(0.5 * logvar) * noise,
                                  method="decode")
        mse = jnp.mean((recon.astype(jnp.float32) - x) ** 2)
        kl = jnp.mean(0.5 * jnp.sum(mean ** 2 + jnp.exp(logvar) - 1.0 - logvar, axis=(1, 2, 3)))
        loss = mse + self.config.vae_kl_weight * kl
        return loss, ({"loss": loss, "mse": mse, "kl": kl}, state.stats)

    def train_step(self, state: TrainState, batch, frozen=None, axis_name: str | None = None):
        return common.train_step(self.loss, state, batch, frozen, axis_name, self.tx,
                                 self.config.ema_decay)

    def sample_fn(self, params, frozen, rng, num_images: int, sample_config):
        """Reconstructions (posterior means) of the first examples, next to the originals."""
        x = jnp.asarray(self.examples[:num_images // 2])
        recon = self.module.apply({"params": params}, x)
        return jnp.clip(jnp.concatenate([x, recon]), -1.0, 1.0), jnp.zeros((2 * len(x),), jnp.int32)

    def save_outputs(self, workdir: str, params) -> None:
        """The chain exports the VAE folder itself (teachers.train_vae)."""


def latent_statistics(module, params, images: np.ndarray, batch_size: int = 500) -> dict:
    """Per-channel mean and std of the posterior means over `images`: the VAE config fields that
    standardize the latents ((z - mean) * scaling_factor / std, with scaling_factor 1)."""
    encode = jax.jit(lambda p, x: module.apply({"params": p}, x, method="encode")[0])
    means = np.concatenate([np.asarray(encode(params, images[i:i + batch_size]))
                            for i in range(0, len(images), batch_size)])
    axes = tuple(range(means.ndim - 1))
    return {"latents_mean": means.mean(axes).tolist(), "latents_std": means.std(axes).tolist(),
            "scaling_factor": 1.0}
