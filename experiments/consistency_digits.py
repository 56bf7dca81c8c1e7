r"""Consistency distillation studies on the digits teacher of README command 1 (LCD, TCD).

  python -m experiments.consistency_digits --workdir workdirs/digits_lcd --out workdirs/cd_study \
      --run base --run ema99:ema_decay=0.99 --run tcd:objective=tcd \
      [--steps 1500] [--eval_every 500] [--guidance 1.5,2.5] [--gammas 0,0.3,0.5,1] [--seeds 0]
  python -m experiments.consistency_digits --workdir workdirs/digits_lcd --out workdirs/cd_study \
      --teacher --guidance 1,1.5,2,2.5 --seeds 0,1,2

Reuses the VAE and the latent teacher cached in WORKDIR (W/vae, W/teacher; trained first if
missing). Each `--run NAME[:field=value,...]` distils one student from configs/digits_lcd.py with
those dotted overrides (values parsed as Python literals), for `--steps` steps, and scores it
every `--eval_every` steps and at the end: FD-digits and accuracy of 500 class-conditional
samples at 1 / 2 / 4 / 8 steps, per guidance g (the student embeds w = g - 1), with the LCM
sampler and, for TCD students, TCD's sampler at each gamma. `--seeds` repeats the final
evaluation with other sampling seeds (the evaluation noise). Runs named NAME_s0, NAME_s1, ... with
`seed=K` are replicates: with `--seeds 0,1,2` each is also read at sampling seed K, and the table
"mean ± std" pools them (both seeds vary together). `--teacher` scores the teacher instead:
DDIM-50, and command 1's few-step solvers (DDIM, DPM-Solver, DPM-Solver++) at 1 / 2 / 4 / 8 steps. Results go to OUT/results.json (finished runs are skipped on a rerun) and print
as markdown tables.
"""
import argparse
import os

from experiments import _harness

STEPS = (1, 2, 4, 8)


def run_config(overrides, steps: int, arg: str = ""):
    """configs/digits_lcd.py (`arg` 'tiny' for tests) for `steps` steps with `overrides`: a list
    of 'field=VALUE' or a {field: value} dict, checked as main.py checks --config.FIELD=VALUE."""
    from configs import digits_lcd

    config = digits_lcd.get_config(arg)
    config.total_steps = steps
    config.checkpoint.update(every_steps=steps, keep=1)
    config.sample.every_steps = steps
    return _harness.configure(config, overrides)


def load_chain(workdir: str):
    """(configs/digits_lcd.py, its data pipeline, the cached teacher with the student's network,
    the FD-digits evaluator)."""
    from configs import digits_lcd
    from lcm_jax import data, teachers
    from lcm_jax.eval import digits_metrics
    from lcm_jax.objectives import consistency

    base = digits_lcd.get_config()
    pipeline = data.make_pipeline(base.data, global_batch_size=base.batch_size, seed=base.seed)
    teacher = teachers.train_chained(base, workdir, pipeline.arrays["image"], pipeline.arrays["label"],
                                     consistency.w_embedding_dim(base))
    return base, pipeline, teacher, digits_metrics.DigitsEvaluator(base.data.image_size, 1)


def samplers_for(sampler: str, gammas):
    """(label, sample-config fields) of the student's few-step samplers (TCD's: per gamma)."""
    if sampler == "tcd":
        return [(f"tcd_g{g}", dict(sampler="tcd", gamma=g)) for g in gammas]
    return [("lcm", dict(sampler="lcm"))]


def score(sample_fn, params, frozen, evaluator, fields: dict, guidance: float, seed: int, base):
    import ml_collections

    from lcm_jax.eval import sampling

    sc = ml_collections.ConfigDict(dict(fields, guidance_scale=guidance,
                                        num_samples=base.eval.num_samples,
                                        batch_size=base.eval.batch_size))
    metrics, _ = sampling.evaluate_digits(sample_fn, params, frozen, sc, evaluator, seed=seed)
    return {k: round(v, 4) for k, v in metrics.items()}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", required=True, help="README command 1's workdir (VAE, teacher)")
    parser.add_argument("--out", required=True)
    parser.add_argument("--run", action="append", default=[], help="NAME[:field=value,...]")
    parser.add_argument("--teacher", action="store_true", help="score the teacher's DDIM-50")
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--eval_every", type=int, default=0)
    parser.add_argument("--guidance", default="1.5", help="guidance scales, e.g. 1,1.5,2 (command 1's: 1.5)")
    parser.add_argument("--gammas", default="0,0.3,0.5,1")
    parser.add_argument("--seeds", default="0")
    args = parser.parse_args()

    import jax

    from lcm_jax import config_checks, objectives, tracking, train
    from lcm_jax.eval import few_step
    from lcm_jax.objectives import consistency

    base, pipeline, teacher, evaluator = load_chain(args.workdir)
    guidances = [float(g) for g in args.guidance.split(",")]
    gammas = [float(g) for g in args.gammas.split(",")]
    seeds = [int(s) for s in args.seeds.split(",")]
    results = _harness.ResultsFile(os.path.join(args.out, "results.json"))

    if args.teacher:
        objective = consistency.ConsistencyObjective(base, teacher, objectives.module("lcd").STRATEGY)
        frozen = jax.device_put(objective.frozen)
        teacher_fn = lambda p, f, rng, n, sc: objective.teacher_sample_fn(f, rng, n, sc)
        fields = dict(sampler="ddim", num_steps=base.eval.teacher_steps, sampler_kwargs=dict(
            timestep_spacing="trailing", steps_offset=0, set_alpha_to_one=True))
        scores = results.entry("teacher_ddim50")
        for g in guidances:
            for seed in seeds:
                key = f"g{g}/seed{seed}"
                if key not in scores:
                    scores[key] = score(teacher_fn, None, frozen, evaluator, fields, g, seed, base)
                    print("teacher", key, scores[key], flush=True)
                    results.save()
                for solver, (sampler, kwargs) in few_step.BASELINES.items():  # command 1's table
                    cell = results.entry(f"teacher_{solver}").setdefault(key, {})
                    for n in (str(n) for n in STEPS if str(n) not in cell):
                        cell[n] = score(teacher_fn, None, frozen, evaluator, dict(
                            sampler=sampler, num_steps=int(n), sampler_kwargs=kwargs), g, seed, base)
                    print(f"teacher {solver}", key, cell, flush=True)
                    results.save()

    for text in args.run:
        name, overrides = _harness.split_run(text)
        if results.done(name):
            continue
        config = _harness.in_study(run_config(overrides, args.steps), args.out, name)
        config_checks.validate(config)
        strategy = objectives.module(config.objective).STRATEGY  # lcd, tcd, lcf
        objective = consistency.ConsistencyObjective(config, teacher, strategy)
        record = results.data[name] = {"overrides": overrides, "steps": args.steps, "done": False}

        def evaluate(step, params, frozen, final=False):
            if step == args.steps and not final:
                return {}  # the loop's own end-of-run call: scored below, with every seed
            at = record.setdefault(str(step), {})
            for label, fields in samplers_for(strategy.student_sampler, gammas):
                for g in guidances:
                    for seed in (seeds if final else seeds[:1]):
                        cell = at.setdefault(f"{label}/g{g}/seed{seed}", {})
                        for n in STEPS:
                            cell[str(n)] = score(objective.sample_fn, params, frozen, evaluator,
                                                 dict(fields, num_steps=n), g, seed, base)
                        print(name, step, label, g, seed, cell, flush=True)
            results.save()
            return {}

        if args.eval_every:
            config.eval.every_steps = args.eval_every
        pipeline.set_state({"step": 0})
        final = train.run(config, os.path.join(args.out, name), objective, pipeline, evaluate=evaluate)
        evaluate(args.steps, final.ema_params, jax.device_put(objective.frozen), final=True)
        results.finish(name)
    results.set("seed_summary", seed_summary(results.data))
    print(tables(results.data))
    tracking.log_results(run_config([], args.steps), args.out, "results", results.data)


SEEDED = _harness.SEEDED


def seed_summary(results: dict) -> dict:
    """Over the finished runs NAME_s0, NAME_s1, ... (training seed K, each read at sampling seed
    K): per NAME, sampler / guidance and step count, the mean and std (ddof 1) of FD-digits and
    accuracy, and the seeds used; the teacher's few-step solvers (`--teacher`) over their
    sampling seeds."""
    pooled = {}
    for name, record in results.items():
        match = SEEDED.match(name)
        if not match or not isinstance(record, dict) or record.get("done") is not True:
            continue
        seed = int(match.group(2))
        for key, cell in record.get(str(record["steps"]), {}).items():
            label, _, at = key.rpartition("/seed")
            if int(at) == seed:
                for n, metrics in cell.items():
                    pooled.setdefault(match.group(1), {}).setdefault(label, {}).setdefault(
                        n, []).append((seed, metrics))
    for name, record in results.items():  # the teacher's solvers: one network, sampling seeds
        if name.startswith("teacher_"):
            for key, cell in record.items():
                label, _, at = key.rpartition("/seed")
                if name == "teacher_ddim50":  # {fd, acc} of DDIM-50
                    cell = {"50": cell}
                for n, metrics in cell.items():
                    pooled.setdefault(name, {}).setdefault(label, {}).setdefault(n, []).append(
                        (int(at), metrics))
    summary = {}
    for group, labels in pooled.items():
        for label, steps in labels.items():
            for n, runs in steps.items():
                (fd_mean, fd_std), (acc_mean, acc_std) = (
                    _harness.mean_std(m[k] for _, m in runs) for k in ("fd", "acc"))
                summary.setdefault(group, {}).setdefault(label, {})[n] = dict(
                    seeds=sorted(s for s, _ in runs), fd_mean=round(fd_mean, 4),
                    fd_std=round(fd_std, 4), acc_mean=round(acc_mean, 4), acc_std=round(acc_std, 4))
    return summary


def seed_table(summary: dict) -> str:
    """'FD mean ± std (accuracy mean ± std)' per run group and sampler / guidance."""
    cell = lambda c: (f"{c['fd_mean']:.2f} ± {c['fd_std']:.2f} "
                      f"({c['acc_mean']:.1%} ± {c['acc_std']:.1%})") if c else "-"
    counts = STEPS + ((50,) if any("50" in steps for labels in summary.values()
                                   for steps in labels.values()) else ())
    rows = [[f"{group} {label}", len(next(iter(steps.values()))["seeds"]),
             *(cell(steps.get(str(n))) for n in counts)]
            for group, labels in summary.items() for label, steps in labels.items()]
    return _harness.markdown_table(["run / sampler / guidance", "seeds",
                                    *(f"{n} steps" for n in counts)], rows)


def tables(results: dict) -> str:
    lines = [f"teacher DDIM-50 {g_seed}: FD {_harness.fd_cell(row)}"
             for g_seed, row in sorted(results.get("teacher_ddim50", {}).items())]
    if results.get("seed_summary"):
        lines += ["\nmean ± std over training seed K read at sampling seed K",
                  seed_table(results["seed_summary"])]
    for name, record in results.items():
        if name.startswith("teacher_") or name == "seed_summary":  # in the summary
            continue
        rows = [[step, key, *(_harness.fd_cell(cell[str(n)]) for n in STEPS)]
                for step, cells in record.items() if step.isdigit() for key, cell in cells.items()]
        lines += [f"\n{name} {record['overrides']}", _harness.markdown_table(
            ["step", "sampler / guidance / seed", *(f"{n} steps" for n in STEPS)], rows)]
    return "\n".join(lines)


if __name__ == "__main__":
    _harness.main(main)
