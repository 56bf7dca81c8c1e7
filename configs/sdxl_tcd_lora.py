r"""TCD-LoRA for SDXL (r = 64; both text encoders, pooled embeds, time ids; zero uncond embeds).

  python -m experiments.main --config configs/sdxl_tcd_lora.py:/path/to/stable-diffusion-xl-base-1.0 --workdir W

The LCD step with the trajectory consistency function (objectives/tcd.py) on one base UNet, as
LCM-LoRA (the target is the live adapters under stop_gradient). Defaults: the community TCD
recipe: lr 4.5e-6, LoRA r 64 (alpha 64), L2 loss; w in [3, 15] as the SDXL LCD scripts; samples
with TCD's sampler (gamma 0.3, 4 steps, no CFG).
Expected: compiles ahead of time, then trains (not run here: no weights on this machine).
"""
from configs._sd_lcd import lcd_config


def get_config(pretrained: str = ""):
    return lcd_config(pretrained, image_size=1024, prediction_type="epsilon", lora_rank=64,
                      w_min=3.0, w_max=15.0, lr=4.5e-6, batch_size=8, objective="tcd", loss="l2",
                      sampler="tcd")
