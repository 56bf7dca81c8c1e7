r"""Export a run's newest checkpoint (finished or interrupted) in the formats diffusers loads.

  python -m experiments.export --workdir W --out DIR [--weights ema|online] [--config CFG.py]

The run's config is W/config.json (every run writes it), or --config for an older workdir. DIR gets:
- full LCD / TCD / LCF on an SD or SDXL folder: a diffusers pipeline folder -- the student UNet
  (time_cond_proj_dim), the teacher's VAE, text encoder(s), tokenizer(s), and an LCMScheduler
  (LCD, LCF) or TCDScheduler (TCD) config. SD LCD / LCF: `LatentConsistencyModelPipeline`;
  TCD and SDXL: the teacher's pipeline class (`StableDiffusion(XL)Pipeline`) with that scheduler.
- LoRA runs (LCM-LoRA, TCD-LoRA, Smooth Diffusion LoRA): pytorch_lora_weights.safetensors with
  its adapter metadata, for `pipe.load_lora_weights(DIR)` on the base pipeline, and
  scheduler/scheduler_config.json (LCM / TCD) to swap in.
- the digits chain of README command 1: DIR/vae (a diffusers AutoencoderKL folder) and DIR/student
  (DIR/smooth for Smooth runs): a diffusers UNet2DConditionModel folder when the backbone is the
  UNet (class labels through `class_labels`, the null class = num_classes), else lcm_jax's
  params.msgpack + model.json (diffusers has no DiT with a time_cond_proj input).
"""
import json
import os

from experiments import _harness
from lcm_jax import cli_args, config_loading, errors, objectives, paths

TEXT_COMPONENTS = ("vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2")
# The fields an LCM / TCD scheduler takes from the teacher's scheduler config (its noise schedule).
SCHEDULE_FIELDS = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas",
                   "prediction_type", "rescale_betas_zero_snr")


def load_config(workdir: str, config_path: str | None = None):
    import ml_collections

    if config_path:  # "file.py[:arg]", as --config takes it in main.py
        return config_loading.load(config_path)
    path = paths.path(workdir) / "config.json"
    if not path.exists():
        raise errors.UserError(f"{path} does not exist: pass the run's config with --config "
                                "(workdirs written before config.json was saved do not have it).")
    return ml_collections.ConfigDict(json.loads(path.read_text()))


def spec(config) -> objectives.Export:
    """What the run's objective exports (its registry module's EXPORT)."""
    export = objectives.module(config.objective).EXPORT
    if export is None:
        raise errors.UserError(f"objective={config.objective!r}: export covers the distilled and "
                               "fine-tuned models (objectives with an EXPORT: "
                               f"{', '.join(n for n in objectives.REGISTRY if objectives.module(n).EXPORT)}); "
                               "a model trained from scratch here has no diffusers form.")
    return export


def build_objective(config, workdir: str):
    """Any run's objective, without training anything: a digits chain must be finished; a model
    trained from scratch (no EXPORT) is built from config.data's shape, reading no data."""
    import jax

    from lcm_jax import data

    export = objectives.module(config.objective).EXPORT
    if export is None:
        return objectives.build(config, workdir, None)
    chain = None if config.model.get("pretrained") else export.chain(config, workdir)
    if chain:
        missing = [s for s in ("vae", "teacher") if not (paths.path(chain) / s / "DONE").exists()]
        if missing:
            raise errors.UserError(f"{chain} has no finished {' / '.join(missing)} stage: finish "
                                   "the run (rerun the same command) before exporting.")
    pipeline = None
    if not config.model.get("pretrained"):
        pipeline = data.make_pipeline(config.data, global_batch_size=config.batch_size, seed=config.seed,
                                      process_index=jax.process_index(), process_count=jax.process_count())
    return objectives.build(config, workdir, pipeline)


def restore_params(config, workdir: str, objective, weights: str):
    """(params, step) of the newest readable checkpoint: the EMA or the online weights."""
    import jax

    from lcm_jax import train

    frozen = jax.eval_shape(lambda: objective.frozen)
    abstract = jax.eval_shape(objective.init_state, jax.random.PRNGKey(0), frozen)
    restored = train.Checkpointer(os.path.join(workdir, "checkpoints"), config.checkpoint.keep).restore(abstract)
    if restored is None:
        raise errors.UserError(f"{workdir}/checkpoints holds no checkpoint to export.")
    state = restored[0]
    return (state.ema_params if weights == "ema" else state.params), int(state.step)


def lora_settings(config):
    return (config.get(spec(config).lora_section) or {}).get("lora") or None


def scheduler_config(config, teacher_folder: str | None) -> dict:
    """An LCMScheduler / TCDScheduler config on the teacher's noise schedule, with the run's skip
    grid as original_inference_steps and its boundary-condition timestep scaling."""
    lcd = config.get("lcd") or {}
    if lcd.get("sigma_data", 0.5) != 0.5:
        raise errors.UserError(f"config.lcd.sigma_data={lcd.sigma_data}: diffusers' LCM / TCD schedulers fix "
                         "sigma_data at 0.5, so this student would sample differently there.")
    teacher = {}
    if teacher_folder:
        with open(os.path.join(teacher_folder, "scheduler", "scheduler_config.json")) as f:
            teacher = {k: v for k, v in json.load(f).items() if k in SCHEDULE_FIELDS}
    else:
        d = config_loading.stage_config(config, "teacher_stage").diffusion if config.get("teacher_stage") \
            else config.diffusion
        teacher = {"num_train_timesteps": d.num_train_timesteps, "beta_start": d.beta_start,
                   "beta_end": d.beta_end, "beta_schedule": d.beta_schedule,
                   "prediction_type": d.prediction_type}
    return {"_class_name": spec(config).scheduler or "LCMScheduler", **teacher,
            "original_inference_steps": lcd.get("num_ddim_timesteps", 50),
            "timestep_scaling": lcd.get("timestep_scaling", 10.0), "clip_sample": False,
            "set_alpha_to_one": True, "steps_offset": 0, "timestep_spacing": "leading"}


def _write_json(path: str, value: dict) -> None:
    paths.write_atomic(path, json.dumps(value, indent=2, sort_keys=True))


def export_sd_pipeline(config, params, out: str) -> None:
    """A full student on an SD / SDXL teacher folder -> a diffusers pipeline folder."""
    from lcm_jax.models import convert, unet
    from lcm_jax.objectives import consistency

    folder = os.path.expanduser(config.model.pretrained)
    for name in TEXT_COMPONENTS:
        if os.path.isdir(os.path.join(folder, name)):
            paths.copy_tree(os.path.join(folder, name), os.path.join(out, name))
    unet_config = convert.read_config(os.path.join(folder, "unet"))
    if spec(config).adds_w_embedding:  # an LCM base (LCF's) has the field already
        unet_config["time_cond_proj_dim"] = consistency.w_embedding_dim(config)
    unet.save_pretrained(os.path.join(out, "unet"), unet_config, params)
    scheduler = scheduler_config(config, folder)
    _write_json(os.path.join(out, "scheduler", "scheduler_config.json"), scheduler)
    with open(os.path.join(folder, "model_index.json")) as f:
        index = json.load(f)
    if spec(config).pipeline and "text_encoder_2" not in index:  # SDXL keeps its own class
        index["_class_name"] = spec(config).pipeline
    index["scheduler"] = ["diffusers", scheduler["_class_name"]]
    _write_json(os.path.join(out, "model_index.json"), index)


def export_lora(config, params, out: str, teacher_folder: str | None) -> None:
    from lcm_jax.models import lora

    settings = lora_settings(config)
    lora.save(out, params, settings.get("alpha", settings.rank))
    if spec(config).scheduler:
        _write_json(os.path.join(out, "scheduler", "scheduler_config.json"),
                    scheduler_config(config, teacher_folder))


def export_digits(config, objective, params, out: str) -> None:
    """The digits chain: the VAE folder and the trained network (student or smooth)."""
    from lcm_jax.models import lora, vae

    base = objective.base
    vae.save_pretrained(os.path.join(out, "vae"), base.vae.config.to_dict(), base.vae_params)
    settings = lora_settings(config)
    if settings:  # the digits LoRA merged: the fine-tuned network as a whole
        params = lora.merge(base.params, params, settings.get("alpha", settings.rank))
    export_network(config_loading.stage_config(config, "teacher_stage").model,
                   objective.network.denoiser, params, base.latent_shape,
                   os.path.join(out, spec(config).network), scheduler_config(config, None))


def export_network(model_config, net, params, latent_shape, out: str, scheduler: dict) -> None:
    """One digits network: a diffusers UNet folder for the UNet backbone, else msgpack + JSON."""
    from lcm_jax import teachers
    from lcm_jax.models import unet

    if model_config.name == "unet":
        c = net.module.config
        unet.save_pretrained(out, dict(model_config.unet, in_channels=c.in_channels,
                                       out_channels=c.out_channels, num_class_embeds=c.num_class_embeds,
                                       time_cond_proj_dim=c.time_cond_proj_dim), params)
    else:
        teachers.save_params(os.path.join(out, "params.msgpack"), params)
        _write_json(os.path.join(out, "model.json"), {
            "model": model_config.to_dict(), "latent_shape": list(latent_shape),
            "time_cond_proj_dim": getattr(net.module, "time_cond_proj_dim", None)})
    _write_json(os.path.join(out, "scheduler_config.json"), scheduler)


def export(workdir: str, out: str, weights: str = "ema", config=None) -> dict:
    """Writes DIR for the run in `workdir`; returns what was written (kind, step, paths)."""
    config = config or load_config(workdir)
    spec(config)  # an exportable objective, before anything is built
    objective = build_objective(config, workdir)
    params, step = restore_params(config, workdir, objective, weights)
    paths.path(out).mkdir(parents=True, exist_ok=True)
    pretrained = config.model.get("pretrained")
    if lora_settings(config) and pretrained:
        export_lora(config, params, out, os.path.expanduser(pretrained))
        kind = "lora"
    elif pretrained:
        if not spec(config).full_pipeline:
            raise errors.UserError(f"A full (non-LoRA) {config.objective} run on an SD folder: export "
                                   "the UNet with lcm_jax.models.unet.save_pretrained into a copy of "
                                   "the folder.")
        export_sd_pipeline(config, params, out)
        kind = "pipeline"
    else:
        export_digits(config, objective, params, out)
        kind = "digits"
    summary = {"kind": kind, "step": step, "weights": weights, "out": str(paths.path(out)),
               "files": paths.files_under(out)}
    _write_json(os.path.join(out, "lcm_jax_export.json"), summary)
    return summary


def main_cli():
    p = cli_args.Parser(description=__doc__)
    p.add_argument("--workdir", required=True, type=cli_args.existing_dir)
    p.add_argument("--out", required=True, type=cli_args.output_dir)
    p.add_argument("--weights", choices=("ema", "online"), default="ema",
                   help="the EMA (target) network or the online one")
    p.add_argument("--config", default=None, help="CFG.py[:arg] when W/config.json is absent")
    a = p.parse_args()
    config = load_config(a.workdir, a.config) if a.config else None
    print(json.dumps(export(a.workdir, a.out, a.weights, config), indent=2))


if __name__ == "__main__":
    _harness.main(main_cli)
