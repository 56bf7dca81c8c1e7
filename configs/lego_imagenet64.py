r"""LEGO-L on ImageNet 64x64 in pixel space, the paper's Table 2 setting (PG: FID 2.16, PR: 2.29).

  python -m experiments.main --config configs/lego_imagenet64.py:pg --workdir workdirs/in64_pg \
      --config.data.data_dir=/data/tensorflow_datasets

Arguments: `pg` or `pr` (LEGO-L stacks of the paper's Table 5), optionally `,xl` or `,s` for the
other published sizes. Data: tfds `imagenet2012` prepared locally (nothing is downloaded), resized
to 64 with center crops and random flips. The paper's recipe: Adam lr 1e-4, batch 512, EDM
preconditioning, bf16 compute with fp32 parameters here, remat on. Parameter counts:
tests/test_lego.py prints them; compiled memory per device: `python -m experiments.benchmark
--suite lego_memory`. Not run on this machine (no ImageNet, no accelerator).
Expected (the paper, 8 A100s): FID-50k 2.16 (PG-L) / 2.29 (PR-L) after its full schedule.
"""
from configs import _lego


VARIANTS = ("pg", "pr", "pg,s", "pr,xl")  # the arguments get_config takes (config_loading.known_fields reads each)

def get_config(arg: str = "pg"):
    args = arg.split(",")
    if args[0] not in ("pg", "pr") or not set(args[1:]) <= {"s", "l", "xl"}:
        raise ValueError(f"configs/lego_imagenet64.py:{arg}: use 'pg' or 'pr', optionally ',s' / ',xl'.")
    size = next((a.upper() for a in args[1:]), "L")
    return _lego.edm_config(
        _lego.lego_model(f"{args[0].upper()}-64", size),
        dict(name="tfds", tfds_name="imagenet2012", image_size=64, channels=3, label_key="label",
             data_dir="", random_flip=True, shuffle_buffer=50_000),
        total_steps=1_000_000, batch_size=512, lr=1e-4, ema_decay=0.9999, num_classes=1000,
        guidance_scale=1.0, num_steps=40, tags=("imagenet64", "lego", args[0], size))
