"""The LCD step both sides run: a small SD-shaped UNet, its batch, lcm_jax's fused step and the
reference script's PyTorch step, plus the LCD objective on any UNet config (the memory suites'
SD 1.5 and SDXL, abstract weights)."""
import jax
import jax.numpy as jnp

from lcm_jax.models import unet


# A small SD-shaped UNet (cross-attention down/up blocks) on 16x16 latents: big enough that the
# UNet, not the Python around it, dominates both sides.
LCD_UNET = dict(sample_size=16, in_channels=4, out_channels=4, block_out_channels=(32, 64),
                layers_per_block=1, norm_num_groups=8, cross_attention_dim=32, attention_head_dim=4,
                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
LCD_BATCH, LCD_CONTEXT, W_DIM, W_RANGE, HUBER_C, EMA, LR = 8, 16, 256, (5.0, 15.0), 0.001, 0.95, 1e-5
# config.optimizer of the LCD step (the reference script's: clip 1, AdamW, constant lr).
OPTIMIZER = dict(lr=LR, warmup_steps=0, decay="constant", grad_clip=1.0, weight_decay=0.0,
                 b1=0.9, b2=0.999, eps=1e-8)
TOTAL_STEPS = 10 ** 6


class CachedTextConditioning:
    """Conditioning from precomputed prompt embeddings (both sides skip the text encoder); with
    `pooled` (SDXL) also the pooled embedding and the size / crop time ids."""
    frozen = {}

    def __init__(self, context: int, dim: int, pooled: int = 0):
        self.shape, self.pooled = (context, dim), pooled

    def prepare_batch(self, batch):
        return batch

    def _added(self, batch, pooled):
        return {"added_cond": {"text_embeds": pooled, "time_ids": batch["time_ids"]}} if self.pooled else {}

    def encode(self, batch, frozen):
        h = batch["prompt_embeds"]
        cond = {"encoder_hidden_states": h, **self._added(batch, batch.get("pooled_embeds"))}
        uncond = {"encoder_hidden_states": jnp.broadcast_to(batch["uncond_embeds"][:1], h.shape),
                  **self._added(batch, jnp.zeros_like(batch.get("pooled_embeds", h[:, 0])))}
        return cond, uncond

    def sample_conditions(self, frozen, num):  # shapes for the student's init; no sampling here
        batch = {"time_ids": jnp.zeros((num, 6)), "pooled_embeds": jnp.zeros((num, self.pooled))}
        cond = {"encoder_hidden_states": jnp.zeros((num,) + self.shape), **self._added(batch, batch["pooled_embeds"])}
        return cond, cond, jnp.arange(num)


def init_unet(module, side: int, context: int = LCD_CONTEXT, rng=None):
    """Random params of a UNet module (seed 0 unless `rng`)."""
    x, t, kw = unet.example_inputs(module.config, 1, side, context)
    return module.init(jax.random.PRNGKey(0) if rng is None else rng, x, t, **kw)["params"]


def lcd_objective(unet_config: dict, image_side: int, params=None, lora_rank: int = 0,
                  remat: bool = False, context: int = LCD_CONTEXT, attention: str = "auto",
                  dtype=jnp.float32):
    """The LCD objective (objectives.consistency with lcd's strategy) on a UNet teacher with
    cached text embeddings; params=None: abstract weights."""
    import ml_collections

    from lcm_jax import models
    from lcm_jax.diffusion import schedule as sched
    from lcm_jax.objectives import consistency, lcd
    from lcm_jax.objectives.parts import Base

    teacher_module = unet.from_config(unet_config, remat=remat, attention=attention, dtype=dtype)
    student_module = unet.from_config(dict(unet_config, time_cond_proj_dim=W_DIM), remat=remat,
                                      attention=attention, dtype=dtype)
    if params is None:
        params = unet.abstract_params(teacher_module)
    side = image_side // 8
    base = Base(models.Denoiser(teacher_module), params,
                sched.make_schedule("scaled_linear", 1000, 0.00085, 0.012), "epsilon",
                CachedTextConditioning(context, unet_config["cross_attention_dim"], pooled_dim(unet_config)),
                (side, side, 4),
                student_net=models.Denoiser(student_module))
    config = ml_collections.ConfigDict(dict(
        total_steps=TOTAL_STEPS, ema_decay=EMA, optimizer=OPTIMIZER,
        lcd=dict(num_ddim_timesteps=50, solver="ddim", w_min=W_RANGE[0], w_max=W_RANGE[1],
                 w_embedding_dim=W_DIM, loss="huber", huber_c=HUBER_C,
                 target="online" if lora_rank else "ema",
                 lora=dict(rank=lora_rank, alpha=float(lora_rank)) if lora_rank else None)))
    return consistency.ConsistencyObjective(config, base, lcd.STRATEGY)


def pooled_dim(unet_config: dict) -> int:
    """SDXL's pooled text embedding width (0 for SD 1.x / 2.x)."""
    if unet_config.get("addition_embed_type") != "text_time":
        return 0
    return unet_config["projection_class_embeddings_input_dim"] - 6 * unet_config["addition_time_embed_dim"]


def lcd_batch(b: int, side: int, context: int, dim: int, seed: int = 0, pooled: int = 0):
    import numpy as np

    rng = np.random.default_rng(seed)
    batch = {"latents": rng.standard_normal((b, side, side, 4)).astype("float32"),
             "prompt_embeds": rng.standard_normal((b, context, dim)).astype("float32"),
             "uncond_embeds": rng.standard_normal((b, context, dim)).astype("float32")}
    if pooled:
        batch.update(pooled_embeds=rng.standard_normal((b, pooled)).astype("float32"),
                     time_ids=np.tile(np.asarray([[8.0 * side, 8.0 * side, 0, 0, 8.0 * side, 8.0 * side]],
                                                 "float32"), (b, 1)))
    return batch


def jax_lcd_step(batch: dict, attention: str = "auto", compiler_options: dict | None = None,
                 unet_config: dict = LCD_UNET, lora_rank: int = 0, dtype=jnp.float32,
                 teacher_dtype=None):
    """A callable running one fused LCD step of lcm_jax (until its loss is ready) on `batch`, with
    random weights of `unet_config`; `dtype` the compute dtype, `teacher_dtype` the frozen
    teacher's storage (the trained params stay float32). `step.compiled` is the XLA program."""
    from lcm_jax import models

    side, context = batch["latents"].shape[1], batch["prompt_embeds"].shape[1]
    # The key is an argument: XLA would constant-fold an argument-free init (minutes on a GPU).
    params = jax.jit(lambda rng: init_unet(unet.from_config(unet_config), side, context, rng))(
        jax.random.PRNGKey(0))
    objective = lcd_objective(unet_config, side * 8, params, lora_rank=lora_rank,
                              attention=attention, context=context, dtype=dtype)
    frozen = objective.frozen  # {"base": the teacher's params}
    if teacher_dtype is not None:
        frozen = jax.jit(lambda f: models.as_dtype(f, teacher_dtype))(frozen)
    del params
    state = jax.jit(objective.init_state)(jax.random.PRNGKey(0), frozen)
    device_batch = jax.device_put(batch)
    step_fn = jax.jit(objective.train_step, donate_argnums=0).lower(state, device_batch, frozen).compile(
        compiler_options=compiler_options)
    holder = {"state": state}

    def step():
        holder["state"], metrics = step_fn(holder["state"], device_batch, frozen)
        jax.block_until_ready(metrics["loss"])

    step.compiled = step_fn
    return step


def torch_lcd_step(batch: dict, unet_config: dict = LCD_UNET, device: str = "cpu",
                   bf16: bool = False):
    """The reference LCD script's step (diffusers examples/consistency_distillation), verbatim in
    structure: 4 UNet forwards (student, teacher cond, teacher uncond, target) + 1 backward. With
    `bf16`, as the script runs under mixed precision: the teacher stored in bf16, the student
    and its EMA target in float32, the UNet calls under bf16 autocast."""
    import contextlib
    import copy

    import diffusers
    import torch

    torch.manual_seed(0)
    teacher = diffusers.UNet2DConditionModel.from_config(dict(unet_config)).eval().requires_grad_(False)
    student = diffusers.UNet2DConditionModel.from_config(dict(unet_config, time_cond_proj_dim=W_DIM))
    student.load_state_dict(teacher.state_dict(), strict=False)
    teacher.to(device, dtype=torch.bfloat16 if bf16 else torch.float32)
    student.to(device).train()
    target = copy.deepcopy(student).requires_grad_(False)
    autocast = (lambda: torch.autocast(device, dtype=torch.bfloat16)) if bf16 else contextlib.nullcontext
    opt = torch.optim.AdamW(student.parameters(), lr=LR, betas=(0.9, 0.999), weight_decay=0.0, eps=1e-8)
    sched = diffusers.DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    abar = sched.alphas_cumprod.to(device)
    alpha, sigma = abar.sqrt(), (1 - abar).sqrt()
    k = 20
    ddim_ts = torch.arange(1, 51, device=device) * k - 1
    latents = torch.from_numpy(batch["latents"]).permute(0, 3, 1, 2).contiguous().to(device)
    embeds = torch.from_numpy(batch["prompt_embeds"]).to(device)
    uncond = torch.from_numpy(batch["uncond_embeds"])[:1].expand_as(embeds).to(device)
    b = latents.shape[0]
    col = lambda a: a[:, None, None, None]

    def scalings(t):
        st = t.float() * 10.0
        return 0.25 / (st ** 2 + 0.25), st / (st ** 2 + 0.25) ** 0.5

    def w_embedding(w):
        w = w * 1000.0
        half = W_DIM // 2
        freqs = torch.exp(torch.arange(half, device=device) * -(torch.log(torch.tensor(10000.0)) / (half - 1)))
        args = w[:, None] * freqs[None]
        return torch.cat([torch.sin(args), torch.cos(args)], dim=1)

    def step():
        index = torch.randint(0, 50, (b,), device=device)
        start = ddim_ts[index]
        t = torch.clamp(start - k, min=0)
        cs_start, co_start = scalings(start)
        cs, co = scalings(t)
        noise = torch.randn_like(latents)
        noisy = col(alpha[start]) * latents + col(sigma[start]) * noise
        w = (W_RANGE[1] - W_RANGE[0]) * torch.rand(b, device=device) + W_RANGE[0]
        w_emb = w_embedding(w)
        with autocast():
            out = student(noisy, start, timestep_cond=w_emb, encoder_hidden_states=embeds).sample.float()
        x0 = (noisy - col(sigma[start]) * out) / col(alpha[start])
        model_pred = col(cs_start) * noisy + col(co_start) * x0
        with torch.no_grad(), autocast():
            eps_c = teacher(noisy, start, encoder_hidden_states=embeds).sample.float()
            eps_u = teacher(noisy, start, encoder_hidden_states=uncond).sample.float()
            x0_c = (noisy - col(sigma[start]) * eps_c) / col(alpha[start])
            x0_u = (noisy - col(sigma[start]) * eps_u) / col(alpha[start])
            x0_w = x0_c + col(w) * (x0_c - x0_u)
            eps_w = eps_c + col(w) * (eps_c - eps_u)
            x_prev = col(alpha[t]) * x0_w + col(sigma[t]) * eps_w
            out_t = target(x_prev, t, timestep_cond=w_emb, encoder_hidden_states=embeds).sample.float()
            x0_t = (x_prev - col(sigma[t]) * out_t) / col(alpha[t])
            target_pred = col(cs) * x_prev + col(co) * x0_t
        loss = torch.mean(torch.sqrt((model_pred - target_pred) ** 2 + HUBER_C ** 2) - HUBER_C)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        with torch.no_grad():
            for p_t, p in zip(target.parameters(), student.parameters()):
                p_t.mul_(EMA).add_(p, alpha=1 - EMA)
        if device != "cpu":
            torch.cuda.synchronize()

    return step


def lcd_batch_for_step() -> dict:
    return lcd_batch(LCD_BATCH, LCD_UNET["sample_size"], LCD_CONTEXT, LCD_UNET["cross_attention_dim"])
