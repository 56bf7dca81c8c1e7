"""Checks a full experiment config before anything is built or compiled.

`validate(config)` collects every problem it finds and raises one `ConfigError` with a line per
problem; each line names the field (`config.diffusion.prediction_type`), the bad value and the fix,
so a researcher fixes them all in one go. It returns None when the config is good.

A field that no config in configs/ has is a problem (a misspelling; the line names the nearest
fields): a new objective adds its fields to its config there. The fields the train loop always
reads are required (`REQUIRED`); every other check runs only when its field is set.
Name lists come from the registries of the modules that own them.
"""
from __future__ import annotations

import numbers
import os

import jax

from lcm_jax import config_loading, data, tracking
from lcm_jax.data import webdataset
from lcm_jax.diffusion import samplers, solvers
from lcm_jax.diffusion import schedule as sched
from lcm_jax.errors import UserError
from lcm_jax.models import DTYPES, MODELS, attention, lego

# The objectives registry: the names `config.objective` may take (one file each in objectives/).
OBJECTIVES = ("diffusion", "lcd", "lcf", "tcd", "smooth", "edm")
EDM_SAMPLERS = ("heun",)  # diffusion/edm.py
PARALLEL_MODES = ("jit", "pmap")
LCD_LOSSES = ("l2", "huber")
LCD_TARGETS = ("ema", "online")  # objectives.lcd.TARGETS
FEW_STEP_SAMPLERS = ("lcm", "tcd")  # their steps come from the distillation grid
VAE_FACTOR = 8  # Stable Diffusion's AutoencoderKL: 3 downsamplings
MIN_IMAGE_SIZE = 8
REQUIRED = ("objective", "total_steps", "batch_size", "model.name", "data.name", "optimizer.lr")
REQUIRED_DDPM = ("diffusion.prediction_type", "diffusion.num_train_timesteps")  # all but edm

_MISSING = object()


class ConfigError(UserError):
    """A config that cannot run; `problems` holds one line per problem."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        super().__init__(problems[0] if len(problems) == 1 else
                         f"The config has {len(problems)} problems:\n" +
                         "\n".join(f"  - {p}" for p in problems))


def validate(config, *, device_count: int | None = None, process_count: int | None = None) -> None:
    """Raises ConfigError listing every problem of `config`; returns None if there are none.

    device_count / process_count default to jax.device_count() / jax.process_count() (call this
    after multi-host initialisation); the local device count is device_count // process_count
    when device_count is given, else jax.local_device_count().
    """
    process_count = jax.process_count() if process_count is None else process_count
    if device_count is None:  # reading counts initialises the backend: only here, never at import
        device_count, local_device_count = jax.device_count(), jax.local_device_count()
    else:
        local_device_count = max(device_count // process_count, 1)

    counts = (device_count, process_count, local_device_count)
    problems = [*config_loading.unknown_fields(config), *_run_problems(config, *counts)]
    for section in config_loading.STAGES:  # the chain's earlier runs, by the same rules
        if _get(config, section, None):
            stage = config_loading.stage_config(config, section)
            problems += [p for p in map(_in_stage(config, section), _run_problems(stage, *counts))
                         if p not in problems]
    if problems:
        raise ConfigError(problems)


def _run_problems(config, device_count: int, process_count: int, local_device_count: int):
    return [*_required(config), *_names(config),
            *_batch_and_mesh(config, device_count, process_count, local_device_count),
            *_image_size(config), *_diffusion(config), *_edm(config), *_lego(config),
            *_optimizer(config),
            *_consistency_distillation(config), *_smooth(config), *_samplers(config),
            *_loop(config),
            *_paths(config, process_count)]


def _in_stage(config, section: str):
    """A stage's problem line, renamed to the field that set it: config.optimizer.lr of the VAE
    stage is config.vae_stage.optimizer.lr when that section sets it (otherwise the top-level
    field is at fault, and the line stays as it is, reported once)."""
    def rename(problem: str) -> str:
        field = problem.removeprefix("config.").split("=")[0].split(" ")[0]
        if problem.startswith("config.") and field.split(".")[0] in config[section]:
            return f"config.{section}.{problem.removeprefix('config.')}"
        return problem
    return rename


# ----------------------------------------------------------------------------------------------
# Helpers: dotted lookups that never raise, type tests, and the one message format.
# ----------------------------------------------------------------------------------------------

def _get(config, path: str, default=_MISSING):
    """config.a.b via .get (works on ConfigDicts and dicts); `default` when any part is absent."""
    node = config
    for key in path.split("."):
        if node is None or not hasattr(node, "get"):
            return default
        node = node.get(key, _MISSING)
        if node is _MISSING:
            return default
    return node


def _present(value) -> bool:
    return value is not _MISSING and value is not None


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _bad(path: str, value, why: str, fix: str) -> str:
    return f"config.{path}={value!r} {why}; {fix}."


def _choice(config, path: str, choices, what: str):
    """A problem line if the field is set and not one of `choices`."""
    value = _get(config, path)
    if _present(value) and value not in choices:
        yield _bad(path, value, f"is not a known {what}", f"use one of {tuple(choices)}")


def _at_least(config, path: str, lo, *, integer: bool = True, fix: str | None = None):
    """A problem line if the field is set and is not a number (an int if `integer`) >= lo."""
    value = _get(config, path)
    if not _present(value):
        return
    kind = "an integer" if integer else "a number"
    if not (_is_int(value) if integer else _is_real(value)):
        yield _bad(path, value, f"is not {kind}", fix or f"set it to {kind} >= {lo}")
    elif value < lo:
        yield _bad(path, value, f"is below {lo}", fix or f"set it to {kind} >= {lo}")


def _positive(config, path: str, *, allow_none: bool = False):
    value = _get(config, path)
    if value is _MISSING or (value is None and allow_none):
        return
    if not _is_real(value) or value <= 0:
        none = " or None to turn it off" if allow_none else ""
        yield _bad(path, value, "must be > 0", f"set it to a positive number{none}")


def _in_unit_interval(config, path: str, what: str, example: float):
    """A problem line if the field is set and not in [0, 1)."""
    value = _get(config, path)
    if _present(value) and (not _is_real(value) or not 0 <= value < 1):
        yield _bad(path, value, f"must be in [0, 1) ({what})", f"e.g. {example}")


# ----------------------------------------------------------------------------------------------
# The checks, one group each. Each yields problem lines.
# ----------------------------------------------------------------------------------------------

def _required(config):
    edm = _get(config, "objective") == "edm"
    for path in REQUIRED + (() if edm else REQUIRED_DDPM):
        if _get(config, path, None) is None:
            yield (f"config.{path} is missing; set it (configs/digits_diffusion.py shows every "
                   f"field).")
    if edm:
        if _get(config, "edm", None) is None:
            yield ("config.edm is missing; objective 'edm' needs it (configs/digits_lego.py "
                   "shows every field).")
        return
    if _get(config, "diffusion.beta_schedule", None) is None and \
            _get(config, "diffusion.trained_betas", None) is None:
        yield (f"config.diffusion.beta_schedule is missing; set it to one of "
               f"{sched.BETA_SCHEDULES} (or give diffusion.trained_betas).")


def _names(config):
    yield from _choice(config, "objective", OBJECTIVES, "objective")
    yield from _choice(config, "model.name", MODELS, "model")
    yield from _choice(config, "model.attention", attention.IMPLEMENTATIONS, "attention implementation")
    for path in ("model.dtype", "model.param_dtype"):
        yield from _choice(config, path, DTYPES, "dtype")
    yield from _choice(config, "data.name", data.DATASETS, "dataset")
    yield from _at_least(config, "data.prefetch", 0, fix="set it to the batches to read ahead, e.g. 2 (0: none)")


def _mesh(config, device_count: int):
    """config.parallel.data * config.parallel.fsdp == device_count, one -1 filling the rest."""
    sizes = {axis: _get(config, f"parallel.{axis}", default) for axis, default in
             (("data", -1), ("fsdp", 1))}
    bad = [axis for axis, size in sizes.items() if not _is_int(size) or (size < 1 and size != -1)]
    for axis in bad:
        yield _bad(f"parallel.{axis}", sizes[axis], "is not a mesh axis size",
                   "use a positive integer, or -1 to fill with the remaining devices")
    if bad:
        return
    fills = [axis for axis, size in sizes.items() if size == -1]
    fixed = [size for size in sizes.values() if size != -1]
    shown = ", ".join(f"parallel.{axis}={size}" for axis, size in sizes.items())
    if len(fills) > 1:
        yield (f"config.{shown}: only one mesh axis may be -1; give the other its size "
               f"(e.g. parallel.fsdp=1).")
    elif fills and any(device_count % size for size in fixed):
        yield (f"config.{shown}: the fixed sizes do not divide the {device_count} devices; "
               f"choose sizes that divide {device_count}.")
    elif not fills and fixed[0] * fixed[1] != device_count:
        yield (f"config.{shown}: data * fsdp = {fixed[0] * fixed[1]} but there are "
               f"{device_count} devices; make the product {device_count}, or set one to -1.")


def _batch_and_mesh(config, device_count: int, process_count: int, local_device_count: int):
    yield from _at_least(config, "total_steps", 1)
    batch = _get(config, "batch_size")
    if _present(batch) and (not _is_int(batch) or batch < 1):
        yield _bad("batch_size", batch, "is not a positive integer",
                   "set the global batch size, e.g. 128")
    elif _present(batch):
        if batch % device_count:
            yield _bad("batch_size", batch, f"is not divisible by the {device_count} devices",
                       f"use a multiple of {device_count}")
        elif batch % process_count:
            yield _bad("batch_size", batch, f"is not divisible by the {process_count} processes",
                       f"use a multiple of {process_count}")
        elif (_get(config, "parallel.mode") == "pmap"
              and (batch // process_count) % local_device_count):
            yield _bad("batch_size", batch, f"gives a per-process batch of "
                       f"{batch // process_count} that pmap cannot split over "
                       f"{local_device_count} local devices",
                       f"use a multiple of {process_count * local_device_count}")

    yield from _choice(config, "parallel.mode", PARALLEL_MODES, "parallel mode")
    if _get(config, "parallel.mode", "jit") == "pmap":
        fsdp = _get(config, "parallel.fsdp", 1)
        if fsdp not in (1, -1):
            yield _bad("parallel.fsdp", fsdp, "needs parallel.mode='jit' (pmap replicates params)",
                       "set parallel.fsdp=1 or parallel.mode='jit'")
    else:
        yield from _mesh(config, device_count)


def _image_size(config):
    """data.image_size >= 8 and divisible by what the model (and the VAE, if any) downsamples."""
    size = _get(config, "data.image_size")
    if not _present(size):
        if _get(config, "data.name") not in (None, "digits"):  # digits defaults to 16
            yield "config.data.image_size is missing; give the training resolution, e.g. 512."
        return
    if not _is_int(size) or size < MIN_IMAGE_SIZE:
        yield _bad("data.image_size", size, f"is not an integer >= {MIN_IMAGE_SIZE}",
                   "give the training resolution in pixels, e.g. 16 or 512")
        return

    factor, why = 1, []
    name = _get(config, "model.name")
    if name == "dit":
        patch = _get(config, "model.patch_size")
        if _present(patch) and (not _is_int(patch) or patch < 1):
            yield _bad("model.patch_size", patch, "is not a positive integer", "e.g. 2")
            return
        if _present(patch):
            factor, why = patch, [f"model.patch_size={patch}"]
    elif name == "lego":
        stack = _lego_stack(config)
        if stack and not lego.stack_problems(stack):
            factor, why = lego.max_tile(stack), ["the LEGO stack's tile sizes"]
    elif name == "unet":
        channels = _get(config, "model.unet.block_out_channels")  # the diffusers UNet config
        if isinstance(channels, (list, tuple)) and channels:
            factor = 2 ** (len(channels) - 1)
            why = [f"the UNet's {len(channels) - 1} downsamplings"]
    vae_folder = _get(config, "model.vae", None)  # an EDM / LEGO latent model's frozen VAE
    if vae_folder and os.path.isfile(os.path.join(os.path.expanduser(str(vae_folder)), "config.json")):
        import json

        with open(os.path.join(os.path.expanduser(str(vae_folder)), "config.json")) as f:
            vae_factor = 2 ** (len(json.load(f).get("block_out_channels", [0] * 4)) - 1)
        factor, why = factor * vae_factor, why + [f"the VAE's factor {vae_factor}"]
    if _get(config, "vae", None):  # a latent model sees image_size / 8
        vae_channels = _get(config, "vae.block_out_channels")
        vae_factor = (2 ** (len(vae_channels) - 1) if isinstance(vae_channels, (list, tuple))
                      and vae_channels else VAE_FACTOR)
        factor, why = factor * vae_factor, why + [f"the VAE's factor {vae_factor}"]
    if size % factor:
        yield _bad("data.image_size", size, f"is not divisible by {factor} ({' x '.join(why)})",
                   f"use a multiple of {factor}, e.g. {max(factor, size // factor * factor)}")

    if name == "dit":
        width, heads = _get(config, "model.width"), _get(config, "model.num_heads")
        if _is_int(width) and _is_int(heads) and (heads < 1 or width % heads):
            yield _bad("model.width", width, f"is not divisible by model.num_heads={heads}",
                       "choose num_heads that divides width (e.g. width=128, num_heads=4)")


def _diffusion(config):
    yield from _choice(config, "diffusion.prediction_type", sched.PREDICTION_TYPES,
                       "prediction type")
    if _get(config, "diffusion.trained_betas", None) is None:
        yield from _choice(config, "diffusion.beta_schedule", sched.BETA_SCHEDULES, "beta schedule")
    yield from _at_least(config, "diffusion.num_train_timesteps", 2,
                         fix="set it to an integer >= 2, e.g. 1000")
    yield from _in_unit_interval(config, "diffusion.cond_drop_prob",
                                 "the probability of dropping the condition", 0.1)
    yield from _positive(config, "diffusion.min_snr_gamma", allow_none=True)


def _edm(config):
    """The `edm` section (EDM-preconditioned training, LEGO's): noise distribution, dropout,
    patch subsampling."""
    if not _get(config, "edm", None):
        return
    yield from _positive(config, "edm.sigma_data")
    yield from _positive(config, "edm.p_std")
    yield from _in_unit_interval(config, "edm.cond_drop_prob",
                                 "the probability of dropping the label", 0.1)
    fraction = _get(config, "edm.tile_fraction")
    if _present(fraction) and (not _is_real(fraction) or not 0 < fraction <= 1):
        yield _bad("edm.tile_fraction", fraction, "must be in (0, 1] (the share of each patch "
                   "brick's tiles computed per example)", "use 1.0 to compute all tiles, e.g. 0.5")
    if _get(config, "objective") == "edm" and _get(config, "model.name") not in ("dit", "lego"):
        yield _bad("model.name", _get(config, "model.name"), "is not trained by objective 'edm'",
                   "use 'lego' or 'dit'")
    for section in ("sample", "eval"):
        t_break = _get(config, f"{section}.t_break")
        if _present(t_break) and (not _is_real(t_break) or not 0 <= t_break <= 1):
            yield _bad(f"{section}.t_break", t_break, "must be a fraction of the sampling "
                       "trajectory in [0, 1]", "e.g. 0.5 (T/2); 0 turns skipping off")
        if _present(t_break) and t_break and _get(config, "model.name") != "lego":
            yield _bad(f"{section}.t_break", t_break, "skips a LEGO brick but config.model.name "
                       f"is {_get(config, 'model.name')!r}", "set it to 0")


def _lego_stack(config):
    if _get(config, "model.layout", None):
        try:
            return lego.named_stack(_get(config, "model.layout"), _get(config, "model.size", "S"))
        except ValueError:
            return None
    stack = _get(config, "model.stack", None)
    return tuple(tuple(b) for b in stack) if isinstance(stack, (list, tuple)) else stack


def _lego(config):
    if _get(config, "model.name") != "lego":
        return
    layout = _get(config, "model.layout", None)
    if layout:
        try:
            lego.named_stack(layout, _get(config, "model.size", "S"))
        except ValueError as e:
            yield f"config.model.layout / config.model.size: {e}"
        return
    stack = _lego_stack(config)
    if not isinstance(stack, tuple):
        yield _bad("model.stack", stack, "is not a list of bricks",
                   "give [[r, p, depth, width, num_heads], ...] or model.layout='PG-64'")
        return
    yield from lego.stack_problems(stack)


def _optimizer(config):
    yield from _positive(config, "optimizer.lr")
    warmup, total = _get(config, "optimizer.warmup_steps"), _get(config, "total_steps")
    yield from _at_least(config, "optimizer.warmup_steps", 0)
    if _is_int(warmup) and _is_int(total) and 0 <= warmup and warmup >= total >= 1:
        yield _bad("optimizer.warmup_steps", warmup, f"is not below total_steps={total}",
                   f"use fewer warmup steps than {total} (e.g. {total // 10})")
    yield from _positive(config, "optimizer.grad_clip", allow_none=True)
    yield from _in_unit_interval(config, "ema_decay", "the EMA rate", 0.999)
    yield from _accumulation(config)


def _accumulation(config):
    """optimizer.accumulate_steps = k: every *_steps field counts train steps (one batch of
    batch_size each); the optimizer updates every k-th step, on the mean gradient of k batches."""
    k = _get(config, "optimizer.accumulate_steps")
    yield from _at_least(config, "optimizer.accumulate_steps", 1,
                         fix="set it to an integer >= 1 (1: no accumulation)")
    if not (_is_int(k) and k > 1):
        return
    batch = _get(config, "batch_size")
    for path in ("total_steps", "optimizer.warmup_steps"):
        steps = _get(config, path)
        if _is_int(steps) and steps % k:
            yield _bad(path, steps, f"is not a multiple of optimizer.accumulate_steps={k}",
                       f"it counts steps of batch_size={batch}, and an update happens every {k} "
                       f"steps (effective batch {k} x {batch}): use a multiple of {k}, "
                       f"e.g. {max(k, round(steps / k) * k)}")


def _consistency_distillation(config):
    """The `lcd` section, when present: guidance range, skip-step grid, solver and loss."""
    if not _get(config, "lcd", None):
        return
    w_min, w_max = _get(config, "lcd.w_min"), _get(config, "lcd.w_max")
    yield from _at_least(config, "lcd.w_min", 0, integer=False)
    yield from _at_least(config, "lcd.w_max", 0, integer=False)
    if _is_real(w_min) and _is_real(w_max) and 0 <= w_max < w_min:
        yield _bad("lcd.w_min", w_min, f"is above lcd.w_max={w_max}",
                   "give w_min <= w_max (guidance scales are drawn from [w_min, w_max])")

    n, total = _get(config, "lcd.num_ddim_timesteps"), _get(config, "diffusion.num_train_timesteps")
    if _present(n) and not _is_int(n):
        yield _bad("lcd.num_ddim_timesteps", n, "is not an integer", "e.g. 50")
    elif _present(n) and _is_int(total) and total >= 2:
        try:
            sched.skip_grid(total, n)
        except ValueError as e:
            yield f"config.lcd.num_ddim_timesteps: {e}"
    yield from _choice(config, "lcd.solver", solvers.SOLVERS, "solver")
    yield from _choice(config, "lcd.loss", LCD_LOSSES, "loss")
    yield from _positive(config, "lcd.huber_c")
    yield from _choice(config, "lcd.target", LCD_TARGETS, "target network")
    yield from _lora(config, "lcd", "e.g. 64 (LCM-LoRA)")
    yield from _sd_folder(config, "Stable Diffusion distillation needs the teacher's",
                          "configs/sd15_lcd.py")
    if _get(config, "objective") == "lcf":
        yield from _fine_tuning(config)


def _lora(config, section: str, rank_fix: str):
    if _get(config, f"{section}.lora", None):
        yield from _at_least(config, f"{section}.lora.rank", 1, fix=rank_fix)
        yield from _positive(config, f"{section}.lora.alpha", allow_none=True)


def _sd_folder(config, needs: str, config_file: str):
    """A UNet objective without its local diffusers folder."""
    if _get(config, "model.name") == "unet" and not _get(config, "model.pretrained", None):
        yield (f"config.model.pretrained is not set; {needs} local diffusers folder: "
               f"--config {config_file}:/path/to/folder.")


def _fine_tuning(config):
    """LCF: a full-parameter fine-tune of an LCM, from a folder or a digits LCD workdir."""
    if _get(config, "lcd.lora", None):
        yield _bad("lcd.lora", _get(config, "lcd.lora").to_dict(), "is set, but LCF fine-tunes "
                   "the full LCM", "set config.lcd.lora=None")
    if _get(config, "model.pretrained", None):
        return
    workdir = _get(config, "lcf.lcm_workdir", None)
    if not workdir:
        yield ("config.lcf.lcm_workdir is missing; LCF fine-tunes a distilled LCM: point it at "
               "the workdir of README command 1 (or set config.model.pretrained to an LCM folder).")
    else:
        from lcm_jax.teachers import student_path

        if not os.path.isfile(student_path(os.path.expanduser(str(workdir)))):
            yield _bad("lcf.lcm_workdir", workdir, "holds no distilled student "
                       f"({student_path('W')})", "run README command 1 with that --workdir first")


def _smooth(config):
    """Smooth Diffusion: the regulariser's weight and decay, the LoRA, the base network."""
    if _get(config, "objective") != "smooth":
        return
    if not _get(config, "smooth", None):
        yield ("config.smooth is missing; objective 'smooth' needs it (lambda_reg, decay, lora: "
               "see configs/digits_smooth.py or configs/sd15_smooth.py).")
        return
    yield from _at_least(config, "smooth.lambda_reg", 0, integer=False, fix="e.g. 1.0 (the paper)")
    decay = _get(config, "smooth.decay")
    if _present(decay) and (not _is_real(decay) or not 0 < decay <= 1):
        yield _bad("smooth.decay", decay, "must be in (0, 1] (the running mean's rate)", "e.g. 0.01")
    drop = _get(config, "smooth.cond_drop_prob")
    if _present(drop) and (not _is_real(drop) or not 0 <= drop <= 1):
        yield _bad("smooth.cond_drop_prob", drop, "must be in [0, 1]", "e.g. 0.0 (the recipe) or 0.1")
    yield from _lora(config, "smooth", "e.g. 8 (the recipe)")
    yield from _sd_folder(config, "Smooth Diffusion fine-tunes a", "configs/sd15_smooth.py")


def _samplers(config):
    """config.sample and config.eval: sampler name, step count, guidance."""
    total = _get(config, "diffusion.num_train_timesteps")
    edm = _get(config, "objective") == "edm"
    for section in ("sample", "eval"):
        if not _get(config, section, None):
            continue
        name = _get(config, f"{section}.sampler")
        yield from _choice(config, f"{section}.sampler",
                           EDM_SAMPLERS if edm else samplers.SAMPLERS, "sampler")
        steps = _get(config, f"{section}.num_steps")
        yield from _at_least(config, f"{section}.num_steps", 1)
        if _is_int(steps) and steps >= 1:
            if name in FEW_STEP_SAMPLERS:
                limit = _get(config, f"{section}.original_inference_steps", 50)
                if _is_int(limit) and steps > limit:
                    yield _bad(f"{section}.num_steps", steps, f"exceeds the {limit} "
                               f"original_inference_steps of the {name!r} sampler",
                               f"use at most {limit} steps (typically 1-8)")
            elif _is_int(total) and 2 <= total < steps:
                yield _bad(f"{section}.num_steps", steps,
                           f"exceeds diffusion.num_train_timesteps={total}",
                           f"use at most {total} steps")
        yield from _at_least(config, f"{section}.guidance_scale", 0, integer=False,
                             fix="use 0 or more (1 = no guidance for most samplers)")
        gamma = _get(config, f"{section}.gamma")
        if _present(gamma) and (not _is_real(gamma) or not 0 <= gamma <= 1):
            yield _bad(f"{section}.gamma", gamma, "must be in [0, 1] (TCD's stochasticity: 0 "
                       "deterministic, 1 ~ LCM)", "e.g. 0.3")
        yield from _choice(config, f"{section}.student_sampler", FEW_STEP_SAMPLERS, "few-step sampler")
    # The counts a run reads only at its end (eval) or every few steps (sample): checked here,
    # so a bad one never costs the training before it.
    for path in ("sample.every_steps", "sample.num_images", "eval.num_samples", "eval.batch_size",
                 "eval.teacher_steps", "eval.every_steps"):
        if _present(_get(config, path, None)):
            yield from _at_least(config, path, 1)
    steps = _get(config, "eval.steps", None)
    if _present(steps) and (not isinstance(steps, (list, tuple)) or not steps
                            or not all(_is_int(s) and s >= 1 for s in steps)):
        yield _bad("eval.steps", steps, "is not a list of step counts >= 1", "e.g. [1, 2, 4, 8]")


def _loop(config):
    yield from _at_least(config, "checkpoint.every_steps", 1)
    yield from _at_least(config, "checkpoint.keep", 1)
    yield from _at_least(config, "log_every_steps", 1)
    yield from _choice(config, "wandb.mode", tracking.MODES, "wandb mode")


def _paths(config, process_count: int):
    """Pretrained weights and data must already be on disk: nothing is downloaded here."""
    pretrained = _get(config, "model.pretrained", None)
    if pretrained:
        path = os.path.expanduser(str(pretrained))
        if not os.path.exists(path):
            yield (f"config.model.pretrained={pretrained!r} does not exist; point it at a local "
                   f"diffusers folder (weights cannot be downloaded here).")
        elif not (os.path.isfile(os.path.join(path, "config.json"))
                  or os.path.isfile(os.path.join(path, "unet", "config.json"))):
            yield (f"config.model.pretrained={pretrained!r} is not a diffusers folder (no "
                   f"config.json, no unet/config.json); point it at a model folder or a "
                   f"pipeline folder saved by diffusers.")

    vae_folder = _get(config, "model.vae", None)
    if vae_folder and not os.path.isfile(os.path.join(os.path.expanduser(str(vae_folder)),
                                                      "config.json")):
        yield (f"config.model.vae={vae_folder!r} is not a diffusers AutoencoderKL folder (no "
               f"config.json); point it at a local VAE folder, e.g. /path/to/sd-v1-5/vae.")

    name, path = _get(config, "data.name"), _get(config, "data.path", None)
    if name not in ("folder", "webdataset"):
        if name == "tfds" and not _get(config, "data.tfds_name", None):
            yield "config.data.tfds_name is missing; name a tfds dataset, e.g. 'mnist'."
        return
    what = ("a folder of images" if name == "folder"
            else "the .tar shards ('/data/{00000..00099}.tar')")
    if not path:
        yield f"config.data.path is not set; point it at {what}."
    elif name == "folder" and not os.path.isdir(os.path.expanduser(str(path))):
        yield _bad("data.path", path, "is not a folder", f"point it at {what}")
    elif name == "webdataset":
        try:
            shards = webdataset.list_shards(str(path))
        except ValueError as e:
            yield str(e)
        else:
            if len(shards) < process_count:
                yield _bad("data.path", path, f"has {len(shards)} shards for {process_count} "
                           f"processes", "give at least one shard per process")
