r"""Train any objective from an ml_collections config.

  python experiments/main.py --config configs/digits_diffusion.py --workdir workdirs/digits \
      [--config.total_steps=100 --config.eval.steps="(1, 2)" ...]

Every field takes `--config.FIELD=VALUE`, VALUE a Python literal (lcm_jax/config_loading.py).

The workdir holds checkpoints (a rerun resumes from them), metrics.jsonl, TensorBoard files,
W&B offline runs, sample grids and, for digits, results.json.
"""
import json
import logging
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402

from lcm_jax import config_loading, errors  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("config", None, "Experiment config file, e.g. configs/digits_lcd.py[:tiny].")
flags.DEFINE_string("workdir", None, "Checkpoints, logs and results go here; reruns resume.")
flags.mark_flags_as_required(["config", "workdir"])
OVERRIDES: list[str] = []  # the --config.a.b=VALUE arguments (lcm_jax.config_loading)


def parse_flags(argv: list[str]) -> list[str]:
    rest, overrides = config_loading.split_argv(argv)
    OVERRIDES[:] = overrides
    try:
        return FLAGS(rest)
    except flags.Error as e:
        raise errors.UserError(f"{e} (see --helpfull)") from None


def main(argv):
    del argv
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    config = config_loading.load(FLAGS.config, OVERRIDES)
    results = train_and_evaluate(config, FLAGS.workdir)
    if results:
        print(json.dumps(results, indent=2))


def train_and_evaluate(config, workdir: str) -> dict:
    from lcm_jax import config_checks, parallel, paths

    parallel.initialize_distributed(config.parallel)
    parallel.enable_compilation_cache(config.parallel)
    config_checks.validate(config)  # every config problem, before anything compiles

    import jax

    from lcm_jax import data, train

    pipeline = data.make_pipeline(config.data, global_batch_size=config.batch_size,
                                  seed=config.seed, process_index=jax.process_index(),
                                  process_count=jax.process_count())
    paths.path(workdir).mkdir(parents=True, exist_ok=True)
    objective = build_objective(config, workdir, pipeline)
    evaluate = None
    if config.data.name == "digits":
        evaluate = (_few_step_table if config.objective in DISTILLATION
                    else _digits_evaluation)(config, objective, workdir)
    train.run(config, workdir, objective, pipeline, evaluate=_saving(evaluate, workdir),
              on_trained=lambda final: _save_outputs(config, workdir, final.ema_params))
    path = paths.path(workdir) / "results.json"
    return json.loads(path.read_text()) if path.exists() else {}


DISTILLATION = ("lcd", "tcd")  # objectives with a teacher: the few-step table on digits


def build_objective(config, workdir: str, pipeline):
    from lcm_jax import models, objectives, train

    if config.objective == "smooth":
        return _smooth_objective(config, workdir, pipeline)
    if config.objective in DISTILLATION + ("lcf",):
        from lcm_jax import teachers
        from lcm_jax.objectives.lcd import LCDObjective
        from lcm_jax.objectives.lcf import LCFObjective
        from lcm_jax.objectives.tcd import TCDObjective

        if config.model.get("pretrained"):  # a teacher (LCD, TCD) or an LCM (LCF) folder
            teacher = teachers.from_pretrained(config)
        elif config.objective == "lcf":  # the digits LCM of README command 1
            teacher = teachers.distilled_from_chained(config, config.lcf.lcm_workdir)
        else:  # the embedded default: train the VAE and the latent teacher first (cached)
            teacher = teachers.train_chained(config, workdir, pipeline.arrays["image"],
                                             pipeline.arrays["label"])
        return {"lcd": LCDObjective, "tcd": TCDObjective, "lcf": LCFObjective}[
            config.objective](config, teacher)
    image_shape = train.peek(pipeline)["image"].shape[1:]
    channels = image_shape[-1]
    if config.model.get("vae"):  # a latent model (objective 'edm'): the VAE's latent channels
        from lcm_jax.models import convert

        channels = convert.read_config(config.model.vae).get("latent_channels", 4)
    model = models.make_model(config.model, channels)
    return objectives.make_objective(config, model, image_shape)


def _smooth_objective(config, workdir: str, pipeline):
    """Smooth Diffusion fine-tunes a local SD folder, or the digits teacher of README command 1
    (the chain in config.smooth.teacher_workdir, trained there first if it is not yet)."""
    from lcm_jax import teachers
    from lcm_jax.objectives.smooth import SmoothObjective

    if config.model.get("pretrained"):
        return SmoothObjective(config, teachers.from_pretrained(config))
    chain = os.path.expanduser(config.smooth.get("teacher_workdir") or workdir)
    return SmoothObjective(config, teachers.train_chained(config, chain, pipeline.arrays["image"],
                                                          pipeline.arrays["label"]))


def _save_outputs(config, workdir: str, params) -> None:
    """What later runs and users read, written before the final evaluation."""
    if config.objective in DISTILLATION + ("lcf",) and not config.model.get("pretrained"):
        from lcm_jax import teachers  # the digits student, for LCF to fine-tune

        teachers.save_params(teachers.student_path(workdir), params)
    if config.objective == "smooth":
        _export_smooth(config, workdir, params)


def _export_smooth(config, workdir: str, params):
    """W/smooth/params.msgpack (the LoRA factors or the full params, for lcm_jax), and for LoRA
    runs pytorch_lora_weights.safetensors (diffusers' pipe.load_lora_weights(W/smooth))."""
    import jax

    from lcm_jax import teachers
    from lcm_jax.models import lora

    teachers.save_params(teachers.smooth_path(workdir), params)
    if config.smooth.get("lora") and config.model.get("pretrained") and jax.process_index() == 0:
        lora.save(os.path.dirname(teachers.smooth_path(workdir)), params,
                  config.smooth.lora.get("alpha", config.smooth.lora.rank))


def _evaluator(config):
    from lcm_jax.eval import digits_metrics

    return digits_metrics.DigitsEvaluator(config.data.image_size, config.data.get("channels", 1))


def _digits_evaluation(config, objective, workdir):
    """FD-digits and classifier accuracy of class-conditional samples, keyed e.g. 'ddim50'."""
    from lcm_jax.eval import sampling

    def evaluate(params, frozen):
        metrics, _ = sampling.evaluate_digits(objective.sample_fn, params, frozen, config.eval,
                                              _evaluator(config), seed=config.seed)
        return {f"{config.eval.sampler}{config.eval.num_steps}": metrics}

    return evaluate


def _few_step_table(config, objective, workdir):
    """LCM vs DDIM / DPM-Solver / DPM-Solver++ at few steps (the LCM paper's Table 1)."""
    from lcm_jax.eval import few_step

    def evaluate(params, frozen):
        table = few_step.few_step_table(objective, params, frozen, config.eval, _evaluator(config),
                                        seed=config.seed, grid_dir=f"{workdir.rstrip('/')}/grids")
        print(few_step.format_table(table), flush=True)
        return table

    return evaluate


def _saving(evaluate, workdir):
    from lcm_jax import paths

    if evaluate is None:
        return None

    def wrapped(params, frozen):
        results = evaluate(params, frozen)
        paths.write_atomic(paths.path(workdir) / "results.json", json.dumps(results, indent=2))
        return results

    return wrapped


if __name__ == "__main__":
    errors.cli_main(lambda: app.run(main, flags_parser=parse_flags))
