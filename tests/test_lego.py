"""LEGO bricks (models/lego.py) and their EDM objective (objectives/edm.py)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import f32_tol, fast_compile

from lcm_jax import config_checks, models
from lcm_jax.diffusion import edm as edm_math
from lcm_jax.models import lego
from lcm_jax.objectives import edm as edm_objective
from lcm_jax.objectives.edm import EDMObjective
from support.lego import digits_lego_config

W, H = 16, 2  # tiny brick width and heads
PG = ((4, 2, 1, W, H), (8, 4, 1, W, H), (16, 2, 1, W, H))
PR = tuple(reversed(PG))
U = ((16, 2, 1, W, H), (4, 2, 1, W, H), (16, 2, 1, W, H))


def random_params(module, shape, seed=0, scale=0.2):
    """Params with every leaf random (the zero-initialised adaLN and final layers included), so
    that outputs depend on every input."""
    x = jnp.zeros((1,) + shape)
    labels = jnp.zeros((1,), jnp.int32) if module.num_classes else None
    params = jax.jit(module.init)(jax.random.PRNGKey(seed), x, jnp.zeros((1,)), labels)["params"]
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.PRNGKey(seed + 1), len(leaves))
    return jax.tree.unflatten(tree, [scale * jax.random.normal(k, l.shape) for k, l in zip(keys, leaves)])


def test_tiles_round_trip_and_layout():
    x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 8, 12, 3)), jnp.float32)
    tiles = lego.to_tiles(x, 4)
    assert tiles.shape == (2, 6, 4, 4, 3)
    np.testing.assert_array_equal(tiles[:, 4], x[:, 4:8, 4:8])  # row 1, column 1 (row-major)
    np.testing.assert_array_equal(lego.from_tiles(tiles, 8, 12), x)


def test_coordinate_channels_span_the_whole_canvas():
    m = lego.coordinate_channels(8, 12)
    assert m.shape == (8, 12, 2)
    np.testing.assert_array_equal(m[0, 0], [-1, -1])
    np.testing.assert_array_equal(m[-1, -1], [1, 1])
    assert np.all(m[:, :, 0] == m[:, :1, 0]) and np.all(m[:, :, 1] == m[:1, :, 1])  # rows, columns
    # A brick's tile carries the global coordinates of its pixels: tiles differ.
    tiles = lego.to_tiles(jnp.asarray(m)[None], 4)[0]
    assert not np.allclose(tiles[0], tiles[1])


@pytest.mark.parametrize("stack", [PG, PR, U], ids=["PG", "PR", "U"])
@pytest.mark.parametrize("canvas", [(16, 32), (32, 16), (16, 16)])
def test_every_stack_runs_on_non_square_canvases(stack, canvas):
    module = lego.LEGO(stack=stack, num_classes=10)
    x = jnp.ones((2,) + canvas + (1,))
    params = jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0), x[:1, :16, :16], jnp.zeros(1),
                                                jnp.zeros(1, jnp.int32)))
    outs = jax.eval_shape(lambda p: module.apply({"params": p}, x, jnp.zeros(2), jnp.zeros(2, jnp.int32),
                                                 method="outputs"), params["params"])
    assert [o.shape for o in outs] == [(2,) + canvas + (1,)] * len(stack)


def test_canvas_must_be_a_multiple_of_the_tiles():
    module = lego.LEGO(stack=PG)
    with pytest.raises(ValueError, match="multiple of brick 2's tile size r=16"):
        module.init(jax.random.PRNGKey(0), jnp.zeros((1, 16, 24, 1)), jnp.zeros(1))


def test_tiles_are_refined_independently():
    """A one-brick stack: changing one tile's input changes that tile's output only; equal tile
    contents give different outputs (the coordinate channels)."""
    module = lego.LEGO(stack=((4, 2, 1, W, H),))
    params = random_params(module, (8, 8, 1))
    x = jnp.zeros((1, 8, 8, 1))
    f = jax.jit(lambda x: module.apply({"params": params}, x, jnp.zeros(1), None)).lower(x).compile(FAST)
    base = f(x)
    changed = f(x.at[0, 1, 2, 0].set(3.0)) - base  # a pixel in tile (0, 0)
    assert np.abs(changed[0, :4, :4]).max() > 1e-3
    mask = np.ones((8, 8), bool)
    mask[:4, :4] = False
    assert np.abs(changed[0][mask]).max() == 0.0
    assert np.abs(base[0, :4, :4] - base[0, :4, 4:]).max() > 1e-3


def _flops(f, *args):
    """XLA's FLOP count of the compiled program (lowest backend optimisation: compiles fast)."""
    return jax.jit(f).lower(*args).compile(FAST).cost_analysis()["flops"]


FAST = {"xla_backend_optimization_level": 0}


@pytest.mark.parametrize("stack", [PG, PR], ids=["PG", "PR"])
def test_skipping_removes_the_top_brick_from_the_program(stack):
    """num_bricks = K - 1 returns brick K - 1's output, and the compiled evaluation's FLOPs drop
    by the top brick's own FLOPs: it is not computed, not merely ignored."""
    module = lego.LEGO(stack=stack, num_classes=10)
    params = random_params(module, (16, 16, 1))
    x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 16, 16, 1)), jnp.float32)
    t, y = jnp.full((2,), 0.3), jnp.array([1, 10])
    run = lambda p, x, n: module.apply({"params": p}, x, t, y, num_bricks=n)
    outs = jax.jit(lambda p, x: module.apply({"params": p}, x, t, y, method="outputs"))(params, x)
    # Another brick's output would differ by O(1); eager vs jit fusions differ by an ulp or two.
    np.testing.assert_allclose(run(params, x, 2), outs[1], atol=1e-5)
    full, skipped = _flops(lambda p, x: run(p, x, 3), params, x), _flops(lambda p, x: run(p, x, 2), params, x)

    r = stack[-1][0]  # the top brick alone, on its tiles of [x, previous output, coordinates]
    top = lego.Brick(*stack[-1], out_channels=1)
    n = (16 // r) ** 2
    tiles = jnp.zeros((2 * n, r, r, 4))
    c = jnp.zeros((2 * n, W))
    top_flops = _flops(lambda p, tl, c: top.apply({"params": p}, tl, c), params["bricks_2"], tiles, c)
    assert abs((full - skipped) - top_flops) <= 0.1 * top_flops, (full, skipped, top_flops)
    assert skipped < full


def test_skip_phase_and_schedule():
    assert lego.skip_phase(PG) == "low_noise" and lego.skip_phase(U) == "low_noise"
    assert lego.skip_phase(PR) == "high_noise"
    assert edm_objective.skip_schedule(18, 0.5, "low_noise") == (9, 9)
    assert edm_objective.skip_schedule(18, 0.25, "high_noise") == (4, 14)  # first 4 skip
    assert edm_objective.skip_schedule(18, 0.0, "low_noise") == (18, 0)


def test_patch_subsampling_computes_only_the_chosen_tiles():
    module = lego.LEGO(stack=PG, num_classes=10)
    params = random_params(module, (16, 16, 1))
    x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 16, 16, 1)), jnp.float32)
    fill = jnp.full((2, 16, 16, 1), 7.0)
    idx = jnp.array([[0, 5, 9], [15, 2, 3]])
    args = (x, jnp.full((2,), 0.3), jnp.array([1, 2]))
    outputs = jax.jit(lambda *a, **kw: module.apply({"params": params}, *a, method="outputs", **kw))
    full = outputs(*args)
    sub = outputs(*args, tiles=[idx, None, None], fill=fill)
    tiles_full, tiles_sub = lego.to_tiles(full[0], 4), lego.to_tiles(sub[0], 4)
    # Two programs (3 tiles vs all 16 per image): XLA sums each its own way, so the chosen tiles
    # agree to float32 reassociation (64 ulps of their scale; 6 ulps seen), not bit for bit.
    for b in range(2):
        chosen = np.asarray(idx[b])
        np.testing.assert_allclose(tiles_sub[b, chosen], tiles_full[b, chosen], rtol=0,
                                   atol=f32_tol(64, tiles_full[b, chosen]))
        rest = np.setdiff1d(np.arange(16), chosen)
        assert np.all(tiles_sub[b, rest] == 7.0)
    assert not np.allclose(sub[1], full[1])  # the next brick reads the filled tiles


def test_nested_tiles_lie_under_the_coarse_choice():
    chosen = np.array([[1], [2]])  # 16x16 canvas, r_c = 8: tile (0, 1), tile (1, 0)
    idx = lego.nested_tiles(PG, 16, 16, chosen)
    assert idx[2] is None and idx[1].tolist() == [[1], [2]]
    assert idx[0].tolist() == [[2, 3, 6, 7], [8, 9, 12, 13]]  # r = 4: the 2x2 under each


@pytest.mark.parametrize("stack", [PG, PR], ids=["pg", "pr"])
def test_no_computed_tile_reads_a_filled_value(stack):
    """Nested subsampling with a NaN fill: every tile a patch brick computes is finite, so none
    read a value that was filled rather than computed (PR's bottom image brick too)."""
    module = lego.LEGO(stack=stack, num_classes=10)
    params = random_params(module, (16, 16, 1))
    x = jnp.asarray(np.random.default_rng(1).standard_normal((2, 16, 16, 1)), jnp.float32)
    tiles = lego.nested_tiles(stack, 16, 16, jnp.array([[0, 3], [2, 1]]))
    outs = jax.jit(lambda x: module.apply({"params": params}, x, jnp.full((2,), 0.3),
                                          jnp.array([1, 2]), method="outputs", tiles=tiles,
                                          fill=jnp.full((2, 16, 16, 1), jnp.nan)))(x)
    for k, (idx, out, brick) in enumerate(zip(tiles, outs, stack)):
        if idx is None and k == len(stack) - 1 and stack is PG:
            assert np.isnan(out).any()  # PG's top image brick reads the fill (zeros in training)
            continue
        computed = lego.to_tiles(out, brick[0]) if idx is None else jnp.take_along_axis(
            lego.to_tiles(out, brick[0]), idx[:, :, None, None, None], axis=1)
        assert np.isfinite(computed).all(), k


@pytest.fixture(scope="module")
def tiny_pg():
    """The tiny digits LEGO-PG config's objective and a batch."""
    from lcm_jax import data

    config = digits_lego_config("pg,tiny")
    config.total_steps = 200  # the learning rate's cosine decay spans the steps the tests take
    config_checks.validate(config)
    pipeline = data.make_pipeline(config.data, global_batch_size=config.batch_size, seed=0)
    model = models.make_model(config.model, 1)
    return config, EDMObjective(config, model, (16, 16, 1)), pipeline.batch_at(0)


def test_patch_subsampling_saves_training_flops(tiny_pg):
    config, objective, batch = tiny_pg
    sub_config = config.copy_and_resolve_references()
    sub_config.edm.tile_fraction = 0.5
    sub = EDMObjective(sub_config, objective.network.denoiser, (16, 16, 1))
    assert sub.tile_counts() == [8, 2, None]
    batch = {k: v for k, v in batch.items() if k != "caption"}
    state = jax.eval_shape(objective.init_state, jax.random.PRNGKey(0))
    flops = [_flops(lambda s, b, o=o: o.train_step(s, b), state, batch) for o in (objective, sub)]
    assert flops[1] < 0.9 * flops[0], flops


@pytest.mark.slow
def test_a_few_training_steps_reduce_the_loss(tiny_pg):
    config, objective, batch = tiny_pg
    batch = {k: jnp.asarray(v) for k, v in batch.items() if k != "caption"}
    state = objective.init_state(jax.random.PRNGKey(0))
    step = jax.jit(objective.train_step).lower(state, batch).compile(FAST)
    losses = []
    for _ in range(40):
        state, metrics = step(state, batch)
        losses.append(float(metrics["loss"]))
        assert set(metrics) >= {"loss_brick0", "loss_brick1", "loss_brick2"}
    assert np.mean(losses[-8:]) < 0.8 * np.mean(losses[:8]), losses


def test_sampling_on_larger_canvases_and_with_skipping(tiny_pg):
    config, objective, _ = tiny_pg
    params = random_params(objective.network.denoiser.module, (16, 16, 1), scale=0.05)
    labels = jnp.array([3, 7])
    sc = config.eval.copy_and_resolve_references()
    draw = lambda t_break, shape: fast_compile(
        lambda p: objective.sample(p, jax.random.PRNGKey(0), labels, _with(sc, t_break), shape), params)
    wide = draw(0.0, (16, 32, 1))
    assert wide.shape == (2, 16, 32, 1) and np.isfinite(wide).all()
    odd = draw(0.0, (12, 20, 1))  # not multiples of the 16-pixel tile: padded to 16x32, cropped
    assert odd.shape == (2, 12, 20, 1) and np.isfinite(odd).all()
    assert not np.allclose(draw(0.5, (16, 16, 1)), draw(0.0, (16, 16, 1)))


def test_shifted_coordinates_keep_every_pixel_s_coordinate():
    inner = lego.coordinate_channels(16, 32)
    for dy, dx in ((0, 0), (8, 8), (3, 11)):
        grid = lego.shifted_coordinates(16, 32, 16, dy, dx)
        assert grid.shape == (32, 48, 2)
        np.testing.assert_allclose(grid[dy:dy + 16, dx:dx + 32], inner, atol=1e-6)


def test_shifted_tiling_moves_the_tile_grid_every_other_noise_level(tiny_pg):
    """At offset 0 the canvas's tiles are the unshifted grid's (the margin only adds tiles
    outside the crop), so D is the same; at half a tile they straddle the old borders."""
    config, objective, _ = tiny_pg
    params = random_params(objective.network.denoiser.module, (16, 16, 1), scale=0.05)
    labels = jnp.array([3, 7])
    sigmas = jnp.array([4.0, 1.0])
    levels = edm_math.preconditioning(sigmas)[3]  # level 0: offset 0, level 1: offset 8
    x = jax.random.normal(jax.random.PRNGKey(1), (2, 16, 32, 1))
    plain = objective.denoise_fn(params, labels, 1.5)
    shifted = objective.denoise_fn(params, labels, 1.5, shifted_levels=levels)
    at = lambda fn, sigma: fast_compile(lambda p: fn(x, jnp.full((2,), sigma)), params)
    np.testing.assert_allclose(at(shifted, 4.0), at(plain, 4.0), atol=1e-5)
    assert np.abs(at(shifted, 1.0) - at(plain, 1.0)).max() > 1e-3
    sc = _with(config.eval, 0.0)
    sc.shifted_tiles = True
    panorama = fast_compile(lambda p: objective.sample(p, jax.random.PRNGKey(0), labels, sc, (16, 48, 1)), params)
    assert panorama.shape == (2, 16, 48, 1) and np.isfinite(panorama).all()


def _with(config, t_break):
    c = config.copy_and_resolve_references()
    c.t_break = t_break
    return c


def test_lego_is_a_denoiser_with_a_w_embedding():
    config = digits_lego_config("pr,tiny")
    denoiser = models.make_model(config.model, 1, time_cond_proj_dim=8)
    x, t, y = jnp.zeros((2, 16, 16, 1)), jnp.array([10, 500]), jnp.array([1, 10])
    params = denoiser.init(jax.random.PRNGKey(0), x, t, y, jnp.zeros((2, 8)))
    assert "cond_proj" in params
    out = denoiser.apply(params, x, t, y, jnp.ones((2, 8)))
    assert out.shape == x.shape
    assert len(denoiser.outputs(params, x, t, y, jnp.ones((2, 8)))) == 3


NAMED = [("PG-64", "S"), ("PG-64", "L"), ("PG-64", "L_old"), ("PG-64", "XL"), ("PR-64", "L"),
         ("PR-64", "L_old"), ("U-64", "S"), ("U-64", "L"), ("U-64", "XL"), ("PG-32", "L"),
         ("PG-32", "XL"), ("PR-32", "L"), ("PR-32", "XL"), ("U-32", "S"), ("U-32", "L"),
         ("U-32", "XL")]


def test_published_stacks_parameter_counts(capsys):
    """Counts of the named stacks (ImageNet: 1000 classes; latent stacks have 4 channels),
    printed beside the paper's where it gives one."""
    lines = []
    for layout, size in NAMED:
        module = lego.LEGO(stack=lego.named_stack(layout, size), num_classes=1000)
        res, ch = int(layout.split("-")[1]), (4 if layout.endswith("32") else 3)
        shapes = jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0), jnp.zeros((1, res, res, ch)),
                                                    jnp.zeros(1), jnp.zeros(1, jnp.int32)))
        count = sum(x.size for x in jax.tree.leaves(shapes))
        paper = lego.PAPER_PARAMS.get((layout, size))
        lines.append(f"{layout} {size}: {count / 1e6:.1f}M" + (f" (paper {paper / 1e9:.1f}B)" if paper else ""))
        # Each DiT block holds 18 width^2 weights (+ biases): the stack's bulk.
        blocks = sum(b[2] for b in lego.named_stack(layout, size))
        width = lego.named_stack(layout, size)[0][3]
        assert 18 * width ** 2 * blocks < count < 18 * width ** 2 * blocks * 1.1
    with capsys.disabled():
        print("\n" + "\n".join(lines))
    with pytest.raises(ValueError, match="no published size 'S'"):
        lego.named_stack("PG-32", "S")


def test_config_checks_name_the_bad_lego_fields():
    config = digits_lego_config("pg,tiny")
    config.model.stack[1] = [8, 3, 1, 16, 2]
    config.edm.tile_fraction = 1.5
    config.eval.t_break = 2.0
    config.data.image_size = 24
    with pytest.raises(config_checks.ConfigError) as e:
        config_checks.validate(config)
    text = str(e.value)
    assert "config.model.stack[1]: tile size r=8 is not a multiple of the patch size p=3" in text
    assert "config.edm.tile_fraction=1.5" in text
    assert "config.eval.t_break=2.0" in text
    dit = digits_lego_config("dit,tiny")
    dit.sample.t_break = 0.5
    with pytest.raises(config_checks.ConfigError, match="skips a LEGO brick"):
        config_checks.validate(dit)
    for arg in ("pg", "pr", "u", "dit", "pg,sub"):
        config_checks.validate(digits_lego_config(arg))
    ok = digits_lego_config("pg,tiny")
    ok.data.image_size = 24
    with pytest.raises(config_checks.ConfigError, match="not divisible by 16"):
        config_checks.validate(ok)


def test_latent_lego_encodes_inside_the_step_and_decodes_samples(tmp_path):
    """model.vae: a frozen diffusers VAE folder; the step trains on its latents, samples decode."""
    from lcm_jax import data
    from lcm_jax.models import vae as vae_lib

    vae_config = dict(in_channels=1, out_channels=1, block_out_channels=[8, 16], latent_channels=4,
                      norm_num_groups=4, sample_size=16, scaling_factor=0.7)
    module = vae_lib.from_config(vae_config)
    vae_lib.save_pretrained(str(tmp_path), vae_config,
                            jax.jit(module.init)(jax.random.PRNGKey(0), jnp.zeros((1, 16, 16, 1)))["params"])
    config = digits_lego_config("pg,tiny")
    config.model.vae = str(tmp_path)
    config.model.stack = [[4, 2, 1, W, H], [8, 4, 1, W, H]]
    config_checks.validate(config)
    objective = EDMObjective(config, models.make_model(config.model, 4), (16, 16, 1))
    assert objective.image_shape == (8, 8, 4)
    batch = data.make_pipeline(config.data, global_batch_size=4, seed=0).batch_at(0)
    batch = {k: jnp.asarray(v) for k, v in batch.items() if k != "caption"}
    state = objective.init_state(jax.random.PRNGKey(0))
    state, metrics = fast_compile(objective.train_step, state, batch, objective.frozen)
    assert np.isfinite(metrics["loss"]) and int(state.step) == 1
    images, labels = fast_compile(lambda p, f: objective.sample_fn(p, f, jax.random.PRNGKey(1), 2, config.eval),
                                  state.ema_params, objective.frozen)
    assert images.shape == (2, 16, 16, 1)
    config.model.vae = str(tmp_path / "missing")
    with pytest.raises(config_checks.ConfigError, match="config.model.vae="):
        config_checks.validate(config)

