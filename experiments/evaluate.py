r"""A run's model sampled at 1 / 2 / 4 / 8 steps and scored as the LCM paper's tables.

  python -m experiments.evaluate --workdir W [--steps 1,2,4,8] [--num 1000] [--weights ema] \
      [--prompts prompts.txt] [--clip CLIP_FOLDER] [--inception INCEPTION.safetensors --ref_stats REF.npz]

- Digits runs (README command 1): FD-digits and classifier accuracy of class-conditional samples.
- Runs trained from scratch (LEGO, DiT: objective edm; diffusion): class-balanced FID-N with the
  run's sampler (config.eval; --steps: its step counts, default config.eval.num_steps), sample i
  of class i mod num_classes, against --ref_stats (e.g. ADM's reference batch statistics: the
  same pool3 features); --num 50000 for FID-50K.
- SD / SDXL runs: one image per prompt (the file's lines, cycled to --num), scored with
  - CLIP score (--clip: a transformers CLIPModel folder, e.g. openai/clip-vit-large-patch14 or
    laion's ViT-g-14 saved with save_pretrained, with its tokenizer and processor config);
  - FID (--inception: pytorch-fid's pt_inception-2015-12-05 weights converted once with
    `python -m lcm_jax.eval.inception convert IN.pth OUT.safetensors`; --ref_stats: mu / sigma of
    the reference images as .npz, e.g. from `inception.dataset_stats`).
The sampler is the run's (LCM, or TCD for TCD runs). Writes W/evaluation.json and prints the table.
Batches are sharded over the local devices along the batch axis.
"""
import json
import os

from experiments import _harness, export
from lcm_jax import cli_args, errors, objectives, paths


def _sharded(x):
    """x split along the batch over the local devices (replicated when it does not divide)."""
    import jax
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    devices = jax.local_devices()
    spec = PartitionSpec("data") if x.shape[0] % len(devices) == 0 else PartitionSpec()
    return jax.device_put(x, NamedSharding(Mesh(devices, ("data",)), spec))


def _require(path: str | None, flag: str, what: str) -> str:
    if path and not os.path.exists(os.path.expanduser(path)):
        raise errors.UserError(f"--{flag} {path} does not exist: {what}")
    return path and os.path.expanduser(path)


def student_sampler(objective) -> str:
    """The few-step sampler the run's student is scored with (TCD's for TCD, else LCM's)."""
    strategy = getattr(objective, "strategy", None)
    if strategy is None:
        raise errors.UserError("experiments/evaluate.py scores consistency students (lcd, tcd, lcf) "
                               "at few steps; a smooth run's results.json holds its evaluation.")
    return strategy.student_sampler


def student_pipeline(config, objective, params):
    """The teacher's SD folder with the run's student in it (full: the w-embedded UNet; LoRA: merged)."""
    import dataclasses

    from lcm_jax import pipeline
    from lcm_jax.models import lora

    pipe = pipeline.StableDiffusion.from_pretrained(os.path.expanduser(config.model.pretrained))
    sc = dict(pipe.scheduler_config, original_inference_steps=(config.get("lcd") or {}).get(
        "num_ddim_timesteps", 50))
    settings = export.lora_settings(config)
    if settings:
        return dataclasses.replace(pipe, scheduler_config=sc, unet_params=lora.merge(
            pipe.unet_params, params, settings.get("alpha", settings.rank)), _programs={})
    return dataclasses.replace(pipe, unet=objective.network.denoiser.module, unet_params=params,
                               scheduler_config=sc, _programs={})


def evaluate_sd(config, objective, params, steps, num, batch_size, prompts, guidance, clip, inception,
                ref_stats, seed=0):
    import jax
    import numpy as np
    import tqdm

    pipe = student_pipeline(config, objective, params)
    sampler = student_sampler(objective)
    scorer = None
    if clip:
        from lcm_jax.eval import clip_score

        scorer = clip_score.CLIPScorer.from_pretrained(clip)
    features = None
    if inception:
        from lcm_jax.eval import inception as inception_lib

        features = inception_lib.InceptionFeatures.from_safetensors(inception)
    prompts = [prompts[i % len(prompts)] for i in range(num)]
    f = pipe.vae.config.factor
    shape = (pipe.sample_size, pipe.sample_size, pipe.unet.config.in_channels)
    table = {}
    for k in steps:
        images = []
        for i in tqdm.trange(0, num, batch_size, desc=f"{sampler} {k} steps"):
            batch = prompts[i:i + batch_size]
            latents = jax.random.normal(jax.random.fold_in(jax.random.PRNGKey(seed), i), (len(batch),) + shape)
            images.append(pipe(batch, sampler=sampler, num_inference_steps=k, guidance_scale=guidance,
                               latents=_sharded(latents), seed=seed + i, height=shape[0] * f,
                               width=shape[1] * f))
        images = np.concatenate(images)
        row = {}
        if scorer:
            row["clip_score"] = float(np.mean(scorer.score(images, prompts)))
        if features:
            row["fid"] = float(features.fid(images, ref_stats))
        table[str(k)] = row
    return {sampler: table}


def evaluate_digits(config, objective, params, steps, num, batch_size, guidance, seed=0):
    from lcm_jax.eval import few_step, sampling
    from lcm_jax.eval.digits_metrics import DigitsEvaluator

    sampler = student_sampler(objective)
    evaluator = DigitsEvaluator(config.data.image_size, config.data.get("channels", 1))
    table = {}
    for k in steps:
        sc = few_step._sample_config(sampler, k, guidance, {}, config.eval.get("gamma", 0.3))
        sc.update(num_samples=num, batch_size=batch_size)
        table[str(k)], _ = sampling.evaluate_digits(objective.sample_fn, params, objective.frozen, sc,
                                                    evaluator, seed)
    return {sampler: table}


def evaluate_fid(config, objective, params, steps, num, batch_size, guidance, inception, ref_stats,
                 seed=0):
    """Class-balanced FID of a class-conditional model trained here, per sampling step count."""
    import ml_collections

    from lcm_jax.eval import inception as inception_lib
    from lcm_jax.eval import sampling

    features = inception_lib.InceptionFeatures.from_safetensors(inception)
    ref = inception_lib.load_stats(ref_stats)
    table = {}
    for k in steps:
        sc = ml_collections.ConfigDict(dict(config.eval))
        sc.update(num_steps=k, guidance_scale=guidance)
        table[str(k)] = {"fid": sampling.class_balanced_fid(
            objective.sample_images, params, objective.frozen, sc, num, batch_size,
            config.model.get("num_classes", 0), lambda x: features.features(x, (-1.0, 1.0)), ref,
            seed)}
    return {config.eval.sampler: table}


def evaluate(workdir, steps=None, num=None, weights="ema", prompts_file=None, clip=None,
             inception=None, ref_stats=None, guidance=None, batch_size=None, config=None) -> dict:
    config = config or export.load_config(workdir)
    clip = _require(clip, "clip", "give a local transformers CLIPModel folder.")
    inception = _require(inception, "inception", "convert pytorch-fid's pt_inception-2015-12-05-"
                         "6726825d.pth with `python -m lcm_jax.eval.inception convert`.")
    ref_stats = _require(ref_stats, "ref_stats", "an .npz with mu and sigma of the reference set.")
    if bool(inception) != bool(ref_stats):
        raise errors.UserError("FID needs both --inception and --ref_stats.")
    pretrained = config.model.get("pretrained")
    if objectives.module(config.objective).EXPORT is None:  # trained from scratch: FID
        return _fid_run(config, workdir, steps, num, weights, inception, ref_stats, guidance,
                        batch_size)
    steps = steps or (1, 2, 4, 8)
    if pretrained:
        if not prompts_file:
            raise errors.UserError("An SD run is evaluated on prompts: give --prompts FILE (one per line).")
        with open(_require(prompts_file, "prompts", "a text file, one prompt per line.")) as f:
            prompts = [line.strip() for line in f if line.strip()]
    objective = export.build_objective(config, workdir)
    params, step = export.restore_params(config, workdir, objective, weights)
    eval_config = config.get("eval") or {}
    guidance = guidance if guidance is not None else eval_config.get("guidance_scale", 8.0 if pretrained else 1.5)
    num = num or eval_config.get("num_samples", 1000)
    batch_size = batch_size or eval_config.get("batch_size", 16)
    if pretrained:
        table = evaluate_sd(config, objective, params, steps, num, batch_size, prompts, guidance, clip,
                            inception, ref_stats)
    else:
        table = evaluate_digits(config, objective, params, steps, num, batch_size, guidance)
    return _record(workdir, step, weights, guidance, num, table)


def _fid_run(config, workdir, steps, num, weights, inception, ref_stats, guidance, batch_size):
    if not inception:
        raise errors.UserError(f"objective={config.objective!r} (trained from scratch) is scored with "
                               "class-balanced FID: give --inception and --ref_stats.")
    objective = export.build_objective(config, workdir)
    params, step = export.restore_params(config, workdir, objective, weights)
    guidance = config.eval.guidance_scale if guidance is None else guidance
    num = num or config.eval.num_samples
    table = evaluate_fid(config, objective, params, steps or (config.eval.num_steps,), num,
                         batch_size or config.eval.batch_size, guidance, inception, ref_stats)
    return _record(workdir, step, weights, guidance, num, table)


def _record(workdir, step, weights, guidance, num, table) -> dict:
    result = {"step": step, "weights": weights, "guidance_scale": guidance, "num_samples": num,
              "table": table}
    paths.write_atomic(paths.path(workdir) / "evaluation.json", json.dumps(result, indent=2))
    return result


def format_table(table: dict) -> str:
    lines = []
    for sampler, rows in table.items():
        metrics = sorted({m for row in rows.values() for m in row})
        lines.append(f"{sampler:<6}steps " + "".join(f"{m:>12}" for m in metrics))
        lines += [f"{'':<6}{k:>5} " + "".join(f"{row[m]:>12.4f}" for m in metrics) for k, row in rows.items()]
    return "\n".join(lines)


def main_cli():
    p = cli_args.Parser(description=__doc__)
    p.add_argument("--workdir", required=True, type=cli_args.existing_dir)
    p.add_argument("--steps", type=cli_args.step_list, default=None,
                   help="step counts (default 1,2,4,8; runs trained from scratch: config.eval.num_steps)")
    p.add_argument("--num", type=cli_args.at_least(1), default=None,
                   help="images per step count (default config.eval)")
    p.add_argument("--batch_size", type=cli_args.at_least(1), default=None)
    p.add_argument("--weights", choices=("ema", "online"), default="ema")
    p.add_argument("--guidance", type=cli_args.real(0), default=None)
    p.add_argument("--prompts", type=cli_args.existing_file, default=None)
    p.add_argument("--clip", type=cli_args.existing_dir, default=None)
    p.add_argument("--inception", type=cli_args.existing_file, default=None)
    p.add_argument("--ref_stats", type=cli_args.existing_file, default=None)
    a = p.parse_args()
    result = evaluate(a.workdir, a.steps, a.num, a.weights, a.prompts,
                      a.clip, a.inception, a.ref_stats, a.guidance, a.batch_size)
    print(format_table(result["table"]))


if __name__ == "__main__":
    _harness.main(main_cli)
