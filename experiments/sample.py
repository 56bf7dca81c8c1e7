r"""Samples from a local diffusers folder or from any run's workdir, as PNGs: one file per image
and a grid, with the seconds per image printed.

  python -m experiments.sample --model PATH [--lora DIR] (--prompt "a photo of a cat" | --prompts FILE) \
      [--sampler lcm --steps 4 --guidance 8 --gamma 0.3 --seed 0 --num 4] --out samples/
  python -m experiments.sample --workdir W [--weights ema|online] [--num 40] [--sampler lcm --steps 4 \
      --guidance 1.5 --gamma 0.3] [--t_break 0.5 --height 16 --width 48 --shifted_tiles] --out samples/

--model: an SD 1.x / 2.x / SDXL pipeline folder (a distilled LCM folder too); --lora: a
pytorch_lora_weights.safetensors folder (LCM-LoRA, TCD-LoRA, Smooth LoRA) fused into it.
--workdir: a run of this repository (its W/config.json and newest checkpoint): a digits LCD / TCD
/ LCF student, a Smooth model, LEGO or DiT; class-conditional samples cycle over the classes.
The sampler, steps, guidance, gamma and t_break default to the run's config.sample; LEGO and
DiT runs also sample other canvases (--height / --width; sides that are not multiples of the
tiles are sampled padded and center-cropped), LEGO with its tile grid shifted every other noise
level (--shifted_tiles).
"""
import os
import time

from experiments import _harness
from lcm_jax import cli_args, errors


def main():
    from lcm_jax.pipeline import SAMPLERS

    p = cli_args.Parser(description=__doc__)
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", type=cli_args.existing_dir, help="a diffusers pipeline folder")
    source.add_argument("--workdir", type=cli_args.existing_dir, help="a run's workdir")
    p.add_argument("--lora", type=cli_args.existing_dir, default=None, help="a LoRA folder (--model)")
    p.add_argument("--prompt", default=None)
    p.add_argument("--prompts", type=cli_args.existing_file, default=None, help="one prompt per line")
    p.add_argument("--negative", default=None)
    p.add_argument("--weights", choices=("ema", "online"), default="ema", help="--workdir: which params")
    p.add_argument("--sampler", default=None, choices=SAMPLERS + ("heun",))
    p.add_argument("--steps", type=cli_args.at_least(1), default=None)
    p.add_argument("--guidance", type=cli_args.real(0), default=None)
    p.add_argument("--gamma", type=cli_args.real(0, 1), default=None, help="TCD's stochasticity")
    p.add_argument("--t_break", type=cli_args.real(0, 1), default=None, help="LEGO brick skipping")
    p.add_argument("--shifted_tiles", action="store_true", default=None,
                   help="LEGO above the training size: shift the tile grid every other noise level")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num", type=cli_args.at_least(1), default=None)
    p.add_argument("--height", type=cli_args.at_least(8), default=None)
    p.add_argument("--width", type=cli_args.at_least(8), default=None)
    p.add_argument("--out", type=cli_args.output_dir, default="samples")
    a = p.parse_args()
    images, seconds = from_model(a) if a.model else from_workdir(a)
    for path in write(images, a.out):
        print(path)
    print(f"{seconds / len(images):.3f} s per image ({len(images)} images; compiling excluded)")


def from_model(a):
    """(images in [-1, 1], seconds) from a diffusers folder, prompt by prompt."""
    from lcm_jax.pipeline import StableDiffusion

    if bool(a.prompt) == bool(a.prompts):
        raise errors.UserError("give --prompt TEXT or --prompts FILE (one prompt per line).")
    for flag in ("weights", "t_break", "shifted_tiles"):
        if getattr(a, flag) not in (None, "ema"):
            raise errors.UserError(f"--{flag} is for --workdir runs, not --model folders.")
    prompts = [a.prompt] if a.prompt else [line.strip() for line in open(a.prompts) if line.strip()]
    pipe = StableDiffusion.from_pretrained(a.model)
    if a.lora:
        pipe = pipe.load_lora_weights(a.lora)
    kwargs = dict(negative_prompt=a.negative, sampler=a.sampler or "ddim",
                  num_inference_steps=a.steps or 50,
                  guidance_scale=7.5 if a.guidance is None else a.guidance,
                  gamma=0.3 if a.gamma is None else a.gamma, seed=a.seed,
                  num_images_per_prompt=a.num or 1, height=a.height, width=a.width)
    pipe(prompts[0], **kwargs)  # compiles (the sampler's program is cached on the pipeline)
    start, images = time.perf_counter(), []
    for prompt in prompts:
        images += list(pipe(prompt, **kwargs) * 2.0 - 1.0)  # [0, 1] -> [-1, 1]
    return images, time.perf_counter() - start


def from_workdir(a):
    """(images in [-1, 1], seconds) of the run in --workdir, class labels cycling."""
    import jax
    import jax.numpy as jnp

    from experiments import export

    config = export.load_config(a.workdir)
    for flag in ("lora", "prompt", "prompts", "negative"):
        if getattr(a, flag):
            raise errors.UserError(f"--{flag} is for --model folders; a run samples its own "
                                   "conditions (its classes or config.sample.prompts).")
    objective = export.build_objective(config, a.workdir)
    if a.shifted_tiles and getattr(objective, "stack", None) is None:
        raise errors.UserError(f"--shifted_tiles moves a LEGO tile grid; this run's model is "
                               f"{config.model.name!r}: drop the flag.")
    params, _ = export.restore_params(config, a.workdir, objective, a.weights)
    sc = config.sample.copy_and_resolve_references()
    with sc.unlocked():
        for field, value in (("sampler", a.sampler), ("num_steps", a.steps),
                             ("guidance_scale", a.guidance), ("gamma", a.gamma),
                             ("t_break", a.t_break), ("shifted_tiles", a.shifted_tiles)):
            if value is not None:
                sc[field] = value

    num = a.num or sc.get("num_images", 16)
    frozen, rng = jax.device_put(objective.frozen), jax.random.PRNGKey(a.seed)
    if a.height or a.width:
        if not hasattr(objective, "sample_images"):
            raise errors.UserError(f"--height / --width: objective {config.objective!r} samples "
                                   "at its training size; other canvases are for runs trained "
                                   "from scratch (LEGO, DiT).")
        draw = _canvas_draw(objective, sc, num, a.height, a.width)
    else:
        draw = jax.jit(lambda p, f, key: objective.sample_fn(p, f, key, num, sc)[0])
    draw = draw.lower(params, frozen, rng).compile()
    start = time.perf_counter()
    images = jax.block_until_ready(draw(params, frozen, rng))
    return jnp.asarray(images), time.perf_counter() - start


def _canvas_draw(objective, sc, num, height, width):
    """A draw on an H x W pixel canvas (a latent model's divided by its VAE's factor)."""
    import jax
    import jax.numpy as jnp

    h, w, c = objective.image_shape
    latent = getattr(objective, "latent", None)
    factor = latent.vae.config.factor if latent is not None and latent.vae is not None else 1
    shape = ((height or h * factor) // factor, (width or w * factor) // factor, c)
    labels = jnp.arange(num, dtype=jnp.int32) % max(objective.null_class, 1)
    return jax.jit(lambda p, f, key: objective.sample_images(p, f, key, labels, sc, shape))


def write(images, out: str) -> list[str]:
    """One PNG per image (images [N, H, W, C] in [-1, 1]) and grid.png in `out`."""
    import numpy as np
    from PIL import Image

    from lcm_jax import paths
    from lcm_jax.train import image_grid

    to_pil = lambda x: Image.fromarray(x.squeeze(-1) if x.shape[-1] == 1 else x)
    arrays = np.asarray(images, np.float32)
    written = [os.path.join(out, f"{i:04d}.png") for i in range(len(arrays))]
    for path, x in zip(written, arrays):
        paths.save_png(path, to_pil(image_grid(x[None], columns=1)))
    paths.save_png(os.path.join(out, "grid.png"), to_pil(image_grid(arrays)))
    return written + [os.path.join(out, "grid.png")]


if __name__ == "__main__":
    _harness.main(main)
