"""The UNet port against diffusers' UNet2DConditionModel on tiny random configs (fp32, <= 1e-4)."""
import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from conftest import fast_compile  # noqa: E402
from lcm_jax.models import convert, unet  # noqa: E402

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


def random_torch_unet(config, seed=0):
    torch.manual_seed(seed)
    model = diffusers.UNet2DConditionModel(**config).eval()
    with torch.no_grad():  # move every weight off its init (norms 1/0, zero biases) so all matter
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model


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


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def pair(request, tmp_path_factory):
    config = CONFIGS[request.param]
    model = random_torch_unet(config)
    folder = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(folder, safe_serialization=True)
    module, params = unet.from_pretrained(str(folder))
    return request.param, config, model, module, params, folder


def test_forward_matches_diffusers(pair):
    name, config, model, module, params, _ = pair
    x, t, kw = inputs(config)
    err = np.max(np.abs(jax_forward(module, params, x, t, kw) - torch_forward(model, x, t, kw)))
    assert err <= 1e-4, f"{name}: max abs error {err:.3g}"


def test_export_round_trip_loads_in_diffusers(pair, tmp_path):
    name, config, model, module, params, folder = pair
    unet.save_pretrained(str(tmp_path), convert.read_config(str(folder)), params)
    reloaded = diffusers.UNet2DConditionModel.from_pretrained(str(tmp_path)).eval()
    x, t, kw = inputs(config, seed=5)
    np.testing.assert_array_equal(torch_forward(reloaded, x, t, kw), torch_forward(model, x, t, kw))


def test_remat_and_bf16_switches():
    config = CONFIGS["classes"]
    x, t, kw = inputs(config)
    xj, tj, kw = jnp.asarray(x.transpose(0, 2, 3, 1)), jnp.asarray(t), jax.tree.map(jnp.asarray, kw)
    module = unet.from_config(dict(config))
    params = module.init(jax.random.PRNGKey(0), xj, tj, **kw)["params"]
    remat = unet.from_config(dict(config), remat=True)
    bf16 = unet.from_config(dict(config), dtype=jnp.bfloat16)

    def check(p):
        loss = lambda m: lambda q: jnp.sum(m.apply({"params": q}, xj, tj, **kw) ** 2)
        return (jax.grad(loss(module))(p), jax.grad(loss(remat))(p),
                module.apply({"params": p}, xj, tj, **kw), bf16.apply({"params": p}, xj, tj, **kw))

    g0, g1, ref, low = fast_compile(check, params)
    for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1)):  # same grads up to fp32 reordering
        assert float(jnp.max(jnp.abs(a - b))) <= 1e-5 * max(1.0, float(jnp.max(jnp.abs(a))))
    assert low.dtype == jnp.float32
    assert float(jnp.max(jnp.abs(low - ref))) < 0.1 * float(jnp.max(jnp.abs(ref)))


def test_unsupported_config_names_the_field():
    with pytest.raises(ValueError, match="resnet_time_scale_shift"):
        unet.from_config(dict(BASE, resnet_time_scale_shift="scale_shift"))
    with pytest.raises(ValueError, match="down_block_types"):
        unet.from_config(dict(BASE, down_block_types=("AttnDownBlock2D", "DownBlock2D")))


def test_shape_mismatch_and_missing_keys_are_reported(pair):
    name, config, model, module, params, folder = pair
    state = convert.load_state_dict(str(folder))
    state["conv_in.weight"] = np.concatenate([state["conv_in.weight"]] * 2, axis=1)
    del state["conv_out.bias"]
    with pytest.raises(convert.ConversionError, match="conv_in.weight") as e:
        convert.torch_to_flax(state, unet.abstract_params(module))
    assert "missing key conv_out.bias" in str(e.value)
