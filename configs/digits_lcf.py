r"""LCF on digits: consistency fine-tuning of README command 1's LCM on an image folder, no teacher.

  python -m experiments.main --config configs/digits_lcf.py --workdir workdirs/digits_lcf \
      --config.data.path=DIR --config.lcf.lcm_workdir=workdirs/digits_lcd

DIR holds 16x16 grey images with captions naming their class ("a handwritten digit three", as
data/digits.caption; .txt sidecars or metadata.jsonl): experiments/lcf_digits.py writes inverted
digits there, runs this config and scores before / after. The LCM (its EMA params, VAE and
architecture) comes from the workdir of a finished command 1 (`lcf.lcm_workdir`); everything else
is LCD's recipe with the teacher's solver step replaced by the forward process (objectives/lcf.py).

Expected on the 2-core CPU: ~2 min per 1,000 steps; on inverted digits (lcf_digits.py, 3,000 steps)
FD-digits to the inverted test set 737 -> 145 at 4 steps, accuracy 14% -> 34% (README).

Consistency training's recipe, off by default (the fields below; --config.FIELD=VALUE turns them on):
  lcd.k_schedule='doubling'   the skip curriculum: LARGE skips first, N = lcd.n_start grid points
                              (k = 1000 / 5 = 200) doubling in stages to lcd.num_ddim_timesteps
                              (k = 20) over total_steps, iCT's N(k) (objectives/consistency.py);
                              None: k = 20 from the first step (today's step, bit for bit)
  lcd.target='online'         the target theta^- = stop_gradient(theta) (iCT) instead of the EMA
  optimizer.decay='constant'  a constant lr after the warmup instead of the cosine decay

Short arguments: `configs/digits_lcf.py:tiny` is the seconds-long variant the tests use.
"""
from configs import digits_lcd


VARIANTS = ("", "tiny")  # the arguments get_config takes (config_loading.known_fields reads each)

def get_config(arg: str = ""):
    c = digits_lcd.get_config("tiny" if arg == "tiny" else "")
    c.objective = "lcf"
    c.total_steps = 4 if arg == "tiny" else 3000
    c.data.update(name="folder", path="", channels=1, image_size=16)
    c.lcf = dict(lcm_workdir="workdirs/digits_lcd")  # README command 1's --workdir
    # c.lcd.k_schedule = "doubling"  # the skip curriculum (configs/digits_lcd.py has the fields)
    # c.lcd.target = "online"  # theta^- = stop_gradient(theta) (iCT) instead of the EMA target
    # (the EMA, decay ema_decay, then only feeds samples and evaluation)
    c.optimizer.update(lr=1e-4, warmup_steps=1 if arg == "tiny" else 50,
                       decay="cosine")  # or "constant": a constant lr after the warmup
    c.sample.update(sampler="lcm", num_steps=4)
    c.wandb.tags = ("digits", "lcf")
    if arg not in ("", "tiny"):
        raise ValueError(f"Unknown config argument {arg!r}; use '' or 'tiny'.")
    return c
