r"""LEGO-S on CelebA 64x64 (unconditional, pixel space), the paper's Table 1 setting.

  python -m experiments.main --config configs/lego_celeba64.py:pg --workdir workdirs/celeba_pg \
      --config.data.path=/data/celeba/img_align_celeba

Arguments: `pg` or `pr`. Data: a local folder of the aligned CelebA images (data.name='folder';
or tfds 'celeb_a' prepared locally with --config.data.name=tfds --config.data.tfds_name=celeb_a),
center-cropped and resized to 64, random flips. Unconditional (num_classes 0). Recipe: Adam lr 1e-4,
batch 512 (REFERENCE.md), EDM. Not run on this machine (no CelebA).
Expected: the paper's Table 1 LEGO-S CelebA-64 FID (not in our references; compare with DiT-S).
"""
from configs import _lego


VARIANTS = ("pg", "pr")  # the arguments get_config takes (config_loading.known_fields reads each)

def get_config(arg: str = "pg"):
    if arg not in ("pg", "pr"):
        raise ValueError(f"configs/lego_celeba64.py:{arg}: use 'pg' or 'pr'.")
    return _lego.edm_config(
        _lego.lego_model(f"{arg.upper()}-64", "S"),
        dict(name="folder", path="", image_size=64, channels=3, random_flip=True),
        total_steps=500_000, batch_size=512, lr=1e-4, ema_decay=0.9999, num_classes=0,
        guidance_scale=1.0, num_steps=40, tags=("celeba64", "lego", arg))
