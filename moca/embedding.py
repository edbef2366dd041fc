"""The embedding model: texts, images and interleaved inputs -> L2-normalised float32 vectors.

    from moca.embedding import MocaEmbedder

    model = MocaEmbedder.from_pretrained("runs/cl/final")            # a local checkpoint directory
    q = model.encode(texts=["a red circle to the left of a blue square"],
                     instruction="Find an image that matches the given caption: ")
    d = model.encode(images=["img/0.png", "img/1.png"])                           # [2, H] float32
    mixed = model.encode(texts=[["Look at this:", {"image": "img/0.png"}, "what is on the left?"]])  # interleaved
    scores = q @ d.T                                                               # cosine similarities

A sample's embedding pools the final hidden states of the bidirectional language model over the sample's own
tokens (instruction, text and image tokens): ``mean`` (MoCa's default for bidirectional models), ``last`` (the
last token; the default for a causal model, as the official code pools causal models) or ``eos`` (an appended
``<|endoftext|>``). As in the official inputs, no ``<|endoftext|>`` is appended unless ``append_eos=True`` (or
``eos`` pooling); a pooling left unset follows the attention (mean if bidirectional, last if causal). Batches
are packed into one row, one attention document per sample, through ``moca_kernels.masked_attention``: no
padding is computed, and the result equals the padded batch (``packed=False``) up to rounding.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import List, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

from .data.batch import Batch, Sample, VisionSpec, collate
from .data.processor import BadRecord, MocaProcessor
from .data.retrieval import _is_pil, build_sample
from .modeling import MOCA_CONFIG, MocaBackbone

POOLINGS = ("mean", "eos", "last")


def default_pooling(causal: bool) -> str:
    """The official pooling for an attention: ``last`` for a causal model, ``mean`` for a bidirectional one."""
    return "last" if causal else "mean"


def pool_hidden(hidden: torch.Tensor, sample_index: torch.Tensor, n_samples: int, pooling: str = "mean",
                normalize: bool = True) -> torch.Tensor:
    """Pool final hidden states into one vector per sample.

    Args:
        hidden: [B, S, H] final hidden states (any float dtype; pooled in float32).
        sample_index: long [B * S], the sample of each token of the flattened grid, -1 at padding.
        n_samples: number of samples (host int, so no device sync is needed).
        pooling: ``mean`` over each sample's tokens, or ``eos`` / ``last``: the sample's last token (the
            collator decides whether that is ``<|endoftext|>``).
        normalize: L2-normalise the vectors.

    Returns:
        float32 [n_samples, H]. Differentiable.
    """
    if pooling not in POOLINGS:
        raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
    B, S, H = hidden.shape
    flat = hidden.reshape(B * S, H).float()
    idx = sample_index.to(flat.device)
    slot = torch.where(idx >= 0, idx, torch.full_like(idx, n_samples))        # padding -> an extra slot, dropped
    if pooling == "mean":
        sums = flat.new_zeros(n_samples + 1, H).index_add(0, slot, flat)[:n_samples]
        counts = torch.bincount(slot, minlength=n_samples + 1)[:n_samples].clamp(min=1).to(flat.dtype)
        out = sums / counts[:, None]
    else:
        pos = torch.arange(B * S, device=flat.device)
        last = torch.full((n_samples + 1,), -1, dtype=torch.long, device=flat.device)
        last = last.scatter_reduce(0, slot, pos, reduce="amax", include_self=True)[:n_samples]
        out = flat.index_select(0, last.clamp(min=0))
    return F.normalize(out, dim=-1) if normalize else out


class MocaEmbedder(nn.Module):
    """A MoCa backbone with pooling: ``forward(batch)`` gives embeddings, ``encode(...)`` is the user API.

    Args:
        backbone: :class:`~moca.modeling.MocaBackbone` (bidirectional, or causal for ablations).
        processor: its :class:`~moca.data.processor.MocaProcessor`.
        pooling: ``mean``, ``eos`` or ``last``; None = by attention (mean if bidirectional, last if causal).
        normalize: L2-normalise (default True).
        append_eos: end every input with ``<|endoftext|>`` (default False, as the official inputs; ``eos``
            pooling appends it regardless).
    """

    def __init__(self, backbone: MocaBackbone, processor: MocaProcessor, pooling: Optional[str] = None,
                 normalize: bool = True, append_eos: bool = False):
        super().__init__()
        pooling = pooling or default_pooling(backbone.causal)
        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
        self.backbone = backbone
        self.processor = processor
        self.pooling = pooling
        self.normalize = normalize
        self.append_eos = bool(append_eos)
        self.max_length: Optional[int] = None     # truncate inputs at this many tokens (official eval: 1280)
        self.spec = VisionSpec.from_config(backbone.vlm.config)

    # -- construction -----------------------------------------------------------------------------------

    @classmethod
    def tiny(cls, seed: int = 0, causal: bool = False, pooling: Optional[str] = None, image_size: int = 112,
             append_eos: bool = False, **sizes) -> "MocaEmbedder":
        """The tiny default model (random init from ``seed``) with the shipped tokenizer (tests, the demo)."""
        proc = MocaProcessor.tiny(image_size=image_size)
        bb = MocaBackbone.tiny(proc.vocab_size, proc.ids, causal=causal, seed=seed, **sizes)
        return cls(bb, proc, pooling=pooling, append_eos=append_eos)

    @classmethod
    def from_pretrained(cls, path: Union[str, os.PathLike], pooling: Optional[str] = None,
                        causal: Optional[bool] = None, dtype: Optional[torch.dtype] = None,
                        device: Optional[Union[str, torch.device]] = None,
                        append_eos: Optional[bool] = None) -> "MocaEmbedder":
        """Load a local checkpoint directory: a moca save (Stage 1 or 2) or a plain Qwen2-VL / Qwen2.5-VL one.

        ``pooling`` / ``causal`` / ``append_eos`` default to what the checkpoint was saved with (for a plain or
        released checkpoint: bidirectional, pooling by attention, no ``<|endoftext|>``; a moca save from before
        ``append_eos`` existed was trained with it, so it keeps it). Never touches the network.
        """
        path = Path(path)
        if not path.is_dir():
            raise FileNotFoundError(f"{path} is not a checkpoint directory")
        meta = json.loads((path / MOCA_CONFIG).read_text()) if (path / MOCA_CONFIG).exists() else {}
        emb = meta.get("embedding", {})
        bb = MocaBackbone.from_pretrained(path, causal=causal, dtype=dtype)
        proc = MocaProcessor.from_pretrained(path)
        rows = bb.language_model.embed_tokens.weight.shape[0]
        if proc.ids["mask"] >= rows:   # a plain checkpoint: the added <|mask|> token needs a row (never used here)
            bb.vlm.resize_token_embeddings(proc.vocab_size)
        if append_eos is None:
            append_eos = emb.get("append_eos", bool(emb))
        model = cls(bb, proc, pooling=pooling or emb.get("pooling"), normalize=emb.get("normalize", True),
                    append_eos=append_eos)
        if device is not None:
            model.to(device)
        return model

    def save_pretrained(self, path: Union[str, os.PathLike], extra_meta: Optional[dict] = None) -> None:
        """Save weights, tokenizer, image settings and the pooling, loadable by :meth:`from_pretrained`."""
        meta = {"embedding": {"pooling": self.pooling, "normalize": self.normalize, "append_eos": self.append_eos},
                **(extra_meta or {})}
        self.backbone.save_pretrained(path, extra_meta=meta)
        self.processor.save_pretrained(path)

    # -- properties -------------------------------------------------------------------------------------

    @property
    def dim(self) -> int:
        """Embedding size (the language model's hidden size)."""
        return self.backbone.hidden_size

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def add_eos(self) -> bool:
        """Whether each input ends with ``<|endoftext|>`` (``append_eos``, or ``eos`` pooling, which pools it)."""
        return self.append_eos or self.pooling == "eos"

    # -- the differentiable path (training) ---------------------------------------------------------------

    def sample(self, side, where: str, instruction: Optional[str] = None, root: Optional[Path] = None) -> Sample:
        """One input (text, image or interleaved list; see :mod:`moca.data.retrieval`) -> :class:`Sample`."""
        return build_sample(self.processor, side, where, root=root, instruction=instruction, add_eos=self.add_eos,
                            max_length=getattr(self, "max_length", None))

    def collate(self, samples: Sequence[Sample], packed: bool = True) -> Batch:
        """Samples -> one packed row (``packed=True``) or right-padded rows, on the CPU."""
        return collate(list(samples), self.spec, packed=packed, pad_token_id=self.processor.ids["endoftext"])

    def forward(self, batch: Batch) -> torch.Tensor:
        """Embeddings float32 [n_samples, H] of a collated batch (L2-normalised unless ``normalize=False``)."""
        hidden = self.backbone(batch)
        return pool_hidden(hidden, batch.sample_index, len(batch.record_ids), self.pooling, self.normalize)

    # -- the user API -----------------------------------------------------------------------------------

    def inputs(self, texts=None, images=None, instruction=None) -> List[tuple]:
        """Validate ``encode``'s arguments; returns (side, name, instruction) per item. See :meth:`encode`."""
        texts = [texts] if isinstance(texts, str) else texts
        if images is not None and (isinstance(images, (str, os.PathLike)) or _is_pil(images)):
            images = [images]
        if texts is None and images is None:
            raise ValueError("encode: give texts=, images= or both")
        if texts is not None and not isinstance(texts, (list, tuple)):
            raise TypeError(f"encode: texts must be a string or a list, got {type(texts).__name__}")
        if images is not None and not isinstance(images, (list, tuple)):
            raise TypeError(f"encode: images must be a path, a PIL image or a list of them, got {type(images).__name__}")
        if texts is not None and images is not None and len(texts) != len(images):
            raise ValueError(f"encode: texts has {len(texts)} items but images has {len(images)}; give one image per "
                             "text (or put images inside interleaved texts items)")
        n = len(texts) if texts is not None else len(images)
        if isinstance(instruction, (list, tuple)):
            if len(instruction) != n:
                raise ValueError(f"encode: {len(instruction)} instructions for {n} inputs")
            instructions = list(instruction)
        else:
            instructions = [instruction] * n
        for i, ins in enumerate(instructions):
            if ins is not None and not isinstance(ins, str):
                where = f"instruction[{i}]" if isinstance(instruction, (list, tuple)) else "instruction"
                raise TypeError(f"encode: {where} must be a string or None, got {type(ins).__name__}")
        items = []
        for i in range(n):
            if images is not None and texts is not None:
                img = images[i]
                if isinstance(img, (str, os.PathLike)):
                    img = {"image": img}
                text = texts[i]
                if isinstance(text, (list, tuple)):
                    raise ValueError(f"encode: texts[{i}] is interleaved; pair images only with plain texts")
                side, name = [img, {"text": text} if isinstance(text, str) else text], f"texts[{i}]/images[{i}]"
            elif images is not None:
                img = images[i]
                side, name = ({"image": img} if isinstance(img, (str, os.PathLike)) else img), f"images[{i}]"
            else:
                side, name = _interleaved(texts[i], f"texts[{i}]"), f"texts[{i}]"
            items.append((side, name, instructions[i]))
        return items

    @torch.inference_mode()
    def encode(self, texts=None, images=None, instruction=None, batch_size: int = 32, show_progress: bool = False,
               packed: bool = True, device: Optional[Union[str, torch.device]] = None) -> torch.Tensor:
        """Embed inputs; returns float32 [n, H] on the CPU, rows L2-normalised, in input order.

        Args:
            texts: a string or a list; each item a string, or an interleaved list of segments: a string is
                text, a PIL image, ``pathlib.Path`` or ``{"image": path}`` is an image, ``{"text": s}`` is text.
            images: a path / PIL image or a list of them. With ``texts`` too (same length), item i is image i
                followed by text i.
            instruction: a string put before every input (or a list, one per input), e.g.
                ``"Find an image that matches the given caption: "``.
            batch_size: inputs per forward pass (packed into one row).
            show_progress: a tqdm bar over batches.
            packed: one packed row per batch (default) or right-padded rows (same result up to rounding).
            device: a check that the model is on this device (the model is not moved: ``model.to(...)``);
                default: wherever the model is.

        Returns an empty float32 [0, H] for empty lists.

        Raises:
            ValueError naming the item: a missing image file, an empty text, texts and images of different
            lengths, an unreadable image. TypeError: ``texts`` / ``images`` / ``instruction`` of a wrong type.
        """
        return self.encode_items(self.inputs(texts, images, instruction), batch_size=batch_size,
                                 show_progress=show_progress, packed=packed, device=device)

    @torch.inference_mode()
    def encode_items(self, items: Sequence[tuple], root: Optional[Path] = None, batch_size: int = 32,
                     show_progress: bool = False, packed: bool = True,
                     device: Optional[Union[str, torch.device]] = None, desc: str = "encode") -> torch.Tensor:
        """Embed ``(side, name, instruction)`` items (record sides; see :mod:`moca.data.retrieval`), relative
        image paths resolved against ``root``. Returns float32 [n, H] on the CPU, in order."""
        if batch_size < 1:
            raise ValueError(f"encode: batch_size must be >= 1, got {batch_size}")
        dev = self.device
        if device is not None and not _same_device(resolve_device(device, "encode: device"), dev):
            raise ValueError(f"encode: device={str(device)!r} but the model is on {dev}; move the model first "
                             f"(model.to({str(device)!r}))")
        was_training = self.training
        self.eval()
        out = []
        try:
            from tqdm.auto import tqdm

            starts = range(0, len(items), batch_size)
            for s in tqdm(starts, desc=desc, unit="batch", disable=not show_progress, dynamic_ncols=True,
                          leave=False):
                chunk = items[s:s + batch_size]
                try:
                    samples = [self.sample(side, name, ins, root) for side, name, ins in chunk]
                except BadRecord as exc:   # "record texts[3]: ..." -> "encode: texts[3]: ..."
                    raise ValueError(f"encode: {str(exc).removeprefix('record ')}") from exc
                batch = self.collate(samples, packed=packed).to(dev)
                out.append(self(batch).float().cpu())
        finally:
            self.train(was_training)
        return torch.cat(out) if out else torch.zeros(0, self.dim)


def resolve_device(spec, what: str = "device") -> torch.device:
    """``spec`` (``"cpu"``, ``"cuda"``, ``"cuda:1"``, a torch.device) as a device this process can use, or a
    ValueError naming ``what`` (an unknown device string, CUDA asked for without a CUDA device)."""
    try:
        dev = torch.device(spec)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"{what}: {spec!r} is not a device (cpu, cuda, cuda:N)") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"{what}: {spec!r} asked for, but torch sees no CUDA device "
                         f"(torch {torch.__version__}, CUDA build {torch.version.cuda})")
    return dev


def _same_device(a: torch.device, b: torch.device) -> bool:
    return a.type == b.type and (a.index is None or b.index is None or a.index == b.index)


def _interleaved(item, name: str):
    """A ``texts`` item: a string, or a list whose strings are text and whose Paths / PIL images are images."""
    if isinstance(item, str):
        return item
    if isinstance(item, (list, tuple)):
        return [{"image": s} if isinstance(s, os.PathLike) else s for s in item]
    if isinstance(item, dict) or _is_pil(item):
        return item
    raise ValueError(f"encode: {name} must be a string or a list of text and images, got {type(item).__name__}")
