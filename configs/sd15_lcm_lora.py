r"""LCM-LoRA for SD 1.5 (r = 64; one base UNet: teacher = base, student = base + LoRA).

  python -m experiments.main --config configs/sd15_lcm_lora.py:/path/to/stable-diffusion-v1-5 --workdir W

Expected: compiles ahead of time, then trains at w in [5.0, 15.0], lr 1e-4, batch 16 (not run
here: no weights on this machine). Data, paper defaults and memory: configs/_sd_lcd.py.
"""
from configs._sd_lcd import lcd_config


def get_config(pretrained: str = ""):
    return lcd_config(pretrained, image_size=512, prediction_type="epsilon", lora_rank=64,
                      w_min=5.0, w_max=15.0, lr=1e-4, batch_size=16)
