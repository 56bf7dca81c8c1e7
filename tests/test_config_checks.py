"""config_checks.validate: every bad field is named with its fix; good configs pass."""
import importlib.util
import os
import pathlib

import ml_collections
import pytest

from lcm_jax.config_checks import ConfigError, validate

ROOT = pathlib.Path(__file__).resolve().parents[1]
DEVICES = 8  # the table runs as on an 8-device host: batch 16 and the -1 mesh fit it


def load_config(arg=""):
    spec = importlib.util.spec_from_file_location("digits_diffusion",
                                                  ROOT / "configs" / "digits_diffusion.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


def make(base="tiny", **changes):
    """The tiny config (plus an LCD section for base='lcd') with dotted-path changes applied.

    Goes through a dict so a change may also change a field's type (ConfigDict is type-safe).
    """
    d = load_config("tiny").to_dict()
    if base == "lcd":
        d["objective"] = "lcd"
        d["lcd"] = dict(w_min=3.0, w_max=15.0, num_ddim_timesteps=50, solver="ddim", loss="huber",
                        huber_c=0.001)
        d["sample"].update(sampler="lcm", num_steps=4, guidance_scale=1.0)
    for path, value in changes.items():
        *parents, key = path.split("__")
        node = d
        for parent in parents:
            node = node.setdefault(parent, {})
        node[key] = value
    return ml_collections.ConfigDict(d)


def errors(config, **counts):
    counts = {"device_count": DEVICES, "process_count": 1, **counts}
    with pytest.raises(ConfigError) as info:
        validate(config, **counts)
    return str(info.value)


# (base, dotted field, bad value, the field the message must name, a word of the fix)
BAD = [
    ("tiny", "objective", "lcm_distill", "config.objective", "lcd"),
    ("tiny", "objective", None, "config.objective is missing", "set it"),
    ("tiny", "model.name", "vit", "config.model.name", "dit"),
    ("tiny", "data.name", "imagenet", "config.data.name", "webdataset"),
    ("tiny", "total_steps", 0, "config.total_steps", ">= 1"),
    ("tiny", "batch_size", 12, "config.batch_size", "multiple of 8"),
    ("tiny", "batch_size", 0, "config.batch_size", "global batch"),
    ("tiny", "parallel.mode", "shard_map", "config.parallel.mode", "pmap"),
    ("tiny", "parallel.fsdp", 3, "parallel.fsdp=3", "divide"),
    ("tiny", "parallel.data", 2, "parallel.data=2", "product"),
    ("tiny", "parallel.fsdp", -1, "parallel.fsdp=-1", "only one"),
    ("tiny", "data.image_size", 15, "config.data.image_size", "multiple of 4"),
    ("tiny", "data.image_size", 4, "config.data.image_size", ">= 8"),
    ("tiny", "model.num_heads", 3, "config.model.width", "num_heads"),
    ("tiny", "diffusion.prediction_type", "eps", "config.diffusion.prediction_type", "epsilon"),
    ("tiny", "diffusion.beta_schedule", "cosine", "config.diffusion.beta_schedule",
     "squaredcos_cap_v2"),
    ("tiny", "diffusion.num_train_timesteps", 1, "config.diffusion.num_train_timesteps", "1000"),
    ("tiny", "diffusion.cond_drop_prob", 1.0, "config.diffusion.cond_drop_prob", "0.1"),
    ("tiny", "diffusion.min_snr_gamma", 0.0, "config.diffusion.min_snr_gamma", "None"),
    ("tiny", "optimizer.lr", "1e-3", "config.optimizer.lr", "positive"),
    ("tiny", "optimizer.warmup_steps", 6, "config.optimizer.warmup_steps", "fewer"),
    ("tiny", "optimizer.grad_clip", -1.0, "config.optimizer.grad_clip", "None"),
    ("tiny", "ema_decay", 1.0, "config.ema_decay", "0.999"),
    ("lcd", "lcd.w_min", 20.0, "config.lcd.w_min", "w_min <= w_max"),
    ("lcd", "lcd.w_max", -1.0, "config.lcd.w_max", ">= 0"),
    ("lcd", "lcd.num_ddim_timesteps", 30, "config.lcd.num_ddim_timesteps", "must divide"),
    ("lcd", "lcd.solver", "euler", "config.lcd.solver", "dpm_solver_pp"),
    ("lcd", "lcd.loss", "l1", "config.lcd.loss", "huber"),
    ("lcd", "lcd.huber_c", 0.0, "config.lcd.huber_c", "positive"),
    ("lcd", "sample.num_steps", 60, "config.sample.num_steps", "at most 50"),
    ("tiny", "sample.sampler", "euler", "config.sample.sampler", "dpm_solver"),
    ("tiny", "eval.num_steps", 0, "config.eval.num_steps", ">= 1"),
    ("tiny", "eval.num_steps", 2000, "config.eval.num_steps", "at most 1000"),
    ("tiny", "sample.guidance_scale", -1.0, "config.sample.guidance_scale", "0 or more"),
    ("tiny", "checkpoint.every_steps", 0, "config.checkpoint.every_steps", ">= 1"),
    ("tiny", "checkpoint.keep", 0, "config.checkpoint.keep", ">= 1"),
    ("tiny", "log_every_steps", 0, "config.log_every_steps", ">= 1"),
    ("tiny", "wandb.mode", "on", "config.wandb.mode", "offline"),
    ("tiny", "model.pretrained", "/nonexistent/sd15", "config.model.pretrained",
     "local diffusers folder"),
    ("tiny", "data.name", "folder", "config.data.path", "folder of images"),
    ("tiny", "data.name", "webdataset", "config.data.path", ".tar shards"),
    ("tiny", "data.name", "tfds", "config.data.tfds_name", "mnist"),
]


@pytest.mark.parametrize("base, path, value, field, fix", BAD,
                         ids=[f"{path}={value!r}" for _, path, value, _, _ in BAD])
def test_bad_field_is_named_with_its_fix(base, path, value, field, fix):
    message = errors(make(base, **{path.replace(".", "__"): value}))
    assert field in message and fix in message, message


@pytest.mark.parametrize("arg, device_count", [("tiny", 1), ("tiny", 8), ("", 1), ("", 8)])
def test_digits_configs_are_valid(arg, device_count):
    assert validate(load_config(arg), device_count=device_count, process_count=1) is None


def test_lcd_base_is_valid():
    validate(make("lcd"), device_count=DEVICES, process_count=1)


def test_all_problems_reported_at_once():
    config = make(diffusion__prediction_type="eps", optimizer__lr=0.0)
    with pytest.raises(ConfigError) as info:
        validate(config, device_count=1, process_count=1)
    assert isinstance(info.value, ValueError)
    assert len(info.value.problems) == 2
    message = str(info.value)
    assert "2 problems" in message
    assert "config.diffusion.prediction_type='eps'" in message
    assert "config.optimizer.lr=0.0" in message


def test_misspelled_fields_in_a_config_file_name_the_nearest():
    message = errors(make(optimizer__weigth_decay=0.1, model__bricks=4, lcf__anything=None))
    assert "config.optimizer.weigth_decay is no field" in message
    assert "did you mean config.optimizer.weight_decay" in message
    assert "config.model.bricks" in message and "config.lcf.anything is no field" in message


def test_every_shipped_config_and_variant_is_valid_but_for_local_paths():
    import glob

    from lcm_jax import config_loading

    for path in sorted(glob.glob(os.path.join(ROOT, "configs", "[!_]*.py"))):
        module = config_loading._import(path)
        for arg in getattr(module, "VARIANTS", ("",)):
            config = module.get_config(arg) if arg else module.get_config()
            assert config_loading.unknown_fields(config) == [], (path, arg)
            try:  # every stage valid too; only the local paths a user must give may be missing
                validate(config, device_count=1, process_count=1)
            except ConfigError as e:
                paths = ("config.model.pretrained", "config.data.path", "config.lcf.lcm_workdir")
                assert all(p.startswith(paths) for p in e.problems), (path, arg, e.problems)


def test_batch_divisible_by_processes():
    assert "16 processes" in errors(make(batch_size=8), device_count=8, process_count=16)


def test_pmap_rejects_fsdp():
    message = errors(make(parallel__mode="pmap", parallel__data=1, parallel__fsdp=8))
    assert "config.parallel.fsdp" in message and "jit" in message


def test_latent_unet_image_size_counts_vae_and_downsamplings():
    unet = dict(model__name="unet", model__unet__block_out_channels=(32, 64, 64, 64),
                vae__scaling_factor=0.18215)
    message = errors(make(data__image_size=96, **unet))
    assert "not divisible by 64" in message and "VAE" in message
    validate(make(data__image_size=512, **unet), device_count=DEVICES, process_count=1)


def test_pretrained_must_be_a_diffusers_folder(tmp_path):
    assert "not a diffusers folder" in errors(make(model__pretrained=str(tmp_path)))
    (tmp_path / "unet").mkdir()
    (tmp_path / "unet" / "config.json").write_text("{}")
    validate(make(model__pretrained=str(tmp_path)), device_count=DEVICES, process_count=1)


def test_webdataset_pattern_must_match_shards(tmp_path):
    pattern = str(tmp_path / "{00000..00001}.tar")
    config = make(data__name="webdataset", data__path=pattern)
    assert "matches no .tar shards" in errors(config)
    (tmp_path / "00000.tar").write_bytes(b"")
    validate(config, device_count=DEVICES, process_count=1)
    assert "one shard per process" in errors(make(data__name="webdataset", data__path=pattern,
                                                  batch_size=16), process_count=2)


def test_counts_default_to_this_host():
    validate(load_config("tiny"))  # jax.device_count() / process_count(): 1 CPU here
