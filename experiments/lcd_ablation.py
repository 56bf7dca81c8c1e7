r"""Skip-step ablation (LCM paper, Fig. 3): skip k x solver, FD-digits of the distilled student.

  python -m experiments.lcd_ablation --teacher_workdir workdirs/digits_lcd --out workdirs/lcd_ablation \
      [--steps 300] [--ks 1,5,10,20,50] [--solvers ddim,dpm_solver,dpm_solver_pp] \
      [--config.lcd.w_min=0.5 --config.lcd.w_max=2.5 --config.eval.guidance_scale=2.5]

Reuses the VAE and latent teacher of a finished configs/digits_lcd.py run (W/vae, W/teacher; they
are trained first if missing), then distils one student per cell for the same number of steps
(k = T / num_ddim_timesteps: k = 1 is N = 1000 grid points, k = 50 is N = 20) and scores LCM
sampling at 2 and 4 steps (500 samples, FD-digits and accuracy) at eval.guidance_scale. `--config.FIELD=VALUE`
pins config fields for every cell (docs/lcd.md's table pins the recipe it was made with). Cells
already in OUT/ablation.json are skipped, so an interrupted run continues. Prints a markdown table.
`--config.wandb.mode=offline` (or online) tracks every cell in W&B, grouped by OUT, and logs the table
as a wandb.Table in a summary run of the same group.
"""
import argparse
import os
import sys

from experiments import _harness
from experiments import consistency_digits as study


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher_workdir", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--ks", default="1,5,10,20,50")
    parser.add_argument("--solvers", default="ddim,dpm_solver,dpm_solver_pp")
    parser.add_argument("--eval_steps", default="2,4")
    from lcm_jax import config_loading

    # --config.FIELD=VALUE (main.py's syntax), pinned for every cell: 'FIELD=VALUE' items.
    argv, pinned = config_loading.split_argv(sys.argv[1:] if argv is None else list(argv))
    args = parser.parse_args(argv)

    import jax

    from lcm_jax import config_checks, objectives, tracking, train
    from lcm_jax.objectives import consistency

    base, pipeline, teacher, evaluator = study.load_chain(args.teacher_workdir)
    results = _harness.ResultsFile(os.path.join(args.out, "ablation.json"))
    ks, solvers = [int(k) for k in args.ks.split(",")], args.solvers.split(",")
    for k in ks:
        for solver in solvers:
            cell = f"k{k}_{solver}"
            if results.done(cell):
                continue
            config = _harness.in_study(study.run_config(pinned + [
                f"lcd.num_ddim_timesteps={base.diffusion.num_train_timesteps // k}",
                f"lcd.solver={solver}"], args.steps), args.out, cell)
            config_checks.validate(config)
            strategy = objectives.module(config.objective).STRATEGY  # lcd (tcd if pinned)
            objective = consistency.ConsistencyObjective(config, teacher, strategy)
            pipeline.set_state({"step": 0})
            final = train.run(config, os.path.join(args.out, cell), objective, pipeline)
            frozen = jax.device_put(objective.frozen)
            results.set(cell, {str(n): study.score(objective.sample_fn, final.ema_params, frozen,
                                                   evaluator,
                                                   dict(sampler=strategy.student_sampler, num_steps=n),
                                                   config.eval.guidance_scale, base.seed, base)
                               for n in (int(s) for s in args.eval_steps.split(","))})
            print(cell, results[cell], flush=True)
    print(table(results.data, ks, solvers, args.eval_steps.split(",")))
    tracking.log_results(study.run_config(pinned, args.steps), args.out, "ablation", results.data)


def table(results: dict, ks, solvers, eval_steps) -> str:
    lines = []
    for n in eval_steps:
        rows = [[k, *(f"{c['fd']:.2f} ({c['acc']:.3f})" if c else "-"
                      for c in (results.get(f"k{k}_{s}", {}).get(n) for s in solvers))] for k in ks]
        lines += [f"\nFD-digits of LCM@{n} (accuracy)\n", _harness.markdown_table(["k", *solvers], rows)]
    return "\n".join(lines)


if __name__ == "__main__":
    _harness.main(main)
