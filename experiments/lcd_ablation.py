r"""Skip-step ablation (LCM paper, Fig. 3): skip k x solver, FD-digits of the distilled student.

  python experiments/lcd_ablation.py --teacher_workdir workdirs/digits_lcd --out workdirs/lcd_ablation \
      [--steps 300] [--ks 1,5,10,20,50] [--solvers ddim,dpm_solver,dpm_solver_pp]

Reuses the VAE and latent teacher of a finished configs/digits_lcd.py run (W/vae, W/teacher; they
are trained first if missing), then distils one student per cell for the same number of steps
(k = T / num_ddim_timesteps: k = 1 is N = 1000 grid points, k = 50 is N = 20) and scores LCM
sampling at 2 and 4 steps (500 samples, FD-digits and accuracy). Cells already in OUT/ablation.json
are skipped, so an interrupted run continues. Prints a markdown table.
"""
import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher_workdir", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--ks", default="1,5,10,20,50")
    parser.add_argument("--solvers", default="ddim,dpm_solver,dpm_solver_pp")
    parser.add_argument("--eval_steps", default="2,4")
    args = parser.parse_args()
    os.environ.setdefault("WANDB_MODE", "disabled")

    import jax
    import ml_collections

    from configs import digits_lcd
    from lcm_jax import config_checks, data, teachers, train
    from lcm_jax.eval import digits_metrics, sampling
    from lcm_jax.objectives.lcd import LCDObjective

    base = digits_lcd.get_config()
    pipeline = data.make_pipeline(base.data, global_batch_size=base.batch_size, seed=base.seed)
    teacher = teachers.train_chained(base, args.teacher_workdir, pipeline.arrays["image"],
                                     pipeline.arrays["label"])
    evaluator = digits_metrics.DigitsEvaluator(base.data.image_size, 1)
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "ablation.json")
    results = json.load(open(path)) if os.path.exists(path) else {}
    ks, solvers = [int(k) for k in args.ks.split(",")], args.solvers.split(",")
    for k in ks:
        for solver in solvers:
            cell = f"k{k}_{solver}"
            if cell in results:
                continue
            config = digits_lcd.get_config()
            config.lcd.update(num_ddim_timesteps=base.diffusion.num_train_timesteps // k, solver=solver)
            config.total_steps = args.steps
            config.checkpoint.every_steps = args.steps
            config.sample.every_steps = args.steps
            config.wandb.mode = "disabled"
            config_checks.validate(config)
            objective = LCDObjective(config, teacher)
            pipeline.set_state({"step": 0})
            final = train.run(config, os.path.join(args.out, cell), objective, pipeline)
            frozen = jax.device_put(objective.frozen)
            results[cell] = {}
            for n in (int(s) for s in args.eval_steps.split(",")):
                sc = ml_collections.ConfigDict(dict(sampler="lcm", num_steps=n,
                                                    guidance_scale=base.eval.guidance_scale,
                                                    num_samples=base.eval.num_samples,
                                                    batch_size=base.eval.batch_size))
                metrics, _ = sampling.evaluate_digits(objective.sample_fn, final.ema_params, frozen,
                                                      sc, evaluator, seed=base.seed)
                results[cell][str(n)] = metrics
            print(cell, results[cell], flush=True)
            with open(path + ".tmp", "w") as f:
                json.dump(results, f, indent=2)
            os.replace(path + ".tmp", path)
    print(table(results, ks, solvers, args.eval_steps.split(",")))


def table(results: dict, ks, solvers, eval_steps) -> str:
    lines = []
    for n in eval_steps:
        lines += [f"\nFD-digits of LCM@{n} (accuracy)\n", "| k | " + " | ".join(solvers) + " |",
                  "|---|" + "---|" * len(solvers)]
        for k in ks:
            cells = [results.get(f"k{k}_{s}", {}).get(n) for s in solvers]
            lines.append(f"| {k} | " + " | ".join(f"{c['fd']:.2f} ({c['acc']:.3f})" if c else "-"
                                                 for c in cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
