r"""LEGO-U XL on ImageNet 256x256 in the Stable Diffusion VAE's latent space (32x32x4), the paper's
Table 3 setting (FID 2.59 with guidance, IS 338).

  python -m experiments.main --config configs/lego_imagenet256.py:/path/to/sd-vae-ft-ema \
      --workdir workdirs/in256_u --config.data.data_dir=/data/tensorflow_datasets

The argument is a local diffusers AutoencoderKL folder (nothing is downloaded); the step encodes
each batch with it (a posterior draw, frozen) and samples are decoded. Stack: `U-32` of
lcm_jax/models/lego.py at XL (the public code's depths 14, 10, 4, 10, 14: 1.26B parameters, the
paper's "1.2B"). Recipe: Adam lr 1e-4, batch 512, EDM,
bf16 compute, remat. Compiled memory: `python -m experiments.benchmark --suite lego_memory`.
Expected (the paper): FID-50k 2.59 and IS 338 with guidance. Not run on this machine.
"""
from configs import _lego


def get_config(vae: str = ""):
    return _lego.edm_config(
        _lego.lego_model("U-32", "XL", vae=vae or None),
        dict(name="tfds", tfds_name="imagenet2012", image_size=256, channels=3, label_key="label",
             data_dir="", random_flip=True, shuffle_buffer=50_000),
        total_steps=1_000_000, batch_size=512, lr=1e-4, ema_decay=0.9999, num_classes=1000,
        guidance_scale=1.5, num_steps=40, tags=("imagenet256", "lego", "u"))
