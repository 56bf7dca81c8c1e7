r"""SD 2.1 (v-prediction, 768^2), full-parameter LCD. The teacher's v output is converted to (x0, eps) before the solver step (the official LCD script used raw v as noise).

Command (a local diffusers pipeline folder; nothing is downloaded):
  python experiments/main.py --config configs/sd21_lcd.py:/path/to/stable-diffusion-2-1 \
      --workdir workdirs/sd21_lcd --config.data.path='/data/laion/{00000..00099}.tar'

Expected: the step compiles ahead of time (memory known before the first batch); on one 80 GB
GPU or TPU host this trains at the paper's settings. Not run here (no weights on this machine);
experiments/benchmark.py --suite lcd_memory reports the compiled memory of this step.
Paper defaults (documented, not all used): w in [2, 14], k = 20 (N = 50), DDIM solver, lr 8e-6,
batch 72, EMA 0.999943 (the public scripts: w in [5, 15] (SDXL [3, 15]), lr 1e-6 full / 1e-4
LoRA, batch 12-16 per GPU, EMA 0.95, pseudo-Huber c = 0.001).
"""
from configs._sd_lcd import lcd_config


def get_config(pretrained: str = ""):
    return lcd_config(pretrained, image_size=768, prediction_type="v_prediction", lora_rank=0,
                      w_min=5.0, w_max=15.0, lr=1e-6, batch_size=8)
