"""Latent Consistency Distillation (Latent Consistency Models, arXiv 2310.04378, Algorithm 1),
full-parameter and LCM-LoRA, as ONE compiled train step.

Per step, inside one XLA program (donated state, the shardings of parallel.py):
  1. latents z (VAE-encoded here, a posterior draw, or `batch["latents"]` from a cache) and the
     condition c; per example a grid index n, a guidance scale w ~ U[w_min, w_max] and noise;
     z_t = alpha_t z + sigma_t noise at t = t_{n+k};
  2. the teacher on cond AND uncond in ONE batched call of 2B (second-order solvers make a second
     2B call at the midpoint);
  3. the CFG-augmented solver step z_s = (1 + w) Psi(z_t, t, s, c) - w Psi(z_t, t, s, 0) with
     s = t_n (for DDIM this is x0_w = x0_c + w (x0_c - x0_u), eps_w likewise: the LCM convention).
     Teacher outputs are converted to (x0, eps) for their prediction type first: a v-prediction
     teacher's raw output is never used as noise (the official LCD code's bug);
  4. the student f(z_t, w, c, t) = c_skip(t) z_t + c_out(t) x0(F(z_t, t, c, emb(w))) and the
     target f^-(z_s, w, c, s) under stop_gradient, with the same w-embedding;
  5. L2 or pseudo-Huber distance, gradient clipping + AdamW, EMA theta^- <- mu theta^- + (1-mu) theta.

LCM-LoRA mode (`config.lcd.lora`): ONE base network. The teacher is the base, the student is
base + LoRA (applied next to each base kernel, `lora.Unmerged`: one base copy), the target is base +
stop_gradient(LoRA) (`lcd.target = "online"`, as LCM-LoRA) or base + EMA(LoRA) ("ema"); there
is no w-embedding. Full mode trains a copy of the teacher with a new `time_cond_proj` input.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from lcm_jax.diffusion import consistency, samplers, solvers
from lcm_jax.diffusion import schedule as sched
from lcm_jax.models import Denoiser, convert, lora
from lcm_jax.objectives import common
from lcm_jax.objectives.conditioning import concat
from lcm_jax.train import TrainState

TARGETS = ("ema", "online")


@dataclasses.dataclass
class Teacher:
    """What LCD distils from. `net` is the teacher (in LoRA mode also the student's base);
    `student_net` is the same network with the w-embedding input (full mode)."""
    net: Denoiser
    params: Any
    schedule: sched.Schedule
    prediction_type: str
    conditioning: Any  # objectives.conditioning.*
    latent_shape: tuple  # (h, w, c) of the teacher's input
    vae: Any = None  # AutoencoderKL module, or None when batches carry latents
    vae_params: Any = None
    student_net: Denoiser | None = None


def distance(pred, target, loss: str, huber_c: float):
    """Elementwise mean of (pred - target)^2, or of sqrt((pred - target)^2 + c^2) - c."""
    d = pred.astype(jnp.float32) - target.astype(jnp.float32)
    if loss == "l2":
        return jnp.mean(d ** 2)
    if loss == "huber":
        return jnp.mean(jnp.sqrt(d ** 2 + huber_c ** 2) - huber_c)
    raise ValueError(f"config.lcd.loss={loss!r}; use 'l2' or 'huber'.")


class LCDObjective:
    def __init__(self, config, teacher: Teacher):
        self.config, self.teacher = config, teacher
        self.lcd = lcd = config.lcd
        self.schedule = teacher.schedule
        self.grid = sched.skip_grid(self.schedule.num_train_timesteps, lcd.num_ddim_timesteps)
        self.lora = lcd.get("lora") or None
        self.target = lcd.get("target", "online" if self.lora else "ema")
        if self.target not in TARGETS:
            raise ValueError(f"config.lcd.target={self.target!r}; use one of {TARGETS}.")
        if not self.lora and teacher.student_net is None:
            raise ValueError("Full LCD needs Teacher.student_net (the teacher with time_cond_proj).")
        self.student_net = teacher.net if self.lora else teacher.student_net
        self.conditioning = teacher.conditioning
        self.scalings = dict(sigma_data=lcd.get("sigma_data", 0.5),
                             timestep_scaling=lcd.get("timestep_scaling", 10.0))
        self.tx = common.make_optimizer(config.optimizer, config.total_steps)
        self.frozen = {"teacher": teacher.params, **self.conditioning.frozen}
        if teacher.vae is not None:
            self.frozen["vae"] = teacher.vae_params

    # -- what the loop needs ----------------------------------------------------------------
    def prepare_batch(self, batch: dict) -> dict:
        return self.conditioning.prepare_batch(batch)

    def init_state(self, rng, frozen) -> TrainState:
        init_rng, rng = jax.random.split(rng)
        if self.lora:
            params = lora.init(init_rng, frozen["teacher"], self.lora.get("targets", lora.LCM_LORA_TARGETS),
                               self.lora.rank)
        else:
            params = self._student_from(init_rng, self.starting_point(frozen), frozen)
        return TrainState.create(params, self.tx, rng)

    def train_step(self, state: TrainState, batch, frozen, axis_name: str | None = None):
        rng = jax.random.fold_in(state.rng, state.step)
        (loss, metrics), grads = jax.value_and_grad(self.loss, has_aux=True)(
            state.params, state, batch, frozen, rng, axis_name)
        return common.apply_gradients(state, grads, metrics, self.tx, self.config.ema_decay,
                                      axis_name)

    def sample_fn(self, params, frozen, rng, num_images: int, sample_config):
        """LCM multistep samples of the student (`params`: its EMA), decoded: (images, labels)."""
        cond, uncond, labels = self.conditioning.sample_conditions(frozen, num_images)
        z = jax.random.normal(rng, (num_images,) + self.teacher.latent_shape)
        g = sample_config.guidance_scale
        if self.lora:  # no w-embedding: classifier-free guidance at sampling time
            model_fn = samplers.guided(self._apply_fn(self.student(params, frozen)), cond, uncond, g)
        else:  # pipelines embed w = guidance_scale - 1; one conditional call per step
            w_emb = self.w_embedding(jnp.full((num_images,), g - 1.0))
            model_fn = lambda x, t: self.student_net.apply(params, x, t, cond, w_emb)
        kwargs = dict(rng=jax.random.fold_in(rng, 1),
                      original_inference_steps=self.lcd.num_ddim_timesteps)
        if sample_config.sampler == "lcm":
            kwargs.update(self.scalings)
        elif sample_config.sampler == "tcd":
            kwargs["gamma"] = sample_config.get("gamma", 0.3)
        latents = samplers.sample(sample_config.sampler, model_fn, z, self.schedule,
                                  sample_config.num_steps,
                                  prediction_type=self.teacher.prediction_type, **kwargs)
        return self.decode(frozen, latents), labels

    def teacher_sample_fn(self, frozen, rng, num_images: int, sample_config):
        """Baseline samples of the teacher (DDIM / DPM-Solver(++)) under CFG, decoded."""
        cond, uncond, labels = self.conditioning.sample_conditions(frozen, num_images)
        z = jax.random.normal(rng, (num_images,) + self.teacher.latent_shape)
        model_fn = samplers.guided(self._apply_fn(frozen["teacher"]), cond, uncond,
                                   sample_config.guidance_scale)
        kwargs = dict(sample_config.get("sampler_kwargs", None) or {})  # e.g. timestep_spacing
        if sample_config.sampler in ("tcd", "lcm") or kwargs.get("eta"):
            kwargs["rng"] = jax.random.fold_in(rng, 1)
        latents = samplers.sample(sample_config.sampler, model_fn, z, self.schedule,
                                  sample_config.num_steps,
                                  prediction_type=self.teacher.prediction_type, **kwargs)
        return self.decode(frozen, latents), labels

    # -- the math ---------------------------------------------------------------------------
    def w_embedding(self, w):
        return consistency.guidance_scale_embedding(w, self.lcd.get("w_embedding_dim", 256))

    def student(self, params, frozen):
        """The student's parameters (LoRA: the base with the adapters, lora.adapted)."""
        if not self.lora:
            return params
        return lora.adapted(frozen["teacher"], params, self.lora)

    def denoise(self, net: Denoiser, params, x, t, cond, w_emb=None):
        """(x0, eps) from the network's raw output, whatever its prediction type."""
        out = net.apply(params, x, t, cond, w_emb)
        alpha, sigma = self.schedule.alpha_sigma(t)
        return sched.to_x0_eps(out, x, alpha, sigma, self.teacher.prediction_type)

    def consistency(self, params, x, t, cond, w_emb):
        """f(x, w, c, t) = c_skip(t) x + c_out(t) x0(F(x, t, c, emb(w)))."""
        x0, _ = self.denoise(self.student_net, params, x, t, cond, w_emb)
        return consistency.consistency_fn(x, x0, t, **self.scalings)

    def solve(self, teacher_params, x_t, t, s, cond, uncond, w):
        """The CFG-augmented teacher step (1 + w) Psi(x_t, t, s, c) - w Psi(x_t, t, s, 0),
        cond and uncond in one batched call (a second one at the midpoint for 2nd order)."""
        both = concat(cond, uncond)
        double = lambda a: jnp.concatenate([a, a])
        denoise_fn = lambda x, tt: self.denoise(self.teacher.net, teacher_params, x, tt, both)
        x2, t2 = double(x_t), double(t)
        x0, eps = denoise_fn(x2, t2)
        psi_c, psi_u = jnp.split(
            solvers.psi(self.lcd.solver, x2, t2, double(s), x0, eps, denoise_fn, self.schedule), 2)
        w = sched.broadcast(w, psi_c)
        return (1.0 + w) * psi_c - w * psi_u

    def draws(self, rng, batch_size: int, latent_shape, axis_name=None) -> dict:
        """Per-example grid index n, guidance scale w, noise, VAE posterior noise and a uniform
        u (TCD's end point), keyed by the example's global index: the same draws on any device
        layout."""
        keys = common.example_keys(rng, batch_size, axis_name)
        one = lambda k: dict(
            n=jax.random.randint(jax.random.fold_in(k, 0), (), 0, len(self.grid.timesteps)),
            w=jax.random.uniform(jax.random.fold_in(k, 1), (), jnp.float32, self.lcd.w_min,
                                 self.lcd.w_max),
            noise=jax.random.normal(jax.random.fold_in(k, 2), latent_shape),
            posterior_noise=jax.random.normal(jax.random.fold_in(k, 3), latent_shape),
            u=jax.random.uniform(jax.random.fold_in(k, 4), ()))
        return jax.vmap(one)(keys)

    def latents(self, batch, frozen, posterior_noise):
        """The batch's cached latents, or the VAE's: a posterior draw (`lcd.sample_posterior`,
        the SD scripts' latent_dist.sample()) or the posterior mean. Use what the teacher was
        trained on: a teacher of posterior means sees a draw as off-distribution noise."""
        if "latents" in batch:
            return batch["latents"]
        noise = posterior_noise if self.lcd.get("sample_posterior", True) else None
        return self.teacher.vae.encode_to_latents(frozen["vae"], batch["image"], noise=noise)

    def previous_point(self, frozen, z, d, x_t, t, s, cond, uncond):
        """x_hat at t_n = s, the target's input: LCD and TCD take the teacher's CFG solver step."""
        return self.solve(frozen["teacher"], x_t, t, s, cond, uncond, d["w"])

    def end_timestep(self, d, s):
        """Where the boundary function maps to: LCD's consistency function maps to the data."""
        return None

    def boundary(self, params, x, t, cond, w_emb, end):
        """The function both points of the pair go through: LCD's consistency function."""
        return self.consistency(params, x, t, cond, w_emb)

    def loss(self, params, state: TrainState, batch, frozen, rng, axis_name=None):
        """d(boundary_theta(x_{t_{n+k}}, t_{n+k}), boundary_theta-(x_hat_{t_n}, t_n)), the pair
        built by `previous_point` / `end_timestep` / `boundary` (LCD here; TCD and LCF change one
        each)."""
        batch_size = next(iter(batch.values())).shape[0]
        d = self.draws(rng, batch_size, self.teacher.latent_shape, axis_name)
        z = self.latents(batch, frozen, d["posterior_noise"])
        cond, uncond = self.conditioning.encode(batch, frozen)
        t, s = jnp.asarray(self.grid.timesteps)[d["n"]], jnp.asarray(self.grid.prev_timesteps)[d["n"]]
        x_t = sched.add_noise(z, d["noise"], *self.schedule.alpha_sigma(t))
        w_emb = None if self.lora else self.w_embedding(d["w"])
        end = self.end_timestep(d, s)

        x_s = jax.lax.stop_gradient(self.previous_point(frozen, z, d, x_t, t, s, cond, uncond))
        target_params = jax.lax.stop_gradient(state.ema_params if self.target == "ema" else params)
        target = self.boundary(self.student(target_params, frozen), x_s, s, cond, w_emb, end)
        pred = self.boundary(self.student(params, frozen), x_t, t, cond, w_emb, end)
        loss = distance(pred, jax.lax.stop_gradient(target), self.lcd.loss,
                        self.lcd.get("huber_c", 0.001))
        return loss, {"loss": loss}

    # -- helpers -----------------------------------------------------------------------------
    def _apply_fn(self, params):
        return lambda x, t, cond: self.teacher.net.apply(params, x, t, cond)

    def decode(self, frozen, latents):
        if self.teacher.vae is None:
            return jnp.clip(latents, -1.0, 1.0)
        return jnp.clip(self.teacher.vae.decode_latents(frozen["vae"], latents), -1.0, 1.0)

    def starting_point(self, frozen):
        """The params the student starts from: the teacher's."""
        return frozen["teacher"]

    def _student_from(self, rng, start, frozen):
        """`start` plus the new w-embedding projection (`cond_proj`) when it lacks one,
        zero-initialised (`lcd.zero_init_cond_proj`, default) so that the student starts as the
        teacher."""
        cond, _, _ = self.conditioning.sample_conditions(frozen, 1)
        x = jnp.zeros((1,) + self.teacher.latent_shape)
        t = jnp.zeros((1,), jnp.int32)
        fresh = convert.flatten(self.student_net.init(rng, x, t, cond,
                                                      self.w_embedding(jnp.zeros((1,)))))
        taught = convert.flatten(start)
        if set(taught) - set(fresh):
            raise ValueError(f"Params absent from the student: {sorted(set(taught) - set(fresh))[:5]}")
        zero_new = self.lcd.get("zero_init_cond_proj", True)
        return convert.unflatten({
            p: taught[p] if p in taught else (jnp.zeros_like(v) if zero_new else v)
            for p, v in fresh.items()})
