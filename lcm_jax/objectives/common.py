"""Pieces every objective's train step shares: the step itself, the optimizer, EMA, per-example
randomness, and running a named sampler."""
from __future__ import annotations

import functools
import math
import numbers
from typing import Mapping

import jax
import jax.numpy as jnp
import optax

from lcm_jax import parallel
from lcm_jax.diffusion import samplers


def learning_rate(opt_config, total_steps: int):
    """Linear warmup, then constant or cosine decay to 0 (a pure function of the optimizer's
    update count). Under gradient accumulation the count is of updates, not train steps: the
    warmup and the decay horizon are `optimizer.warmup_steps` and `total_steps` divided by
    `optimizer.accumulate_steps` (every `*_steps` of a config counts train steps)."""
    k = accumulate_steps(opt_config)
    warmup = opt_config.get("warmup_steps", 0) // k
    total_updates = total_steps // k
    decay = opt_config.get("decay", "constant")
    if decay == "cosine":
        after = optax.cosine_decay_schedule(opt_config.lr, max(total_updates - warmup, 1))
    elif decay == "constant":
        after = optax.constant_schedule(opt_config.lr)
    else:
        raise ValueError(f"config.optimizer.decay={decay!r}: use 'constant' or 'cosine'.")
    if not warmup:
        return after
    return optax.join_schedules([optax.linear_schedule(0.0, opt_config.lr, warmup), after], [warmup])


def accumulate_steps(opt_config) -> int:
    """`optimizer.accumulate_steps` (1 when unset): micro-batches per optimizer update."""
    k = opt_config.get("accumulate_steps", 1)
    if isinstance(k, bool) or not isinstance(k, numbers.Integral) or k < 1:
        raise ValueError(f"config.optimizer.accumulate_steps={k!r}: use an int >= 1.")
    return int(k)


def make_optimizer(opt_config, total_steps: int,
                   lr_scales: Mapping[str, float] | None = None) -> optax.GradientTransformation:
    """AdamW with gradient clipping by global norm (the LCD scripts' max_grad_norm = 1).

    `lr_scales` {param-path substring: factor}: the params whose path (keys joined by "/", e.g.
    "time_embedding/cond_proj/kernel") contains the substring are updated by AdamW at the
    learning rate times the factor, every other param at the learning rate (torch's param groups
    with their own lr: Adam's moments are per param either way, and the decoupled weight decay
    is lr * factor * weight_decay, as torch's AdamW does with a group's lr). The gradient is
    clipped by its global norm over ALL params before the split (optax.multi_transform, the
    groups labelled from the param tree when the optimizer is initialised). A param matching
    two substrings, or a substring matching none, is an error. None, {} or factors of 1: the
    plain chain, bit for bit (no multi_transform).

    `optimizer.accumulate_steps` = k > 1 wraps it in optax.MultiSteps: each train step adds its
    batch's gradient to a running mean, and every k-th step the clip + AdamW update runs on the
    mean of the k gradients (in between the params do not move; `apply_gradients` updates the
    EMA only on the updating steps). k steps of batch B then equal one step of batch k B: the
    effective batch is k * config.batch_size, there are total_steps // k updates, and the
    schedule counts updates. k = 1: the plain chain, no wrapper."""
    schedule = learning_rate(opt_config, total_steps)
    adamw = lambda lr: optax.adamw(lr, b1=opt_config.get("b1", 0.9), b2=opt_config.get("b2", 0.999),
                                   eps=opt_config.get("eps", 1e-8),
                                   weight_decay=opt_config.get("weight_decay", 0.0))
    scales = checked_lr_scales(lr_scales)
    chain = []
    if opt_config.get("grad_clip"):
        chain.append(optax.clip_by_global_norm(opt_config.grad_clip))
    if scales:
        groups = {DEFAULT_GROUP: adamw(schedule)}
        for i, factor in enumerate(scales.values()):
            groups[f"lr_scale_{i}"] = adamw(lambda count, f=factor: schedule(count) * f)
        chain.append(optax.multi_transform(groups, functools.partial(lr_groups, tuple(scales))))
    else:
        chain.append(adamw(schedule))
    tx = optax.chain(*chain)
    k = accumulate_steps(opt_config)
    if k > 1:
        tx = optax.MultiSteps(tx, every_k_schedule=k).gradient_transformation()
    return tx


DEFAULT_GROUP = "default"  # make_optimizer's group of the params no lr_scales substring names


def checked_lr_scales(lr_scales) -> dict[str, float]:
    """`lr_scales` without its factors of 1, each a real >= 0 (0 freezes the group)."""
    scales = {}
    for substring, factor in (lr_scales or {}).items():
        if not isinstance(substring, str) or not substring:
            raise ValueError(f"lr_scales key {substring!r}: use a non-empty param-path substring.")
        if isinstance(factor, bool) or not isinstance(factor, numbers.Real) or not (
                math.isfinite(factor) and factor >= 0):
            raise ValueError(f"lr_scales[{substring!r}]={factor!r}: use a finite real >= 0.")
        if factor != 1:
            scales[substring] = float(factor)
    return scales


def param_path(keypath) -> str:
    """A jax key path as "a/b/c" (dict keys, attribute names, sequence indices)."""
    name = lambda k: str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k))))
    return "/".join(map(name, keypath))


def lr_groups(substrings: tuple, tree):
    """The make_optimizer group of each leaf of `tree` (params or updates): "lr_scale_{i}" for
    the one substring its path contains, DEFAULT_GROUP for none."""
    used = set()

    def label(keypath, _):
        path = param_path(keypath)
        hits = [i for i, s in enumerate(substrings) if s in path]
        if len(hits) > 1:
            raise ValueError(f"Param {path!r} matches several lr_scales substrings "
                             f"{[substrings[i] for i in hits]}; make them disjoint.")
        used.update(hits)
        return f"lr_scale_{hits[0]}" if hits else DEFAULT_GROUP

    labels = jax.tree_util.tree_map_with_path(label, tree)
    if len(used) < len(substrings):
        missing = [s for i, s in enumerate(substrings) if i not in used]
        paths = [param_path(p) for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0][:3]]
        raise ValueError(f"lr_scales substrings {missing} match no param path (the paths read "
                         f"like {paths}).")
    return labels


def ema_update(ema_params, params, decay):
    """theta_ema <- decay theta_ema + (1 - decay) theta."""
    return jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, ema_params, params)


def apply_gradients(state, grads, metrics: dict, tx, ema_decay: float, axis_name: str | None = None):
    """Average over replicas, one optax update, the EMA, the step counter (+ grad_norm metric).
    Under gradient accumulation (an optax.MultiSteps state, `make_optimizer`) the params move
    and the EMA / target network follows only on the steps where the accumulated update was
    applied; `step` counts train steps (micro-batches) either way."""
    grads, metrics = cross_replica_mean((grads, metrics), axis_name)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = jax.tree.map(jnp.add, state.params, updates)
    metrics = dict(metrics, grad_norm=jnp.sqrt(sum(jnp.sum(g ** 2) for g in jax.tree.leaves(grads))))
    ema_params = ema_update(state.ema_params, params, ema_decay)
    if isinstance(opt_state, optax.MultiStepsState):
        updated = opt_state.gradient_step > state.opt_state.gradient_step
        ema_params = jax.tree.map(lambda new, old: jnp.where(updated, new, old), ema_params,
                                  state.ema_params)
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                         ema_params=ema_params), metrics


def train_step(loss_fn, state, batch, frozen, axis_name, tx, ema_decay: float):
    """THE train step: the loss and its gradient at the step's key, then `apply_gradients`.

    `loss_fn(params, state, batch, frozen, rng, axis_name) -> (loss, (metrics, stats))`: `stats`
    is the state's running statistics after this step (`state.stats` when it keeps none); the
    state carries them, checkpointed with the params."""
    rng = jax.random.fold_in(state.rng, state.step)
    (_, (metrics, stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state.params, state, batch, frozen, rng, axis_name)
    state, metrics = apply_gradients(state, grads, metrics, tx, ema_decay, axis_name)
    return state.replace(stats=stats), metrics


def run_sampler(sample_config, model_fn, x, schedule, prediction_type: str, rng, **defaults):
    """`sample_config.sampler` for `num_steps` from `x`: its `sampler_kwargs` over `defaults`,
    and the per-step noise from `rng` (folded, so that it never repeats x's draw) for the
    samplers that re-noise (LCM, TCD, DDIM with eta > 0)."""
    kwargs = {**defaults, **(sample_config.get("sampler_kwargs", None) or {})}
    if sample_config.sampler in samplers.STOCHASTIC or kwargs.get("eta"):
        kwargs["rng"] = jax.random.fold_in(rng, 1)
    return samplers.sample(sample_config.sampler, model_fn, x, schedule, sample_config.num_steps,
                           prediction_type=prediction_type, **kwargs)


def guided_samples(apply, conditioning, latent, schedule, prediction_type: str, frozen, rng,
                   num_images: int, sample_config, **defaults):
    """(images in [-1, 1], labels): `apply(x, t, cond)` sampled under classifier-free guidance
    (sample_config's sampler, steps and guidance scale; one batched call of 2B per step) from
    the conditioning's sample conditions, decoded from `latent` (a parts.LatentSpace)."""
    cond, uncond, labels = conditioning.sample_conditions(frozen, num_images)
    z = jax.random.normal(rng, (num_images,) + latent.shape)
    model_fn = samplers.guided(apply, cond, uncond, sample_config.guidance_scale)
    latents = run_sampler(sample_config, model_fn, z, schedule, prediction_type, rng, **defaults)
    return latent.decode(frozen, latents), labels


def example_keys(rng, local_batch_size: int, axis_name: str | None = None):
    """One key per example, keyed by the example's GLOBAL index: the same numbers whether the
    batch runs on one device, sharded under jit, or split over pmap replicas."""
    offset = parallel.example_offset(axis_name, local_batch_size)
    return jax.vmap(lambda i: jax.random.fold_in(rng, i))(offset + jnp.arange(local_batch_size))


def cross_replica_mean(tree, axis_name: str | None):
    return tree if axis_name is None else jax.lax.pmean(tree, axis_name)
