r"""SD 2.1 (v-prediction, 768^2), full-parameter LCD; the v output becomes (x0, eps) before the solver.

  python -m experiments.main --config configs/sd21_lcd.py:/path/to/stable-diffusion-2-1 --workdir W

Expected: compiles ahead of time, then trains at w in [5.0, 15.0], lr 1e-6, batch 8 (not run
here: no weights on this machine). Data, paper defaults and memory: configs/_sd_lcd.py.
"""
from configs._sd_lcd import lcd_config


def get_config(pretrained: str = ""):
    return lcd_config(pretrained, image_size=768, prediction_type="v_prediction", lora_rank=0,
                      w_min=5.0, w_max=15.0, lr=1e-6, batch_size=8)
