"""Real-image inversion, interpolation and editing on a latent diffusion model (Smooth Diffusion's
applications), for a local Stable Diffusion folder and for the digits teacher alike.

  model = LatentModel.from_stable_diffusion(pipeline.StableDiffusion.from_pretrained(folder))
  model = LatentModel.from_digits(config, "workdirs/digits_lcd", smooth_workdir=None)
  inv = model.invert(images, ["a cat"], null_text=True)        # DDIM (+ null-text) inversion
  images = model.reconstruct(inv)
  frames = model.interpolate(inv_a, inv_b)                     # slerp x_T, lerp the conditions
  edited = model.edit(images, ["a cat"], ["a dog"], ratio=0.8)  # prompt switch after (1 - r) N

Conditions are prompts (SD) or class labels / captions (digits: labels play the prompts' role).
The unconditional input that null-text inversion optimises is the empty prompt's embedding (SD)
or the null class's embedding row (digits). DDIM follows the model's scheduler conventions
(`ddim`: SD's leading spacing with steps_offset 1; the digits teacher's trailing grid to abar = 1).
Every method runs jitted programs (one per shape and step count) cached on the model; the frozen
weights enter them as arguments.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from lcm_jax import pipeline
from lcm_jax.diffusion import inversion
from lcm_jax.diffusion import schedule as sched
from lcm_jax.models import dit, lora

DIGITS_DDIM = {"timestep_spacing": "trailing", "steps_offset": 0, "set_alpha_to_one": True}
SD_DDIM = {"timestep_spacing": "leading", "steps_offset": 1, "set_alpha_to_one": False}


@dataclasses.dataclass(frozen=True)
class Inversion:
    """The DDIM-inverted trajectory [n + 1, B, ...] (x_0 ... x_T), the conditions it was inverted
    with, the per-step null inputs of null-text inversion (None for plain DDIM inversion) and the
    guidance scale they were optimised for."""
    trajectory: Any
    cond: Any
    nulls: Any = None
    guidance_scale: float = 1.0

    @property
    def x_T(self):
        return self.trajectory[-1]

    @property
    def num_steps(self) -> int:
        return self.trajectory.shape[0] - 1

    def select(self, index) -> "Inversion":
        """Some images of the batch (they keep the batch's shared nulls)."""
        take = lambda a: a[index] if jnp.ndim(index) else a[index:index + 1]
        return dataclasses.replace(self, trajectory=self.trajectory[:, index] if jnp.ndim(index)
                                   else self.trajectory[:, index:index + 1],
                                   cond=jax.tree.map(take, self.cond))


@dataclasses.dataclass(eq=False)
class LatentModel:
    """A latent diffusion model as the operations need it. Every compiled program takes the frozen
    weights, `params` = {"net": the denoiser's, "vae": the VAE's}, and the null input as arguments
    (never constants baked into the program), and is cached on the instance, so that it is freed
    with the instance and one model's programs serve any params of the same shapes."""
    apply: Callable  # (net params, x, t, cond) -> the raw prediction
    uncond_apply: Callable  # (net params, null, x, t) -> the prediction with the unconditional input null
    params: Any  # {"net": ..., "vae": ...}
    null: Any  # the unconditional input (an embedding)
    schedule: sched.Schedule
    prediction_type: str
    encode: Callable  # (vae params, images [B, H, W, C] in [-1, 1]) -> latents
    decode: Callable  # (vae params, latents) -> images in [-1, 1]
    condition: Callable  # prompts / labels -> a cond pytree [B, ...]
    ddim: dict
    latent_shape: tuple  # (h, w, c) of the latents at the model's native size
    lerp_conditions: bool = True  # False: class labels cannot be mixed (digits)
    # (name, static settings) -> jitted program. Not an init field: dataclasses.replace starts an
    # empty cache, as a program may bake in any other field (the schedule, the callables).
    _programs: dict = dataclasses.field(default_factory=dict, init=False, repr=False)

    # -- builders -----------------------------------------------------------------------------
    @classmethod
    def from_stable_diffusion(cls, pipe) -> "LatentModel":
        if pipe.is_sdxl:
            raise NotImplementedError("editing.LatentModel supports SD 1.x / 2.x folders; SDXL's "
                                      "pooled and micro-conditioning inputs are not wired here.")
        unet, vae = pipe.unet, pipe.vae  # modules, no arrays: what the programs close over

        def apply(p, x, t, cond):
            return unet.apply({"params": p}, x, t, cond["encoder_hidden_states"])

        def uncond_apply(p, null, x, t):
            return unet.apply({"params": p}, x, t, jnp.broadcast_to(null, (x.shape[0],) + null.shape[1:]))

        sc = pipe.scheduler_config
        return cls(apply=apply, uncond_apply=uncond_apply, params={"net": pipe.unet_params, "vae": pipe.vae_params},
                   null=pipe.encode_prompt([""]),  # [1, L, D]
                   schedule=pipe.schedule, prediction_type=sc.get("prediction_type", "epsilon"),
                   encode=vae.encode_to_latents,
                   decode=lambda p, z: jnp.clip(vae.decode_latents(p, z), -1.0, 1.0),
                   condition=lambda prompts: {"encoder_hidden_states": pipe.encode_prompt(list(prompts))},
                   ddim=pipeline.scheduler_options(sc, "ddim"),
                   latent_shape=(pipe.sample_size, pipe.sample_size, unet.config.in_channels))

    @classmethod
    def from_digits(cls, config, teacher_workdir: str, smooth_workdir: str | None = None) -> "LatentModel":
        """The digits teacher of README command 1 (its chain in `teacher_workdir`, trained there
        if absent), optionally with the params a Smooth Diffusion run exported (LoRA merged).
        The null input is the null class's label embedding (a DiT's)."""
        from lcm_jax import teachers
        from lcm_jax.data import digits

        images, labels = digits.load("train", config.data.image_size, config.data.get("channels", 1))
        teacher = teachers.train_chained(config, teacher_workdir, images, labels)
        if not isinstance(teacher.net.module, dit.DiT):
            raise NotImplementedError("editing.LatentModel.from_digits needs a DiT teacher "
                                      "(config.model.name='dit'): it inverts DiT's label embedding.")
        params = teacher.params
        if smooth_workdir:
            from lcm_jax.objectives.smooth import SmoothObjective

            objective = SmoothObjective(config, teacher)
            template = jax.eval_shape(objective.init_state, jax.random.PRNGKey(0), objective.frozen).params
            trained = teachers.load_params(teachers.smooth_path(smooth_workdir), template)
            params = lora.materialized(objective.network.params(trained, objective.frozen))
        net, vae, null_class = teacher.net, teacher.vae, teacher.conditioning.null_class

        def uncond_apply(p, null, x, t):  # DiT's label embedding input, `null` for every image
            embedding = jnp.broadcast_to(null, (x.shape[0],) + null.shape)
            return net.apply(p, x, t, {"label_embedding": embedding})

        names = list(digits.captions(np.arange(null_class)))

        def condition(prompts):
            return jnp.asarray([names.index(p) if isinstance(p, str) else int(p) for p in prompts], jnp.int32)

        return cls(apply=net.apply, uncond_apply=uncond_apply,
                   params={"net": params, "vae": teacher.vae_params},
                   null=dit.label_embedding(params, null_class), schedule=teacher.schedule,
                   prediction_type=teacher.prediction_type, encode=vae.encode_to_latents,
                   decode=lambda p, z: jnp.clip(vae.decode_latents(p, z), -1.0, 1.0),
                   condition=condition, ddim=DIGITS_DDIM, latent_shape=tuple(teacher.latent_shape),
                   lerp_conditions=False)

    # -- the operations -----------------------------------------------------------------------
    def invert(self, images, prompts: Sequence, *, num_steps: int = 50, guidance_scale: float = 7.5,
               null_text: bool = False, shared_nulls: bool = True,
               inner_steps: int = 10) -> Inversion:
        """DDIM inversion with the conditional model (as Mokady et al.), then, with null_text,
        the per-step null inputs that make guided DDIM retrace it: one set for the whole batch
        (shared_nulls, what interpolating two real images needs) or one set per image
        (Inversion.nulls then [B, n, ...]; reconstruct handles both)."""
        cond = self.condition(prompts)
        latents = self._encode()(self.params, jnp.asarray(images))
        trajectory = self._invert(num_steps)(self.params, latents, cond)
        if not null_text:
            return Inversion(trajectory, cond, None, guidance_scale)
        nulls = self._null_text(num_steps, inner_steps, shared_nulls)(
            self.params, self.null, trajectory, cond, jnp.float32(guidance_scale))
        return Inversion(trajectory, cond, nulls, guidance_scale)

    def generate(self, x_T, cond, *, num_steps: int = 50, guidance_scale: float = 7.5,
                 nulls=None, target_cond=None, switch_step: int | None = None):
        """Images [-1, 1] by DDIM with CFG from x_T: per-step nulls if given, and the condition
        switched to `target_cond` from step `switch_step` on (prompt-switch editing)."""
        if nulls is None:
            nulls = jnp.broadcast_to(self.null, (num_steps,) + jnp.shape(self.null))
        target = cond if target_cond is None else target_cond
        switch = num_steps if switch_step is None else switch_step
        return self._generate(num_steps)(self.params, x_T, cond, target, nulls, jnp.int32(switch),
                                         jnp.float32(guidance_scale))

    def reconstruct(self, inv: Inversion):
        if inv.nulls is not None and inv.nulls.ndim == jnp.ndim(self.null) + 2:  # one set per image
            return self._generate(inv.num_steps, per_image=True)(
                self.params, inv.x_T, inv.cond, inv.nulls, jnp.float32(inv.guidance_scale))
        return self.generate(inv.x_T, inv.cond, num_steps=inv.num_steps,
                             guidance_scale=inv.guidance_scale, nulls=inv.nulls)

    def interpolate(self, a: Inversion, b: Inversion, etas=np.linspace(0, 1, 11)):
        """Frames [B, F, H, W, C]: slerp of the inverted x_T, lerp of the conditions (SD), the
        per-step nulls averaged when both have them (invert the two images together for one
        shared set, as the paper; per-image sets are averaged over their images)."""
        if not self.lerp_conditions and not bool(jnp.all(a.cond == b.cond)):
            raise ValueError("Class labels cannot be interpolated: invert two images of the same "
                             "class (or interpolate SD prompts).")
        shared = lambda n: n if n.ndim == jnp.ndim(self.null) + 1 else n.mean(0)  # per image: mean
        nulls = None if a.nulls is None or b.nulls is None else (shared(a.nulls) + shared(b.nulls)) / 2
        frames = []
        for eta in etas:
            cond = jax.tree.map(lambda u, v: (1 - eta) * u + eta * v, a.cond, b.cond) \
                if self.lerp_conditions else a.cond
            frames.append(self.generate(inversion.slerp(a.x_T, b.x_T, float(eta)), cond,
                                        num_steps=a.num_steps, guidance_scale=a.guidance_scale,
                                        nulls=nulls))
        return jnp.stack(frames, axis=1)

    def edit(self, images, source: Sequence, target: Sequence, *, ratio: float = 0.8,
             num_steps: int = 50, guidance_scale: float = 7.5, null_text: bool = True):
        """Prompt-switch editing: invert with the source prompt, generate with it for the first
        (1 - ratio) N steps, then with the target prompt."""
        inv = self.invert(images, source, num_steps=num_steps, guidance_scale=guidance_scale,
                          null_text=null_text)
        switch = int(round((1.0 - ratio) * num_steps))
        return self.generate(inv.x_T, inv.cond, num_steps=num_steps, guidance_scale=guidance_scale,
                             nulls=inv.nulls, target_cond=self.condition(target), switch_step=switch)

    # -- compiled programs: each takes the whole params pytree (jit drops the unused leaves) ----
    def _cached(self, key: tuple, fn: Callable):
        if key not in self._programs:
            self._programs[key] = jax.jit(fn)
        return self._programs[key]

    def _encode(self):
        return self._cached(("encode",), lambda params, images: self.encode(params["vae"], images))

    def _invert(self, num_steps: int):
        def run(params, latents, cond):
            model_fn = lambda x, t: self.apply(params["net"], x, t, cond)
            return inversion.ddim_invert(model_fn, latents, self.schedule, num_steps,
                                         prediction_type=self.prediction_type, **self.ddim)
        return self._cached(("invert", num_steps), run)

    def _null_text(self, num_steps: int, inner_steps: int, shared: bool):
        def run(params, null, trajectory, cond, guidance):
            net = params["net"]
            return inversion.null_text_inversion(
                lambda x, t: self.apply(net, x, t, cond),
                lambda n, x, t: self.uncond_apply(net, n, x, t), null, trajectory,
                self.schedule, num_steps, guidance, prediction_type=self.prediction_type,
                inner_steps=inner_steps, **self.ddim)[0]
        key = ("null_text", num_steps, inner_steps, shared)
        if shared:
            return self._cached(key, run)
        one = lambda params, null, traj, c, g: run(params, null, traj[:, None],
                                                   jax.tree.map(lambda a: a[None], c), g)
        return self._cached(key, jax.vmap(one, in_axes=(None, None, 1, 0, None)))

    def _generate(self, num_steps: int, per_image: bool = False):
        """One program for every guidance scale (a traced input; both branches always run).
        per_image: (params, x_T, cond, nulls [B, n, ...], guidance), each image with its nulls."""
        def run(params, x_T, cond, target, nulls, switch, guidance):
            def step_model(x, t, i):
                c = jax.tree.map(lambda s, g: jnp.where(i < switch, s, g), cond, target)
                u = self.uncond_apply(params["net"], nulls[i], x, t)
                return u + guidance * (self.apply(params["net"], x, t, c) - u)
            z = inversion.ddim_generate(step_model, x_T, self.schedule, num_steps,
                                        prediction_type=self.prediction_type, **self.ddim)
            return self.decode(params["vae"], z)
        if not per_image:
            return self._cached(("generate", num_steps), run)

        def one(params, x, c, n, guidance):
            c = jax.tree.map(lambda a: a[None], c)
            return run(params, x[None], c, c, n, jnp.int32(num_steps), guidance)[0]
        return self._cached(("generate_per_image", num_steps),
                            jax.vmap(one, in_axes=(None, 0, 0, 0, None)))
