"""Where the frozen networks objectives start from come from: an `objectives.parts.Base`.

  from_pretrained(config)          a local diffusers Stable Diffusion folder (SD 1.x, 2.x, SDXL):
                                   UNet, VAE, text encoder(s), tokenizer(s), scheduler config.
  train_chained(config, workdir)   the embedded default: a KL autoencoder and a class-conditional
                                   latent teacher trained on digits first, each in its own
                                   sub-workdir (W/vae, W/teacher) and skipped on a rerun.
  distilled_from_chained(...)      the student a digits LCD run distilled (LCF's LCM).

`w_embedding_dim` (given for full-parameter consistency students) adds `Base.student_net`: the
same network with the guidance-scale embedding input.
"""
from __future__ import annotations

import json
import logging
import os

import jax
import ml_collections
import numpy as np

from lcm_jax import config_loading, models, paths, tracking, train
from lcm_jax.errors import UserError
from lcm_jax.data import digits
from lcm_jax.diffusion import schedule as sched
from lcm_jax.objectives import conditioning
from lcm_jax.objectives.parts import Base

log = logging.getLogger("lcm_jax")


# ==============================================================================================
# Stable Diffusion folders
# ==============================================================================================

def from_pretrained(config, w_embedding_dim: int | None = None) -> Base:
    """The SD network of `config.model.pretrained` (a diffusers pipeline folder). The scheduler
    config gives the noise schedule; its prediction type must match config.diffusion's."""
    from lcm_jax.models import clip_text, convert, unet, vae

    folder = os.path.expanduser(config.model.pretrained)
    sub = lambda name: os.path.join(folder, name)
    dtype = models.DTYPES[config.model.get("dtype", "float32")]
    remat, attention = config.model.get("remat", False), config.model.get("attention", "auto")
    unet_module, unet_params = unet.from_pretrained(sub("unet"), dtype=dtype, remat=remat, attention=attention)
    vae_module, vae_params = vae.from_pretrained(sub("vae"), dtype=dtype)
    with open(os.path.join(sub("scheduler"), "scheduler_config.json")) as f:
        sc = json.load(f)
    prediction_type = sc.get("prediction_type", "epsilon")
    if prediction_type != config.diffusion.prediction_type:
        raise ValueError(f"config.diffusion.prediction_type={config.diffusion.prediction_type!r} "
                         f"but {folder}/scheduler says {prediction_type!r}; set it to match.")
    schedule = sched.make_schedule(sc.get("beta_schedule", "scaled_linear"),
                                   sc.get("num_train_timesteps", 1000), sc.get("beta_start", 0.00085),
                                   sc.get("beta_end", 0.012), trained_betas=sc.get("trained_betas"))
    size = config.data.image_size // vae_module.config.factor
    prompts = tuple(config.sample.get("prompts", ("",)))
    clip_skip = config.model.get("clip_skip", None)
    if os.path.isdir(sub("text_encoder_2")):  # SDXL
        encoders = [clip_text.from_pretrained(sub(n), dtype=dtype)
                    for n in ("text_encoder", "text_encoder_2")]
        cond = conditioning.SDXLConditioning(
            [e[0] for e in encoders], [e[1] for e in encoders],
            [clip_text.load_tokenizer(sub(n)) for n in ("tokenizer", "tokenizer_2")],
            config.data.image_size, prompts, clip_skip)
    else:
        encoder, text_params = clip_text.from_pretrained(sub("text_encoder"), dtype=dtype)
        cond = conditioning.TextConditioning(encoder, text_params,
                                             clip_text.load_tokenizer(sub("tokenizer")),
                                             prompts, clip_skip)
    student = None
    if w_embedding_dim:
        student_config = dict(convert.read_config(sub("unet")), time_cond_proj_dim=w_embedding_dim)
        student = models.Denoiser(unet.from_config(student_config, dtype=dtype, remat=remat,
                                                   attention=attention))
    return Base(models.Denoiser(unet_module), unet_params, schedule, prediction_type, cond,
                   (size, size, unet_module.config.in_channels), vae_module, vae_params, student)


# ==============================================================================================
# The chained digits teacher
# ==============================================================================================

def _tracked(stage, workdir: str, job_type: str) -> ml_collections.ConfigDict:
    """The stage's W&B run joins the chain's group (the student's workdir), as `job_type`."""
    if "wandb" in stage:
        stage.wandb.update(group=stage.wandb.get("group") or tracking.group_name(workdir), job_type=job_type,
                           name="")
    return stage


def _done(path: str) -> bool:
    return (paths.path(path) / "DONE").exists()


def _mark_done(path: str) -> None:
    if jax.process_index() == 0:
        paths.write_atomic(paths.path(path) / "DONE", "")


def _pipeline(arrays: dict, stage):
    from lcm_jax.data.pipeline import ArrayPipeline

    return ArrayPipeline(arrays, global_batch_size=stage.batch_size, seed=stage.seed,
                         process_index=jax.process_index(), process_count=jax.process_count())


def train_vae(config, workdir: str, images: np.ndarray):
    """Stage 1: the KL autoencoder, exported as a diffusers AutoencoderKL folder (W/vae/export)
    whose latents_mean / latents_std standardize the training latents."""
    from lcm_jax.models import vae as vae_lib
    from lcm_jax.objectives.autoencoder import AutoencoderObjective, latent_statistics

    path, export = os.path.join(workdir, "vae"), os.path.join(workdir, "vae", "export")
    if not _done(path):
        c = _tracked(config_loading.stage_config(config, "vae_stage"), workdir, "vae")
        objective = AutoencoderObjective(c, images.shape[1:], images[:20])
        final = train.run(c, path, objective, _pipeline({"image": images}, c))
        params = jax.device_get(final.ema_params)
        vae_config = dict(objective.vae_config,
                          **latent_statistics(objective.module, params, images))
        if jax.process_index() == 0:
            vae_lib.save_pretrained(export, vae_config, params)
        _mark_done(path)
    return vae_lib.from_pretrained(export)


def train_teacher(config, workdir: str, latents: np.ndarray, labels: np.ndarray):
    """Stage 2: the class-conditional latent teacher (plain diffusion on the cached latents)."""
    from lcm_jax.objectives.diffusion import DiffusionObjective

    c = _tracked(config_loading.stage_config(config, "teacher_stage"), workdir, "teacher")
    net = models.make_model(c.model, latents.shape[-1])
    path = os.path.join(workdir, "teacher")
    weights = os.path.join(path, "ema_params.msgpack")
    objective = DiffusionObjective(c, net, latents.shape[1:])
    if not _done(path):
        final = train.run(c, path, objective, _pipeline({"image": latents, "label": labels}, c))
        save_params(weights, final.ema_params)
        _mark_done(path)
    template = jax.eval_shape(objective.init_state, jax.random.PRNGKey(0)).params
    return net, load_params(weights, template), objective.schedule, c


def train_chained(config, workdir: str, images: np.ndarray, labels: np.ndarray,
                  w_embedding_dim: int | None = None) -> Base:
    """VAE -> latent cache -> latent teacher, each skipped when its sub-workdir says DONE."""
    from lcm_jax.data import latents as latent_cache

    vae_module, vae_params = train_vae(config, workdir, images)
    latents = latent_cache.encode(vae_module, vae_params, images)
    net, params, schedule, c = train_teacher(config, workdir, latents, labels)
    student = None
    if w_embedding_dim:
        student = models.make_model(c.model, latents.shape[-1], w_embedding_dim)
    return Base(net, params, schedule, c.diffusion.prediction_type, digits_conditioning(c),
                latents.shape[1:], vae_module, vae_params, student)


def digits_conditioning(stage) -> conditioning.ClassConditioning:
    """Class labels of the digits chain; the captions name the classes (image folders)."""
    classes = stage.model.num_classes
    return conditioning.ClassConditioning(classes, digits.captions(np.arange(classes)))


def student_path(workdir: str) -> str:
    """Where a digits LCD / TCD run (README command 1) exports its student's EMA params."""
    return os.path.join(workdir, "student", "ema_params.msgpack")


def smooth_path(workdir: str) -> str:
    """Where a Smooth Diffusion run exports its trained params (LoRA factors or the full set)."""
    return os.path.join(workdir, "smooth", "params.msgpack")


def distilled_from_chained(config, workdir: str, w_embedding_dim: int) -> Base:
    """The student that command 1 distilled in `workdir` (its EMA params, its VAE, its class
    conditioning), as the Base LCF starts from: net = the w-conditioned student."""
    from lcm_jax.models import vae as vae_lib

    path = student_path(workdir)
    if not paths.path(path).is_file():
        raise ValueError(f"{path} does not exist: run README command 1 (configs/digits_lcd.py) "
                         f"with --workdir {workdir} first, or point config.lcf.lcm_workdir at "
                         f"the workdir of a finished digits LCD run.")
    vae_module, vae_params = vae_lib.from_pretrained(os.path.join(workdir, "vae", "export"))
    c = config_loading.stage_config(config, "teacher_stage")
    side = config.data.image_size // vae_module.config.factor
    latent_shape = (side, side, vae_module.config.latent_channels)
    net = models.make_model(c.model, latent_shape[-1], w_embedding_dim)
    x = jax.ShapeDtypeStruct((1,) + latent_shape, np.float32)
    ints = jax.ShapeDtypeStruct((1,), np.int32)
    template = jax.eval_shape(net.init, jax.random.PRNGKey(0), x, ints, ints,
                              jax.ShapeDtypeStruct((1, w_embedding_dim), np.float32))
    from lcm_jax.objectives.diffusion import schedule_from_config

    return Base(net, load_params(path, template), schedule_from_config(c.diffusion),
                c.diffusion.prediction_type, digits_conditioning(c), latent_shape, vae_module,
                vae_params, net)


def save_params(path: str, params) -> None:
    """Params as flax msgpack, written atomically (process 0)."""
    from flax import serialization

    if jax.process_index() == 0:
        paths.write_atomic(path, serialization.to_bytes(jax.device_get(params)))


def load_params(path: str, template):
    """Params saved by `save_params`, checked leaf by leaf against `template` (a cached stage
    trained under another model config is refused, not half-loaded)."""
    from flax import serialization

    params = serialization.from_bytes(template, paths.path(path).read_bytes())
    differences = train.leaf_differences(train.leaves(params), train.leaves(template))
    if differences:
        raise UserError(
            f"{path} holds params of another model than this config builds ({len(differences)} "
            f"leaves differ: {'; '.join(differences[:3])}): it was trained and cached under "
            f"other model fields (see config.json beside it). Revert those fields, or use a new "
            f"--workdir to train the chain again.")
    return params
