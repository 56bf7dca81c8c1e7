"""Input suite: training steps/s on a webdataset of the digits, with and without host prefetch."""
import os
import time

import jax


def write_digits_shards(folder: str, side: int = 128, shards: int = 4) -> str:
    """The digits train split as webdataset shards: {key}.png (side x side, 8-bit grey) + .txt."""
    import io
    import tarfile

    import numpy as np
    from PIL import Image

    from lcm_jax.data import digits

    images, labels = digits.load("train", side, 1)
    pixels = np.round((images[..., 0] + 1) * 127.5).astype(np.uint8)
    for shard, index in enumerate(np.array_split(np.arange(len(pixels)), shards)):
        with tarfile.open(os.path.join(folder, f"{shard:05d}.tar"), "w") as tar:
            for i in index:
                png = io.BytesIO()
                Image.fromarray(pixels[i]).save(png, format="PNG")
                for ext, data in (("png", png.getvalue()), ("txt", f"digit {labels[i]}".encode())):
                    info = tarfile.TarInfo(f"{i:06d}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    return os.path.join(folder, "*.tar")


def prefetch(rounds: int = 5, steps: int = 20) -> dict:
    """Training steps/s on a webdataset of the digits (128^2 PNGs decoded and resized to 16^2, batch
    64, configs/digits_diffusion.py's DiT, unconditional labels), reading in the loop
    (data.prefetch=0) vs in a thread (data.prefetch=2). The loop is the training loop's: no block
    per step, one at the end of each round; the two alternate round by round."""
    import tempfile

    import numpy as np

    from configs import digits_diffusion
    from lcm_jax import data, models, train
    from lcm_jax.objectives.diffusion import DiffusionObjective

    config = digits_diffusion.get_config()
    with tempfile.TemporaryDirectory() as folder:
        config.data = dict(name="webdataset", path=write_digits_shards(folder), image_size=16,
                           channels=1, shuffle_buffer=256, random_flip=False)
        objective = DiffusionObjective(config, models.make_model(config.model, 1), (16, 16, 1))
        labels = np.full((config.batch_size,), 10, np.int32)  # the null class: no labels in the shards
        sides = {}
        for depth in (0, 2):
            pipeline = data.make_pipeline(dict(config.data, prefetch=depth),
                                          global_batch_size=config.batch_size, seed=0)
            program = train.Program(config, objective, dict(train.peek(pipeline), label=labels))
            sides[f"prefetch_{depth}"] = {"pipeline": pipeline, "program": program,
                                          "state": program.init_fn(jax.random.PRNGKey(0))}

        def run(side, n):
            start = time.perf_counter()
            for _ in range(n):
                batch = dict(next(side["pipeline"]), label=labels)
                side["state"], metrics = side["program"].step_fn(side["state"], side["program"].device_batch(batch))
            jax.block_until_ready(metrics["loss"])
            return time.perf_counter() - start

        seconds = {name: [] for name in sides}
        for side in sides.values():
            run(side, 3)  # warm-up
        for _ in range(rounds):
            for name, side in sides.items():
                seconds[name].append(run(side, steps))
        decode = sides["prefetch_0"]["pipeline"]
        start = time.perf_counter()
        for _ in range(steps):
            next(decode)
        decode_ms = 1e3 * (time.perf_counter() - start) / steps
        sides["prefetch_2"]["pipeline"].close()  # its thread reads from the folder being removed
    result = {name: round(steps / float(np.median(s)), 2) for name, s in seconds.items()}
    result = {"steps_per_s": result, "speedup": round(result["prefetch_2"] / result["prefetch_0"], 3),
              "decode_ms_per_batch": round(decode_ms, 1), "batch": config.batch_size}
    print(result, flush=True)
    return result
