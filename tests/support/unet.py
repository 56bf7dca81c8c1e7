"""Tiny random diffusers UNet configs and the two forwards compared on them (test_unet, test_lora,
test_pipeline)."""
import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

BASE = dict(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(8, 16),
            layers_per_block=1, norm_num_groups=4, cross_attention_dim=12, attention_head_dim=2,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
CONFIGS = {
    "sd1": BASE,
    "sd2": dict(BASE, use_linear_projection=True, attention_head_dim=(1, 2), upcast_attention=True,
                layers_per_block=2),
    "sdxl": dict(BASE, use_linear_projection=True, transformer_layers_per_block=(1, 2),
                 down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=16,
                 addition_embed_type="text_time", addition_time_embed_dim=4,
                 projection_class_embeddings_input_dim=8 + 6 * 4),
    "lcm_w": dict(BASE, time_cond_proj_dim=6),
    "classes": dict(BASE, num_class_embeds=11, down_block_types=("DownBlock2D", "DownBlock2D"),
                    up_block_types=("UpBlock2D", "UpBlock2D"), mid_block_type="UNetMidBlock2D",
                    in_channels=1, out_channels=1),
}


def random_torch(model_class, config, seed=0):
    """A diffusers model with every weight moved off its init (norms 1/0, zero biases), so that
    all of them matter."""
    torch.manual_seed(seed)
    model = model_class(**config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model


def random_torch_unet(config, seed=0):
    return random_torch(diffusers.UNet2DConditionModel, config, seed)


def inputs(config, b=2, size=8, seed=1):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((b, config.get("in_channels", 4), size, size)).astype(np.float32)
    kw = {"encoder_hidden_states": rng.standard_normal((b, 5, config["cross_attention_dim"]))
          .astype(np.float32)}
    if config.get("num_class_embeds"):
        kw["class_labels"] = np.array([3, 10][:b])
    if config.get("time_cond_proj_dim"):
        kw["timestep_cond"] = rng.standard_normal((b, config["time_cond_proj_dim"])).astype(np.float32)
    if config.get("addition_embed_type") == "text_time":
        kw["added_cond"] = {"text_embeds": rng.standard_normal((b, 8)).astype(np.float32),
                            "time_ids": np.array([[16, 16, 0, 0, 16, 16]] * b, np.float32)}
    return x, np.array([999, 37][:b]), kw


def torch_forward(model, x, t, kw):
    tk = {k: torch.from_numpy(v) for k, v in kw.items() if k != "added_cond"}
    if "added_cond" in kw:
        tk["added_cond_kwargs"] = {k: torch.from_numpy(v) for k, v in kw["added_cond"].items()}
    with torch.no_grad():
        return model(torch.from_numpy(x), torch.from_numpy(t), **tk).sample.numpy()


def jax_forward(module, params, x, t, kw):
    jk = {k: (jax.tree.map(jnp.asarray, v)) for k, v in kw.items()}
    out = module.apply({"params": params}, jnp.asarray(x.transpose(0, 2, 3, 1)), jnp.asarray(t), **jk)
    return np.asarray(out).transpose(0, 3, 1, 2)
