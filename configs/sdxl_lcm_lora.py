r"""LCM-LoRA for SDXL (r = 64; both text encoders, pooled embeds and time ids; zero embeddings for the unconditional branch).

Command (a local diffusers pipeline folder; nothing is downloaded):
  python experiments/main.py --config configs/sdxl_lcm_lora.py:/path/to/stable-diffusion-xl-base-1.0 \
      --workdir workdirs/sdxl_lcm_lora --config.data.path='/data/laion/{00000..00099}.tar'

Expected: the step compiles ahead of time (memory known before the first batch); on one 80 GB
GPU or TPU host this trains at the paper's settings. Not run here (no weights on this machine);
experiments/benchmark.py --suite lcd_memory reports the compiled memory of this step.
Paper defaults (documented, not all used): w in [2, 14], k = 20 (N = 50), DDIM solver, lr 8e-6,
batch 72, EMA 0.999943 (the public scripts: w in [5, 15] (SDXL [3, 15]), lr 1e-6 full / 1e-4
LoRA, batch 12-16 per GPU, EMA 0.95, pseudo-Huber c = 0.001).
"""
from configs._sd_lcd import lcd_config


def get_config(pretrained: str = ""):
    return lcd_config(pretrained, image_size=1024, prediction_type="epsilon", lora_rank=64,
                      w_min=3.0, w_max=15.0, lr=1e-4, batch_size=8)
