"""Unmasked multi-head attention for the UNet, VAE and DiT / LEGO blocks, [B, L, H, D] layout.

softmax(q k^T / sqrt(D)) v, by the kernel that the models' `attention` field names:

  xla         jax.nn.dot_product_attention's XLA path: runs anywhere, any dtype and shape, and the
              only one with forward-mode autodiff; autodiff keeps the [B, H, L, S] probabilities.
  chunked     memory-efficient attention (Rabe & Staats, arXiv 2112.05682, with FlashAttention's
              backward): queries in chunks of at most `query_chunk`, only each row's log-sum-exp
              kept, the probabilities recomputed chunk by chunk in the backward pass. Peak memory
              is O(chunk x S) instead of O(L x S), forward and backward.
  cudnn       cuDNN's fused flash attention (jax.nn.dot_product_attention(implementation="cudnn")):
              NVIDIA GPUs of compute capability >= 8.0, float16 / bfloat16, head dim a multiple of 8
              and <= 128 (<= 256 from Hopper on), even query and key lengths (jax 0.11 refuses odd
              ones under autodiff: SD's 77 text tokens): the limits of jax/_src/cudnn/
              fused_attention_stablehlo.py, which raises outside them, so "auto" checks them first.
  pallas_tpu  the Pallas splash-attention kernel (jax.experimental.pallas.ops.tpu.splash_attention).
              It tiles in 128-wide blocks, so lengths and head dim are zero-padded to multiples of
              128, padded keys masked out (segment ids) and the padding sliced off. A Mosaic kernel
              cannot be partitioned by jit: it runs in one-device programs, pmap or shard_map.
  auto        per call, at trace time: chunked on CPU (there the faster one too: autodiff's softmax
              backward spends more in the [B, H, L, S] reductions and relayouts than the recompute
              costs, `python -m experiments.benchmark --suite lcd_breakdown`); cudnn on an NVIDIA GPU
              where its limits allow; pallas_tpu on a one-device TPU v4+ where L and S are whole
              128-blocks (no padded rows); xla everywhere else (fp32 on GPU, the VAE's 512-wide head,
              77-token text keys on GPU and TPU, jit over several TPUs, other backends).

Naming cudnn or pallas_tpu insists on that kernel: a call it cannot run raises ValueError at trace
time rather than silently running another. chunked, cudnn and pallas_tpu define their own VJPs, so
they support reverse mode (grad, vjp) only: forward mode through a model (jax.jvp, jacfwd, e.g.
continuous-time consistency training) needs attention="xla".
"""
from __future__ import annotations

import functools
import re

import jax
import jax.numpy as jnp

IMPLEMENTATIONS = ("auto", "xla", "chunked", "cudnn", "pallas_tpu")
QUERY_CHUNK = 1024
TPU_TILE = 128  # the TPU's lane width: the splash kernel's smallest block and head-dim unit


def _backend() -> tuple[str, str, int]:
    """(platform, detail, device count) for the default backend: ("cpu", "", 1), ("cuda", compute
    capability e.g. "9.0", n), ("tpu", device kind e.g. "TPU v5 lite", n), ("rocm", "", n), ...
    Its own function so that tests can pretend to be a GPU or a TPU."""
    platform, device = jax.default_backend(), jax.devices()[0]
    if platform == "tpu":
        return "tpu", str(device.device_kind), jax.device_count()
    if platform not in ("gpu", "cuda", "rocm"):
        return platform, "", jax.device_count()
    if "cuda" not in str(getattr(device.client, "platform_version", "")).lower():
        return "rocm", "", jax.device_count()
    return "cuda", str(getattr(device, "compute_capability", "")), jax.device_count()


def _capability(text: str) -> tuple[int, int]:
    try:
        major, minor = text.split(".")[:2]
        return int(major), int(minor)
    except ValueError:
        return 0, 0


def _cudnn_problem(backend, q=None, k=None, v=None) -> str | None:
    """Why cuDNN's flash attention cannot take these q, k, v here (None: it can)."""
    platform, capability, _ = backend
    if platform != "cuda":
        return f"it needs an NVIDIA GPU and the default backend is {platform!r}"
    cc = _capability(capability)
    if cc < (8, 0):
        return f"cuDNN flash attention needs compute capability >= 8.0, this GPU has {capability!r}"
    if q is None:
        return None
    half = (jnp.dtype(jnp.float16), jnp.dtype(jnp.bfloat16))
    dtype = jnp.dtype(q.dtype)
    if not (dtype == jnp.dtype(k.dtype) == jnp.dtype(v.dtype) and dtype in half):
        return f"cuDNN flash attention takes float16 / bfloat16 q, k, v, not {q.dtype} (set model.dtype)"
    most, dim = (256 if cc >= (9, 0) else 128), q.shape[-1]
    if not (k.shape[-1] == v.shape[-1] == dim and dim % 8 == 0 and dim <= most):
        return (f"cuDNN flash attention needs a head dim that is a multiple of 8 and <= {most} on "
                f"compute capability {capability}, not {dim}")
    if q.shape[1] % 2 or k.shape[1] % 2:  # jax 0.11 refuses odd lengths under autodiff
        return (f"cuDNN flash attention's backward needs even sequence lengths, not query "
                f"{q.shape[1]}, keys {k.shape[1]}")
    return None


def _pallas_tpu_problem(backend, q=None, k=None, auto: bool = False) -> str | None:
    """Why the splash kernel should not run here (None: it should). Named explicitly it pads any
    shape. "auto" also wants no padded rows, a TPU v4 or later (jax tests splash from v4 on), and a
    one-device program: jit cannot partition a Mosaic kernel, and this module does not know the
    mesh to shard_map it over."""
    platform, kind, devices = backend
    if platform != "tpu":
        return f"it needs a TPU and the default backend is {platform!r}"
    if not auto:
        return None
    generation = re.search(r"\d+", kind)
    if generation and int(generation.group()) < 4:
        return f"{kind} predates TPU v4"
    if devices != 1:
        return f"jit cannot partition a Mosaic kernel over {devices} devices"
    if q is not None and (q.shape[1] % TPU_TILE or k.shape[1] % TPU_TILE):
        return f"lengths {q.shape[1]}, {k.shape[1]} are not multiples of {TPU_TILE}"
    return None


def resolve(implementation: str, q=None, k=None, v=None) -> str:
    """The kernel that `implementation` runs for these q, k, v (arrays or ShapeDtypeStructs,
    [B, L, H, D] / [B, S, H, D]) on the default backend; without them, the backend's choice for
    shapes that fit it."""
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"attention={implementation!r} is not one of {IMPLEMENTATIONS}; set "
                         f"config.model.attention to one of them.")
    if implementation in ("xla", "chunked"):
        return implementation
    backend = _backend()
    if implementation == "auto":
        if backend[0] == "cpu":
            return "chunked"
        if _cudnn_problem(backend, q, k, v) is None:
            return "cudnn"
        if _pallas_tpu_problem(backend, q, k, auto=True) is None:
            return "pallas_tpu"
        return "xla"
    if implementation == "cudnn":
        problem = _cudnn_problem(backend, q, k, v)
    else:
        problem = _pallas_tpu_problem(backend, q, k)
    if problem is not None:
        raise ValueError(f"attention={implementation!r} cannot run this attention: {problem}; set "
                         f"config.model.attention to 'auto' (this kernel where it can run, else "
                         f"'xla') or 'xla'.")
    return implementation


def dot_product_attention(q, k, v, implementation: str = "auto", query_chunk: int = QUERY_CHUNK):
    """softmax(q k^T / sqrt(D)) v for q [B, L, H, D], k and v [B, S, H, D] -> [B, L, H, D]."""
    kernel = resolve(implementation, q, k, v)
    if kernel == "chunked":
        return _chunked(q, k, v, _chunk_size(q.shape[1], query_chunk))
    if kernel == "cudnn":
        return jax.nn.dot_product_attention(q, k, v, implementation="cudnn")
    if kernel == "pallas_tpu":
        return _pallas_tpu(q, k, v)
    return jax.nn.dot_product_attention(q, k, v)


def _round_up(n: int, unit: int) -> int:
    return -(-n // unit) * unit


def _tpu_block(length: int) -> int:
    """The largest of 512, 256, 128 that divides `length` (a multiple of 128)."""
    return next(b for b in (4 * TPU_TILE, 2 * TPU_TILE, TPU_TILE) if length % b == 0)


def _pallas_tpu(q, k, v, interpret: bool = False):
    """Splash attention on [B, L, H, D]. The kernel takes one example's [H, L, D] (vmapped over B),
    does not scale q, and tiles L, S and D by 128: all three are zero-padded to multiples of 128
    (zero head-dim columns change no logit), padded keys get segment id 1 so that no query (id 0)
    sees them, and the padded rows and columns are sliced off. `interpret` runs it on CPU (tests)."""
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as masks

    _, length, heads, dim = q.shape
    keys = k.shape[1]
    lq, lk, width = _round_up(length, TPU_TILE), _round_up(keys, TPU_TILE), _round_up(dim, TPU_TILE)

    def heads_first(x, rows):  # [B, n, H, D] -> [B, H, rows, width]
        x = jnp.pad(x, ((0, 0), (0, rows - x.shape[1]), (0, 0), (0, width - dim)))
        return jnp.swapaxes(x, 1, 2)

    segments = None
    if lk != keys:
        segments = splash.SegmentIds(q=jnp.zeros((lq,), jnp.int32),
                                     kv=(jnp.arange(lk) >= keys).astype(jnp.int32))
    bq, bkv = _tpu_block(lq), _tpu_block(lk)
    sizes = splash.BlockSizes(block_q=bq, block_kv=bkv, block_kv_compute=bkv, block_q_dkv=bq,
                              block_kv_dkv=bkv, block_kv_dkv_compute=bkv, block_q_dq=bq, block_kv_dq=bkv)
    kernel = splash.make_splash_mha(masks.MultiHeadMask([masks.FullMask((lq, lk))] * heads),
                                    block_sizes=sizes, head_shards=1, q_seq_shards=1, interpret=interpret)
    q = q * jnp.asarray(dim ** -0.5, q.dtype)
    out = jax.vmap(kernel, in_axes=(0, 0, 0, None))(heads_first(q, lq), heads_first(k, lk),
                                                    heads_first(v, lk), segments)
    return jnp.swapaxes(out, 1, 2)[:, :length, :, :dim]


def _chunk_size(length: int, most: int) -> int:
    """The largest divisor of `length` that is <= `most` (4096 -> 1024, 9216 -> 1024, 77 -> 77);
    `length` itself (one chunk) when that divisor is too small to be worth a loop (a prime length)."""
    best = max(c for c in range(1, min(length, most) + 1) if length % c == 0)
    return best if best * 16 >= min(length, most) else length


def _split(x, chunk: int):
    """[B, L, ...] -> [L / chunk, B, chunk, ...], the leading axis scanned over."""
    b, length = x.shape[:2]
    return jnp.moveaxis(x.reshape(b, length // chunk, chunk, *x.shape[2:]), 1, 0)


def _merge(x):
    return jnp.moveaxis(x, 0, 1).reshape(x.shape[1], -1, *x.shape[3:])


def _logits(q, k):
    """Scaled logits [B, H, L, S] in float32 whatever the compute dtype."""
    q = q * jnp.asarray(q.shape[-1] ** -0.5, q.dtype)
    return jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32)


def _forward_chunk(q, k, v):
    s = _logits(q, k)
    m = jax.lax.stop_gradient(jnp.max(s, axis=-1, keepdims=True))
    p = jnp.exp(s - m)
    total = jnp.sum(p, axis=-1, keepdims=True)
    out = jnp.einsum("bhqk,bkhd->bqhd", p.astype(v.dtype), v, preferred_element_type=jnp.float32)
    out = out / jnp.swapaxes(total, 1, 2)  # normalised after the product: L x D divisions, not L x S
    return out.astype(v.dtype), m + jnp.log(total)  # and the row log-sum-exp, [B, H, chunk, 1]


def _forward(q, k, v, chunk):
    if chunk == q.shape[1]:
        return _forward_chunk(q, k, v)
    out, lse = jax.lax.map(lambda qc: _forward_chunk(qc, k, v), _split(q, chunk))
    n, b, h, c, _ = lse.shape  # [N, B, H, chunk, 1] -> [B, H, N * chunk, 1]
    return _merge(out), jnp.moveaxis(lse, 0, 2).reshape(b, h, n * c, 1)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _chunked(q, k, v, chunk):
    return _forward(q, k, v, chunk)[0]


def _chunked_fwd(q, k, v, chunk):
    out, lse = _forward(q, k, v, chunk)
    return out, (q, k, v, out, lse)


def _backward_chunk(k, v, q, out, lse, d_out):
    """One query chunk's dq, and its contributions to dk and dv (FlashAttention's backward)."""
    p = jnp.exp(_logits(q, k) - lse)  # the forward's probabilities, recomputed
    dv = jnp.einsum("bhqk,bqhd->bkhd", p.astype(d_out.dtype), d_out, preferred_element_type=jnp.float32)
    dp = jnp.einsum("bqhd,bkhd->bhqk", d_out, v, preferred_element_type=jnp.float32)
    delta = jnp.einsum("bqhd,bqhd->bhq", d_out.astype(jnp.float32), out.astype(jnp.float32))
    ds = (p * (dp - delta[..., None])).astype(q.dtype)
    scale = q.shape[-1] ** -0.5
    dq = jnp.einsum("bhqk,bkhd->bqhd", ds, k, preferred_element_type=jnp.float32) * scale
    dk = jnp.einsum("bhqk,bqhd->bkhd", ds, q, preferred_element_type=jnp.float32) * scale
    return dq, dk, dv


def _chunked_bwd(chunk, residuals, d_out):
    q, k, v, out, lse = residuals
    if chunk == q.shape[1]:
        dq, dk, dv = _backward_chunk(k, v, q, out, lse, d_out)
    else:
        def step(carry, xs):
            dq, dk, dv = _backward_chunk(k, v, *xs)
            return (carry[0] + dk, carry[1] + dv), dq

        lse_chunks = jnp.moveaxis(lse.reshape(*lse.shape[:2], -1, chunk, 1), 2, 0)
        zeros = jnp.zeros(k.shape, jnp.float32), jnp.zeros(v.shape, jnp.float32)
        (dk, dv), dq = jax.lax.scan(step, zeros, (_split(q, chunk), _split(out, chunk), lse_chunks,
                                                  _split(d_out, chunk)))
        dq = _merge(dq)
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype)


_chunked.defvjp(_chunked_fwd, _chunked_bwd)
