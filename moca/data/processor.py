"""Records -> samples: tokenise interleaved text and images into one sequence with Qwen's vision tokens.

A record is a dict with ``content``: a list of segments, each ``{"text": str}`` or ``{"image": path}``
(relative paths are resolved against the record file's folder), or ``{"image": EncodedImage}`` (bytes, from
the published pre-training sets). Shorthands: ``{"text": ...}``,
``{"image": ...}``, or both (image first, then text). An image becomes
``<|vision_start|> <|image_pad|> x n <|vision_end|>`` with n = its merged tokens; the sample ends with
``<|endoftext|>``.

Problems with a record raise :class:`BadRecord` naming it; the loaders count and skip those when asked.
"""

from __future__ import annotations

import os
import reprlib
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence

import torch

from .batch import Sample
from .images import (DEFAULT_MAX_IMAGE_PIXELS, ImageError, ImageSpec, image_root, load_image,  # noqa: F401
                     open_image, preprocess_image, resolve_image_path)
from .tokenizer import load_tokenizer, never_masked_ids, special_ids


class BadRecord(ValueError):
    """A record that cannot be used; ``reason`` is a short category for the skip counts."""

    def __init__(self, record_id: str, message: str, reason: str):
        super().__init__(f"record {record_id}: {message}")
        self.record_id, self.reason = record_id, reason


def truncate_tokens(ids: List[int], rows: list, grids: list, limit: int, vision_start: int, m2: int):
    """Cut token ids to ``limit``; an image block the cut falls into is removed whole with its pixel rows, as are
    the images after it (no partial image can be encoded). ``rows`` / ``grids``: per image, in order."""
    if limit < 1:
        raise ValueError(f"max_length must leave room for at least one token, got {limit + 1}")
    if len(ids) <= limit:
        return ids, rows, grids
    starts = [i for i, t in enumerate(ids) if t == vision_start]
    keep = 0
    for j, st in enumerate(starts):
        if st + rows[j].shape[0] // m2 + 2 <= limit:
            keep = j + 1
        else:
            return ids[:st], rows[:keep], grids[:keep]
    return ids[:limit], rows[:keep], grids[:keep]


def truncate_sample(sample: Sample, max_length: int, ids: dict, merge_size: int = 2) -> Sample:
    """A processed sample cut to ``max_length`` tokens (its final ``<|endoftext|>`` kept), see
    :func:`truncate_tokens`. ``ids``: the processor's role -> token id map."""
    tok = sample.input_ids.tolist()
    if len(tok) <= max_length:
        return sample
    eos = tok[-1] == ids["endoftext"]
    if eos:
        tok = tok[:-1]
    grids = [tuple(g) for g in sample.image_grid_thw.tolist()] if sample.image_grid_thw is not None else []
    rows = list(sample.pixel_values.split([t * h * w for t, h, w in grids])) if grids else []
    tok, rows, grids = truncate_tokens(tok, rows, grids, max_length - int(eos), ids["vision_start"], merge_size ** 2)
    if eos:
        tok.append(ids["endoftext"])
    return Sample(torch.tensor(tok, dtype=torch.long), torch.cat(rows) if rows else None,
                  torch.tensor(grids, dtype=torch.long) if grids else None, sample.record_id)


def _is_encoded(x) -> bool:
    from .published import EncodedImage

    return isinstance(x, EncodedImage)


def segments_of(record: dict, record_id: str) -> List[dict]:
    """The record's content as a list of {"text"} / {"image"} segments (validated)."""
    if not isinstance(record, dict):
        raise BadRecord(record_id, f"expected a JSON object, got {type(record).__name__}", "malformed")
    if "content" in record:
        content = record["content"]
        if not isinstance(content, list):
            raise BadRecord(record_id, "'content' must be a list of {'text': ...} / {'image': ...} segments", "malformed")
    else:
        content = []
        for key in ("image", "images"):
            imgs = record.get(key)
            if imgs:
                content += [{"image": p} for p in ([imgs] if isinstance(imgs, str) else imgs)]
        if record.get("text") is not None:
            content.append({"text": record["text"]})
    out = []
    for i, seg in enumerate(content):
        if not isinstance(seg, dict) or len(seg.keys() & {"text", "image"}) != 1:
            raise BadRecord(record_id, f"segment {i} must have exactly one of 'text' or 'image', got {reprlib.repr(seg)}"[:200],
                            "malformed")
        if "text" in seg and not isinstance(seg["text"], str):
            raise BadRecord(record_id, f"segment {i}: text must be a string", "malformed")
        if "image" in seg and not isinstance(seg["image"], (str, os.PathLike)) and not _is_encoded(seg["image"]):
            raise BadRecord(record_id, f"segment {i}: image must be a path", "malformed")
        out.append(seg)
    if not any("text" in s and s["text"].strip() for s in out):
        raise BadRecord(record_id, "has no text", "no_text")
    return out


def check_text(text: str, record_id: str) -> None:
    """BadRecord for a text the tokenizer cannot take: one holding a lone surrogate (JSON allows ``"\\ud800"``)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise BadRecord(record_id, f"text is not valid Unicode ({exc.reason} at character {exc.start})",
                        "malformed") from exc


def load_record_image(path, root, spec: ImageSpec, record_id: str):
    """The decoded RGB image a record names, through :func:`moca.data.images.load_image`: the path resolved
    against ``root`` (and confined to it, unless ``root.allow_outside``), or an image kept as bytes
    (:class:`~moca.data.published.EncodedImage`, decoded through :func:`~moca.data.images.open_image_bytes`); in
    both cases the pixel bound (``root.max_pixels``) and Qwen's shape rule are checked from the header first.
    Any problem raises :class:`BadRecord` naming the record, with the :class:`~moca.data.images.ImageError`'s
    reason."""
    try:
        return load_image(path, root, spec)
    except ImageError as exc:
        raise BadRecord(record_id, str(exc), exc.reason) from exc


class MocaProcessor:
    """Tokenizer + image preprocessing of one model (the tiny default, or a checkpoint's own files).

    Attributes:
        tokenizer: a transformers fast tokenizer with ``<|mask|>``.
        image_spec: :class:`ImageSpec`.
        ids: role -> token id (endoftext, vision_start, vision_end, image_pad, video_pad, mask, ...).
        never_masked: sorted ids that text masking must not touch.
    """

    def __init__(self, tokenizer, image_spec: ImageSpec):
        self.tokenizer = tokenizer
        self.image_spec = image_spec
        self.ids = special_ids(tokenizer)
        self.never_masked = never_masked_ids(tokenizer)

    @classmethod
    def tiny(cls, image_size: int = 112) -> "MocaProcessor":
        """The shipped tiny tokenizer; images resized to about ``image_size`` squared pixels."""
        area = image_size * image_size
        return cls(load_tokenizer(None), ImageSpec(min_pixels=min(area, 56 * 56), max_pixels=area))

    @classmethod
    def from_pretrained(cls, path) -> "MocaProcessor":
        """The tokenizer and image settings of a local checkpoint directory (or a moca save of the tiny model)."""
        return cls(load_tokenizer(str(path)), ImageSpec.from_pretrained(path))

    def save_pretrained(self, path) -> None:
        import json

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self.tokenizer.save_pretrained(str(path))
        (path / "preprocessor_config.json").write_text(json.dumps(self.image_spec.to_preprocessor_config(), indent=2))

    @property
    def vocab_size(self) -> int:
        return len(self.tokenizer)

    def encode_text(self, text: str, record_id: str = "") -> List[int]:
        check_text(text, record_id)
        ids = self.tokenizer.encode(text, add_special_tokens=False)
        bad = {self.ids["image_pad"], self.ids["video_pad"], self.ids["vision_start"], self.ids["vision_end"]} & set(ids)
        if bad:
            names = ", ".join(self.tokenizer.convert_ids_to_tokens(sorted(bad)))
            raise BadRecord(record_id, f"text contains the vision placeholder token {names} (only images may put "
                                       "vision tokens in a sequence)", "vision_token_in_text")
        return ids

    def process(self, record: dict, record_id: str = "", root=None, add_eos: bool = True) -> Sample:
        """One record -> :class:`Sample`. Raises :class:`BadRecord` (missing/corrupt/too large image, an image
        path outside the data folder, no text, ...).

        ``root``: an :class:`~moca.data.images.ImageRoot` (or a folder, confined with the defaults) that the
        record's image paths resolve against and must stay inside; None = paths used as given.
        """
        segs = segments_of(record, record_id)
        ids: List[int] = []
        rows, grids = [], []
        m2 = self.image_spec.merge_size ** 2
        for seg in segs:
            if "text" in seg:
                ids += self.encode_text(seg["text"], record_id)
                continue
            img = load_record_image(seg["image"], root, self.image_spec, record_id)
            try:
                px, grid = preprocess_image(img, self.image_spec)
            except ValueError as exc:
                raise BadRecord(record_id, f"image {seg['image']} cannot be used ({exc})", "bad_image_size") from exc
            rows.append(px)
            grids.append(grid)
            n = px.shape[0] // m2
            ids += [self.ids["vision_start"]] + [self.ids["image_pad"]] * n + [self.ids["vision_end"]]
        if add_eos:
            ids.append(self.ids["endoftext"])
        return Sample(torch.tensor(ids, dtype=torch.long),
                      torch.cat(rows) if rows else None,
                      torch.tensor(grids, dtype=torch.long) if grids else None,
                      record_id)
