r"""Text -> image from a local diffusers Stable Diffusion folder.

  python -m experiments.sample --model PATH --prompt "a photo of a cat" --sampler lcm \
      --steps 4 --guidance 8 --seed 0 --num 4 --out samples/
"""
import os

from experiments import _harness
from lcm_jax import cli_args
from lcm_jax.pipeline import SAMPLERS, StableDiffusion


def main():
    p = cli_args.Parser(description=__doc__)
    p.add_argument("--model", required=True, type=cli_args.existing_dir, help="a diffusers pipeline folder")
    p.add_argument("--prompt", required=True)
    p.add_argument("--negative", default=None)
    p.add_argument("--sampler", default="ddim", choices=SAMPLERS)
    p.add_argument("--steps", type=cli_args.at_least(1), default=50)
    p.add_argument("--guidance", type=cli_args.real(0), default=7.5)
    p.add_argument("--gamma", type=cli_args.real(0, 1), default=0.3, help="TCD's stochasticity")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num", type=cli_args.at_least(1), default=1)
    p.add_argument("--height", type=cli_args.at_least(8), default=None)
    p.add_argument("--width", type=cli_args.at_least(8), default=None)
    p.add_argument("--out", type=cli_args.output_dir, default="samples")
    a = p.parse_args()
    pipe = StableDiffusion.from_pretrained(a.model)
    images = pipe(a.prompt, negative_prompt=a.negative, sampler=a.sampler, num_inference_steps=a.steps,
                  guidance_scale=a.guidance, gamma=a.gamma, seed=a.seed, num_images_per_prompt=a.num,
                  height=a.height, width=a.width, output_type="pil")
    os.makedirs(a.out, exist_ok=True)
    for i, image in enumerate(images):
        path = os.path.join(a.out, f"{a.sampler}_{a.steps}_{a.seed}_{i}.png")
        image.save(path)
        print(path)


if __name__ == "__main__":
    _harness.main(main)
