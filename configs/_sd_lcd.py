"""Shared builder of the Stable Diffusion consistency configs: LCD (sd15_lcd.py, sd21_*_lcd.py,
*_lcm_lora.py), TCD (sd15_tcd.py, sdxl_tcd_lora.py) and LCF (sd15_lcf.py); `sd_base` is what every
SD config shares (also sd15_smooth.py).

The teacher is a local diffusers pipeline folder, given as the config argument:
  --config configs/sd15_lcd.py:/path/to/stable-diffusion-v1-5
Nothing is downloaded: validation fails before anything compiles if the folder is missing.
Data: captioned images, webdataset shards (LAION subsets) by default:
  --config.data.path='/data/laion/{00000..00099}.tar'   (or data.name='folder', data.path=DIR)

Paper defaults (LCM, arXiv 2310.04378): w in [2, 14], k = 20 (N = 50), DDIM solver, lr 8e-6,
batch 72, EMA 0.999943. The public scripts (used here): w in [5, 15] (SDXL [3, 15]), lr 1e-6 full /
1e-4 LoRA, batch 12-16 per GPU, EMA 0.95, pseudo-Huber c = 0.001, LoRA alpha = rank.
Memory of the SD 1.5 step: experiments/benchmark.py --suite lcd_memory (README).
"""
import ml_collections

from lcm_jax import tracking
from lcm_jax.models.lora import LCM_LORA_TARGETS

PROMPTS = ("a photo of an astronaut riding a horse on mars",
           "a close-up portrait of an old fisherman, 35mm photograph",
           "a watercolor painting of a lighthouse at dawn",
           "a red sports car parked in front of a modern house")


def lcd_config(pretrained: str, *, image_size: int, prediction_type: str, lora_rank: int = 0,
               w_min: float = 5.0, w_max: float = 15.0, lr: float = 1e-6,
               batch_size: int = 16, objective: str = "lcd", loss: str = "huber",
               sampler: str = "lcm", ema_decay: float = 0.95) -> ml_collections.ConfigDict:
    """objective 'lcd', 'tcd' (the same step through TCD's trajectory function) or 'lcf' (the
    folder is an LCM, fine-tuned without a teacher); sampler 'lcm' or 'tcd' (gamma 0.3)."""
    c = sd_base(pretrained, objective, image_size=image_size, prediction_type=prediction_type,
                batch_size=batch_size, total_steps=4000 if lora_rank else 10_000)
    c.lcd = ml_collections.ConfigDict(dict(
        num_ddim_timesteps=50, solver="ddim", w_min=w_min, w_max=w_max, w_embedding_dim=256,
        loss=loss, huber_c=0.001, target="online" if lora_rank else "ema",
        sigma_data=0.5, timestep_scaling=10.0, zero_init_cond_proj=True,
        cond_proj_lr_scale=1.0,  # the w-embedding projection's lr factor (configs/digits_lcd.py)
        sample_posterior=True,  # latent_dist.sample(), as the SD LCD scripts
        k_schedule=None, n_start=5,  # the skip curriculum (configs/digits_lcd.py); None: k = 20
        lora=ml_collections.ConfigDict(dict(rank=lora_rank, alpha=float(lora_rank),
                                            targets=LCM_LORA_TARGETS,
                                            merged=False))  # True: merged kernels in the step
        if lora_rank else None))
    c.ema_decay = 0.0 if lora_rank else ema_decay  # LoRA: no EMA (samples show the live adapters)
    c.optimizer = ml_collections.ConfigDict(dict(
        lr=lr, warmup_steps=500 if not lora_rank else 100, decay="constant", b1=0.9, b2=0.999,
        eps=1e-8, weight_decay=0.01 if lora_rank else 0.0, grad_clip=1.0))
    c.checkpoint = ml_collections.ConfigDict(dict(every_steps=500, keep=3))
    c.sample = ml_collections.ConfigDict(dict(
        every_steps=500, sampler=sampler, gamma=0.3, num_steps=4, num_images=len(PROMPTS),
        guidance_scale=1.0 if lora_rank else 8.0,  # LCM: w = g - 1 embedded; LoRA: plain CFG
        prompts=PROMPTS))
    c.wandb = tracking.default_config((objective, "lora" if lora_rank else "full"))
    return c


def sd_base(pretrained: str, objective: str, *, image_size: int, prediction_type: str,
            batch_size: int, total_steps: int, seed: int = 0) -> ml_collections.ConfigDict:
    """What every SD config shares: the folder, webdataset captions, SD's schedule, the mesh."""
    c = ml_collections.ConfigDict()
    c.seed = seed
    c.objective = objective
    c.total_steps = total_steps
    c.batch_size = batch_size
    c.data = ml_collections.ConfigDict(dict(
        name="webdataset", path="", image_size=image_size, channels=3, caption_key="txt",
        random_crop=True, random_flip=False, shuffle_buffer=1000,
        prefetch=2))  # batches decoded ahead in a thread (0: in the training loop)
    c.model = ml_collections.ConfigDict(dict(
        name="unet", pretrained=pretrained, remat=True, clip_skip=None,
        dtype="float32",  # compute dtype
        param_dtype="float32",  # storage of the frozen teacher / VAE / text encoders ("bfloat16" halves
        # them; the trained params stay a float32 master copy)
        attention="auto"))  # "chunked" (memory-efficient) on CPU, XLA's on GPU / TPU
    c.diffusion = ml_collections.ConfigDict(dict(  # SD's; the folder's scheduler config is used
        beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
        num_train_timesteps=1000, prediction_type=prediction_type))
    c.parallel = ml_collections.ConfigDict(dict(
        mode="jit", data=-1, fsdp=1, fsdp_min_size=2 ** 16, coordinator_address="",
        num_processes=0, process_id=-1,
        compilation_cache_dir=""))  # e.g. ~/.cache/lcm_jax/xla: reruns skip compiling
    c.log_every_steps = 20
    return c
