r"""LEGO bricks on the embedded digits: LEGO-PG, LEGO-PR and a DiT baseline, trained from scratch
for the same steps, then compared on FD-digits, accuracy, training FLOPs and sampling time, with
the t_break sweep and generation on canvases larger than the training one.

  python -m experiments.lego_digits --out workdirs/lego_digits \
      [--models pg,pr,dit,pg_sub,dit_eqflops] [--sweep pg,pr] [--t_breaks 0,0.25,0.5,0.75]

NAME_sK trains and samples NAME at seed K (NAME alone is seed 0); with replicates in OUT, the
table opens with every model's FD-digits and accuracy as mean ± std over its seeds.

Each model trains in OUT/NAME with configs/digits_lego.py:NAME (',' for '_'; resumable, a finished
one is only restored); `dit_eqflops` is the DiT trained for as many steps as spend the training
FLOPs of LEGO-PR's run (`--equal_flops_to`), with its learning-rate schedule over those steps.
Then, side by side in this one process, for every model (and every t_break for the models in
--sweep; t_break is the share of the 18 Heun steps without the top brick): 500 class-conditional
samples from the same noise, their FD-digits and accuracy, and the wall time to draw them
(compiled: one draw compiles, then the median of `repeats` timed draws). Training FLOPs per image and the denoiser's FLOPs per evaluation with and
without the top brick come from XLA's cost analysis. Grids of 16x32 and 32x32 canvases go to
OUT/canvas_NAME_HxW.png. Results: OUT/results.json, and a markdown table on stdout.
"""
import argparse
import os
import statistics
import time

from experiments import _harness

TINY = ""  # ",tiny" under --tiny: seconds-long models, to check the recipe end to end by hand


def build(name: str, workdir: str, total_steps: int | None = None):
    """(config, objective, pipeline) of configs/digits_lego.py:NAME, as main.py builds a run;
    NAME_sK with seed=K (training and sampling)."""
    from configs import digits_lego

    model, seed = _harness.replicate(name)
    config = _harness.in_study(digits_lego.get_config(model.replace("_", ",") + TINY),
                               os.path.dirname(workdir), os.path.basename(workdir))
    config.seed = seed
    if total_steps:
        config.total_steps = total_steps
    objective, pipeline = _harness.build_run(config, workdir)
    return config, objective, pipeline


def train_flops_per_image(config, objective, pipeline) -> float:
    """XLA's FLOP count of one compiled train step, over the batch."""
    import jax

    from lcm_jax import train

    state = jax.eval_shape(objective.init_state, jax.random.PRNGKey(0), {})
    batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in train.peek(pipeline).items()
             if v.dtype.kind not in "USO"}
    step = jax.jit(lambda s, b: objective.train_step(s, b, {})).lower(state, batch).compile()
    return step.cost_analysis()["flops"] / config.batch_size


def evaluation_flops(objective, params, shape, num_bricks=None) -> float:
    """XLA's FLOP count of one network evaluation (one image, conditional branch only)."""
    import jax
    import jax.numpy as jnp

    kwargs = {} if num_bricks is None else {"num_bricks": num_bricks}
    f = lambda p, x: objective.network.denoiser.apply(p, x, jnp.zeros((1,)), jnp.zeros((1,), jnp.int32),
                                                     **kwargs)
    x = jax.ShapeDtypeStruct((1,) + tuple(shape), jnp.float32)
    return jax.jit(f).lower(params, x).compile().cost_analysis()["flops"]


def timed_evaluation(objective, params, eval_config, evaluator, seed, repeats):
    """(FD / accuracy of eval_config.num_samples samples, median seconds to draw them)."""
    from lcm_jax.eval import sampling

    def draw():
        t0 = time.perf_counter()
        images, labels = sampling.class_conditional_samples(
            objective.sample_fn, params, objective.frozen, eval_config, eval_config.num_samples,
            eval_config.batch_size, seed)
        return images, labels, time.perf_counter() - t0

    images, labels, _ = draw()  # compiles
    seconds = statistics.median(draw()[2] for _ in range(repeats))
    return evaluator.evaluate(images, labels), seconds


def canvases(objective, params, eval_config, out: str, name: str):
    """Class-conditional grids on canvases 2x wider and 2x larger than the training one, and for
    LEGO a 3x-wide panorama per class, sampled with fixed and with shifted tiles from one noise."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from PIL import Image

    from lcm_jax import train

    h, w, c = objective.image_shape
    paths = []
    for shape in ((h, 2 * w, c), (2 * h, 2 * w, c)):
        labels = jnp.arange(20, dtype=jnp.int32) % objective.null_class
        images = jax.jit(lambda p, rng: objective.sample(p, rng, labels, eval_config, shape=shape))(
            params, jax.random.PRNGKey(7))
        grid = train.image_grid(np.asarray(images), columns=10)
        path = os.path.join(out, f"canvas_{name}_{shape[0]}x{shape[1]}.png")
        Image.fromarray(grid.squeeze(-1)).resize((grid.shape[1] * 3, grid.shape[0] * 3),
                                                 Image.NEAREST).save(path)
        paths.append(path)
    if objective.stack is not None:  # a 1x3 panorama, tiles fixed vs shifted every other level
        labels = jnp.arange(10, dtype=jnp.int32) % objective.null_class
        shifted = eval_config.copy_and_resolve_references()
        shifted.shifted_tiles = True
        draw = lambda sc: np.asarray(jax.jit(lambda p, rng: objective.sample(
            p, rng, labels, sc, shape=(h, 3 * w, c)))(params, jax.random.PRNGKey(7)))
        pairs = np.stack([draw(eval_config), draw(shifted)], axis=1).reshape((-1, h, 3 * w, c))
        grid = train.image_grid(pairs, columns=2)  # per class: fixed tiles | shifted tiles
        path = os.path.join(out, f"panorama_{name}_{h}x{3 * w}.png")
        Image.fromarray(grid.squeeze(-1)).resize((grid.shape[1] * 3, grid.shape[0] * 3),
                                                 Image.NEAREST).save(path)
        paths.append(path)
    return paths


def equal_flops_steps(name: str, reference: str, out: str) -> int:
    """Steps at which model `name` has spent the training FLOPs of `reference`'s full run."""
    (config, *built), (ref_config, *ref_built) = build(name, out), build(reference, out)
    ratio = train_flops_per_image(ref_config, *ref_built) / train_flops_per_image(config, *built)
    return int(round(ref_config.total_steps * ref_config.batch_size * ratio / config.batch_size))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--models", default="pg,pr,dit,pg_sub,dit_eqflops",
                        help="NAME_eqflops: NAME trained for the FLOPs of --equal_flops_to's run")
    parser.add_argument("--equal_flops_to", default="pr")
    parser.add_argument("--t_breaks", default="0,0.25,0.5,0.75")
    parser.add_argument("--sweep", default="pg,pr", help="the models that get the t_break sweep")
    parser.add_argument("--repeats", type=int, default=1, help="timed draws after the compiling one")
    parser.add_argument("--tiny", action="store_true", help="seconds-long models (the tests)")
    args = parser.parse_args(argv)
    global TINY
    TINY = ",tiny" if args.tiny else ""

    import jax

    from lcm_jax import train
    from lcm_jax.eval import digits_metrics

    results = _harness.ResultsFile(os.path.join(args.out, "results.json"))
    t_breaks = [float(t) for t in args.t_breaks.split(",")]
    evaluator = None
    for name in args.models.split(","):
        steps = equal_flops_steps(name.split("_eqflops")[0], args.equal_flops_to, args.out) \
            if name.endswith("_eqflops") else None
        workdir = os.path.join(args.out, name)
        config, objective, pipeline = build(name.split("_eqflops")[0], workdir, steps)
        final = train.run(config, workdir, objective, pipeline)
        params = final.ema_params
        evaluator = evaluator or digits_metrics.DigitsEvaluator(config.data.image_size, 1)
        shape = objective.image_shape
        entry = {
            "params": int(sum(x.size for x in jax.tree.leaves(params))),
            "train_flops_per_image": train_flops_per_image(config, objective, pipeline),
            "steps": config.total_steps,
            "train_images": config.total_steps * config.batch_size,
            "eval_flops": evaluation_flops(objective, params, shape),
            "sweep": {}}
        if objective.stack is not None:
            entry["eval_flops_top_skipped"] = evaluation_flops(objective, params, shape,
                                                               len(objective.stack) - 1)
        for t_break in (t_breaks if name in args.sweep.split(",") else [0.0]):
            eval_config = config.eval.copy_and_resolve_references()
            eval_config.t_break = t_break
            metrics, seconds = timed_evaluation(objective, params, eval_config, evaluator,
                                                config.seed, args.repeats)
            entry["sweep"][str(t_break)] = dict(metrics, seconds=seconds)
            print(name, t_break, entry["sweep"][str(t_break)], flush=True)
        entry["canvases"] = canvases(objective, params, config.eval, args.out, name)
        results.set(name, entry)
    if any(_harness.SEEDED.match(name) for name in results.data):
        results.set("seed_summary", seed_summary(results.data))
    print(tables(results.data, t_breaks))
    from lcm_jax import tracking

    tracking.log_results(config, args.out, "results", results.data)
    return results.data


def seed_summary(results: dict) -> dict:
    """Per model over its replicates NAME_sK (NAME itself is seed 0): the seeds, mean and std
    (ddof 1) of FD-digits and accuracy at t_break 0, and the training FLOPs per image."""
    summary = {}
    for group, runs in _harness.pool_replicates(results, skip=("seed_summary",)).items():
        (fd, fd_std), (acc, acc_std) = (_harness.mean_std(e["sweep"]["0.0"][k] for e in runs.values())
                                        for k in ("fd", "acc"))
        summary[group] = dict(seeds=sorted(runs), fd_mean=round(fd, 4), fd_std=round(fd_std, 4),
                              acc_mean=round(acc, 4), acc_std=round(acc_std, 4),
                              train_flops_per_image=next(iter(runs.values()))["train_flops_per_image"])
    return summary


def tables(results: dict, t_breaks) -> str:
    summary = results.get("seed_summary", {})
    results = {k: v for k, v in results.items() if k != "seed_summary"}
    rows = []
    for name, e in results.items():
        s = e["sweep"]["0.0"]
        total = e["train_flops_per_image"] * e["train_images"] / 1e12
        rows.append([name, f"{e['params']:,}", f"{e['steps']:,}",
                     f"{e['train_flops_per_image'] / 1e9:.4f}", f"{total:.1f}", f"{s['fd']:.2f}",
                     f"{s['acc']:.3f}", f"{s['seconds']:.2f}"])
    sweep = [[name, f"{e['eval_flops'] / 1e6:.2f} / {e['eval_flops_top_skipped'] / 1e6:.2f}",
              *(f"{c['fd']:.2f} ({c['acc']:.3f}) / {c['seconds']:.2f} s" if c else "-"
                for c in (e["sweep"].get(str(t)) for t in t_breaks))]
             for name, e in results.items() if "eval_flops_top_skipped" in e]
    seeds = [[group, ",".join(map(str, c["seeds"])), f"{c['fd_mean']:.2f} ± {c['fd_std']:.2f}",
              f"{c['acc_mean']:.1%} ± {c['acc_std']:.1%}", f"{c['train_flops_per_image'] / 1e9:.4f}"]
             for group, c in summary.items()]
    return "\n".join([
        *([_harness.markdown_table(["model", "seeds", "FD-digits mean ± std", "accuracy",
                                    "train GFLOP / image"], seeds), ""] if seeds else []),
        _harness.markdown_table(["model", "params", "training steps", "train GFLOP / image",
                                 "train TFLOP total", "FD-digits", "accuracy", "sampling s / 500"], rows),
        "", "t_break sweep: FD-digits (accuracy) / seconds for 500 images; MFLOP per evaluation "
        "with / without the top brick", "",
        _harness.markdown_table(["model", "MFLOP", *(f"t_break = {t:g} T" for t in t_breaks)], sweep)])


if __name__ == "__main__":
    _harness.main(main)
