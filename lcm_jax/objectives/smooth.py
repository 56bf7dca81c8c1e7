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

`smooth.mean_init` (MEAN_INITS): "zero" is the reference's start. At decay 0.01, a is below
half of mean L for ~70 steps and below 90% for ~230, and the penalty pulls every L_i towards
that small a (it contracts the noise -> image map) rather than only evening the L_i out: 23% of
a 1,000-step digits run, 0.1% of the SD recipe's 240k. "bias_corrected" (Adam's correction)
keeps the raw average from 0 and uses a_hat = a / (1 - (1 - decay)^k) after k updates: the
k batch means weighted (1 - decay)^(k - j) and normalised, so mean L_1 after the first; k is in
the stats (`variation_updates`, checkpointed). A start at the base model's mean L over a few
batches would need those batches before step 0, which the train loop does not give an
objective; a_hat after update 1 is already the base's mean L on the first batch (training
starts at the base: LoRA B = 0, or the base's own params).

What is trained: LoRA factors (`smooth.lora`, the recipe: rank 8 on the attention projections;
the base is the frozen input, never copied) or every parameter (`smooth.lora=None`). The network
is any `models.Denoiser` with its frozen conditioning and VAE: the SD UNet from a diffusers
folder, the digits teacher of README command 1.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from lcm_jax import config_rules as rules
from lcm_jax.diffusion import schedule as sched
from lcm_jax.models import lora
from lcm_jax.objectives import Export, common, diffusion
from lcm_jax.objectives.parts import Base, Network
from lcm_jax.train import TrainState

REQUIRED, SAMPLERS = diffusion.REQUIRED, diffusion.SAMPLERS
MEAN_INITS = ("zero", "bias_corrected")  # smooth.mean_init (module docstring)
EXPORT = Export(network="smooth", lora_section="smooth", full_pipeline=False,
                chain=lambda config, workdir: config.smooth.get("teacher_workdir") or workdir)
DIGITS_EVALUATION = "samples"


def build(config, workdir: str, pipeline) -> "SmoothObjective":
    """A local SD folder (config.model.pretrained), or the digits teacher of README command 1
    (the chain in config.smooth.teacher_workdir, trained there first if it is not yet)."""
    import os

    from lcm_jax import teachers

    if config.model.get("pretrained"):
        return SmoothObjective(config, teachers.from_pretrained(config))
    chain = os.path.expanduser(config.smooth.get("teacher_workdir") or workdir)
    return SmoothObjective(config, teachers.train_chained(config, chain, pipeline.arrays["image"],
                                                          pipeline.arrays["label"]))


def config_problems(config):
    """The `smooth` section: the regulariser's weight, decay and mean start, the LoRA, the base."""
    yield from diffusion.config_problems(config)
    if not rules.get(config, "smooth", None):
        yield ("config.smooth is missing; objective 'smooth' needs it (lambda_reg, decay, lora: "
               "see configs/digits_smooth.py or configs/sd15_smooth.py).")
        return
    yield from rules.at_least(config, "smooth.lambda_reg", 0, integer=False, fix="e.g. 1.0 (the paper)")
    decay = rules.get(config, "smooth.decay")
    if rules.present(decay) and (not rules.is_real(decay) or not 0 < decay <= 1):
        yield rules.bad("smooth.decay", decay, "must be in (0, 1] (the running mean's rate)", "e.g. 0.01")
    drop = rules.get(config, "smooth.cond_drop_prob")
    if rules.present(drop) and (not rules.is_real(drop) or not 0 <= drop <= 1):
        yield rules.bad("smooth.cond_drop_prob", drop, "must be in [0, 1]", "e.g. 0.0 (the recipe) or 0.1")
    yield from rules.choice(config, "smooth.mean_init", MEAN_INITS, "running-mean start")
    yield from rules.lora(config, "smooth", "e.g. 8 (the recipe)")
    yield from rules.choice(config, "smooth.lora.init", lora.INITS, "LoRA init")
    yield from rules.sd_folder(config, "Smooth Diffusion fine-tunes a", "configs/sd15_smooth.py")


def variation_penalty(lengths, stats: dict, decay: float, axis_name: str | None = None):
    """(penalty, the mean it used, new stats) from the per-example lengths L_i: a' = a + decay
    (mean L - a) with mean L over the global batch; penalty = mean_i (L_i - a_hat')^2, where
    a_hat' = a' ("zero") or a' / (1 - (1 - decay)^k') when the stats count updates k
    ("bias_corrected"). Stats are stored without gradient; the penalty's a_hat' keeps it."""
    mean = stats["variation_mean"]
    batch_mean = common.cross_replica_mean(jnp.mean(lengths), axis_name)
    new_mean = mean + decay * (batch_mean - mean)
    new_stats = {"variation_mean": jax.lax.stop_gradient(new_mean)}
    if "variation_updates" in stats:  # mean_init="bias_corrected" (init_state adds the count)
        k = stats["variation_updates"] + 1
        new_mean = new_mean / (1 - (1 - decay) ** k.astype(jnp.float32))
        new_stats["variation_updates"] = k
    return jnp.mean((lengths - new_mean) ** 2), jax.lax.stop_gradient(new_mean), new_stats


class SmoothObjective:
    def __init__(self, config, base: Base):
        self.config, self.base = config, base
        self.smooth = config.smooth
        self.schedule, self.prediction_type = base.schedule, base.prediction_type
        self.conditioning = base.conditioning
        self.lora = self.smooth.get("lora") or None
        self.network = Network(base.net, self.lora)
        self.latent = base.latent_space(self.smooth.get("sample_posterior", True))
        self.tx = common.make_optimizer(config.optimizer, config.total_steps)
        self.frozen = base.frozen()

    # -- what the loop needs ----------------------------------------------------------------
    def prepare_batch(self, batch: dict) -> dict:
        return self.conditioning.prepare_batch(batch)

    def init_state(self, rng, frozen) -> TrainState:
        init_rng, rng = jax.random.split(rng)
        params = self.network.init(init_rng, frozen, lora.ATTENTION_TARGETS, lambda _: frozen["base"])
        stats = {"variation_mean": jnp.zeros((), jnp.float32)}
        mean_init = self.smooth.get("mean_init", "zero")
        if mean_init == "bias_corrected":  # the count only then: "zero" keeps today's checkpoints
            stats["variation_updates"] = jnp.zeros((), jnp.int32)
        elif mean_init != "zero":
            raise ValueError(f"config.smooth.mean_init={mean_init!r}: use one of {MEAN_INITS}.")
        return TrainState.create(params, self.tx, rng, stats=stats)

    def train_step(self, state: TrainState, batch, frozen, axis_name: str | None = None):
        return common.train_step(self.loss, state, batch, frozen, axis_name, self.tx,
                                 self.config.ema_decay)

    def sample_fn(self, params, frozen, rng, num_images: int, sample_config):
        """Samples of the fine-tuned model under classifier-free guidance, decoded."""
        net_params = self.network.params(params, frozen)
        return common.guided_samples(lambda x, t, c: self.network.denoiser.apply(net_params, x, t, c),
                                     self.conditioning, self.latent, self.schedule,
                                     self.prediction_type, frozen, rng, num_images, sample_config)

    def save_outputs(self, workdir: str, params) -> None:
        """W/smooth/params.msgpack (the LoRA factors or the full params, for lcm_jax), and for LoRA
        runs on an SD folder pytorch_lora_weights.safetensors (diffusers'
        pipe.load_lora_weights(W/smooth))."""
        import os

        from lcm_jax import teachers

        teachers.save_params(teachers.smooth_path(workdir), params)
        if self.lora and self.config.model.get("pretrained") and jax.process_index() == 0:
            lora.save(os.path.dirname(teachers.smooth_path(workdir)), params,
                      self.lora.get("alpha", self.lora.rank))

    # -- the math ---------------------------------------------------------------------------
    def draws(self, rng, batch_size: int, axis_name=None) -> dict:
        """Per example: t, eps, the probe's normal draw, condition dropout, VAE posterior noise;
        keyed by the example's global index (the same on any device layout)."""
        shape = self.latent.shape
        keys = common.example_keys(rng, batch_size, axis_name)
        one = lambda k: dict(
            t=jax.random.randint(jax.random.fold_in(k, 0), (), 0, self.schedule.num_train_timesteps),
            eps=jax.random.normal(jax.random.fold_in(k, 1), shape),
            probe=jax.random.normal(jax.random.fold_in(k, 2), shape),
            drop=jax.random.bernoulli(jax.random.fold_in(k, 3), self.smooth.get("cond_drop_prob", 0.0)),
            posterior_noise=jax.random.normal(jax.random.fold_in(k, 4), shape))
        return jax.vmap(one)(keys)

    def loss(self, params, state, batch, frozen, rng, axis_name=None):
        """eps-MSE + lambda * penalty; aux: (metrics, the state's stats with the new running mean)."""
        batch_size = next(iter(batch.values())).shape[0]
        d = self.draws(rng, batch_size, axis_name)
        z = self.latent.encode(batch, frozen, d["posterior_noise"])
        cond, uncond = self.conditioning.encode(batch, frozen)
        drop = lambda c: d["drop"].reshape(d["drop"].shape + (1,) * (c.ndim - 1))
        cond = jax.tree.map(lambda c, u: jnp.where(drop(c), u, c), cond, uncond)
        alpha, sigma = self.schedule.alpha_sigma(d["t"])
        net_params = self.network.params(params, frozen)

        def x0_hat(eps):  # the map eps -> x_t -> x0_hat whose VJP the penalty measures
            x_t = sched.add_noise(z, eps, alpha, sigma)
            out = self.network.denoiser.apply(net_params, x_t, d["t"], cond)
            x0, _ = sched.to_x0_eps(out, x_t, alpha, sigma, self.prediction_type)
            return x0, out

        _, pullback, out = jax.vjp(x0_hat, d["eps"], has_aux=True)
        probe = d["probe"] * sched.broadcast(sigma, z) / math.sqrt(math.prod(z.shape[1:]))
        (g,) = pullback(probe)
        lengths = jnp.sqrt(jnp.sum(g.astype(jnp.float32) ** 2, axis=tuple(range(1, z.ndim))))
        penalty, new_mean, stats = variation_penalty(lengths, state.stats,
                                                     self.smooth.get("decay", 0.01), axis_name)
        target = sched.from_x0_eps(z, d["eps"], alpha, sigma, self.prediction_type)
        mse = jnp.mean((out.astype(jnp.float32) - target) ** 2)
        loss = mse + self.smooth.lambda_reg * penalty
        metrics = {"loss": loss, "mse": mse, "variation_penalty": penalty,
                   "variation_length": jnp.mean(lengths), "variation_mean": new_mean}
        return loss, (metrics, stats)
