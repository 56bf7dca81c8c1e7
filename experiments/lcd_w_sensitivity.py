r"""How much a w-conditioned LCM student's prediction moves with w, beside its teacher's guidance.

  python -m experiments.lcd_w_sensitivity --workdir workdirs/digits_lcd --out workdirs/cd_study \
      --run base --run wide:lcd.w_min=0.0,lcd.w_max=2.0 [--w 0,2] [--json OUT.json]

For each finished student OUT/NAME of experiments/consistency_digits.py (NAME[:overrides] as
there, restored, not trained), on one batch of training latents noised at t = 999 / 759 / 499 /
259 (the same noise for every run): the RMS of f(x_t, w_hi) - f(x_t, w_lo), the student's
consistency-function output at the two guidance scales, beside the RMS of the teacher's one-step
guided x0 difference x0_c + w (x0_c - x0_u) between the same two w. A student that serves every
guidance must move with w about as its target does; one that averages over w barely moves.
"""
import argparse
import json
import os

from experiments import _harness, consistency_digits

TIMESTEPS = (999, 759, 499, 259)


def sensitivity(objective, params, frozen, batch, w_lo: float, w_hi: float) -> dict:
    """{t: {student, teacher, student_over_teacher}} RMS differences between w_lo and w_hi."""
    import jax
    import jax.numpy as jnp

    from lcm_jax.diffusion import schedule as sched

    b = batch["label"].shape[0]
    z = objective.latent.encode(batch, frozen, jnp.zeros((b,) + objective.latent.shape))
    cond, uncond = objective.conditioning.encode(batch, frozen)
    noise = jax.random.normal(jax.random.PRNGKey(1), z.shape)
    rms = lambda a: float(jnp.sqrt(jnp.mean(a ** 2)))
    out = {}
    for t_value in TIMESTEPS:
        t = jnp.full((b,), t_value)
        x_t = sched.add_noise(z, noise, *objective.schedule.alpha_sigma(t))
        student = lambda w: objective.boundary(params, x_t, t, cond, objective.w_embedding(jnp.full((b,), w)), None)
        x0_c, x0_u = (objective.denoise(objective.base.net, frozen["base"], x_t, t, c)[0] for c in (cond, uncond))
        moved, target = rms(student(w_hi) - student(w_lo)), rms((w_hi - w_lo) * (x0_c - x0_u))
        out[str(t_value)] = dict(student=round(moved, 4), teacher=round(target, 4),
                                 student_over_teacher=round(moved / target, 3))
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", required=True, help="README command 1's workdir (VAE, teacher)")
    parser.add_argument("--out", required=True, help="experiments/consistency_digits.py's OUT")
    parser.add_argument("--run", action="append", default=[], help="NAME[:field=value,...]")
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--w", default="0,2", help="the two guidance weights w (g = 1 + w)")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()

    import jax
    import jax.numpy as jnp

    from lcm_jax import objectives, train
    from lcm_jax.objectives import consistency

    w_lo, w_hi = (float(w) for w in args.w.split(","))
    base, pipeline, teacher, _ = consistency_digits.load_chain(args.workdir)
    batch = {k: jnp.asarray(v) for k, v in train.peek(pipeline).items() if v.dtype.kind not in "USO"}
    results = {}
    for text in args.run:
        name, overrides = _harness.split_run(text)
        config = consistency_digits.run_config(overrides, args.steps)
        config.wandb.mode = "disabled"
        objective = consistency.ConsistencyObjective(config, teacher, objectives.module("lcd").STRATEGY)
        state = train.run(config, os.path.join(args.out, name), objective, pipeline)  # restores
        results[name] = sensitivity(objective, state.ema_params, jax.device_put(objective.frozen),
                                    batch, w_lo, w_hi)
        print(name, results[name], flush=True)
    rows = [[name, *(f"{c['student']:.3f} / {c['teacher']:.3f} ({c['student_over_teacher']:.2f})"
                     for c in r.values())] for name, r in results.items()]
    print(_harness.markdown_table(["student", *(f"t = {t}" for t in TIMESTEPS)], rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(results, w=[w_lo, w_hi]), f, indent=2)


if __name__ == "__main__":
    _harness.main(main)
