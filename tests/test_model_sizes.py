"""The real SD 1.5 / 2.1 / SDXL UNet configs (configs/models/*.json) build with the published
parameter counts, via jax.eval_shape (no weights, no memory), and equal diffusers' on torch's meta device."""
import json
import os

import jax
import pytest

from lcm_jax.models import unet

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PUBLISHED = {"sd15": 859_520_964, "sd21": 865_910_724, "sd21_base": 865_910_724,
             "sdxl": 2_567_463_684}  # "860M", "865M", "2.6B" in the model cards


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_unet_parameter_count(name):
    config = json.load(open(os.path.join(ROOT, "configs/models", f"{name}_unet.json")))
    count = sum(x.size for x in jax.tree.leaves(unet.abstract_params(unet.from_config(config))))
    assert count == PUBLISHED[name]
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    with torch.device("meta"):
        ref = diffusers.UNet2DConditionModel(**{k: v for k, v in config.items() if k[0] != "_"})
    assert count == sum(p.numel() for p in ref.parameters())
