r"""Class-conditional pixel diffusion on the embedded digits (the digits teacher).

Command (README command 1 runs it through experiments/main.py):
  python -m experiments.main --config configs/digits_diffusion.py --workdir workdirs/digits_diffusion

Expected on the 2-core CPU: 6,000 steps at batch 64 (16x16 grey, DiT patch 4, width 128, depth
4), then DDIM-50 class-conditional samples at guidance 2: FD-digits 14.0 and 99.4% classified
correctly by the digits classifier (results.json: "ddim50": {"fd": .., "acc": ..}; the README's
figure; the runtime was not re-measured at this commit).

Short arguments: `configs/digits_diffusion.py:tiny` is the seconds-long variant the tests use.
"""
import ml_collections

from lcm_jax import tracking


VARIANTS = ("", "tiny")  # the arguments get_config takes (config_loading.known_fields reads each)

def get_config(arg: str = "") -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.objective = "diffusion"
    c.total_steps = 6000
    c.batch_size = 64  # global, over all processes and devices

    c.data = ml_collections.ConfigDict(dict(name="digits", image_size=16, channels=1))

    c.model = ml_collections.ConfigDict(dict(
        name="dit", patch_size=4, width=128, depth=4, num_heads=4, mlp_ratio=4.0,
        num_classes=10, dtype="float32", param_dtype="float32", remat=False, attention="auto"))

    c.diffusion = ml_collections.ConfigDict(dict(
        beta_schedule="linear", beta_start=0.0001, beta_end=0.02, num_train_timesteps=1000,
        prediction_type="epsilon", min_snr_gamma=5.0, cond_drop_prob=0.1))

    c.optimizer = ml_collections.ConfigDict(dict(
        lr=1e-3, warmup_steps=100, decay="cosine", b1=0.9, b2=0.999, weight_decay=0.0,
        grad_clip=1.0))
    c.ema_decay = 0.999

    c.parallel = ml_collections.ConfigDict(dict(
        mode="jit",  # "jit" (NamedSharding over a ('data', 'fsdp') mesh) or "pmap"
        data=-1, fsdp=1,  # mesh axis sizes; -1 fills with the remaining devices
        fsdp_min_size=2 ** 16,  # params smaller than this stay replicated
        coordinator_address="", num_processes=0, process_id=-1,  # multi-host (or JAX env vars)
        compilation_cache_dir=""))  # e.g. ~/.cache/lcm_jax/xla: reruns skip compiling

    c.log_every_steps = 100
    c.checkpoint = ml_collections.ConfigDict(dict(every_steps=1000, keep=3))
    c.sample = ml_collections.ConfigDict(dict(
        every_steps=2000, sampler="ddim", num_steps=50, guidance_scale=2.0, num_images=40))
    c.eval = ml_collections.ConfigDict(dict(
        sampler="ddim", num_steps=50, guidance_scale=2.0, num_samples=500, batch_size=250))
    c.wandb = tracking.default_config(("digits", "diffusion"))

    if arg == "tiny":  # seconds on CPU: what the tests run
        c.total_steps = 6
        c.batch_size = 16
        c.model.update(width=32, depth=1, num_heads=2)
        c.optimizer.warmup_steps = 2
        c.log_every_steps = 2
        c.checkpoint.every_steps = 2
        c.sample.update(every_steps=6, num_steps=2, num_images=4)
        c.eval.update(num_steps=2, num_samples=20, batch_size=20)
        c.wandb.mode = "disabled"
    elif arg:
        raise ValueError(f"Unknown config argument {arg!r}; use '' or 'tiny'.")
    return c
