"""Qwen2-VL image preprocessing: resize to a multiple of 28 within a pixel budget, normalise, cut into patch rows.

The same rules as the Qwen2-VL image processor (its ``smart_resize``, bicubic resize, rescale by 1/255,
CLIP mean/std, the 2x2-merge-block-major patch order), written here so that the tiny default model and a real
checkpoint share one code path and no image library beyond Pillow is needed. A checkpoint's
``preprocessor_config.json`` supplies its own mean, std and pixel bounds (:meth:`ImageSpec.from_pretrained`).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional, Tuple

import numpy as np
import torch

CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


@dataclass
class ImageSpec:
    """Image preprocessing parameters (Qwen2-VL defaults; ``min_pixels``/``max_pixels`` bound the resized area)."""

    patch_size: int = 14
    merge_size: int = 2
    temporal_patch_size: int = 2
    min_pixels: int = 56 * 56
    max_pixels: int = 28 * 28 * 1280
    mean: List[float] = field(default_factory=lambda: list(CLIP_MEAN))
    std: List[float] = field(default_factory=lambda: list(CLIP_STD))

    @property
    def row_size(self) -> int:
        """Values per patch row: 3 * temporal_patch_size * patch_size ** 2 (1176 for Qwen)."""
        return 3 * self.temporal_patch_size * self.patch_size ** 2

    @classmethod
    def from_pretrained(cls, path) -> "ImageSpec":
        """Read ``preprocessor_config.json`` of a local checkpoint (defaults where a field is missing)."""
        f = Path(path) / "preprocessor_config.json"
        if not f.exists():
            return cls()
        c = json.loads(f.read_text())
        size = c.get("size") or {}
        return cls(patch_size=c.get("patch_size", 14), merge_size=c.get("merge_size", 2),
                   temporal_patch_size=c.get("temporal_patch_size", 2),
                   min_pixels=c.get("min_pixels", size.get("shortest_edge", 56 * 56)),
                   max_pixels=c.get("max_pixels", size.get("longest_edge", 28 * 28 * 1280)),
                   mean=list(c.get("image_mean", CLIP_MEAN)), std=list(c.get("image_std", CLIP_STD)))

    def to_preprocessor_config(self) -> dict:
        """A ``preprocessor_config.json`` that transformers' Qwen2-VL image processor reads the same way."""
        return {"image_processor_type": "Qwen2VLImageProcessor", "do_resize": True, "do_rescale": True,
                "rescale_factor": 1 / 255, "do_normalize": True, "do_convert_rgb": True, "resample": 3,
                "image_mean": self.mean, "image_std": self.std, "patch_size": self.patch_size,
                "merge_size": self.merge_size, "temporal_patch_size": self.temporal_patch_size,
                "min_pixels": self.min_pixels, "max_pixels": self.max_pixels,
                "size": {"shortest_edge": self.min_pixels, "longest_edge": self.max_pixels}}


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> Tuple[int, int]:
    """Qwen's rule: both sides multiples of ``factor``, area within [min_pixels, max_pixels], aspect kept."""
    if min(height, width) <= 0:
        raise ValueError(f"image has an empty side ({height} x {width})")
    if max(height, width) / min(height, width) > 200:
        raise ValueError(f"image aspect ratio {max(height, width) / min(height, width):.0f} is above 200")
    h = round(height / factor) * factor
    w = round(width / factor) * factor
    if h * w > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h = max(factor, math.floor(height / beta / factor) * factor)
        w = max(factor, math.floor(width / beta / factor) * factor)
    elif h * w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h = math.ceil(height * beta / factor) * factor
        w = math.ceil(width * beta / factor) * factor
    return h, w


def preprocess_image(image, spec: ImageSpec) -> Tuple[torch.Tensor, Tuple[int, int, int]]:
    """One PIL image -> (pixel rows float32 [gh * gw, row_size], grid (1, gh, gw)) in Qwen's patch order.

    Rows are ordered block-major over ``merge_size x merge_size`` blocks, so the ``merge_size ** 2``
    consecutive rows of each block form one merged LLM image token.
    """
    from PIL import Image

    image = image.convert("RGB")
    factor = spec.patch_size * spec.merge_size
    h, w = smart_resize(image.height, image.width, factor, spec.min_pixels, spec.max_pixels)
    if (h, w) != (image.height, image.width):
        image = image.resize((w, h), resample=Image.BICUBIC)
    x = np.asarray(image, dtype=np.float32) / 255.0                                  # [h, w, 3]
    x = (x - np.asarray(spec.mean, np.float32)) / np.asarray(spec.std, np.float32)
    x = torch.from_numpy(x).permute(2, 0, 1)                                           # [3, h, w]
    p, m, tp = spec.patch_size, spec.merge_size, spec.temporal_patch_size
    gh, gw = h // p, w // p
    x = x.unsqueeze(0).expand(tp, 3, h, w)                                             # a still image: tp equal frames
    x = x.reshape(1, tp, 3, gh // m, m, p, gw // m, m, p)
    x = x.permute(0, 3, 6, 4, 7, 2, 1, 5, 8)                                           # t, bh, bw, mh, mw, c, tp, p, p
    return x.reshape(gh * gw, 3 * tp * p * p).contiguous(), (1, gh, gw)


def load_image(path) -> "Image.Image":
    """Open and fully decode an image (raises OSError / ValueError for missing or corrupt files)."""
    from PIL import Image

    with Image.open(path) as im:
        im.load()
        return im.convert("RGB")
