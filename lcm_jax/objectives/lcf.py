"""Latent Consistency Fine-tuning (LCF; Latent Consistency Models Sec. 4.4, Algorithm 4): a
distilled LCM fine-tuned on a custom dataset with NO teacher, as the consistency family's step.

Both points of the pair come from the same data sample z and the same noise on the forward
process: x_{t_{n+k}} = alpha_{t_{n+k}} z + sigma_{t_{n+k}} eps and x_hat_{t_n} = alpha_{t_n} z +
sigma_{t_n} eps (consistency training's estimate of the PF-ODE step, in place of the teacher's),
then LCD's loss d(f_theta(x_{t_{n+k}}, w, c, t_{n+k}), f_theta^-(x_hat_{t_n}, w, c, t_n)) with the
EMA (or online) target, skip k and the w-embedding kept (w ~ U[w_min, w_max] as in distillation,
so the fine-tuned LCM still takes the guidance scale it was distilled with).

The base is the LCM (its network has the w-embedding input `time_cond_proj`): the student
starts from `frozen["base"]`, which the step never calls. Full-parameter fine-tuning only.

The skip curriculum (`lcd.k_schedule='doubling'`: large skips first, iCT's stages; the
consistency family's, `consistency.curriculum`), the online target (`lcd.target = "online"`:
theta^- = stop_gradient(theta), iCT's choice; the EMA then only feeds the samples) and a constant
lr (`optimizer.decay = "constant"`) are the knobs of consistency training's recipe;
configs/digits_lcf.py shows all three.
"""
import dataclasses
import os

from lcm_jax import config_rules as rules
from lcm_jax.diffusion import schedule as sched
from lcm_jax.errors import UserError
from lcm_jax.objectives import Export, consistency


def forward_step(objective, frozen, draws, z, x_t, t, s, cond, uncond):
    """x_hat_{t_n}: the same sample and the same noise, at t_n (no teacher)."""
    return sched.add_noise(z, draws["noise"], *objective.schedule.alpha_sigma(s))


STRATEGY = consistency.Strategy(previous_point=forward_step, teacher=False)
REQUIRED, SAMPLERS = consistency.REQUIRED, consistency.SAMPLERS
EXPORT = Export(network="student", lora_section="lcd", scheduler="LCMScheduler",
                pipeline="LatentConsistencyModelPipeline", adds_w_embedding=False,
                chain=lambda config, workdir: None)  # the LCM's chain is another run's
DIGITS_EVALUATION = "samples"


def build(config, workdir: str, pipeline) -> consistency.ConsistencyObjective:
    from lcm_jax import teachers

    if config.lcd.get("lora"):
        raise UserError("config.lcd.lora is set, but LCF fine-tunes the full LCM; set "
                        "config.lcd.lora=None.")
    if config.model.get("pretrained"):  # an LCM folder
        lcm = teachers.from_pretrained(config)
        dim = lcm.net.module.config.time_cond_proj_dim
        if dim != consistency.w_embedding_dim(config):
            raise UserError(
                f"LCF fine-tunes a distilled LCM, but {config.model.pretrained}/unet has "
                f"time_cond_proj_dim={dim} and config.lcd.w_embedding_dim="
                f"{consistency.w_embedding_dim(config)}: point config.model.pretrained at an LCM "
                f"folder (e.g. LCM_Dreamshaper_v7) and set w_embedding_dim to its time_cond_proj_dim.")
    else:  # the digits LCM of README command 1
        lcm = teachers.distilled_from_chained(config, config.lcf.lcm_workdir,
                                              consistency.w_embedding_dim(config))
    return consistency.ConsistencyObjective(config, dataclasses.replace(lcm, student_net=lcm.net),
                                            STRATEGY)


def config_problems(config):
    """The consistency checks, and where the LCM comes from: a folder or a digits LCD workdir."""
    yield from consistency.config_problems(config)
    for field in ("k_schedule", "n_start"):  # moved to the family's section
        if rules.present(rules.get(config, f"lcf.{field}", None)):
            yield (f"config.lcf.{field} moved to config.lcd.{field} (the skip curriculum is the "
                   f"consistency family's): set config.lcd.{field} instead.")
    if rules.get(config, "lcd.lora", None):
        yield rules.bad("lcd.lora", rules.get(config, "lcd.lora").to_dict(), "is set, but LCF "
                        "fine-tunes the full LCM", "set config.lcd.lora=None")
    if rules.get(config, "model.pretrained", None):
        return
    workdir = rules.get(config, "lcf.lcm_workdir", None)
    if not workdir:
        yield ("config.lcf.lcm_workdir is missing; LCF fine-tunes a distilled LCM: point it at "
               "the workdir of README command 1 (or set config.model.pretrained to an LCM folder).")
    else:
        from lcm_jax.teachers import student_path

        if not os.path.isfile(student_path(os.path.expanduser(str(workdir)))):
            yield rules.bad("lcf.lcm_workdir", workdir, "holds no distilled student "
                            f"({student_path('W')})", "run README command 1 with that --workdir first")
