r"""SD 1.5, full-parameter TCD (Trajectory Consistency Distillation, eps, 512^2).

  python -m experiments.main --config configs/sd15_tcd.py:/path/to/stable-diffusion-v1-5 --workdir W

The LCD step with the trajectory consistency function (objectives/tcd.py). Defaults: the
community TCD recipe (TCD's authors released no training code): lr 4e-6, L2 loss, EMA target
0.95, DDIM skip-step solver k = 20, w in [5, 15] as the SD LCD scripts; samples with TCD's
strategic stochastic sampler (gamma 0.3, 4 steps).
Expected: compiles ahead of time, then trains (not run here: no weights on this machine).
"""
from configs._sd_lcd import lcd_config


def get_config(pretrained: str = ""):
    return lcd_config(pretrained, image_size=512, prediction_type="epsilon", lora_rank=0,
                      w_min=5.0, w_max=15.0, lr=4e-6, batch_size=16, objective="tcd", loss="l2",
                      sampler="tcd", ema_decay=0.95)
