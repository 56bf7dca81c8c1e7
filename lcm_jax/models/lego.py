"""LEGO bricks (Zheng et al., "Learning Stackable and Skippable LEGO Bricks for Efficient,
Reconfigurable, and Variable-Resolution Diffusion Modeling", arXiv 2310.06389), NHWC.

A brick k tiles the canvas into r_k x r_k tiles and refines every tile on its own: the tile of
[noisy input, the previous brick's output (bricks after the first), two coordinate channels in
[-1, 1] over the WHOLE canvas] -> patch embedding with token size p_k -> the tile's sin-cos
positions -> DiT adaLN-zero blocks over the tile's (r_k / p_k)^2 tokens -> its own final layer ->
re-assembled to the full canvas. The time and class embedders are shared by all bricks.

A stack is a list of (r, p, depth, width, num_heads): progressive growth (PG, r grows), progressive
refinement (PR, r shrinks) or LEGO-U (both) are just lists. Nothing a brick does depends on the
canvas except through its tiles, so one set of parameters runs on any canvas whose sides are
multiples of every r_k, square or not (the image brick of training becomes a patch brick of a
wider canvas).

Skipping: `__call__(..., num_bricks=K - 1)` runs the bottom K - 1 bricks and returns the last one's
output; the top brick is not in the traced program at all, so its FLOPs are gone (tested on XLA's
cost analysis). `skip_phase` says when a stack's top brick may be dropped: a global (image-level)
top brick at low noise, a finer patch top brick at high noise.

Shifted tiling (sampling above the training resolution; objectives/edm.py): each evaluation
runs on the canvas placed inside one a tile larger, at an offset that alternates between 0 and half
a tile with the noise level, with `shifted_coordinates`; tile borders then move between steps and
neighbouring tiles see each other's content, instead of each being a training-size image.

Patch subsampling (training): `outputs(..., tiles=[idx_k or None], fill=F)` computes only the tiles
idx_k [B, m_k] of brick k; its other tiles take the values of `fill`. `nested_tiles` makes the
index sets nested (locations drawn once at the coarsest patch brick, every finer patch brick
computing exactly the tiles under them), so a computed tile never reads a filled one: only an
image brick above subsampled bricks sees `fill` (objectives/edm.py passes zeros, never x0).
"""
from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from lcm_jax.models.dit import DiTBlock, FinalLayer, condition_embedding, pos_embed, unpatchify

BRICK_FIELDS = ("resolution", "patch", "depth", "width", "num_heads")


def coordinate_channels(height: int, width: int) -> np.ndarray:
    """[H, W, 2]: (row, column) pixel coordinates, each in [-1, 1] over the whole canvas."""
    rows = np.linspace(-1.0, 1.0, height, dtype=np.float32)
    cols = np.linspace(-1.0, 1.0, width, dtype=np.float32)
    return np.stack(np.meshgrid(rows, cols, indexing="ij"), axis=-1)


def shifted_coordinates(height: int, width: int, margin: int, dy, dx):
    """[H + margin, W + margin, 2]: an H x W canvas's coordinate channels with the canvas placed at
    row dy, column dx (traced or not) of one `margin` larger, extended linearly into the margin:
    every pixel of the canvas keeps its coordinate wherever the tile grid lies."""
    rows = -1.0 + (jnp.arange(height + margin, dtype=jnp.float32) - dy) * (2.0 / (height - 1))
    cols = -1.0 + (jnp.arange(width + margin, dtype=jnp.float32) - dx) * (2.0 / (width - 1))
    return jnp.stack(jnp.meshgrid(rows, cols, indexing="ij"), axis=-1)


def to_tiles(x, r: int):
    """[B, H, W, C] -> [B, (H / r) (W / r), r, r, C], tiles in row-major order."""
    b, h, w, c = x.shape
    x = x.reshape(b, h // r, r, w // r, r, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, (h // r) * (w // r), r, r, c)


def from_tiles(tiles, height: int, width: int):
    """Inverse of to_tiles: [B, n, r, r, C] -> [B, H, W, C]."""
    b, _, r, _, c = tiles.shape
    x = tiles.reshape(b, height // r, width // r, r, r, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, height, width, c)


def num_tiles(brick, height: int, width: int) -> int:
    return (height // brick[0]) * (width // brick[0])


def skip_phase(stack: Sequence[Sequence[int]]) -> str:
    """When the top brick may be skipped: 'low_noise' when it is at least as coarse as the brick
    below it (PG's and LEGO-U's image brick, which builds global structure), 'high_noise' when
    it is finer (PR's small patch brick, which adds local detail)."""
    if len(stack) < 2:
        raise ValueError("A one-brick stack has nothing to skip.")
    return "low_noise" if stack[-1][0] >= stack[-2][0] else "high_noise"


class Brick(nn.Module):
    """One LEGO brick on tiles: [N, r, r, C_in] with condition [N, D] -> [N, r, r, out_channels]."""
    resolution: int
    patch: int
    depth: int
    width: int
    num_heads: int
    out_channels: int
    mlp_ratio: float = 4.0
    dtype: Any = jnp.float32
    remat: bool = False
    attention: str = "auto"

    @nn.compact
    def __call__(self, tiles, c):
        n, r, p = tiles.shape[0], self.resolution, self.patch
        g = r // p  # tokens per tile side
        patch_init = nn.initializers.xavier_uniform(in_axis=(0, 1, 2), out_axis=3)
        x = nn.Conv(self.width, (p, p), strides=(p, p), padding="VALID", dtype=self.dtype,
                    kernel_init=patch_init, name="x_embedder")(tiles.astype(self.dtype))
        x = x.reshape(n, g * g, self.width) + pos_embed(g, g, self.width, x.dtype)
        block = nn.remat(DiTBlock) if self.remat else DiTBlock
        for i in range(self.depth):
            x = block(self.width, self.num_heads, self.mlp_ratio, self.dtype, self.attention,
                      name=f"blocks_{i}")(x, c)
        x = FinalLayer(p, self.out_channels, self.dtype, name="final_layer")(x, c)
        return unpatchify(x, g, g, p).astype(jnp.float32)


class LEGO(nn.Module):
    """A stack of LEGO bricks: x [B, H, W, C], t [B] (or a scalar), labels [B] or None
    -> the top brick's output [B, H, W, out_channels] (out_channels defaults to C).

    `stack`: ((r, p, depth, width, num_heads), ...) from the bottom brick to the top. Null-class
    convention as DiT's: labels == num_classes (or None) is the unconditional class.
    """
    stack: tuple
    num_classes: int = 0
    out_channels: int | None = None
    cond_width: int | None = None  # width of the shared time/class embedding; default max width
    mlp_ratio: float = 4.0
    dtype: Any = jnp.float32
    remat: bool = False
    time_cond_proj_dim: int | None = None  # the w-embedding input of consistency students
    attention: str = "auto"  # attention.IMPLEMENTATIONS

    @property
    def null_class(self) -> int:
        return self.num_classes

    def __call__(self, x, t, labels=None, timestep_cond=None, num_bricks: int | None = None,
                 coords=None):
        return self.outputs(x, t, labels, timestep_cond, num_bricks=num_bricks, coords=coords)[-1]

    @nn.compact
    def outputs(self, x, t, labels=None, timestep_cond=None, *, num_bricks: int | None = None,
                tiles: Sequence | None = None, fill=None, coords=None):
        """Every computed brick's output (bottom first). `num_bricks` runs only the bottom ones;
        `tiles[k]` ([B, m] tile indices, or None for all) computes a subset of brick k's tiles,
        the rest taken from `fill` [B, H, W, out_channels]. `coords` [H, W, 2] replaces the
        canvas's coordinate channels (`shifted_coordinates`: a canvas inside a larger one)."""
        b, height, width, channels = x.shape
        for k, (r, p, *_rest) in enumerate(self.stack):
            if height % r or width % r:
                raise ValueError(f"Canvas {height}x{width} is not a multiple of brick {k}'s tile "
                                 f"size r={r}: use sides that are multiples of {max_tile(self.stack)}.")
            if r % p:
                raise ValueError(f"Brick {k}: tile size r={r} is not a multiple of its patch p={p}.")
        out_channels = self.out_channels or channels
        count = len(self.stack) if num_bricks is None else num_bricks
        if not 1 <= count <= len(self.stack):
            raise ValueError(f"num_bricks={num_bricks}: run between 1 and {len(self.stack)} bricks.")
        c = condition_embedding(t, labels, timestep_cond, batch=b,
                                width=self.cond_width or max(brick[3] for brick in self.stack),
                                num_classes=self.num_classes,
                                time_cond_proj_dim=self.time_cond_proj_dim, dtype=self.dtype)
        coords = coordinate_channels(height, width) if coords is None else coords
        coords = jnp.broadcast_to(jnp.asarray(coords, x.dtype), (b, height, width, 2))
        prev, outs = None, []
        for k, (r, p, depth, brick_width, heads) in enumerate(self.stack[:count]):
            brick = Brick(r, p, depth, brick_width, heads, out_channels, self.mlp_ratio, self.dtype,
                          self.remat, self.attention, name=f"bricks_{k}")
            inputs = jnp.concatenate([x, coords] if prev is None else [x, prev, coords], axis=-1)
            tile_in = to_tiles(inputs, r)
            n = tile_in.shape[1]
            idx = None if tiles is None else tiles[k]
            if idx is None:
                out = brick(tile_in.reshape((b * n,) + tile_in.shape[2:]), jnp.repeat(c, n, axis=0))
                out = out.reshape(b, n, r, r, out_channels)
            else:
                m = idx.shape[1]
                chosen = jnp.take_along_axis(tile_in, idx[:, :, None, None, None], axis=1)
                computed = brick(chosen.reshape((b * m,) + chosen.shape[2:]), jnp.repeat(c, m, axis=0))
                out = to_tiles(fill, r).at[jnp.arange(b)[:, None], idx].set(
                    computed.reshape(b, m, r, r, out_channels))
            prev = from_tiles(out, height, width)
            outs.append(prev)
        return outs


def nested_tiles(stack, height: int, width: int, chosen) -> list:
    """Per brick, the tiles to compute when `chosen` [B, m] are the computed tiles of the stack's
    coarsest patch brick (`coarsest_patch`): a patch brick with tile r computes the
    (r_c / r)^2 tiles under each chosen one (row-major indices [B, m (r_c / r)^2]); an image
    brick (one tile) is computed whole (None). Tile sizes of patch bricks must divide r_c."""
    r_c = coarsest_patch(stack, height, width)
    rows_c, cols_c = divmod(chosen, width // r_c)  # [B, m] each
    indices = []
    for k, (r, *_rest) in enumerate(stack):
        if num_tiles((r,), height, width) == 1:
            indices.append(None)
            continue
        if r_c % r:
            raise ValueError(f"Brick {k}'s tile size r={r} does not divide the coarsest patch "
                             f"brick's r={r_c}: nested patch subsampling needs nested tiles.")
        f, a = r_c // r, np.arange(r_c // r)
        rows = rows_c[..., None, None] * f + a[:, None]  # [B, m, f, 1]
        cols = cols_c[..., None, None] * f + a[None, :]  # [B, m, 1, f]
        indices.append((rows * (width // r) + cols).reshape(chosen.shape[0], -1))
    return indices


def coarsest_patch(stack, height: int, width: int) -> int | None:
    """The largest tile size among the patch bricks (more than one tile), or None."""
    sizes = [b[0] for b in stack if num_tiles(b, height, width) > 1]
    return max(sizes) if sizes else None


def max_tile(stack) -> int:
    """The side every canvas must be a multiple of: the lcm of the bricks' tile sizes."""
    return int(np.lcm.reduce([b[0] for b in stack]))


# ---- named stacks ----------------------------------------------------------------------------
# The paper's Table 5 (REFERENCE.md) and the public code's model list (JegZheng/LEGODiffusion,
# training/lego_models.py): widths S 384 (6 heads), L 1024 (16), XL 1152 (16); "L_old" is the
# public code's earlier L layout at L width, whose 462.8M parameters are the paper's "0.4B" for
# its ImageNet-64 L models (today's L layouts have 500.6M).

WIDTHS = {"S": (384, 6), "L": (1024, 16), "L_old": (1024, 16), "XL": (1152, 16)}
LAYOUTS = {  # name -> (tile sizes r, patch sizes p, {size: depths})
    "PG-64": ((4, 16, 64), (2, 8, 2), {"S": (2, 4, 6), "L": (6, 8, 12), "L_old": (6, 6, 12),
                                       "XL": (4, 12, 14)}),
    "PR-64": ((64, 16, 4), (2, 8, 2), {"S": (6, 4, 2), "L": (12, 8, 6), "L_old": (12, 6, 6),
                                       "XL": (14, 12, 4)}),
    "PG-32": ((4, 16, 32), (2, 8, 2), {"L": (4, 8, 12), "XL": (4, 12, 14)}),  # latent 32x32
    "PR-32": ((32, 16, 4), (2, 8, 2), {"L": (12, 8, 4), "XL": (14, 12, 4)}),
    "U-64": ((64, 16, 4, 16, 64), (2, 8, 2, 8, 2), {"S": (6, 4, 2, 4, 6), "L": (12, 8, 6, 8, 12),
                                                    "XL": (14, 12, 4, 12, 14)}),
    "U-32": ((32, 16, 4, 16, 32), (2, 8, 2, 8, 2), {"S": (6, 4, 2, 4, 6), "L": (12, 8, 6, 8, 12),
                                                    "XL": (14, 10, 4, 10, 14)}),  # ImageNet-256
}
# Parameter counts the paper reports (REFERENCE.md), for tests/test_lego.py to print beside ours.
PAPER_PARAMS = {("PG-64", "L_old"): 0.4e9, ("PR-64", "L_old"): 0.4e9, ("U-32", "XL"): 1.2e9}


def named_stack(layout: str, size: str) -> tuple:
    """The published stack `layout` ('PG-64', 'PR-64', 'PG-32', 'PR-32', 'U-64') at `size`."""
    if layout not in LAYOUTS:
        raise ValueError(f"Unknown LEGO layout {layout!r}; use one of {tuple(LAYOUTS)}.")
    rs, ps, depths = LAYOUTS[layout]
    if size not in depths:
        raise ValueError(f"LEGO layout {layout!r} has no published size {size!r}; use one of "
                         f"{tuple(depths)}.")
    width, heads = WIDTHS[size]
    return tuple((r, p, d, width, heads) for r, p, d in zip(rs, ps, depths[size]))


def from_config(model_config, in_channels: int, time_cond_proj_dim: int | None = None) -> LEGO:
    """LEGO from `config.model` (name='lego'): either `stack` (a list of [r, p, depth, width,
    num_heads]) or `layout` + `size` (a published stack)."""
    m = model_config
    if m.get("layout"):
        stack = named_stack(m.layout, m.get("size", "S"))
    else:
        stack = tuple(tuple(int(v) for v in brick) for brick in m.stack)
    check_stack(stack)
    from lcm_jax.models import DTYPES

    dtype = DTYPES[m.get("dtype", "float32")]
    return LEGO(stack=stack, num_classes=m.get("num_classes", 0), out_channels=in_channels,
                mlp_ratio=m.get("mlp_ratio", 4.0), dtype=dtype, remat=m.get("remat", False),
                time_cond_proj_dim=time_cond_proj_dim, attention=m.get("attention", "auto"))


def check_stack(stack) -> None:
    problems = stack_problems(stack)
    if problems:
        raise ValueError("; ".join(problems))


def stack_problems(stack) -> list[str]:
    """Every problem of a stack, one line each naming the field and the fix."""
    problems = []
    if not stack:
        return ["config.model.stack is empty; give [[r, p, depth, width, num_heads], ...]"]
    for k, brick in enumerate(stack):
        if len(brick) != len(BRICK_FIELDS) or not all(isinstance(v, (int, np.integer)) and v > 0
                                                      for v in brick):
            problems.append(f"config.model.stack[{k}]={tuple(brick)!r} is not 5 positive integers "
                            f"{BRICK_FIELDS}")
            continue
        r, p, _, width, heads = brick
        if r % p:
            problems.append(f"config.model.stack[{k}]: tile size r={r} is not a multiple of the "
                            f"patch size p={p}; choose p dividing r (the paper: p = r / 2)")
        if width % heads or width % 4:
            problems.append(f"config.model.stack[{k}]: width={width} must be a multiple of "
                            f"num_heads={heads} and of 4")
    return problems
