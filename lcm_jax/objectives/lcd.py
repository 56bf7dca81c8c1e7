"""Latent Consistency Distillation (Latent Consistency Models, arXiv 2310.04378, Algorithm 1),
full-parameter and LCM-LoRA: the consistency family's strategy that makes x_hat_{t_n} with the
teacher's CFG-augmented skip-step solver (DDIM, DPM-Solver, DPM-Solver++) and maps both points
of the pair to the data with the consistency function. The step is objectives/consistency.py's.
"""
from lcm_jax.objectives import Export, consistency

STRATEGY = consistency.Strategy(previous_point=consistency.teacher_step)
REQUIRED, SAMPLERS, config_problems = (consistency.REQUIRED, consistency.SAMPLERS,
                                       consistency.config_problems)
EXPORT = Export(network="student", lora_section="lcd", scheduler="LCMScheduler",
                pipeline="LatentConsistencyModelPipeline")
DIGITS_EVALUATION = "few_step_table"


def build(config, workdir: str, pipeline) -> consistency.ConsistencyObjective:
    return consistency.ConsistencyObjective(config, consistency.base_for(config, workdir, pipeline),
                                            STRATEGY)
