r"""Smooth Diffusion on README command 1's digits teacher: Smooth-LoRA vs the base, and a lambda sweep.

  python -m experiments.smooth_digits --teacher_workdir workdirs/digits_lcd --out workdirs/smooth_digits \
      [--lambdas 0,0.1,1,10] [--steps 1000] [--pairs 5] [--nti 50] [--seeds 0]

1. Trains configs/digits_smooth.py at each lambda in OUT/lambda_<value> (skipped once it has
   exported OUT/lambda_<value>/smooth/params.msgpack). lambda 0 is the control: the same LoRA
   fine-tune without the regulariser, so that what the regulariser does is told apart from what
   any fine-tuning does. `--full_lambdas` adds full fine-tuning runs (every parameter, lr
   `--full_lr`) in OUT/full_lambda_<value>.
2. Scores the base teacher and every run, all from the same noises:
   - ISTD: 10 classes x `pairs` noise pairs, 11 slerp latents each, DDIM-50 at guidance 1.5,
     decoded (lcm_jax.eval.istd defaults: [0, 1] pixels, L2 = sqrt of the sum, ddof 0);
   - FD-digits and accuracy of 500 DDIM-50 samples at guidance 1.5;
   - DDIM-inversion reconstruction of the 300 test digits (inverted with their label, generated
     back at guidance 1 and 1.5): PSNR and SSIM in [0, 1] pixels; null-text inversion at 1.5 on
     the first `nti` test digits (one set of nulls per image); the VAE's own reconstruction as
     the ceiling.
   `--seeds 0,1,2` repeats every run at training seed K (OUT/lambda_<value>_sK for K > 0) and
   scores it and the base (`base_sK`) at sampling seed K: the FD noise and the ISTD noise pairs.
3. Writes OUT/results.json (with `seed_summary`: each model's mean ± std over its seeds, and
   its ISTD and FD change from the base at the same seed), OUT/strip.png (11-frame interpolations: base above, Smooth
   lambda = 1 below, for four classes) and prints the markdown tables of the README.
"""
import argparse
import json
import os
import time

from experiments import _harness

GUIDANCE = 1.5


METRICS = ("istd", "mean_step", "fd", "acc", "ddim_psnr_g1.5")


def run_name(lam: float, full: bool = False, seed: int = 0) -> str:
    return _harness.replicate_name(f"{'full_' if full else ''}lambda_{lam}", seed)


def run_dir(out: str, lam: float, full: bool = False, seed: int = 0) -> str:
    return os.path.join(out, run_name(lam, full, seed))


def run_config(config, lam: float, full_lr: float | None = None, seed: int = 0):
    """The study's config at lambda and seed; full_lr: every parameter trained (no LoRA) at that lr."""
    c = config.copy_and_resolve_references()
    c.seed = seed
    c.smooth.lambda_reg = lam
    if full_lr is not None:
        c.smooth.lora = None
        c.optimizer.lr = full_lr
    return c


def train(config, workdir: str) -> str:
    from experiments import main as entry
    from lcm_jax import teachers

    if not os.path.isfile(teachers.smooth_path(workdir)):
        entry.train_and_evaluate(config, workdir)
    return workdir


def score_model(model, objective, params, frozen, config, evaluator, args, test_images, test_labels):
    """ISTD, FD / accuracy, inversion PSNR / SSIM of one LatentModel (and its objective's sampler)."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from lcm_jax.eval import image_metrics, istd, sampling

    out = {}
    # ISTD: the same noise pairs for every model at this seed.
    classes = np.repeat(np.arange(10), args.pairs)
    shape = (len(classes),) + model.latent_shape
    noise_a = jax.random.normal(jax.random.PRNGKey(100 + 2 * config.seed), shape)
    noise_b = jax.random.normal(jax.random.PRNGKey(101 + 2 * config.seed), shape)
    generate = lambda x, labels: model.generate(x, jnp.asarray(labels), guidance_scale=GUIDANCE)
    frames = istd.interpolation_frames(generate, noise_a, noise_b, classes)
    result = istd.istd(frames)
    out["istd"] = result["istd"]
    out["mean_step"] = float(result["distances"].mean())
    # FD-digits / accuracy (DDIM-50, guidance 1.5, 500 samples from the seed of every run).
    metrics, _ = sampling.evaluate_digits(objective.sample_fn, params, frozen, config.eval, evaluator,
                                          seed=config.seed)
    out.update(fd=metrics["fd"], acc=metrics["acc"])
    # Inversion of the test digits.
    to01 = lambda x: (np.asarray(x) + 1.0) / 2.0
    for g in (1.0, GUIDANCE):
        inv = model.invert(test_images, test_labels, guidance_scale=g)
        rec = model.reconstruct(inv)
        out[f"ddim_psnr_g{g}"] = float(np.mean(image_metrics.psnr(to01(rec), to01(test_images))))
        out[f"ddim_ssim_g{g}"] = float(np.mean(image_metrics.ssim(to01(rec), to01(test_images), win_size=7)))
    if args.nti:
        n = args.nti
        inv = model.invert(test_images[:n], test_labels[:n], guidance_scale=GUIDANCE, null_text=True,
                           shared_nulls=False)
        rec = model.reconstruct(inv)
        out["nti_psnr"] = float(np.mean(image_metrics.psnr(to01(rec), to01(test_images[:n]))))
        out["nti_ssim"] = float(np.mean(image_metrics.ssim(to01(rec), to01(test_images[:n]))))
    return out, frames


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher_workdir", default="workdirs/digits_lcd")
    parser.add_argument("--out", default="workdirs/smooth_digits")
    parser.add_argument("--lambdas", default="0,0.1,1,10")
    parser.add_argument("--full_lambdas", default="1", help="full fine-tuning runs ('' for none)")
    parser.add_argument("--full_lr", type=float, default=1e-5)
    parser.add_argument("--no_base", action="store_true", help="skip scoring the base (reruns)")
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--pairs", type=int, default=5)
    parser.add_argument("--nti", type=int, default=50)
    parser.add_argument("--seeds", default="0", help="training and sampling seeds (runs NAME_sK)")
    args = parser.parse_args()

    import jax
    import numpy as np

    from configs import digits_smooth
    from lcm_jax import config_checks, editing, teachers
    from lcm_jax.data import digits
    from lcm_jax.eval import digits_metrics
    from lcm_jax.objectives.smooth import SmoothObjective

    config = digits_smooth.get_config()
    config.smooth.teacher_workdir = args.teacher_workdir
    config.total_steps = args.steps
    config_checks.validate(config)
    lambdas = [float(x) for x in args.lambdas.split(",") if x]
    full = [float(x) for x in args.full_lambdas.split(",") if x]
    seeds = [int(k) for k in args.seeds.split(",")]
    runs = [(run_name(lam, False, k), run_config(config, lam, seed=k), run_dir(args.out, lam, False, k))
            for k in seeds for lam in lambdas]
    runs += [(run_name(lam, True, k), run_config(config, lam, args.full_lr, k), run_dir(args.out, lam, True, k))
             for k in seeds for lam in full]
    runs = [(name, _harness.in_study(c, args.out, name), workdir) for name, c, workdir in runs]
    for _, c, workdir in runs:
        train(c, workdir)

    evaluator = digits_metrics.DigitsEvaluator(config.data.image_size, 1)
    test_images, test_labels = digits.load("test", config.data.image_size, 1)
    images, labels = digits.load("train", config.data.image_size, 1)
    teacher = teachers.train_chained(config, args.teacher_workdir, images, labels)

    results = _harness.ResultsFile(os.path.join(args.out, "results.json"))  # reruns add their models
    strips = {}
    bases = [(_harness.replicate_name("base", k), run_config(config, 0.0, seed=k), None) for k in seeds]
    models = ([] if args.no_base else bases) + runs
    for name, c, workdir in models:
        t0 = time.time()
        model = editing.LatentModel.from_digits(c, args.teacher_workdir, workdir)
        run_objective = SmoothObjective(c, teacher)
        template = run_objective.init_state(jax.random.PRNGKey(0), run_objective.frozen).params
        params = template if workdir is None else teachers.load_params(teachers.smooth_path(workdir),
                                                                        template)
        scores, strips[name] = score_model(model, run_objective, params, run_objective.frozen,
                                           c, evaluator, args, test_images, test_labels)
        results.set(name, dict(scores, seconds=time.time() - t0))
        print(name, json.dumps(results[name]), flush=True)
    vae = teacher.vae
    rec = np.asarray(vae.decode_latents(teacher.vae_params, vae.encode_to_latents(teacher.vae_params, test_images)))
    from lcm_jax.eval import image_metrics

    to01 = lambda x: (np.clip(np.asarray(x), -1, 1) + 1.0) / 2.0
    results.set("vae", {"psnr": float(np.mean(image_metrics.psnr(to01(rec), to01(test_images)))),
                        "ssim": float(np.mean(image_metrics.ssim(to01(rec), to01(test_images))))})
    if any(_harness.SEEDED.match(name) for name in results.data):
        results.set("seed_summary", seed_summary(results.data))
    if "base" in strips:
        save_strip(os.path.join(args.out, "strip.png"), strips["base"], strips.get("lambda_1.0"), args.pairs)
    print(tables(results.data))
    from lcm_jax import tracking

    tracking.log_results(config, args.out, "results", results.data)


def save_strip(path: str, base, smooth, pairs: int, classes=(0, 3, 5, 8)) -> None:
    """Per class (its first noise pair): the base's 11 frames above Smooth's, a white line
    between classes; 4x nearest-neighbour upscaled."""
    import numpy as np
    from PIL import Image

    from lcm_jax.train import image_grid

    blocks = []
    for c in classes:
        rows = [base[c * pairs]] + ([smooth[c * pairs]] if smooth is not None else [])
        blocks.append(image_grid(np.concatenate(rows), columns=base.shape[1])[..., 0])
        blocks.append(np.full((2, blocks[-1].shape[1]), 255, np.uint8))
    grid = np.concatenate(blocks[:-1])
    Image.fromarray(np.kron(grid, np.ones((4, 4), np.uint8))).save(path)


def seed_summary(results: dict) -> dict:
    """Per model over its seeds (NAME is seed 0, NAME_sK seed K): mean and std (ddof 1) of each of
    METRICS, and of the relative ISTD and FD change from the base scored at the same seed."""
    pooled = _harness.pool_replicates(results, skip=("vae", "seed_summary"))
    summary = {}
    for group, by_seed in pooled.items():
        row = {"seeds": sorted(by_seed)}
        for key in METRICS:
            row[f"{key}_mean"], row[f"{key}_std"] = (round(x, 4) for x in _harness.mean_std(
                r[key] for r in by_seed.values()))
        base = pooled.get("base", {})
        for key in ("istd", "fd"):
            changes = [r[key] / base[k][key] - 1 for k, r in by_seed.items() if k in base]
            if changes and group != "base":
                row[f"{key}_change_mean"], row[f"{key}_change_std"] = (
                    round(x, 4) for x in _harness.mean_std(changes))
        summary[group] = row
    return summary


def tables(results: dict) -> str:
    summary = results.get("seed_summary", {})
    results = {k: v for k, v in results.items() if k != "seed_summary"}
    seeds = [[group, ",".join(map(str, r["seeds"])),
              *(f"{r[f'{key}_mean']:.3f} ± {r[f'{key}_std']:.3f}" for key in METRICS),
              *(f"{r[f'{key}_change_mean']:+.1%} ± {r[f'{key}_change_std']:.1%}"
                if f"{key}_change_mean" in r else "" for key in ("istd", "fd"))]
             for group, r in summary.items()]
    seed_table = [_harness.markdown_table(
        ["model", "seeds", *(f"{key} mean ± std" for key in METRICS), "ISTD vs base", "FD vs base"],
        seeds), ""] if seeds else []
    rows = [[name, f"{r['istd']:.3f}", f"{r['mean_step']:.2f}", f"{r['fd']:.2f}", f"{r['acc']:.3f}",
             f"{r['ddim_psnr_g1.0']:.2f} / {r['ddim_psnr_g1.5']:.2f}",
             f"{r['ddim_ssim_g1.0']:.3f} / {r['ddim_ssim_g1.5']:.3f}",
             f"{r['nti_psnr']:.2f} / {r['nti_ssim']:.3f}" if "nti_psnr" in r else "-"]
            for name, r in results.items() if name != "vae"]
    if "vae" in results:
        rows.append(["VAE reconstruction (ceiling)", "", "", "", "", f"{results['vae']['psnr']:.2f}",
                     f"{results['vae']['ssim']:.3f}", ""])
    return "\n".join(seed_table + [_harness.markdown_table(
        ["model", "ISTD", "mean step", "FD-digits", "acc", "DDIM-inv PSNR g1 / g1.5", "SSIM g1 / g1.5",
         "NTI PSNR / SSIM"], rows)])


if __name__ == "__main__":
    _harness.main(main)
