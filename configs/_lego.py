"""Shared builder of EDM / LEGO configs (configs/digits_lego.py, lego_imagenet64.py, ...)."""
import ml_collections

from lcm_jax import tracking


def edm_config(model: dict, data: dict, *, total_steps: int, batch_size: int, lr: float,
               ema_decay: float, num_classes: int, tile_fraction: float = 1.0,
               guidance_scale: float = 1.5, num_steps: int = 18, tags=()) -> ml_collections.ConfigDict:
    """objective 'edm': EDM preconditioning (sigma_data 0.5, ln sigma ~ N(-1.2, 1.2^2)), label
    dropout 0.1, AdamW with warmup and cosine decay, Heun sampling under guidance."""
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.objective = "edm"
    c.total_steps = total_steps
    c.batch_size = batch_size  # global, over all processes and devices
    c.data = ml_collections.ConfigDict(data)
    c.model = ml_collections.ConfigDict(dict(model, num_classes=num_classes))
    c.edm = ml_collections.ConfigDict(dict(
        sigma_data=0.5, p_mean=-1.2, p_std=1.2, cond_drop_prob=0.1, tile_fraction=tile_fraction))
    c.optimizer = ml_collections.ConfigDict(dict(
        lr=lr, warmup_steps=min(100, total_steps // 10), decay="cosine", b1=0.9, b2=0.999,
        weight_decay=0.0, grad_clip=1.0))
    c.ema_decay = ema_decay
    c.parallel = ml_collections.ConfigDict(dict(
        mode="jit", data=-1, fsdp=1, fsdp_min_size=2 ** 16,
        coordinator_address="", num_processes=0, process_id=-1,
        compilation_cache_dir=""))  # e.g. ~/.cache/lcm_jax/xla: reruns skip compiling
    c.log_every_steps = 100
    c.checkpoint = ml_collections.ConfigDict(dict(every_steps=1000, keep=3))
    c.sample = ml_collections.ConfigDict(dict(
        every_steps=1000, sampler="heun", num_steps=num_steps, guidance_scale=guidance_scale,
        num_images=40, t_break=0.0, shifted_tiles=False, **CHURN))
    c.eval = ml_collections.ConfigDict(dict(
        sampler="heun", num_steps=num_steps, guidance_scale=guidance_scale, num_samples=500,
        batch_size=250, t_break=0.0, shifted_tiles=False, **CHURN))
    c.wandb = tracking.default_config(tags)
    return c


# shifted_tiles: on canvases above the training size, move LEGO's tile grid by half a tile every
# other noise level (objectives/edm.py: shifted_tiling) so tiles are not independent images.
# EDM's sampler: s_churn 0 is deterministic Heun (Algorithm 1); EDM's stochastic ImageNet-64
# setting (Algorithm 2) is s_churn=40, s_min=0.05, s_max=50, s_noise=1.003 (s_max None: no bound).
CHURN = dict(s_churn=0.0, s_min=0.0, s_max=None, s_noise=1.0)


def lego_model(layout: str, size: str, **extra) -> dict:
    return dict(name="lego", layout=layout, size=size, mlp_ratio=4.0, dtype="bfloat16",
                remat=True, attention="auto", param_dtype="float32", **extra)
