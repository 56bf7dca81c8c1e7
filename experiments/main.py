r"""Train any objective from an ml_collections config.

  python -m experiments.main --config configs/digits_diffusion.py --workdir workdirs/digits \
      [--config.total_steps=100 --config.eval.steps="(1, 2)" ...]

Every field takes `--config.FIELD=VALUE`, VALUE a Python literal (lcm_jax/config_loading.py).

The workdir holds checkpoints (a rerun resumes from them), metrics.jsonl, TensorBoard files,
W&B offline runs, sample grids and, for digits, results.json. `--resume_from wandb:ENTITY/PROJECT/RUN`
starts an empty workdir from a W&B run's checkpoint artifact (`--config.wandb.log_checkpoints=True`).
"""
import json
import logging

from absl import app, flags

from experiments import _harness
from lcm_jax import config_loading, errors

FLAGS = flags.FLAGS
flags.DEFINE_string("config", None, "Experiment config file, e.g. configs/digits_lcd.py[:tiny].")
flags.DEFINE_string("workdir", None, "Checkpoints, logs and results go here; reruns resume.")
flags.DEFINE_string("resume_from", None,
                    "Start WORKDIR from another machine's checkpoint: wandb:ENTITY/PROJECT/RUNID (a run "
                    "that logged wandb.log_checkpoints) or a downloaded artifact folder "
                    "(lcm_jax/resume.py). A rerun with the same flag resumes from WORKDIR's own.")
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
    if FLAGS.resume_from:
        from lcm_jax import resume

        step = resume.prepare(FLAGS.resume_from, FLAGS.workdir)
        if step is not None:
            logging.info("Fetched the step %d checkpoint of %s into %s.", step, FLAGS.resume_from,
                         FLAGS.workdir)
    results = train_and_evaluate(config, FLAGS.workdir)
    if results:
        print(json.dumps(results, indent=2))


def train_and_evaluate(config, workdir: str) -> dict:
    from lcm_jax import objectives, paths, train

    objective, pipeline = _harness.build_run(config, workdir)
    evaluate = None
    if config.data.name == "digits":
        kind = objectives.module(config.objective).DIGITS_EVALUATION
        evaluate = {"few_step_table": _few_step_table, "samples": _digits_evaluation}[kind](
            config, objective, workdir)
    train.run(config, workdir, objective, pipeline, evaluate=_saving(evaluate, workdir),
              on_trained=lambda final: objective.save_outputs(workdir, final.ema_params))
    path = paths.path(workdir) / "results.json"
    return json.loads(path.read_text()) if path.exists() else {}


def _evaluator(config):
    from lcm_jax.eval import digits_metrics

    return digits_metrics.DigitsEvaluator(config.data.image_size, config.data.get("channels", 1))


def _digits_evaluation(config, objective, workdir):
    """FD-digits and classifier accuracy of class-conditional samples, keyed e.g. 'ddim50'."""
    from lcm_jax.eval import sampling

    def evaluate(step, params, frozen):
        metrics, _ = sampling.evaluate_digits(objective.sample_fn, params, frozen, config.eval,
                                              _evaluator(config), seed=config.seed)
        return {f"{config.eval.sampler}{config.eval.num_steps}": metrics}

    return evaluate


def _few_step_table(config, objective, workdir):
    """LCM vs DDIM / DPM-Solver / DPM-Solver++ at few steps (the LCM paper's Table 1)."""
    from lcm_jax.eval import few_step

    def evaluate(step, params, frozen):
        table = few_step.few_step_table(objective, params, frozen, config.eval, _evaluator(config),
                                        seed=config.seed, grid_dir=f"{workdir.rstrip('/')}/grids")
        print(few_step.format_table(table), flush=True)
        return table

    return evaluate


def _saving(evaluate, workdir):
    from lcm_jax import paths

    if evaluate is None:
        return None

    def wrapped(step, params, frozen):
        results = evaluate(step, params, frozen)
        paths.write_atomic(paths.path(workdir) / "results.json", json.dumps(results, indent=2))
        return results

    return wrapped


if __name__ == "__main__":
    _harness.main(lambda: app.run(main, flags_parser=parse_flags))
