"""Qwen2-VL image preprocessing: resize to a multiple of 28 within a pixel budget, normalise, cut into patch rows.

The same rules as the Qwen2-VL image processor (its ``smart_resize``, bicubic resize, rescale by 1/255,
CLIP mean/std, the 2x2-merge-block-major patch order), written here so that the tiny default model and a real
checkpoint share one code path and no image library beyond Pillow is needed. A checkpoint's
``preprocessor_config.json`` supplies its own mean, std and pixel bounds (:meth:`ImageSpec.from_pretrained`).

Reading the images that data records name goes through two functions here, for every reader of record files
(Stage 1 and 2 loaders, evaluation, format readers): :func:`resolve_image_path` (a record's path, confined to its
data folder unless allowed) and :func:`open_image` / :func:`check_image` (a pixel bound checked from the header
before decoding, Qwen's shape rule, every failure an :class:`ImageError` naming the file with a reason);
:func:`open_image_bytes` applies the same checks to images kept as bytes (published parquet sets).
"""

from __future__ import annotations

import io
import json
import math
import os
import struct
import warnings
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


# ------------------------------------------------------------------------------------------------------------
# Reading images named by data records: where a path may point, how big an image may be, what counts as bad
# ------------------------------------------------------------------------------------------------------------

DEFAULT_MAX_IMAGE_PIXELS = 64 * 1024 * 1024
"""Default bound on an image's width x height (67,108,864 = 8192 x 8192, 192 MiB as RGB), read from the file's
header before anything is decoded; larger images are refused (config key ``max_image_pixels``; null = no bound)."""

VISION_TOKENS = ("<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>")
"""Qwen's vision placeholders: only the processor may put them in a sequence; a record's text must not hold them."""


class ImageError(ValueError):
    """An image a record names cannot be used. ``reason`` is a short category for skip counts: ``missing_image``,
    ``outside_data_folder``, ``not_an_image``, ``image_too_large``, ``bad_image_size``, ``corrupt_image``."""

    def __init__(self, message: str, reason: str):
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class ImageRoot:
    """Where the image paths of one data file may point, and how big their images may be.

    Attributes:
        folder: relative paths resolve against it (the data file's folder, or a configured image root).
        allow_outside: False (default): a path that resolves outside ``folder`` (``../``, an absolute path
            elsewhere, a symlink out) is refused; True: any path is used as given.
        max_pixels: bound on width x height, checked from the header (None = no bound).
    """

    folder: Path
    allow_outside: bool = False
    max_pixels: Optional[int] = DEFAULT_MAX_IMAGE_PIXELS

    def resolve(self, path) -> Path:
        return resolve_image_path(path, self.folder, self.allow_outside)


def image_root(root) -> Optional[ImageRoot]:
    """``root`` as an :class:`ImageRoot`: None stays None (paths given directly by a caller, not by a data
    record: used as given), a folder becomes a confined ImageRoot with the default pixel bound."""
    if root is None or isinstance(root, ImageRoot):
        return root
    return ImageRoot(Path(root))


def resolve_image_path(path, root=None, allow_outside: bool = False) -> Path:
    """The file a record's image path names.

    Args:
        path: the path as written in the record (str or PathLike).
        root: the folder relative paths resolve against (an :class:`ImageRoot` brings its own
            ``allow_outside``); None = a path given directly by a caller: returned as given, never confined.
        allow_outside: allow paths that resolve (symlinks followed) outside ``root``.

    Returns the path to open: under confinement the resolved real path (so a symlink cannot be swapped between
    the check and the open). Raises :class:`ImageError` (reason ``outside_data_folder``) naming the path, what it
    resolves to and the folder.
    """
    if isinstance(root, ImageRoot):
        root, allow_outside = root.folder, root.allow_outside or allow_outside
    p = Path(path)
    if root is None:
        return p
    full = p if p.is_absolute() else Path(root) / p
    if allow_outside:
        return full
    try:
        real, real_root = Path(os.path.realpath(full)), Path(os.path.realpath(root))
    except (OSError, ValueError) as exc:       # a NUL byte, a symlink loop on some platforms
        raise ImageError(f"image path {str(path)!r} cannot be resolved ({exc})", "missing_image") from exc
    if not real.is_relative_to(real_root):
        raise ImageError(f"image path {str(path)!r} resolves to {real}, outside the data folder {real_root} "
                         f"(allow_outside_paths: true in the data / eval config allows it)", "outside_data_folder")
    return real


def _open(path, max_pixels: Optional[int]):
    """Image.open of a file (header only) with moca's pixel bound in place of Pillow's; ImageError for every
    failure (also for a path that is not a regular file)."""
    p = Path(path)
    try:
        exists, is_dir, is_file = p.exists(), p.is_dir(), p.is_file()
    except (OSError, ValueError) as exc:            # a NUL byte, a name too long, no permission
        raise ImageError(f"image path {str(path)!r} cannot be used ({exc})", "missing_image") from exc
    if not exists:
        raise ImageError(f"image file {p} does not exist", "missing_image")
    if is_dir:
        raise ImageError(f"image {p} is a directory, not an image file", "missing_image")
    if not is_file:                                 # a pipe or a device would block or never end
        raise ImageError(f"image {p} is not a regular file", "not_an_image")
    return _open_pil(p, p, max_pixels)


def _open_pil(source, name, max_pixels: Optional[int]):
    """Image.open of ``source`` (a path or a file object of encoded bytes; ``name`` in messages), header only,
    with moca's pixel bound in place of Pillow's; ImageError for every failure."""
    from PIL import Image, UnidentifiedImageError

    p = name
    pil_limit = Image.MAX_IMAGE_PIXELS
    if pil_limit is not None and (max_pixels is None or 2 * pil_limit < max_pixels):
        Image.MAX_IMAGE_PIXELS = None if max_pixels is None else max_pixels   # ours is the bound that applies
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(source)
    except Image.DecompressionBombError as exc:      # above twice Pillow's own bound, which is above ours
        raise ImageError(f"image {p} has more than {2 * Image.MAX_IMAGE_PIXELS} pixels, more than max_image_pixels "
                         f"({max_pixels}); it was not decoded", "image_too_large") from exc
    except UnidentifiedImageError as exc:
        raise ImageError(f"image {p} cannot be read: not an image file (Pillow does not recognise its format)",
                         "not_an_image") from exc
    except (OSError, ValueError, SyntaxError, EOFError) as exc:
        raise ImageError(f"image {p} cannot be read ({type(exc).__name__}: {exc})"[:300], "corrupt_image") from exc
    w, h = im.size
    if max_pixels is not None and w * h > max_pixels:
        im.close()
        raise ImageError(f"image {p} is {w} x {h} = {w * h} pixels, more than max_image_pixels ({max_pixels}); "
                         "it was not decoded", "image_too_large")
    if min(w, h) <= 0:
        im.close()
        raise ImageError(f"image {p} has an empty side ({w} x {h})", "bad_image_size")
    return im


def check_image_size(width: int, height: int, spec: ImageSpec, what: str = "image") -> None:
    """Raise ImageError (reason ``bad_image_size``) when Qwen's resize rule cannot use a width x height image
    (an empty side, an aspect ratio above 200: e.g. 1 x 400)."""
    factor = spec.patch_size * spec.merge_size
    try:
        h, w = smart_resize(height, width, factor, spec.min_pixels, spec.max_pixels)
    except ValueError as exc:
        raise ImageError(f"{what} ({width} x {height}) cannot be used: {exc}", "bad_image_size") from exc
    if h < factor or w < factor:
        raise ImageError(f"{what} ({width} x {height}) resizes to {w} x {h}, smaller than one "
                         f"{factor} x {factor} merged patch", "bad_image_size")


def check_image(path, spec: Optional[ImageSpec] = None, max_pixels: Optional[int] = DEFAULT_MAX_IMAGE_PIXELS) -> None:
    """Check an image file from its header alone (nothing is decoded): it exists, Pillow knows its format,
    width x height is within ``max_pixels`` and (with ``spec``) Qwen's resize rule can use its shape.
    A file damaged after its header passes; :func:`open_image` finds that. Raises :class:`ImageError`."""
    with _open(path, max_pixels) as im:
        if spec is not None:
            check_image_size(im.width, im.height, spec, f"image {path}")


def check_image_bytes(data, name: str, spec: Optional[ImageSpec] = None,
                      max_pixels: Optional[int] = DEFAULT_MAX_IMAGE_PIXELS) -> None:
    """:func:`check_image` for an image given as encoded bytes (``name`` in messages): header only."""
    if not isinstance(data, (bytes, bytearray, memoryview)) or not len(data):
        raise ImageError(f"image {name}: its bytes are empty or not bytes ({type(data).__name__})", "not_an_image")
    with _open_pil(io.BytesIO(bytes(data)), name, max_pixels) as im:
        if spec is not None:
            check_image_size(im.width, im.height, spec, f"image {name}")


def open_image(path, max_pixels: Optional[int] = DEFAULT_MAX_IMAGE_PIXELS, spec: Optional[ImageSpec] = None):
    """Open and fully decode an image as RGB; the one place moca reads image files.

    Checks before decoding: the file exists, its header names a known format, width x height <= ``max_pixels``
    (None = no bound; a bound above Pillow's own ``Image.MAX_IMAGE_PIXELS`` raises Pillow's to it) and, with
    ``spec``, the shape suits Qwen's resize rule. Raises :class:`ImageError` naming the file and the cause
    (also for a truncated or corrupt file found while decoding).
    """
    return _decode(_open(path, max_pixels), path, spec)


def open_image_bytes(data, name: str, max_pixels: Optional[int] = DEFAULT_MAX_IMAGE_PIXELS,
                     spec: Optional[ImageSpec] = None):
    """:func:`open_image` for an image given as its encoded bytes (a parquet cell of a published set):
    the same checks before decoding (a known format, width x height <= ``max_pixels``, with ``spec`` Qwen's
    shape rule) and the same :class:`ImageError` reasons, naming the image by ``name`` (``file.parquet:row``)."""
    if not isinstance(data, (bytes, bytearray, memoryview)) or not len(data):
        raise ImageError(f"image {name}: its bytes are empty or not bytes ({type(data).__name__})", "not_an_image")
    return _decode(_open_pil(io.BytesIO(bytes(data)), name, max_pixels), name, spec)


def _decode(im, name, spec: Optional[ImageSpec]):
    """Shape check (with ``spec``), then full decode as RGB of an image opened by :func:`_open_pil`."""
    with im:
        if spec is not None:
            check_image_size(im.width, im.height, spec, f"image {name}")
        try:
            im.load()
            return im.convert("RGB")
        except (OSError, ValueError, SyntaxError, EOFError, struct.error, IndexError) as exc:
            raise ImageError(f"image {name} cannot be decoded ({type(exc).__name__}: {exc})"[:300],
                             "corrupt_image") from exc


def _source_bound(root) -> Tuple[Optional[ImageRoot], Optional[int]]:
    root = image_root(root)
    return root, (root.max_pixels if root is not None else DEFAULT_MAX_IMAGE_PIXELS)


def _is_encoded(source) -> bool:
    from .published import EncodedImage    # published imports this module

    return isinstance(source, EncodedImage)


def load_image(source, root=None, spec: Optional[ImageSpec] = None) -> "Image.Image":
    """The decoded RGB image ``source`` names: moca's one image loader (records of both stages, eval sides).

    Args:
        source: a path (str or PathLike) as written in a record, or bytes kept encoded
            (:class:`~moca.data.published.EncodedImage`, decoded through :func:`open_image_bytes`).
        root: the folder a relative path resolves against (:func:`image_root`: a folder is confined with the
            default pixel bound; an :class:`ImageRoot` brings its own ``allow_outside`` and ``max_pixels``);
            None = a path given directly, opened as given with the default bound.
        spec: with it, Qwen's shape rule is checked from the header before decoding.

    Raises :class:`ImageError` (a ValueError with a ``reason``) for a missing, outside, too large, badly shaped
    or corrupt image.
    """
    root, max_pixels = _source_bound(root)
    if _is_encoded(source):
        return source.decode(max_pixels, spec)
    return open_image(resolve_image_path(source, root), max_pixels, spec)


def check_image_source(source, root=None, spec: Optional[ImageSpec] = None) -> None:
    """The checks of :func:`load_image` from the header alone (nothing decoded): the same arguments and errors."""
    root, max_pixels = _source_bound(root)
    if _is_encoded(source):
        check_image_bytes(source.data, source.key, spec, max_pixels)
    else:
        check_image(resolve_image_path(source, root), spec, max_pixels)


def check_image_settings(image_root: Optional[str], max_image_pixels: Optional[int], key: str = "data") -> None:
    """Config checks shared by both stages: ``image_root`` a directory, ``max_image_pixels`` >= 1 or null."""
    if image_root is not None and not Path(image_root).is_dir():
        raise FileNotFoundError(f"{key}.image_root: {image_root} is not a directory")
    if max_image_pixels is not None and (isinstance(max_image_pixels, bool) or not isinstance(max_image_pixels, int)
                                         or max_image_pixels < 1):
        raise ValueError(f"{key}.max_image_pixels must be an integer >= 1 or null (no bound), got {max_image_pixels!r}")
