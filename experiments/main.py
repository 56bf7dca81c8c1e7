r"""Train any objective from an ml_collections config.

  python experiments/main.py --config configs/digits_diffusion.py --workdir workdirs/digits \
      [--config.total_steps=100 ...]

The workdir holds checkpoints (a rerun resumes from them), metrics.jsonl, TensorBoard files,
W&B offline runs, sample grids and, for digits, results.json.
"""
import json
import logging
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Experiment config file.", lock_config=True)
flags.DEFINE_string("workdir", None, "Checkpoints, logs and results go here; reruns resume.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    del argv
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    config, workdir = FLAGS.config, FLAGS.workdir
    results = train_and_evaluate(config, workdir)
    if results:
        print(json.dumps(results, indent=2))


def train_and_evaluate(config, workdir: str) -> dict:
    from lcm_jax import config_checks, parallel

    parallel.initialize_distributed(config.parallel)
    config_checks.validate(config)  # every config problem, before anything compiles

    import jax

    from lcm_jax import data, models, objectives, train

    pipeline = data.make_pipeline(config.data, global_batch_size=config.batch_size,
                                  seed=config.seed, process_index=jax.process_index(),
                                  process_count=jax.process_count())
    image_shape = train.peek(pipeline)["image"].shape[1:]
    model = models.make_model(config.model, image_shape[-1])
    objective = objectives.make_objective(config, model, image_shape)

    os.makedirs(workdir, exist_ok=True)
    evaluate = _digits_evaluation(config, objective) if config.data.name == "digits" else None
    train.run(config, workdir, objective, pipeline, evaluate=_saving(evaluate, workdir))
    path = os.path.join(workdir, "results.json")
    return json.load(open(path)) if os.path.exists(path) else {}


def _digits_evaluation(config, objective):
    """FD-digits and classifier accuracy of class-conditional samples, keyed e.g. 'ddim50'."""
    from lcm_jax.eval import digits_metrics, sampling

    def evaluate(params):
        evaluator = digits_metrics.DigitsEvaluator(config.data.image_size, config.data.get("channels", 1))
        return {f"{config.eval.sampler}{config.eval.num_steps}": sampling.evaluate_digits(
            objective, params, config.eval, evaluator, seed=config.seed)}

    return evaluate


def _saving(evaluate, workdir):
    if evaluate is None:
        return None

    def wrapped(params):
        results = evaluate(params)
        with open(os.path.join(workdir, "results.json.tmp"), "w") as f:
            json.dump(results, f, indent=2)
        os.replace(os.path.join(workdir, "results.json.tmp"), os.path.join(workdir, "results.json"))
        return results

    return wrapped


if __name__ == "__main__":
    app.run(main)
