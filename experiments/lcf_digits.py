r"""LCF demonstration: fine-tune README command 1's LCM on inverted digits (a set its teacher never
saw), from an image folder, with no teacher; FD before and after.

  python -m experiments.lcf_digits --lcm_workdir workdirs/digits_lcd --out workdirs/lcf_digits \
      [--steps 3000] [--eval_steps 1,2,4] [--eval_every 1000] [--control] \
      [--k_schedule [--n_start 5]] [--set lcd.target=online --set optimizer.decay=constant]

1. Writes the shifted set as an image folder: OUT/inverted/ holds the 1,497 training digits with
   black and white swapped, as PNGs with .txt captions ("a handwritten digit three").
2. Scores the LCM before: 500 class-conditional samples at 1 / 2 / 4 steps (guidance of
   configs/digits_lcd.py), against the shifted test set (FD-digits of the un-inverted samples vs
   the 300 test digits: the inverted test set seen through the inverse shift; accuracy likewise)
   and against ordinary digits (the usual FD-digits).
3. Runs configs/digits_lcf.py on the folder (OUT/run) and scores the fine-tuned LCM the same way,
   at the end and, with --eval_every K, every K steps of the same run (its EMA params): the curve.
   --k_schedule: with the skip curriculum (lcd.k_schedule='doubling': N = --n_start grid points,
   k = 1000 / N, doubling in iCT's stages to 50, k = 20, over --steps); --set FIELD=VALUE (any
   config field, as --config.FIELD=VALUE of main.py), e.g. the online target or a constant lr.
   Each variant needs its own OUT (OUT/run resumes from its checkpoints).
Rows for scale: the 1,497 real inverted training digits, and the VAE's reconstructions of the
inverted test digits (the best a latent model on this VAE can do). Prints a markdown table; OUT/results.json holds it.
"""
import argparse
import os

from experiments import _harness


def write_inverted_folder(folder: str, invert: bool = True) -> None:
    """The 1,497 training digits as PNGs + .txt captions, black and white swapped (or, with
    invert=False, as they are: the control)."""
    import numpy as np
    from PIL import Image

    from lcm_jax.data import digits

    if os.path.isdir(folder) and os.listdir(folder):
        return
    os.makedirs(folder, exist_ok=True)
    images, labels = digits.load("train", 16, 1)
    for i, (image, label) in enumerate(zip(images, labels)):
        x = -image[..., 0] if invert else image[..., 0]
        pixels = np.round((x + 1.0) * 127.5).astype(np.uint8)
        Image.fromarray(pixels, mode="L").save(os.path.join(folder, f"{i:04d}.png"))
        with open(os.path.join(folder, f"{i:04d}.txt"), "w") as f:
            f.write(digits.caption(label))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lcm_workdir", default="workdirs/digits_lcd")
    parser.add_argument("--out", default="workdirs/lcf_digits")
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--eval_steps", default="1,2,4")
    parser.add_argument("--eval_every", type=int, default=0,
                        help="also score the run every this many steps (0: before / after only)")
    parser.add_argument("--control", action="store_true",
                        help="fine-tune on the ordinary digits instead (no shift): the control")
    parser.add_argument("--k_schedule", action="store_true",
                        help="the skip curriculum: lcd.k_schedule='doubling' (large skips first)")
    parser.add_argument("--n_start", type=int, default=5,
                        help="with --k_schedule: the first stage's grid points N (k = 1000 / N)")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                        help="a config override, e.g. lcd.target=online, optimizer.decay=constant")
    args = parser.parse_args()

    import jax
    import ml_collections
    import numpy as np

    from configs import digits_lcf
    from lcm_jax import train
    from lcm_jax.data import digits
    from lcm_jax.eval import digits_metrics, sampling

    folder = os.path.join(args.out, "ordinary" if args.control else "inverted")
    write_inverted_folder(folder, invert=not args.control)
    config = digits_lcf.get_config()
    config.data.path = folder
    config.lcf.lcm_workdir = args.lcm_workdir
    config.total_steps = args.steps
    config.checkpoint.update(every_steps=args.steps, keep=1)
    config.sample.every_steps = args.steps
    overrides = list(args.set)
    if args.k_schedule:
        overrides += ["lcd.k_schedule=doubling", f"lcd.n_start={args.n_start}"]
    if overrides:
        config = _harness.configure(config, overrides)
    if args.eval_every:
        config.eval.every_steps = args.eval_every
    config = _harness.in_study(config, args.out, "run")

    ordinary = digits_metrics.DigitsEvaluator(16, 1)
    shifted = digits_metrics.DigitsEvaluator(16, 1, reference_split="test")  # seen through -x
    workdir = os.path.join(args.out, "run")
    objective, pipeline = _harness.build_run(config, workdir)  # the checks; the LCM of LCM_WORKDIR
    lcm = objective.base  # the distilled student LCF starts from
    frozen = jax.device_put(objective.frozen)

    def scores(params) -> dict:
        row = {}
        for n in (int(s) for s in args.eval_steps.split(",")):
            sc = ml_collections.ConfigDict(dict(sampler="lcm", num_steps=n,
                                                guidance_scale=config.eval.guidance_scale))
            images, labels = sampling.class_conditional_samples(
                objective.sample_fn, params, frozen, sc, config.eval.num_samples,
                config.eval.batch_size, seed=config.seed)
            row[str(n)] = {"shifted": shifted.evaluate(-images, labels),
                           "ordinary": ordinary.evaluate(images, labels)}
        return row

    results = _harness.ResultsFile(os.path.join(args.out, "results.json"))
    results.data.clear()  # every entry is measured again: none of an earlier run is kept
    results.set("overrides", overrides)
    results.set("before", scores(lcm.params))
    train_images, train_labels = digits.load("train", 16, 1)
    test_images, test_labels = digits.load("test", 16, 1)
    recon = np.clip(np.asarray(lcm.vae.apply({"params": lcm.vae_params}, -np.asarray(test_images))), -1, 1)
    results.set("real_inverted_train", {"shifted": shifted.evaluate(train_images, train_labels)})
    results.set("vae_reconstruction", {"shifted": shifted.evaluate(-recon, test_labels)})
    curve = results.entry("curve") if args.eval_every else {}  # step -> scores, every --eval_every

    def evaluate(step, params, _frozen):
        if step == args.steps:
            return {}  # the loop's end-of-run call: "after", below
        curve[str(step)] = scores(params)
        results.save()
        print(f"step {step}:", curve[str(step)], flush=True)
        return curve[str(step)]

    final = train.run(config, workdir, objective, pipeline,
                      evaluate=evaluate if args.eval_every else None)
    results.set("after", scores(final.ema_params))
    print(table(results.data))
    from lcm_jax import tracking

    tracking.log_results(config, args.out, "results", results.data)


def table(results: dict) -> str:
    steps = sorted(results["before"], key=int)
    cell = _harness.fd_cell
    header = ["LCM", *(f"{kind} @{n}" for n in steps for kind in ("inverted", "ordinary"))]

    def row(name, scores):
        return [name, *(cell(scores[n][kind]) for n in steps for kind in ("shifted", "ordinary"))]

    curve = results.get("curve", {})
    rows = [row("before LCF", results["before"]),
            *(row(f"LCF, {step} steps", curve[step]) for step in sorted(curve, key=int)),
            row("after LCF", results["after"])]
    rows += [[name.replace("_", " "), cell(results[name]["shifted"])]
             for name in ("real_inverted_train", "vae_reconstruction")]
    return _harness.markdown_table(header, rows)


if __name__ == "__main__":
    _harness.main(main)
