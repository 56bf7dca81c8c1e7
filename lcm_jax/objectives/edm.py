"""EDM-preconditioned diffusion from scratch for any Denoiser, with LEGO's per-brick supervision.

What LEGO's public code trains with (the paper's Eq. 12 in EDM form): x = x0 + sigma n with
ln sigma ~ N(P_mean, P_std^2); every network output F_k is supervised towards
(x0 - c_skip x) / c_out with the same weight, averaged over outputs (the paper's lambda_t^(k) is
EDM's lambda(sigma) = 1 / c_out^2 for every brick; see diffusion/edm.py). A DiT has one output, a
LEGO stack one per brick. Labels are dropped to the null class with `edm.cond_drop_prob`.

Patch subsampling (`edm.tile_fraction` < 1, the paper's Eq. 12, absent from its public code): per
example, round(fraction n_c) locations are drawn once at the coarsest patch brick (n_c tiles) and
every finer patch brick computes exactly the tiles under them (`lego.nested_tiles`), so each
brick conditions on the lower brick's output at the same locations and no computed tile reads a
value it did not compute. Uncomputed tiles carry no loss; an image brick above subsampled bricks
(PG's top) reads zeros there (the network output F = 0, under no gradient), never x0: filling
from the target lets the brick learn to copy it (FD 18.9 -> 91 on digits). Image bricks are always
computed whole.

Latent models (`config.model.vae`: a local diffusers AutoencoderKL folder, frozen): the step
encodes the batch's images (a posterior draw, as DiT and LEGO train) unless the batch carries
cached `latents`; samples are decoded.

Sampling: EDM's Heun sampler (deterministic, or stochastic with `s_churn` > 0) with classifier-free
guidance on D. `t_break` (a fraction
of the sampling trajectory, 0 = no skipping) drops the top brick of a LEGO stack for that share of
the steps: the last ones (low noise) when the top brick is global (PG, U), the first ones (high
noise) when it is a finer patch brick (PR); see `skip_schedule`.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from lcm_jax import config_rules as rules
from lcm_jax.diffusion import edm
from lcm_jax.diffusion import samplers
from lcm_jax.models import lego
from lcm_jax.objectives import common
from lcm_jax.objectives.parts import LatentSpace, Network
from lcm_jax.train import TrainState

REQUIRED = ("edm",)
SAMPLERS = ("heun",)  # diffusion/edm.py
EXPORT = None  # LEGO / DiT backbones have no diffusers form
DIGITS_EVALUATION = "samples"


def build(config, workdir: str, pipeline) -> "EDMObjective":
    """The backbone of config.model on the pipeline's images (pipeline None: config.data's size
    and channels, for evaluation), or on the latents of the frozen VAE folder `config.model.vae`."""
    from lcm_jax import models, train

    image_shape = train.image_shape(config, pipeline)
    channels = image_shape[-1]
    if config.model.get("vae"):  # a latent model: the VAE's latent channels
        from lcm_jax.models import convert

        channels = convert.read_config(config.model.vae).get("latent_channels", 4)
    return EDMObjective(config, models.make_model(config.model, channels), image_shape)


def config_problems(config):
    """The `edm` section (EDM-preconditioned training, LEGO's): noise distribution, dropout,
    patch subsampling, the backbone, and LEGO's brick skipping at sampling time."""
    yield from rules.positive(config, "edm.sigma_data")
    yield from rules.positive(config, "edm.p_std")
    yield from rules.in_unit_interval(config, "edm.cond_drop_prob",
                                      "the probability of dropping the label", 0.1)
    fraction = rules.get(config, "edm.tile_fraction")
    if rules.present(fraction) and (not rules.is_real(fraction) or not 0 < fraction <= 1):
        yield rules.bad("edm.tile_fraction", fraction, "must be in (0, 1] (the share of each "
                        "patch brick's tiles computed per example)",
                        "use 1.0 to compute all tiles, e.g. 0.5")
    if rules.get(config, "model.name") not in ("dit", "lego"):
        yield rules.bad("model.name", rules.get(config, "model.name"),
                        "is not trained by objective 'edm'", "use 'lego' or 'dit'")
    for section in ("sample", "eval"):
        yield from rules.at_least(config, f"{section}.s_churn", 0, integer=False,
                                  fix="e.g. 0 (deterministic Heun) or 40 (EDM's ImageNet-64 setting)")
        yield from rules.positive(config, f"{section}.s_noise")
        t_break = rules.get(config, f"{section}.t_break")
        if rules.present(t_break) and (not rules.is_real(t_break) or not 0 <= t_break <= 1):
            yield rules.bad(f"{section}.t_break", t_break, "must be a fraction of the sampling "
                            "trajectory in [0, 1]", "e.g. 0.5 (T/2); 0 turns skipping off")
        shifted = rules.get(config, f"{section}.shifted_tiles", False)
        if shifted and rules.get(config, "model.name") != "lego":
            yield rules.bad(f"{section}.shifted_tiles", shifted, "shifts a LEGO tile grid but "
                            f"config.model.name is {rules.get(config, 'model.name')!r}", "set it to False")
        if rules.present(t_break) and t_break and rules.get(config, "model.name") != "lego":
            yield rules.bad(f"{section}.t_break", t_break, "skips a LEGO brick but "
                            f"config.model.name is {rules.get(config, 'model.name')!r}", "set it to 0")


def shifted_tiling(net, tile: int, levels):
    """`net(x, c_noise, y)` run on the canvas placed inside one `tile` larger (its margin filled by
    mirroring the canvas), at offset 0 or tile / 2 in both axes, alternating with the index of the
    nearest of the grid's noise `levels`, and cropped back: tile borders move between steps
    (Swin's shifted windows, across sampling steps), so no region is an independent
    training-size image. Costs the larger canvas's FLOPs."""
    def shifted(x, c_noise, y):
        b, h, w, c = x.shape
        level = jnp.argmin(jnp.abs(levels - c_noise.reshape(-1)[0]))
        offset = (level % 2) * (tile // 2)
        mirrored = jnp.pad(x, ((0, 0), (tile, tile), (tile, tile), (0, 0)), mode="symmetric")
        window = jax.lax.dynamic_slice(mirrored, (0, tile - offset, tile - offset, 0),
                                       (b, h + tile, w + tile, c))
        coords = lego.shifted_coordinates(h, w, tile, offset, offset)
        out = net(window, c_noise, y, coords=coords)
        return jax.lax.dynamic_slice(out, (0, offset, offset, 0), (b, h, w, out.shape[-1]))

    return shifted


def _computed_mask(idx, r: int, height: int, width: int):
    """[B, H, W, 1]: 1 on the tiles `idx` [B, m] of a brick with tile size r, 0 elsewhere."""
    b, n = idx.shape[0], (height // r) * (width // r)
    tiles = jnp.zeros((b, n, r, r, 1)).at[jnp.arange(b)[:, None], idx].set(1.0)
    return lego.from_tiles(tiles, height, width)


def skip_schedule(num_steps: int, t_break: float, phase: str) -> tuple[int, int]:
    """How `num_steps` sampling steps split into two segments (first, second), in sampling order.

    The top brick is skipped for round(t_break num_steps) steps: the second segment for phase
    'low_noise' (t < t_break, PG), the first for 'high_noise' (t > T - t_break, PR). A step's
    two Heun evaluations use the bricks of the step's start."""
    if not 0.0 <= t_break <= 1.0:
        raise ValueError(f"t_break={t_break} must be a fraction of the trajectory in [0, 1].")
    skipped = int(round(t_break * num_steps))
    return (num_steps - skipped, skipped) if phase == "low_noise" else (skipped, num_steps - skipped)


class EDMObjective:
    def __init__(self, config, model, image_shape):
        self.config, self.network = config, Network(model)
        self.image_shape = tuple(image_shape)  # (H, W, C) of training (latent: the VAE's)
        self.edm = config.edm
        self.sigma_data = self.edm.get("sigma_data", edm.SIGMA_DATA)
        self.null_class = config.model.num_classes
        self.tx = common.make_optimizer(config.optimizer, config.total_steps)
        self.stack = getattr(model.module, "stack", None)  # LEGO bricks, or None
        self.frozen = {}  # trained from scratch; a latent model's frozen VAE
        vae = None
        if config.model.get("vae"):
            from lcm_jax.models import vae as vae_lib

            vae, self.frozen["vae"] = vae_lib.from_pretrained(config.model.vae)
            f, (h, w, _) = vae.config.factor, self.image_shape
            self.image_shape = (h // f, w // f, vae.config.latent_channels)
        self.latent = LatentSpace(self.image_shape, vae)  # DiT and LEGO train on posterior draws

    # -- what the loop needs ----------------------------------------------------------------
    def prepare_batch(self, batch: dict) -> dict:
        return batch

    def init_state(self, rng, frozen=None) -> TrainState:
        init_rng, rng = jax.random.split(rng)
        x = jnp.zeros((1,) + self.image_shape)
        labels = jnp.zeros((1,), jnp.int32) if self.null_class else None
        params = self.network.denoiser.init(init_rng, x, jnp.zeros((1,)), labels)
        return TrainState.create(params, self.tx, rng)

    def train_step(self, state: TrainState, batch, frozen=None, axis_name: str | None = None):
        return common.train_step(self.loss, state, batch, frozen, axis_name, self.tx,
                                 self.config.ema_decay)

    def sample_fn(self, params, frozen, rng, num_images: int, sample_config):
        """Class-conditional samples cycling through the classes: (images in [-1, 1], labels)."""
        labels = (jnp.arange(num_images, dtype=jnp.int32) % self.null_class if self.null_class
                  else jnp.zeros((num_images,), jnp.int32))  # unconditional: 0 for the grids
        return self.sample_images(params, frozen, rng, labels, sample_config), labels

    def sample_images(self, params, frozen, rng, labels, sample_config, shape=None):
        """Images in [-1, 1] for `labels` (decoded for a latent model) on a canvas `shape` (the
        network's input: latents for a latent model; default the training one)."""
        return self.latent.decode(frozen, self.sample(params, rng, labels, sample_config, shape))

    def save_outputs(self, workdir: str, params) -> None:
        """Nothing beyond the checkpoints."""

    # -- the math ---------------------------------------------------------------------------
    def subsampled(self) -> int | None:
        """How many tiles of the coarsest patch brick training computes (None: every tile)."""
        fraction = self.edm.get("tile_fraction", 1.0)
        h, w, _ = self.image_shape
        r_c = lego.coarsest_patch(self.stack, h, w) if self.stack else None
        if r_c is None or fraction >= 1.0:
            return None
        return max(1, int(round(fraction * (h // r_c) * (w // r_c))))

    def tile_counts(self) -> list[int | None]:
        """Per brick, how many tiles training computes (None: all of them)."""
        m = self.subsampled()
        if m is None:
            return [None] * (len(self.stack) if self.stack else 1)
        h, w, _ = self.image_shape
        chosen = np.zeros((1, m), np.int32)
        return [None if idx is None else idx.shape[1]
                for idx in lego.nested_tiles(self.stack, h, w, chosen)]

    def loss(self, params, state, batch, frozen, rng, axis_name=None):
        b = batch["latents" if "latents" in batch else "image"].shape[0]
        keys = common.example_keys(rng, b, axis_name)
        draw = lambda i, f: jax.vmap(lambda k: f(jax.random.fold_in(k, i)))(keys)
        posterior_noise = None if self.latent.vae is None or "latents" in batch else \
            draw(3 + len(self.stack or ()), lambda k: jax.random.normal(k, self.image_shape))
        x0 = self.latent.encode(batch, frozen, posterior_noise).astype(jnp.float32)
        sigma = draw(0, lambda k: edm.training_sigma(k, (), self.edm.get("p_mean", edm.P_MEAN),
                                                     self.edm.get("p_std", edm.P_STD)))
        noise = draw(1, lambda k: jax.random.normal(k, x0.shape[1:]))
        labels = None  # an unconditional model (num_classes = 0)
        if self.null_class:
            drop = draw(2, lambda k: jax.random.bernoulli(k, self.edm.cond_drop_prob))
            labels = jnp.where(drop, self.null_class, batch["label"])
        x = x0 + sigma[:, None, None, None] * noise
        target = edm.network_target(x0, x, sigma, self.sigma_data)
        c_skip, c_out, c_in, c_noise = edm.preconditioning(sigma, self.sigma_data)
        kwargs, masks = {}, [None] * len(self.stack or [None])
        m = self.subsampled()
        if m is not None:  # locations drawn once, at the coarsest patch brick
            h, w, _ = self.image_shape
            r_c = lego.coarsest_patch(self.stack, h, w)
            chosen = draw(3, lambda key: jax.random.permutation(key, (h // r_c) * (w // r_c))[:m])
            tiles = lego.nested_tiles(self.stack, h, w, chosen)
            kwargs = dict(fill=jnp.zeros_like(target), tiles=tiles)
            masks = [None if idx is None else _computed_mask(idx, brick[0], h, w)
                     for idx, brick in zip(tiles, self.stack)]
        outs = self.network.denoiser.outputs(params, c_in[:, None, None, None] * x, c_noise, labels, **kwargs)
        # The mean over the computed tiles: uncomputed ones are masked out, and the mean over all
        # pixels divided by the computed share.
        per_brick = [jnp.mean((out - target) ** 2) if mask is None else
                     jnp.mean(mask * (out - target) ** 2) / jnp.mean(mask)
                     for out, mask in zip(outs, masks)]
        loss = jnp.mean(jnp.stack(per_brick))
        metrics = {"loss": loss}
        if len(per_brick) > 1:
            metrics.update({f"loss_brick{k}": l for k, l in enumerate(per_brick)})
        return loss, (metrics, state.stats)

    def canvas_multiple(self) -> int:
        """What a canvas's sides must be multiples of: every brick's tile (LEGO), the patch (DiT)."""
        if self.stack is not None:
            return lego.max_tile(self.stack)
        return getattr(self.network.denoiser.module, "patch_size", 1)

    def denoise_fn(self, params, labels, guidance_scale: float, num_bricks: int | None = None,
                   shifted_levels=None):
        """D(x, sigma) under classifier-free guidance (one batched call of 2B); with
        `shifted_levels` (the grid's c_noise values) the LEGO tile grid shifts per noise level."""
        kwargs = {} if num_bricks is None else {"num_bricks": num_bricks}
        net = lambda x, c_noise, y, **more: self.network.denoiser.apply(params, x, c_noise, y,
                                                                        **kwargs, **more)
        if shifted_levels is not None:
            net = shifted_tiling(net, lego.max_tile(self.stack), shifted_levels)
        denoise = edm.denoiser(net, self.sigma_data)
        if not self.null_class:  # unconditional
            return lambda x, sigma: denoise(x, sigma, None)
        return samplers.guided(denoise, labels, jnp.full_like(labels, self.null_class),
                               guidance_scale)

    def sample(self, params, rng, labels, sample_config, shape=None):
        """Heun samples (unclipped; latents for a latent model) for `labels` on a canvas `shape`
        (H, W, C; default the training one), skipping the top brick for the share
        `sample_config.t_break` of the steps; with `sample_config.s_churn` > 0 EDM's stochastic
        sampler (s_min, s_max, s_noise: `edm.Churn`). A canvas whose sides are not multiples of
        every tile (a DiT's patch) is sampled padded up to the next multiple and center-cropped."""
        h, w, c = shape = tuple(shape or self.image_shape)
        m = self.canvas_multiple()
        padded = (-(-h // m) * m, -(-w // m) * m, c)
        if padded != shape:
            top, left = (padded[0] - h) // 2, (padded[1] - w) // 2
            x = self.sample(params, rng, labels, sample_config, padded)
            return x[:, top:top + h, left:left + w]
        n = sample_config.num_steps
        sigmas = edm.karras_sigmas(n, sample_config.get("sigma_min", edm.SIGMA_MIN),
                                   sample_config.get("sigma_max", edm.SIGMA_MAX))
        x = jax.random.normal(rng, (labels.shape[0],) + shape) * sigmas[0]
        churn = edm.Churn(**{f: sample_config[f] for f in ("s_churn", "s_min", "s_max", "s_noise")
                             if sample_config.get(f, None) is not None})
        heun = functools.partial(edm.heun, churn=churn, rng=jax.random.fold_in(rng, 1), num_steps=n)
        g = sample_config.guidance_scale
        levels = None  # the noise levels that set each evaluation's tile offset
        if sample_config.get("shifted_tiles", False):
            levels = jnp.asarray(edm.preconditioning(sigmas[:-1], self.sigma_data)[3])
        full = self.denoise_fn(params, labels, g, shifted_levels=levels)
        t_break = sample_config.get("t_break", 0.0)
        if self.stack is None or not t_break:
            return heun(full, x, sigmas)
        phase = lego.skip_phase(self.stack)
        reduced = self.denoise_fn(params, labels, g, num_bricks=len(self.stack) - 1,
                                  shifted_levels=levels)
        first, _ = skip_schedule(n, t_break, phase)
        fns = (full, reduced) if phase == "low_noise" else (reduced, full)
        for fn, part, start in zip(fns, (sigmas[:first + 1], sigmas[first:]), (0, first)):
            if len(part) > 1:
                x = heun(fn, x, part, first_step=start)
        return x
