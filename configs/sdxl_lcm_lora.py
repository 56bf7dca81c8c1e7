r"""LCM-LoRA for SDXL (r = 64; both text encoders, pooled embeds, time ids; zero uncond embeds).

  python -m experiments.main --config configs/sdxl_lcm_lora.py:/path/to/stable-diffusion-xl-base-1.0 --workdir W

Expected: compiles ahead of time, then trains at w in [3.0, 15.0], lr 1e-4, batch 8 (not run
here: no weights on this machine). Data, paper defaults and memory: configs/_sd_lcd.py.
"""
from configs._sd_lcd import lcd_config


def get_config(pretrained: str = ""):
    return lcd_config(pretrained, image_size=1024, prediction_type="epsilon", lora_rank=64,
                      w_min=3.0, w_max=15.0, lr=1e-4, batch_size=8)
