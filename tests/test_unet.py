"""The UNet port against diffusers' UNet2DConditionModel on tiny random configs (fp32, <= 1e-4)."""
import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from conftest import fast_compile  # noqa: E402
from lcm_jax.models import convert, unet  # noqa: E402
from support.unet import (BASE, CONFIGS, inputs, jax_forward, random_torch_unet,  # noqa: E402
                          torch_forward)


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
