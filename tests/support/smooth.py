"""The tiny Smooth Diffusion config: configs/digits_smooth.py:tiny on the tiny LCD teacher's DiT
(support.lcd), 8x8 digits (test_smooth, parallel_check)."""
from configs import digits_smooth


def tiny_config(**smooth):
    c = digits_smooth.get_config("tiny")
    c.model.update(patch_size=2, width=32, depth=1, num_heads=2)
    c.data.image_size = 8
    c.optimizer.update(lr=1e-3, eps=1e-4)
    if "lora" in smooth:
        c.smooth.lora = smooth.pop("lora")
    c.smooth.update(sample_posterior=True, cond_drop_prob=0.25, **smooth)
    return c
