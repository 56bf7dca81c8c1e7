"""The consistency family (LCD, TCD, LCF) as ONE objective and ONE compiled train step,
parameterised by a `Strategy`: how the pair (x_{t_{n+k}}, x_hat_{t_n}) is made, and where the
boundary function maps to. lcd.py, tcd.py and lcf.py each hold one strategy and its docs.

Per step, inside one XLA program (donated state, the shardings of parallel.py):
  1. latents z (VAE-encoded here, a posterior draw or the mean, or `batch["latents"]`) and the
     condition c; per example a grid index n on the skip grid (k = T / N; N fixed at
     lcd.num_ddim_timesteps, or a traced function of the train step: `lcd.k_schedule`), a
     guidance scale w ~ U[w_min, w_max] and noise; x_{t_{n+k}} = alpha_t z + sigma_t noise;
  2. x_hat at s = t_n by the strategy: the teacher's CFG-augmented solver step (LCD, TCD) or the
     forward process with the same noise (LCF);
  3. d(g_theta(x_{t_{n+k}}, t_{n+k}), g_theta^-(x_hat_{t_n}, t_n)) with g the consistency
     function f(x, w, c, t) = c_skip(t) x + c_out(t) x0(F(x, t, c, emb(w))) (LCD, LCF) or TCD's
     trajectory consistency function f(x, t, s_end) (`Strategy.end_time`), the target network
     theta^- the EMA or the online params under stop_gradient, the same w-embedding on both;
  4. L2 or pseudo-Huber distance, gradient clipping + AdamW, EMA theta^- <- mu theta^- + (1-mu) theta.

Teacher outputs are converted to (x0, eps) for their prediction type before any solver step: a
v-prediction teacher's raw output is never used as noise (the official LCD code's bug).

Full mode (`lcd.lora` None) trains a copy of the base with a new, zero-initialised
`time_cond_proj` input for the w-embedding (`Base.student_net`). LoRA mode (LCM-LoRA) keeps ONE
base network: the teacher is the base, the student base + LoRA (applied next to each base
kernel: one base copy), the target base + stop_gradient(LoRA) (`lcd.target = "online"`, as
LCM-LoRA) or base + EMA(LoRA); there is no w-embedding, guidance is applied at sampling time.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from lcm_jax import config_rules as rules
from lcm_jax.diffusion import consistency as cm
from lcm_jax.diffusion import samplers, solvers
from lcm_jax.diffusion import schedule as sched
from lcm_jax.errors import UserError
from lcm_jax.models import convert, lora
from lcm_jax.objectives import common, diffusion
from lcm_jax.objectives.conditioning import concat
from lcm_jax.objectives.parts import Base, Network
from lcm_jax.train import TrainState

TARGETS = ("ema", "online")  # lcd.target: the target network theta^-
LOSSES = ("l2", "huber")  # lcd.loss
REQUIRED = diffusion.REQUIRED
SAMPLERS = samplers.SAMPLERS


@dataclasses.dataclass(frozen=True)
class Strategy:
    """What one member of the family changes.

    previous_point(objective, frozen, draws, z, x_t, t, s, cond, uncond) -> x_hat_s: the
        target's input at s = t_n (under stop_gradient).
    end_time(key, n, prev_timestep) -> s_end, per example: the trajectory consistency
        function's end point, prev_timestep(j) giving t_j on the step's skip grid; None: the
        consistency function, which maps to the data.
    teacher: whether the base is a teacher that can be sampled (the few-step baselines).
    student_sampler: the few-step sampler its students are evaluated with."""
    previous_point: Callable
    end_time: Callable | None = None
    teacher: bool = True
    student_sampler: str = "lcm"


def teacher_step(objective, frozen, draws, z, x_t, t, s, cond, uncond):
    """x_hat at t_n: the teacher's CFG-augmented solver step from t_{n+k} (LCD, TCD)."""
    return objective.solve(frozen["base"], x_t, t, s, cond, uncond, draws["w"])


def distance(pred, target, loss: str, huber_c: float):
    """Elementwise mean of (pred - target)^2, or of sqrt((pred - target)^2 + c^2) - c."""
    d = pred.astype(jnp.float32) - target.astype(jnp.float32)
    if loss == "l2":
        return jnp.mean(d ** 2)
    if loss == "huber":
        return jnp.mean(jnp.sqrt(d ** 2 + huber_c ** 2) - huber_c)
    raise ValueError(f"config.lcd.loss={loss!r}; use one of {LOSSES}.")


class ConsistencyObjective:
    def __init__(self, config, base: Base, strategy: Strategy):
        self.config, self.base, self.strategy = config, base, strategy
        self.lcd = lcd = config.lcd
        self.schedule = base.schedule
        self.grid = sched.skip_grid(self.schedule.num_train_timesteps, lcd.num_ddim_timesteps)
        # step -> N (traced), or None: the fixed grid above on every step.
        self.grid_points = curriculum(config, self.schedule.num_train_timesteps)
        self.lora = lcd.get("lora") or None
        self.target = lcd.get("target", "online" if self.lora else "ema")
        if self.target not in TARGETS:
            raise UserError(f"config.lcd.target={self.target!r}; use one of {TARGETS}.")
        student = base.net if self.lora else base.student_net
        if student is None:
            raise UserError("A full-parameter consistency student needs Base.student_net (the "
                            "base with the w-embedding input): build the base with "
                            "teachers.from_pretrained(config, w_embedding_dim=...).")
        self.network = Network(student, self.lora)
        self.latent = base.latent_space(lcd.get("sample_posterior", True))
        self.conditioning = base.conditioning
        self.scalings = dict(sigma_data=lcd.get("sigma_data", 0.5),
                             timestep_scaling=lcd.get("timestep_scaling", 10.0))
        self.tx = common.make_optimizer(config.optimizer, config.total_steps, self._lr_scales())
        self.frozen = base.frozen()

    # -- what the loop needs ----------------------------------------------------------------
    def prepare_batch(self, batch: dict) -> dict:
        return self.conditioning.prepare_batch(batch)

    def init_state(self, rng, frozen) -> TrainState:
        init_rng, rng = jax.random.split(rng)
        params = self.network.init(init_rng, frozen, lora.LCM_LORA_TARGETS,
                                   lambda key: self._student_from(key, frozen))
        return TrainState.create(params, self.tx, rng)

    def train_step(self, state: TrainState, batch, frozen, axis_name: str | None = None):
        return common.train_step(self.loss, state, batch, frozen, axis_name, self.tx,
                                 self.config.ema_decay)

    def sample_fn(self, params, frozen, rng, num_images: int, sample_config):
        """Few-step samples of the student (`params`: its EMA), decoded: (images, labels)."""
        defaults = {}
        if sample_config.sampler in samplers.FEW_STEP:
            defaults = dict(original_inference_steps=self.lcd.num_ddim_timesteps)
            defaults.update(self.scalings if sample_config.sampler == "lcm"
                            else dict(gamma=sample_config.get("gamma", 0.3)))
        if self.lora:  # no w-embedding: classifier-free guidance at sampling time
            student = self.network.params(params, frozen)
            return self._guided(lambda x, t, c: self.network.denoiser.apply(student, x, t, c),
                                frozen, rng, num_images, sample_config, **defaults)
        # Pipelines embed w = guidance_scale - 1: one conditional call per step.
        cond, _, labels = self.conditioning.sample_conditions(frozen, num_images)
        z = jax.random.normal(rng, (num_images,) + self.latent.shape)
        w_emb = self.w_embedding(jnp.full((num_images,), sample_config.guidance_scale - 1.0))
        model_fn = lambda x, t: self.network.denoiser.apply(params, x, t, cond, w_emb)
        latents = common.run_sampler(sample_config, model_fn, z, self.schedule,
                                     self.base.prediction_type, rng, **defaults)
        return self.latent.decode(frozen, latents), labels

    def teacher_sample_fn(self, frozen, rng, num_images: int, sample_config):
        """Baseline samples of the teacher (DDIM / DPM-Solver(++)) under CFG, decoded."""
        if not self.strategy.teacher:
            raise UserError("This objective has no teacher to sample (LCF fine-tunes without "
                            "one); evaluate the LCM with sampler 'lcm' or 'tcd'.")
        return self._guided(lambda x, t, c: self.base.net.apply(frozen["base"], x, t, c),
                            frozen, rng, num_images, sample_config)

    def _guided(self, apply, frozen, rng, num_images, sample_config, **defaults):
        return common.guided_samples(apply, self.conditioning, self.latent, self.schedule,
                                     self.base.prediction_type, frozen, rng, num_images,
                                     sample_config, **defaults)

    def save_outputs(self, workdir: str, params) -> None:
        """The digits student's EMA params, for LCF to fine-tune (SD runs: experiments/export.py)."""
        if not self.config.model.get("pretrained"):
            from lcm_jax import teachers

            teachers.save_params(teachers.student_path(workdir), params)

    # -- the math ---------------------------------------------------------------------------
    def w_embedding(self, w):
        return cm.guidance_scale_embedding(w, self.lcd.get("w_embedding_dim", 256))

    def denoise(self, net, params, x, t, cond, w_emb=None):
        """(x0, eps) from the network's raw output, whatever its prediction type."""
        out = net.apply(params, x, t, cond, w_emb)
        alpha, sigma = self.schedule.alpha_sigma(t)
        return sched.to_x0_eps(out, x, alpha, sigma, self.base.prediction_type)

    def solve(self, teacher_params, x_t, t, s, cond, uncond, w):
        """The CFG-augmented teacher step (1 + w) Psi(x_t, t, s, c) - w Psi(x_t, t, s, 0),
        cond and uncond in one batched call (a second one at the midpoint for 2nd order);
        for DDIM this is x0_w = x0_c + w (x0_c - x0_u), eps_w likewise (the LCM convention)."""
        both = concat(cond, uncond)
        double = lambda a: jnp.concatenate([a, a])
        denoise_fn = lambda x, tt: self.denoise(self.base.net, teacher_params, x, tt, both)
        x2, t2 = double(x_t), double(t)
        x0, eps = denoise_fn(x2, t2)
        psi_c, psi_u = jnp.split(
            solvers.psi(self.lcd.solver, x2, t2, double(s), x0, eps, denoise_fn, self.schedule), 2)
        w = sched.broadcast(w, psi_c)
        return (1.0 + w) * psi_c - w * psi_u

    def boundary(self, params, x, t, cond, w_emb, end):
        """The function both points of the pair go through: f(x, w, c, t) (end None) or the
        trajectory consistency function f(x, t, end)."""
        x0, _ = self.denoise(self.network.denoiser, params, x, t, cond, w_emb)
        if end is None:
            return cm.consistency_fn(x, x0, t, **self.scalings)
        return cm.trajectory_consistency_fn(x, x0, t, end, self.schedule)

    def draws(self, rng, batch_size: int, axis_name=None, step=None) -> dict:
        """Per-example grid index n and its pair of timesteps t = t_{n+k}, s = t_n, guidance
        scale w, noise, VAE posterior noise and (TCD) the end time, keyed by the example's global
        index: the same draws on any device layout. `step` (the train step, traced): the grid's
        size N under a curriculum (n ~ U{0..N-1} on the step's grid); unused without one."""
        keys = common.example_keys(rng, batch_size, axis_name)
        shape, end_time = self.latent.shape, self.strategy.end_time
        if self.grid_points is None:
            num_points = len(self.grid.timesteps)
        elif step is None:
            raise ValueError("This objective's skip grid follows a curriculum: pass draws the "
                             "train step (state.step).")
        else:
            num_points = self.grid_points(step)
        # skip_grid's (t_{n+k}, t_n) at index n, for a static or a traced N alike.
        pair = lambda n: sched.skip_pair(self.schedule.num_train_timesteps, num_points, n)

        def one(k):
            n = jax.random.randint(jax.random.fold_in(k, 0), (), 0, num_points)
            d = dict(n=n, w=jax.random.uniform(jax.random.fold_in(k, 1), (), jnp.float32,
                                               self.lcd.w_min, self.lcd.w_max),
                     noise=jax.random.normal(jax.random.fold_in(k, 2), shape),
                     posterior_noise=jax.random.normal(jax.random.fold_in(k, 3), shape))
            if end_time is not None:
                d["end"] = end_time(jax.random.fold_in(k, 4), n, lambda j: pair(j)[1])
            return d
        d = jax.vmap(one)(keys)
        d["t"], d["s"] = pair(d["n"])
        return d

    def loss(self, params, state: TrainState, batch, frozen, rng, axis_name=None):
        batch_size = next(iter(batch.values())).shape[0]
        d = self.draws(rng, batch_size, axis_name, state.step)
        z = self.latent.encode(batch, frozen, d["posterior_noise"])
        cond, uncond = self.conditioning.encode(batch, frozen)
        t, s = d["t"], d["s"]
        x_t = sched.add_noise(z, d["noise"], *self.schedule.alpha_sigma(t))
        w_emb = None if self.lora else self.w_embedding(d["w"])
        end = d.get("end")

        x_s = jax.lax.stop_gradient(
            self.strategy.previous_point(self, frozen, d, z, x_t, t, s, cond, uncond))
        target_params = jax.lax.stop_gradient(state.ema_params if self.target == "ema" else params)
        target = self.boundary(self.network.params(target_params, frozen), x_s, s, cond, w_emb, end)
        pred = self.boundary(self.network.params(params, frozen), x_t, t, cond, w_emb, end)
        loss = distance(pred, jax.lax.stop_gradient(target), self.lcd.loss,
                        self.lcd.get("huber_c", 0.001))
        metrics = {"loss": loss}
        if self.grid_points is not None:  # the curriculum's skip k = T / N at this step
            metrics["skip"] = (self.schedule.num_train_timesteps
                               // self.grid_points(state.step)).astype(jnp.float32)
        return loss, (metrics, state.stats)

    # -- helpers -----------------------------------------------------------------------------
    def _lr_scales(self):
        """make_optimizer's lr_scales: `lcd.cond_proj_lr_scale` (default 1, no groups) on the
        w-embedding projection, every param path holding "cond_proj" (DiT's `cond_proj`, the
        UNet's `time_embedding/cond_proj`). Issue 24: from zero at lr 1e-4 it is not learned in
        README command 1's 1,500 steps, and the student ignores w."""
        scale = self.lcd.get("cond_proj_lr_scale", 1.0)
        if scale == 1:
            return None
        if self.lora:
            raise UserError(f"config.lcd.cond_proj_lr_scale={scale!r} scales the learning rate "
                            "of the full student's w-embedding projection; LoRA mode trains no "
                            "w-embedding (guidance is applied at sampling time): leave it 1.0.")
        return {"cond_proj": scale}

    def _student_from(self, rng, frozen):
        """The base plus the new w-embedding projection (`cond_proj`) when it lacks one,
        zero-initialised (`lcd.zero_init_cond_proj`, default) so that the student starts as the
        base; zero_init_cond_proj=False draws it as diffusers' LCD scripts leave it (torch's
        nn.Linear default, `torch_linear_init`: the backbones' own init of it may be zeros, as
        DiT's is)."""
        cond, _, _ = self.conditioning.sample_conditions(frozen, 1)
        x = jnp.zeros((1,) + self.latent.shape)
        t = jnp.zeros((1,), jnp.int32)
        fresh = convert.flatten(self.network.denoiser.init(rng, x, t, cond,
                                                           self.w_embedding(jnp.zeros((1,)))))
        taught = convert.flatten(frozen["base"])
        if set(taught) - set(fresh):
            raise ValueError(f"Params absent from the student: {sorted(set(taught) - set(fresh))[:5]}")
        new = {p: v for p, v in fresh.items() if p not in taught}
        if self.lcd.get("zero_init_cond_proj", True):
            new = {p: jnp.zeros_like(v) for p, v in new.items()}
        else:
            new = torch_linear_init(jax.random.fold_in(rng, 1), new)
        return convert.unflatten({p: taught[p] if p in taught else new[p] for p in fresh})


def torch_linear_init(rng, flat: dict) -> dict:
    """torch.nn.Linear's default init of flat {path: array} params (diffusers' for a layer it
    adds): each "kernel" [..., in, out] ~ U(+-1/sqrt(fan_in)) (kaiming_uniform, a = sqrt(5)), fan_in
    the product of all but its last dim, its sibling "bias" likewise with the kernel's fan_in;
    other leaves as given."""
    out = dict(flat)
    for i, p in enumerate(sorted(flat)):
        if p[-1] not in ("kernel", "bias"):
            continue
        kernel = flat.get(p[:-1] + ("kernel",))
        if kernel is None:
            continue
        bound = 1.0 / float(np.sqrt(np.prod(kernel.shape[:-1])))
        out[p] = jax.random.uniform(jax.random.fold_in(rng, i), flat[p].shape, flat[p].dtype,
                                    -bound, bound)
    return out


# ==============================================================================================
# What every member's registry module shares: building from a config, its config checks.
# ==============================================================================================

def base_for(config, workdir: str, pipeline) -> Base:
    """The teacher, with the student's w-conditioned network in full mode: a local SD folder
    (config.model.pretrained), else the digits chain of README command 1 (the VAE and latent
    teacher, trained in `workdir` first and cached there)."""
    from lcm_jax import teachers

    dim = None if config.lcd.get("lora") else w_embedding_dim(config)
    if config.model.get("pretrained"):
        return teachers.from_pretrained(config, w_embedding_dim=dim)
    return teachers.train_chained(config, workdir, pipeline.arrays["image"],
                                  pipeline.arrays["label"], dim)


def w_embedding_dim(config) -> int:
    return config.lcd.get("w_embedding_dim", 256)


def curriculum(config, num_train_timesteps: int):
    """The skip curriculum, `lcd.k_schedule`: step -> N, the number of skip-grid points as a jnp
    function of the train step (a traced int32: ONE compiled step serves every N), the grid then
    k = T // N, t_{n+k} = k (n + 1) - 1, t_n = max(t_{n+k} - k, 0) (`schedule.skip_pair`); per
    example n ~ U{0..N-1} from the example's key as always. None (unset): lcd.num_ddim_timesteps
    throughout, bit for bit the step without it.

    Consistency training converges from LARGE skips to small: with few grid points the t = 0
    boundary condition reaches high t in few hops, and the finer grid then removes the coarse
    one's bias (Song et al. 2023 grow N from 2 to 150; iCT doubles it in stages). 'doubling' is
    iCT's curriculum from N = `lcd.n_start` to lcd.num_ddim_timesteps over config.total_steps
    (`schedule.doubling_stages`); 'constant' trains on N = n_start throughout. Sampling keeps
    original_inference_steps = lcd.num_ddim_timesteps. TCD's end times follow the step's grid."""
    kind = rules.get(config, "lcd.k_schedule", None)
    if kind is None:
        return None
    problems = list(curriculum_problems(config, num_train_timesteps))
    if problems:
        raise UserError("; ".join(problems))
    return sched.skip_curriculum(kind, config.lcd.get("n_start", 5), config.lcd.num_ddim_timesteps,
                                 config.total_steps)


def curriculum_problems(config, num_train_timesteps):
    """lcd.k_schedule a known schedule; lcd.n_start an int in [1, N]; each stage's N divides T."""
    kind = rules.get(config, "lcd.k_schedule", None)
    if kind is None:
        return
    if kind not in sched.SKIP_SCHEDULES:
        yield rules.bad("lcd.k_schedule", kind, "is not a known skip schedule",
                        f"use one of {sched.SKIP_SCHEDULES} or None (the fixed grid)")
        return
    n_start, n_final = rules.get(config, "lcd.n_start", 5), rules.get(config, "lcd.num_ddim_timesteps")
    total = rules.get(config, "total_steps", None)
    if not (rules.is_int(n_final) and n_final >= 1 and rules.is_int(total)):
        return  # the generic checks report these
    if not rules.is_int(n_start) or not 1 <= n_start <= n_final:
        yield rules.bad("lcd.n_start", n_start, f"must be an integer in [1, "
                        f"lcd.num_ddim_timesteps={n_final}]", "e.g. 5 (skip k = T / 5 first)")
        return
    if not rules.is_int(num_train_timesteps):
        return
    sizes = sched.curriculum_grid_sizes(kind, n_start, n_final)
    if any(num_train_timesteps % n for n in sizes):
        fine = [s for s in range(1, n_final + 1) if not any(
            num_train_timesteps % n for n in sched.curriculum_grid_sizes(kind, s, n_final))]
        yield rules.bad("lcd.n_start", n_start, f"gives the grid sizes N = {sizes}, of which "
                        f"{[n for n in sizes if num_train_timesteps % n]} do not divide "
                        f"num_train_timesteps={num_train_timesteps} (the skip k = T / N must be "
                        "an integer)", f"use one of {fine}")


def config_problems(config):
    """The `lcd` section: guidance range, skip-step grid and its curriculum, solver, loss,
    target, LoRA."""
    yield from diffusion.config_problems(config)
    if not rules.get(config, "lcd", None):
        yield ("config.lcd is missing; consistency objectives need it (configs/digits_lcd.py "
               "shows every field).")
        return
    w_min, w_max = rules.get(config, "lcd.w_min"), rules.get(config, "lcd.w_max")
    yield from rules.at_least(config, "lcd.w_min", 0, integer=False)
    yield from rules.at_least(config, "lcd.w_max", 0, integer=False)
    if rules.is_real(w_min) and rules.is_real(w_max) and 0 <= w_max < w_min:
        yield rules.bad("lcd.w_min", w_min, f"is above lcd.w_max={w_max}",
                        "give w_min <= w_max (guidance scales are drawn from [w_min, w_max])")
    n, total = rules.get(config, "lcd.num_ddim_timesteps"), rules.get(config, "diffusion.num_train_timesteps")
    if rules.present(n) and not rules.is_int(n):
        yield rules.bad("lcd.num_ddim_timesteps", n, "is not an integer", "e.g. 50")
    elif rules.present(n) and rules.is_int(total) and total >= 2:
        try:
            sched.skip_grid(total, n)
        except ValueError as e:
            yield f"config.lcd.num_ddim_timesteps: {e}"
    # T: the config's (the digits chain); an SD folder's scheduler has 1000 like its configs.
    yield from curriculum_problems(config, total if rules.present(total) else 1000)
    yield from rules.choice(config, "lcd.solver", solvers.SOLVERS, "solver")
    yield from rules.choice(config, "lcd.loss", LOSSES, "loss")
    yield from rules.positive(config, "lcd.huber_c")
    yield from rules.choice(config, "lcd.target", TARGETS, "target network")
    yield from rules.lora(config, "lcd", "e.g. 64 (LCM-LoRA)")
    yield from rules.sd_folder(config, "Stable Diffusion distillation needs the teacher's",
                               "configs/sd15_lcd.py")
