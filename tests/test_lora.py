"""LoRA: a parameter transform that diffusers (peft) loads and matches."""
import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
pytest.importorskip("peft")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from lcm_jax.errors import UserError  # noqa: E402
from lcm_jax.models import convert, lora, unet  # noqa: E402
from conftest import fast_compile  # noqa: E402
from support.unet import CONFIGS, inputs, jax_forward, random_torch_unet, torch_forward  # noqa: E402


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    config = CONFIGS["sd1"]
    model = random_torch_unet(config)
    folder = tmp_path_factory.mktemp("base")
    model.save_pretrained(folder, safe_serialization=True)
    module, params = unet.from_pretrained(str(folder))
    return config, folder, module, params


def random_lora(params, rank, seed=0):
    """LoRA with B moved off zero, so the adapter changes the output."""
    factors = lora.init(jax.random.PRNGKey(seed), params, rank=rank)
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda x: jnp.asarray(x + 0.2 * rng.standard_normal(x.shape), jnp.float32),
                        factors)


def test_targets_are_the_lcm_lora_set(base):
    _, _, _, params = base
    names = {convert.path_to_torch_key(p[:-1], "").rstrip(".").split(".")[-1]
             for p in convert.flatten(lora.init(jax.random.PRNGKey(0), params, rank=4))}
    assert names == {"to_q", "to_k", "to_v", "0", "proj_in", "proj_out", "proj", "2", "conv1",
                     "conv2", "conv_shortcut", "conv", "time_emb_proj"}


def test_init_rules_are_peft_and_diffusers_0_20():
    """init="peft" (the default) is the draw it always was, U(+-1/sqrt(fan_in)) with fan_in
    = in x window, as peft's layers; init="gaussian" is N(0, 1/rank^2) whatever the fan, as
    diffusers 0.20's LoRALinearLayer / LoRAConv2dLayer (Smooth Diffusion's). B = 0 for both."""
    base = {"attn": {"to_q": {"kernel": jnp.zeros((256, 512))}},
            "resnet": {"conv1": {"kernel": jnp.zeros((3, 3, 64, 128))}}}
    rng, rank, targets = jax.random.PRNGKey(3), 8, ("to_q", "conv1")
    peft_init = convert.flatten(lora.init(rng, base, targets, rank))
    gauss = convert.flatten(lora.init(rng, base, targets, rank, init="gaussian"))
    torch.manual_seed(0)
    peft_a = dict(zip(targets, _peft_a(rank)))
    with warnings.catch_warnings():  # diffusers deprecates these layers (peft is its backend now)
        warnings.simplefilter("ignore")
        from diffusers.models.lora import LoRAConv2dLayer, LoRALinearLayer
        diffusers_a = {"to_q": LoRALinearLayer(256, 512, rank).down.weight.detach(),
                       "conv1": LoRAConv2dLayer(64, 128, rank, kernel_size=3).down.weight.detach()}
    for i, (path, fan_in) in enumerate([(("attn", "to_q"), 256), (("resnet", "conv1"), 9 * 64)]):
        a, b = peft_init[path + ("lora_A",)], peft_init[path + ("lora_B",)]
        bound = 1 / np.sqrt(fan_in)  # peft: the draw of the code before INITS, bit for bit
        np.testing.assert_array_equal(a, jax.random.uniform(jax.random.fold_in(rng, i), a.shape,
                                                            jnp.float32, -bound, bound))
        ga = gauss[path + ("lora_A",)]
        assert not np.any(b) and not np.any(gauss[path + ("lora_B",)]) and ga.shape == a.shape
        # std within 6% (~4 sampling sigmas for 2k-5k draws) of the rule and of the library's layer
        np.testing.assert_allclose([np.std(a), float(peft_a[path[-1]].std())], bound / np.sqrt(3),
                                   rtol=0.06)
        np.testing.assert_allclose([np.std(ga), float(diffusers_a[path[-1]].std())], 1 / rank,
                                   rtol=0.06)
        assert abs(float(np.mean(ga))) < 4 / rank / np.sqrt(ga.size)
    with pytest.raises(UserError, match="not a LoRA init"):
        lora.init(rng, base, targets, rank, init="kaiming")


def _peft_a(rank):
    """peft's own lora_A weights for a Linear(256, 512) and a 3x3 Conv2d(64, 128)."""
    import peft

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.to_q, self.conv1 = torch.nn.Linear(256, 512), torch.nn.Conv2d(64, 128, 3)

    model = peft.get_peft_model(Model(), peft.LoraConfig(r=rank, lora_alpha=rank,
                                                         target_modules=["to_q", "conv1"]))
    return [m.lora_A["default"].weight.detach() for m in (model.base_model.model.to_q,
                                                         model.base_model.model.conv1)]


def test_lora_off_is_exactly_the_base_model(base):
    config, _, module, params = base
    factors = lora.init(jax.random.PRNGKey(0), params, rank=4)  # B = 0 at init
    x, t, kw = inputs(config)
    np.testing.assert_array_equal(jax_forward(module, lora.merge(params, factors, 4.0), x, t, kw),
                                  jax_forward(module, params, x, t, kw))
    restored = lora.unmerge(lora.merge(params, random_lora(params, 4), 8.0), random_lora(params, 4), 8.0)
    err = max(float(jnp.max(jnp.abs(a - b))) for a, b in
              zip(jax.tree.leaves(restored), jax.tree.leaves(params)))
    assert err < 1e-6


@pytest.mark.parametrize("rank,alpha", [(4, 4.0), (2, 8.0), (16, 16.0)])
def test_exported_lora_loads_into_diffusers_and_matches(base, tmp_path, rank, alpha):
    """Rank 16 exceeds the 8-channel layers' width: those are saved at rank 8 with a rank_pattern."""
    config, folder, module, params = base
    factors = random_lora(params, rank)
    lora.save(str(tmp_path), factors, alpha)
    loaded, loaded_alpha = lora.load(str(tmp_path))
    assert loaded_alpha == alpha and jax.tree.all(jax.tree.map(np.array_equal, loaded, factors))
    ours = jax_forward(module, lora.merge(params, factors, alpha), *inputs(config))
    model = diffusers.UNet2DConditionModel.from_pretrained(str(folder)).eval()
    base_out = torch_forward(model, *inputs(config))
    model.load_lora_adapter(str(tmp_path), weight_name=lora.WEIGHTS_NAME, prefix="unet",
                            adapter_name="lcm")
    theirs = torch_forward(model, *inputs(config))
    assert np.max(np.abs(theirs - base_out)) > 1e-2  # the adapter really changed the output
    assert np.max(np.abs(ours - theirs)) <= 1e-4


def test_gradients_flow_only_to_lora(base):
    config, _, module, params = base
    factors = random_lora(params, 2)
    x, t, kw = inputs(config)
    xj = jnp.asarray(x.transpose(0, 2, 3, 1))
    kwj = jax.tree.map(jnp.asarray, kw)
    loss = lambda f: jnp.mean(module.apply({"params": lora.merge(params, f, 2.0)}, xj, t, **kwj) ** 2)
    grads = fast_compile(jax.grad(loss), factors)
    assert jax.tree.structure(grads) == jax.tree.structure(factors)
    assert all(float(jnp.max(jnp.abs(g))) > 0 for g in jax.tree.leaves(grads))


def test_unmerged_forward_and_gradients_equal_the_merged_form(base):
    """x W + (x A) B applied at call time (lora.Unmerged, what training uses) vs the merged kernel,
    through nn.remat'd transformer blocks: every LoRA'd Dense and Conv (3x3 convs, strided
    downsamplers, 1x1 shortcuts) and their gradients."""
    from lcm_jax.models import Denoiser

    config, _, module, params = base
    factors, alpha = random_lora(params, 2), 4.0
    x, t, kw = inputs(config)
    xj, kwj = jnp.asarray(x.transpose(0, 2, 3, 1)), jax.tree.map(jnp.asarray, kw)
    net = Denoiser(module.clone(remat=True))
    merged = lambda f: net.apply(lora.merge(params, f, alpha), xj, t, kwj)
    unmerged = lambda f: net.apply(lora.Unmerged(params, f, alpha), xj, t, kwj)
    ours, theirs = fast_compile(unmerged, factors), fast_compile(merged, factors)
    assert float(jnp.max(jnp.abs(ours - net.apply(params, xj, t, kwj)))) > 1e-2  # the adapters act
    np.testing.assert_allclose(ours, theirs, atol=1e-5 * float(jnp.max(jnp.abs(theirs))))
    loss = lambda fn: lambda f: jnp.mean(fn(f) ** 2)
    g_ours, g_theirs = fast_compile(jax.grad(loss(unmerged)), factors), fast_compile(jax.grad(loss(merged)), factors)
    for a, b in zip(jax.tree.leaves(g_ours), jax.tree.leaves(g_theirs)):
        np.testing.assert_allclose(a, b, atol=1e-5 * float(jnp.max(jnp.abs(b))))
