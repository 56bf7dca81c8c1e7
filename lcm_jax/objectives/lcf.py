"""Latent Consistency Fine-tuning (LCF; Latent Consistency Models Sec. 4.4, Algorithm 4): a
distilled LCM fine-tuned on a custom dataset with NO teacher, as LCD's ONE compiled step.

Both points of the pair come from the same data sample z and the same noise on the forward
process: x_{t_{n+k}} = alpha_{t_{n+k}} z + sigma_{t_{n+k}} eps and x_hat_{t_n} = alpha_{t_n} z +
sigma_{t_n} eps (consistency training's estimate of the PF-ODE step, in place of the teacher's),
then LCD's loss d(f_theta(x_{t_{n+k}}, w, c, t_{n+k}), f_theta^-(x_hat_{t_n}, w, c, t_n)) with the
EMA target, skip k and the w-embedding kept (w ~ U[w_min, w_max] as in distillation, so the
fine-tuned LCM still takes the guidance scale it was distilled with).

The starting LCM is `Teacher.params` with `Teacher.net` its network (the w-embedding input
`time_cond_proj` included); it is the `frozen["lcm"]` input the state is initialised from and
never called in the step. Full-parameter fine-tuning only.
"""
from __future__ import annotations

import dataclasses

from lcm_jax.diffusion import schedule as sched
from lcm_jax.objectives.lcd import LCDObjective, Teacher


class LCFObjective(LCDObjective):
    def __init__(self, config, lcm: Teacher):
        if config.lcd.get("lora"):
            raise ValueError("config.lcd.lora is set, but LCF fine-tunes the full LCM; set "
                             "config.lcd.lora=None.")
        super().__init__(config, dataclasses.replace(lcm, student_net=lcm.student_net or lcm.net))
        self.frozen = {"lcm": lcm.params, **self.conditioning.frozen}
        if lcm.vae is not None:
            self.frozen["vae"] = lcm.vae_params

    def starting_point(self, frozen):
        return frozen["lcm"]

    def previous_point(self, frozen, z, d, x_t, t, s, cond, uncond):
        """x_hat_{t_n}: the same sample and the same noise, at t_n (no teacher)."""
        return sched.add_noise(z, d["noise"], *self.schedule.alpha_sigma(s))

    def teacher_sample_fn(self, *args, **kwargs):
        raise ValueError("LCF has no teacher to sample; evaluate the LCM (sampler 'lcm' or 'tcd').")
