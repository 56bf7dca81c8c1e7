"""Pieces every objective's train step shares: the optimizer, EMA, per-example randomness."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from lcm_jax import parallel


def learning_rate(opt_config, total_steps: int):
    """Linear warmup, then constant or cosine decay to 0 (a pure function of the step)."""
    warmup = opt_config.get("warmup_steps", 0)
    decay = opt_config.get("decay", "constant")
    if decay == "cosine":
        after = optax.cosine_decay_schedule(opt_config.lr, max(total_steps - warmup, 1))
    elif decay == "constant":
        after = optax.constant_schedule(opt_config.lr)
    else:
        raise ValueError(f"config.optimizer.decay={decay!r}: use 'constant' or 'cosine'.")
    if not warmup:
        return after
    return optax.join_schedules([optax.linear_schedule(0.0, opt_config.lr, warmup), after], [warmup])


def make_optimizer(opt_config, total_steps: int) -> optax.GradientTransformation:
    """AdamW with gradient clipping by global norm (the LCD scripts' max_grad_norm = 1)."""
    chain = []
    if opt_config.get("grad_clip"):
        chain.append(optax.clip_by_global_norm(opt_config.grad_clip))
    chain.append(optax.adamw(learning_rate(opt_config, total_steps), b1=opt_config.get("b1", 0.9),
                             b2=opt_config.get("b2", 0.999), eps=opt_config.get("eps", 1e-8),
                             weight_decay=opt_config.get("weight_decay", 0.0)))
    return optax.chain(*chain)


def ema_update(ema_params, params, decay):
    """theta_ema <- decay theta_ema + (1 - decay) theta."""
    return jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, ema_params, params)


def apply_gradients(state, grads, metrics: dict, tx, ema_decay: float, axis_name: str | None = None):
    """Average over replicas, one optax update, the EMA, the step counter (+ grad_norm metric)."""
    grads, metrics = cross_replica_mean((grads, metrics), axis_name)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = jax.tree.map(jnp.add, state.params, updates)
    metrics = dict(metrics, grad_norm=jnp.sqrt(sum(jnp.sum(g ** 2) for g in jax.tree.leaves(grads))))
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                         ema_params=ema_update(state.ema_params, params, ema_decay)), metrics


def example_keys(rng, local_batch_size: int, axis_name: str | None = None):
    """One key per example, keyed by the example's GLOBAL index: the same numbers whether the
    batch runs on one device, sharded under jit, or split over pmap replicas."""
    offset = parallel.example_offset(axis_name, local_batch_size)
    return jax.vmap(lambda i: jax.random.fold_in(rng, i))(offset + jnp.arange(local_batch_size))


def cross_replica_mean(tree, axis_name: str | None):
    return tree if axis_name is None else jax.lax.pmean(tree, axis_name)
