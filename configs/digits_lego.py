r"""LEGO bricks and their DiT baseline on the embedded digits (16x16 grey, pixel space), from scratch.

  python -m experiments.main --config configs/digits_lego.py:pg --workdir workdirs/lego_pg
  python -m experiments.lego_digits --out workdirs/lego_digits   # all of them + the tables

Arguments (comma-separated): one model -- `pg` (progressive growth: tiles 4 -> 8 -> 16),
`pr` (progressive refinement: 16 -> 8 -> 4), `u` (LEGO-U: 16 -> 4 -> 16) or `dit` (a DiT of
similar size, patch 2) -- plus optionally `sub` (the paper's patch subsampling: half of each
patch brick's tiles per example) and `tiny` (seconds; what the tests run).

The bricks follow the paper's rule for token sizes (p = r / 2, so a patch brick sees 2x2 tokens
per tile; the image brick uses p = 2) and its S-size depth ratios (PG 1:2:3 ~ 2:4:6), at width 64.
All models train with EDM's preconditioning (sigma_data 0.5, ln sigma ~ N(-1.2, 1.2^2)), every
brick supervised with the same weight, for the same steps and batch; they sample with EDM's Heun
sampler (18 steps, 35 evaluations) under guidance 1.5.

Expected on the 2-core CPU: ~10 min per model (3,000 steps at batch 64); FD-digits (500 samples,
results.json "heun18") about 18.9 for pg, 10.1 for pr, 9.5 for dit, 91 for pg,sub (README, LEGO
section, has the whole comparison).
"""
import ml_collections

from configs import _lego

WIDTH, HEADS = 64, 4
STACKS = {  # (r, p, depth, width, num_heads), bottom brick first
    "pg": [(4, 2, 1, WIDTH, HEADS), (8, 4, 2, WIDTH, HEADS), (16, 2, 3, WIDTH, HEADS)],
    "pr": [(16, 2, 3, WIDTH, HEADS), (8, 4, 2, WIDTH, HEADS), (4, 2, 1, WIDTH, HEADS)],
    "u": [(16, 2, 2, WIDTH, HEADS), (4, 2, 2, WIDTH, HEADS), (16, 2, 2, WIDTH, HEADS)],
}


VARIANTS = ("pg", "pr", "u", "dit", "pg,sub", "pr,sub", "pg,tiny")  # the arguments get_config takes (config_loading.known_fields reads each)

def get_config(arg: str = "pg") -> ml_collections.ConfigDict:
    args = [a for a in arg.split(",") if a]
    model = [a for a in args if a in (*STACKS, "dit")]
    unknown = [a for a in args if a not in (*STACKS, "dit", "sub", "tiny")]
    if unknown or len(model) != 1:
        raise ValueError(f"configs/digits_lego.py:{arg}: give one of pg, pr, u, dit, optionally "
                         f"with ',sub' and/or ',tiny' (e.g. 'pg,sub').")
    name = model[0]

    if name == "dit":
        model = dict(name="dit", patch_size=2, width=WIDTH, depth=6, num_heads=HEADS,
                     mlp_ratio=4.0, dtype="float32", param_dtype="float32", remat=False, attention="auto")
    else:
        model = dict(name="lego", stack=[list(b) for b in STACKS[name]], mlp_ratio=4.0,
                     dtype="float32", param_dtype="float32", remat=False, attention="auto")
    c = _lego.edm_config(model, dict(name="digits", image_size=16, channels=1), total_steps=3000,
                         batch_size=64, lr=1e-3, ema_decay=0.998, num_classes=10,
                         tile_fraction=0.5 if "sub" in args else 1.0, guidance_scale=1.5,
                         num_steps=18, tags=("digits", "lego", name))
    if "tiny" in args:
        c.total_steps = 4
        c.batch_size = 8
        for brick in c.model.get("stack", []):
            brick[2], brick[3], brick[4] = 1, 16, 2
        if name == "dit":
            c.model.update(width=16, depth=1, num_heads=2)
        c.optimizer.warmup_steps = 1
        c.log_every_steps = 2
        c.checkpoint.every_steps = 2
        c.sample.update(every_steps=4, num_steps=2, num_images=4)
        c.eval.update(num_steps=2, num_samples=16, batch_size=16)
        c.wandb.mode = "disabled"
    return c
