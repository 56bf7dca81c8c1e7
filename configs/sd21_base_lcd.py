r"""SD 2.1-base, full-parameter LCD (eps, 512^2).

  python -m experiments.main --config configs/sd21_base_lcd.py:/path/to/stable-diffusion-2-1-base --workdir W

Expected: compiles ahead of time, then trains at w in [5.0, 15.0], lr 1e-6, batch 16 (not run
here: no weights on this machine). Data, paper defaults and memory: configs/_sd_lcd.py.
"""
from configs._sd_lcd import lcd_config


def get_config(pretrained: str = ""):
    return lcd_config(pretrained, image_size=512, prediction_type="epsilon", lora_rank=0,
                      w_min=5.0, w_max=15.0, lr=1e-6, batch_size=16)
