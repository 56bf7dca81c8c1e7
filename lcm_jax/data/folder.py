"""Image folders with captions: the custom datasets of LCF and Smooth Diffusion fine-tuning.

Follows the Hugging Face imagefolder convention. Images (.jpg, .png, .webp, ...) are listed
recursively and sorted by relative path. A caption comes from the `metadata.jsonl` of the image's
folder or any folder above it (one JSON object per line: `file_name`, relative to that metadata
file, and the caption field, `text` unless `caption_key` says otherwise), else from a sidecar
`name.txt` next to `name.jpg`, else it is "".

Custom datasets are small, so every image is decoded and resized once, kept in memory as uint8,
and batched by `ArrayPipeline` (deterministic, process-sharded, exact resume). Random crops and
flips are drawn per batch in ArrayPipeline's `transform` hook.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np

from lcm_jax.data import images as image_lib
from lcm_jax.data.pipeline import ArrayPipeline

logger = logging.getLogger(__name__)


def list_images(root: Path) -> list[Path]:
    """Image files under root, sorted; hidden ones (.ipynb_checkpoints, ._x.jpg) are skipped."""
    files = (p for p in root.rglob("*") if p.suffix.lower() in image_lib.IMAGE_EXTENSIONS)
    files = (p for p in files if p.is_file()
             and not any(part.startswith(".") for part in p.relative_to(root).parts))
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def read_metadata_captions(root: Path, caption_key: str) -> dict[Path, str]:
    """{resolved image path: caption} from every metadata.jsonl under root."""
    captions, fields_seen, records = {}, set(), 0
    for meta in sorted(root.rglob("metadata.jsonl")):
        for line_no, line in enumerate(meta.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{meta}:{line_no} is not valid JSON ({e}).") from None
            if "file_name" not in record:
                raise ValueError(f"{meta}:{line_no} has no 'file_name' field; each line names "
                                 f"its image: {{\"file_name\": \"1.png\", \"text\": \"a cat\"}}.")
            records += 1
            fields_seen.update(record)
            caption = record.get(caption_key)
            image_path = (meta.parent / record["file_name"]).resolve()
            captions[image_path] = "" if caption is None else str(caption)
    if records and caption_key not in fields_seen:
        # A typo in the caption field would otherwise silently train on empty captions.
        raise ValueError(f"metadata.jsonl under {root} has no field config.data.caption_key="
                         f"{caption_key!r}; its fields are {sorted(fields_seen - {'file_name'})}.")
    return captions


def caption_for(image_path: Path, metadata: dict[Path, str]) -> str:
    resolved = image_path.resolve()
    if resolved in metadata:
        return metadata[resolved]
    sidecar = image_path.with_suffix(".txt")
    return sidecar.read_text(encoding="utf-8").strip() if sidecar.is_file() else ""


def load_folder(path: str | Path, *, image_size: int, channels: int = 3, caption_key: str = "text",
                keep_full_resize: bool = False) -> tuple[np.ndarray, np.ndarray, int]:
    """Returns (images, captions [N] str, num_skipped).

    images is uint8 [N, S, S, C] center crops, or with `keep_full_resize` an object array of
    [H, W, C] images with min(H, W) == S, so that random crops can be drawn later.
    """
    root = Path(path).expanduser()
    if not root.is_dir():
        raise ValueError(f"config.data.path={str(path)!r} does not exist or is not a folder; "
                         f"point it at a folder of images.")
    files = list_images(root)
    if not files:
        raise ValueError(f"config.data.path={str(path)!r} contains no images "
                         f"({', '.join(image_lib.IMAGE_EXTENSIONS)}); "
                         f"point it at a folder of images.")
    metadata = read_metadata_captions(root, caption_key)
    kept, captions, num_skipped = [], [], 0
    for file in files:
        try:
            image = image_lib.decode(file.read_bytes(), channels)
        except OSError:  # unreadable file: same treatment as an undecodable one
            image = None
        if image is None:
            num_skipped += 1
            logger.warning("Skipping %s: not a readable image.", file)
            continue
        image = image_lib.resize_shorter_side(image, image_size)
        kept.append(image if keep_full_resize else image_lib.center_crop(image, image_size))
        captions.append(caption_for(file, metadata))
    if not kept:
        raise ValueError(f"None of the {len(files)} image files under config.data.path="
                         f"{str(path)!r} could be decoded.")
    if keep_full_resize:
        images = np.empty(len(kept), dtype=object)  # sizes differ: one object slot per image
        for i, image in enumerate(kept):
            images[i] = image
    else:
        images = np.stack(kept)
    return images, np.asarray(captions, dtype=str), num_skipped


class FolderPipeline(ArrayPipeline):
    """Batches of {image float32 [B, S, S, C] in [-1, 1], caption [B] str} from an image folder."""

    def __init__(self, path: str | Path, *, image_size: int, global_batch_size: int, seed: int = 0,
                 process_index: int = 0, process_count: int = 1, channels: int = 3,
                 caption_key: str = "text", random_crop: bool = False, random_flip: bool = False):
        images, captions, self.num_skipped = load_folder(
            path, image_size=image_size, channels=channels, caption_key=caption_key,
            keep_full_resize=random_crop)
        self.image_size, self.random_crop, self.random_flip = image_size, random_crop, random_flip
        super().__init__({"image": images, "caption": captions},
                         global_batch_size=global_batch_size, seed=seed,
                         process_index=process_index, process_count=process_count,
                         transform=self._crop_flip_scale)

    def _crop_flip_scale(self, batch: dict, rng: np.random.Generator) -> dict:
        images = [image_lib.crop_flip_scale(image, self.image_size, rng,
                                            random_crop=self.random_crop,
                                            random_flip=self.random_flip)
                  for image in batch["image"]]
        return {**batch, "image": np.stack(images)}
