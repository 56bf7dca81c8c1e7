r"""LCF: consistency fine-tuning of a distilled SD 1.5 LCM on your own captioned images, no teacher.

  python -m experiments.main --config configs/sd15_lcf.py:/path/to/LCM_Dreamshaper_v7 --workdir W \
      --config.data.path=/data/pokemon   # images + captions (metadata.jsonl 'text', or .txt sidecars)

The folder is an LCM pipeline (its UNet has time_cond_proj_dim = 256, the w-embedding input),
fine-tuned full-parameter with LCD's step where the teacher's solver step is replaced by the
forward process on the same image and noise (objectives/lcf.py; Algorithm 4). Defaults: the
paper's Pokemon / Simpsons fine-tuning (768^2, lr 8e-6, 30K iterations; 90% of the images to train),
EMA target 0.95, skip k = 20, w in [5, 15] embedded as in distillation, pseudo-Huber. Data: an
image folder (`data.name='folder'`); tfds and webdataset work the same way.
Options (configs/digits_lcf.py shows them): `lcd.k_schedule='doubling'` (the skip curriculum: N
from `lcd.n_start` grid points, k = 1000 / 5 = 200, doubling to 50, k = 20, in iCT's stages over
total_steps), `lcd.target='online'`, `optimizer.decay='constant'`.
Expected: compiles ahead of time, then trains (not run here: no weights on this machine).
"""
from configs._sd_lcd import lcd_config


def get_config(pretrained: str = ""):
    c = lcd_config(pretrained, image_size=768, prediction_type="epsilon", lora_rank=0,
                   w_min=5.0, w_max=15.0, lr=8e-6, batch_size=16, objective="lcf")
    c.total_steps = 30_000
    c.data.update(name="folder", path="", caption_key="text", random_crop=True)
    return c
