"""The AutoencoderKL port vs diffusers on tiny random configs (fp32, <= 1e-4); loading, export."""
import dataclasses
import json
import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from safetensors.numpy import load_file, save_file  # noqa: E402

from conftest import f32_tol  # noqa: E402
from lcm_jax.models import convert, vae  # noqa: E402
from support.unet import random_torch  # noqa: E402

BASE = dict(in_channels=3, out_channels=3, block_out_channels=(8, 16), layers_per_block=1,
            norm_num_groups=4, latent_channels=4, sample_size=32,
            down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2)
CONFIGS = {
    "sd": BASE,
    "plain": dict(BASE, use_quant_conv=False, use_post_quant_conv=False, layers_per_block=2,
                  mid_block_add_attention=False, scaling_factor=0.13025, shift_factor=0.1),
}
TOL = 1e-4


def nhwc(t):
    return jnp.asarray(t.detach().numpy().transpose(0, 2, 3, 1))


def nchw(a):
    return torch.from_numpy(np.asarray(a).transpose(0, 3, 1, 2).copy())


def max_err(ours, ref):
    return float(np.max(np.abs(np.asarray(ours) - np.asarray(ref))))


def random_torch_vae(config, seed=0):
    return random_torch(diffusers.AutoencoderKL, config, seed)


@pytest.fixture(scope="session", params=sorted(CONFIGS))
def case(request, tmp_path_factory):
    """The torch reference, its saved folder, our loaded copy and one compiled encode/decode."""
    model = random_torch_vae(CONFIGS[request.param])
    folder = str(tmp_path_factory.mktemp(request.param))
    model.save_pretrained(folder, safe_serialization=True)
    module, params = vae.from_pretrained(folder)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        post = model.encode(x).latent_dist
        ref = dict(mean=post.mean, logvar=post.logvar, dec=model.decode(post.mean).sample)
    mean, logvar = vae._encode(module, params, nhwc(x))  # the compiled encoder the helpers share
    return dict(name=request.param, model=model, folder=folder, module=module, params=params,
                x=x, ref=ref, mean=mean, logvar=logvar)


def test_encode_decode_match_diffusers(case):
    m = case["module"]
    dec = vae._decode(m, case["params"], case["mean"])
    errs = {k: max_err(ours, nhwc(case["ref"][k]))
            for k, ours in (("mean", case["mean"]), ("logvar", case["logvar"]), ("dec", dec))}
    print(case["name"], "max abs errors", errs)
    assert max(errs.values()) <= TOL, errs
    assert float(np.std(np.asarray(dec))) > 0.1  # a non-trivial output


def test_sample_and_scaled_latents(case):
    m, p, c = case["module"], case["params"], case["module"].config
    mean, logvar = case["mean"], case["logvar"]
    rng = jax.random.PRNGKey(0)
    z = m.sample(mean, logvar, rng)
    eps = jax.random.normal(rng, mean.shape)
    noise = np.exp(0.5 * np.asarray(logvar)) * eps
    # XLA's exp vs numpy's (vectorised per CPU): a few ulps of the terms, not of z (they cancel).
    np.testing.assert_allclose(z, mean + noise, rtol=0, atol=f32_tol(8, mean, noise))
    latents = m.encode_to_latents(p, nhwc(case["x"]), rng)
    np.testing.assert_allclose(latents, (z - (c.shift_factor or 0)) * c.scaling_factor,
                               rtol=1e-5, atol=1e-5)
    # decode_latents undoes the scaling: same images as decoding the unscaled sample
    images = m.decode_latents(p, latents)
    assert max_err(images, vae._decode(m, p, z)) <= 1e-4
    # per-channel statistics (SDXL pipelines' latents_mean / latents_std) take over from the shift
    stats = dataclasses.replace(c, latents_mean=(1., 2., 3., 4.), latents_std=(2.,) * 4)
    shift, scale = vae.AutoencoderKL(stats)._latent_stats()
    np.testing.assert_allclose((z - shift) * scale, (z - jnp.arange(1., 5.)) * c.scaling_factor / 2,
                               rtol=1e-6)


def test_round_trip_to_diffusers(case, tmp_path):
    """ours -> save_pretrained -> diffusers' from_pretrained: the same weights and outputs."""
    config = convert.read_config(case["folder"])
    vae.save_pretrained(str(tmp_path), config, case["params"])
    back = diffusers.AutoencoderKL.from_pretrained(str(tmp_path)).eval()
    want = case["model"].state_dict()
    got = back.state_dict()
    assert set(got) == set(want)
    assert all(torch.equal(got[k], want[k]) for k in want)
    with torch.no_grad():
        assert torch.equal(back.encode(case["x"]).latent_dist.mean, case["ref"]["mean"])
    # a module built from scratch exports its own config
    vae.save_pretrained(str(tmp_path / "own"), case["module"].config.to_dict(), case["params"])
    own = convert.read_config(str(tmp_path / "own"))
    assert vae.VAEConfig.from_dict(own) == case["module"].config


@pytest.mark.parametrize("case", ["sd"], indirect=True)
def test_tiled_decode_matches_diffusers(case):
    model, m, p = case["model"], case["module"], case["params"]
    z = torch.randn(1, 4, 16, 16)
    model.enable_tiling()
    model.tile_latent_min_size, model.tile_sample_min_size = 8, 16  # 3 x 3 tiles, ragged edges
    try:
        with torch.no_grad():
            ref = model.decode(z).sample
    finally:
        model.disable_tiling()
    ours = m.decode_tiled(p, nhwc(z), tile=8, overlap=0.25)
    err = max_err(ours, nhwc(ref))
    print("tiled decode max abs error", err)
    assert ours.shape == (1, 32, 32, 3) and err <= TOL
    # a latent that fits in one tile is decoded whole
    small = nhwc(z)[:, :8, :8]
    assert max_err(m.decode_tiled(p, small, tile=8), vae._decode(m, p, small)) <= 1e-6


# ----------------------------------------------------------------------------------------------
# Loading: variants, legacy names, errors
# ----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def sd_case(tmp_path_factory):
    model = random_torch_vae(CONFIGS["sd"], seed=1)
    folder = str(tmp_path_factory.mktemp("sd_errors"))
    model.save_pretrained(folder, safe_serialization=True)
    return model, folder


def test_fp16_variant(sd_case, tmp_path):
    model, _ = sd_case
    model.half().save_pretrained(str(tmp_path), variant="fp16", safe_serialization=True)
    model.float()
    assert os.path.exists(tmp_path / "diffusion_pytorch_model.fp16.safetensors")
    _, params = vae.from_pretrained(str(tmp_path), variant="fp16")
    state = convert.flax_to_torch(params)
    want = {k: v.half().float().numpy() for k, v in model.state_dict().items()}
    assert all(np.array_equal(state[k], want[k]) for k in want)
    with pytest.raises(FileNotFoundError, match="fp16"):  # no plain file: it names what is there
        vae.from_pretrained(str(tmp_path))


def test_legacy_attention_names(sd_case, tmp_path):
    """Old checkpoints (query/key/value/proj_attn) load as diffusers loads them."""
    _, folder = sd_case
    state = load_file(os.path.join(folder, "diffusion_pytorch_model.safetensors"))
    legacy = {k.replace(".to_q.", ".query.").replace(".to_k.", ".key.").replace(".to_v.", ".value.")
              .replace(".to_out.0.", ".proj_attn."): v for k, v in state.items()}
    assert any(".proj_attn." in k for k in legacy)
    save_file(legacy, str(tmp_path / "diffusion_pytorch_model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps(convert.read_config(folder)))
    _, params = vae.from_pretrained(str(tmp_path))
    state_back = convert.flax_to_torch(params)
    assert set(state_back) == set(state)
    assert all(np.array_equal(state_back[k], state[k]) for k in state)


def test_errors(sd_case, tmp_path):
    _, folder = sd_case
    with pytest.raises(FileNotFoundError, match="does not exist"):
        vae.from_pretrained(str(tmp_path / "nowhere"))
    config = convert.read_config(folder)
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text(json.dumps(config))
    (pickled / "diffusion_pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(convert.ConversionError, match="pickle"):
        vae.from_pretrained(str(pickled))
    bad = tmp_path / "bad"
    state = load_file(os.path.join(folder, "diffusion_pytorch_model.safetensors"))
    state["decoder.conv_out.weight"] = state["decoder.conv_out.weight"][:2]
    del state["encoder.conv_in.bias"]
    convert.save_folder(str(bad), config, state)
    with pytest.raises(convert.ConversionError) as err:
        vae.from_pretrained(str(bad))
    assert "shape mismatch for decoder.conv_out.weight" in str(err.value)
    assert "missing key encoder.conv_in.bias" in str(err.value)
    with pytest.raises(ValueError, match="down_block_types"):
        vae.from_config(dict(config, down_block_types=["AttnDownEncoderBlock2D"] * 2))
    with pytest.raises(ValueError, match="act_fn"):
        vae.from_config(dict(config, act_fn="gelu"))
