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
        self.prompts: dict = {}   # name -> instruction: encode(prompt_name=...), MTEB (sentence-transformers' way)

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
        if pooling is not None and pooling not in POOLINGS:   # before any weights load
            raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
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
        model.name_or_path = str(path)
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

    def forward(self, batch: Batch, normalize: Optional[bool] = None) -> torch.Tensor:
        """Embeddings float32 [n_samples, H] of a collated batch, L2-normalised when ``normalize`` (default:
        the model's ``normalize``, True unless saved otherwise)."""
        hidden = self.backbone(batch)
        normalize = self.normalize if normalize is None else normalize
        return pool_hidden(hidden, batch.sample_index, len(batch.record_ids), self.pooling, normalize)

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
               packed: bool = True, device: Optional[Union[str, torch.device]] = None, *, sentences=None,
               prompt: Optional[str] = None, prompt_name: Optional[str] = None, convert_to_numpy: bool = False,
               convert_to_tensor: bool = False, normalize_embeddings: Optional[bool] = None,
               show_progress_bar: Optional[bool] = None, precision: str = "float32",
               output_value: Optional[str] = "sentence_embedding", **mteb_kwargs):
        """Embed inputs; returns float32 [n, H] on the CPU, rows L2-normalised, in input order.

        Also callable the way sentence-transformers and MTEB call encoders:
        ``encode(sentences, prompt=..., batch_size=..., convert_to_numpy=True, normalize_embeddings=...)``
        (``prompt`` = ``instruction``; ``prompt_name`` picks one of ``self.prompts``; ``show_progress_bar`` =
        ``show_progress``; a torch tensor is returned unless ``convert_to_numpy=True``, where sentence-transformers
        returns numpy by default), and ``encode(dataloader, task_metadata=..., hf_split=..., hf_subset=...,
        prompt_type=...)``, MTEB's encoder protocol (see :meth:`mteb_model_meta`).

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
            sentences: the same as ``texts`` (sentence-transformers' name).
            prompt / prompt_name: the instruction itself, or the key of one in ``self.prompts`` (give one of
                ``instruction``, ``prompt``, ``prompt_name``).
            convert_to_numpy / convert_to_tensor: a float32 numpy array instead of the tensor (tensor wins).
            normalize_embeddings: True / False: L2-normalised or the raw pooled vectors; None (default): the
                model's setting (normalised unless saved otherwise).
            show_progress_bar: the same as ``show_progress``.
            precision / output_value: only "float32" / "sentence_embedding" (anything else raises).

        Returns an empty float32 [0, H] for empty lists (float32 numpy [n, H] with ``convert_to_numpy``).

        Raises:
            ValueError naming the item: a missing image file, an empty text, texts and images of different
            lengths, an unreadable image. TypeError: ``texts`` / ``images`` / ``instruction`` of a wrong type.
        """
        show = show_progress if show_progress_bar is None else show_progress_bar
        if output_value != "sentence_embedding" or precision != "float32":
            raise ValueError(f"encode: only output_value='sentence_embedding' and precision='float32' are "
                             f"supported, got output_value={output_value!r}, precision={precision!r}")
        if _is_dataloader(texts):   # MTEB: encode(DataLoader[BatchedInput], task_metadata=..., ...)
            return self._encode_mteb(texts, batch_size=batch_size, show_progress=show, packed=packed,
                                     normalize=normalize_embeddings, **mteb_kwargs)
        if mteb_kwargs:
            raise TypeError(f"encode() got unexpected keyword argument(s) {sorted(mteb_kwargs)} (MTEB's "
                            "task_metadata / hf_split / hf_subset / prompt_type come with a DataLoader of inputs)")
        if sentences is not None:
            if texts is not None:
                raise TypeError("encode: give the inputs once (texts or sentences=), not both")
            texts = sentences
        instruction = _one_instruction(instruction, prompt, prompt_name, self.prompts)
        out = self.encode_items(self.inputs(texts, images, instruction), batch_size=batch_size, show_progress=show,
                                packed=packed, device=device, normalize=normalize_embeddings)
        return out.numpy() if convert_to_numpy and not convert_to_tensor else out

    # -- MTEB's encoder protocol and sentence-transformers' similarity helpers ------------------------------

    similarity_fn_name = "cosine"

    def similarity(self, embeddings1, embeddings2) -> torch.Tensor:
        """Cosine similarities float32 [n1, n2] of two sets of embeddings (numpy or torch, [n, H] or [H])."""
        a, b = (F.normalize(torch.as_tensor(e).float().reshape(-1, torch.as_tensor(e).shape[-1]), dim=-1)
                for e in (embeddings1, embeddings2))
        return a @ b.T

    def similarity_pairwise(self, embeddings1, embeddings2) -> torch.Tensor:
        """Cosine similarity float32 [n] of each pair (row i of both)."""
        a, b = (F.normalize(torch.as_tensor(e).float().reshape(-1, torch.as_tensor(e).shape[-1]), dim=-1)
                for e in (embeddings1, embeddings2))
        return (a * b).sum(-1)

    @property
    def mteb_model_meta(self):
        """MTEB's ``ModelMeta`` for this model (name: the checkpoint path, or ``moca/tiny``): text and image
        inputs, cosine similarity, instructions used (``self.prompts``)."""
        from mteb.models.model_meta import ModelMeta

        name = getattr(self, "name_or_path", None) or "moca/tiny"
        return ModelMeta.create_empty(overwrites=dict(
            name=name if "/" in name else f"moca/{name}", revision="local", embed_dim=self.dim,
            n_parameters=sum(p.numel() for p in self.parameters()), similarity_fn_name="cosine",
            modalities=["text", "image"], framework=["PyTorch"], use_instructions=bool(self.prompts),
            open_weights=True))

    def _encode_mteb(self, loader, *, task_metadata, hf_split: Optional[str] = None, hf_subset: Optional[str] = None,
                     prompt_type=None, batch_size: int = 32, show_progress: bool = False, packed: bool = True,
                     normalize: Optional[bool] = None, **kwargs):
        """MTEB's ``encode``: batches ``{"text": [...], "image": [...], ...}`` -> float32 numpy [n, H]. The
        instruction is ``self.prompts``' entry for "<task>-<query|document>", "<task>", "<task type>-<...>",
        "<task type>" or "<query|document>" (the first found; sentence-transformers' order), else none."""
        if kwargs:
            raise TypeError(f"encode (MTEB): unexpected keyword argument(s) {sorted(kwargs)}")
        kind = getattr(prompt_type, "value", prompt_type)
        keys = [f"{task_metadata.name}-{kind}", task_metadata.name, f"{task_metadata.type}-{kind}",
                task_metadata.type, kind]
        instruction = next((self.prompts[k] for k in keys if k in self.prompts), None)
        items = []
        for batch in loader:
            texts, images = batch.get("text"), batch.get("image")
            if texts is None and images is None:
                raise ValueError(f"encode (MTEB task {task_metadata.name}): a batch with neither 'text' nor "
                                 f"'image' (keys {sorted(batch)})")
            for i in range(len(texts) if texts is not None else len(images)):
                text = texts[i] if texts is not None else None
                image = images[i] if images is not None else None
                name = f"{task_metadata.name} {kind or 'input'} {len(items)}"
                if image is not None and text:
                    side = [image, {"text": text}]
                else:
                    side = image if image is not None else text
                items.append((side, name, instruction))
        return self.encode_items(items, batch_size=batch_size, show_progress=show_progress, packed=packed,
                                 normalize=normalize).numpy()

    @torch.inference_mode()
    def encode_items(self, items: Sequence[tuple], root: Optional[Path] = None, batch_size: int = 32,
                     show_progress: bool = False, packed: bool = True,
                     device: Optional[Union[str, torch.device]] = None, desc: str = "encode",
                     normalize: Optional[bool] = None) -> torch.Tensor:
        """Embed ``(side, name, instruction)`` items (record sides; see :mod:`moca.data.retrieval`), relative
        image paths resolved against ``root``. Returns float32 [n, H] on the CPU, in order, L2-normalised
        when ``normalize`` (default: the model's setting)."""
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
                out.append(self(batch, normalize=normalize).float().cpu())
        finally:
            self.train(was_training)
        return torch.cat(out) if out else torch.zeros(0, self.dim)


def _is_dataloader(x) -> bool:
    return isinstance(x, torch.utils.data.DataLoader)


def _one_instruction(instruction, prompt, prompt_name, prompts: dict):
    """``instruction``, or its sentence-transformers names ``prompt`` / ``prompt_name`` (one of them)."""
    given = [n for n, v in (("instruction", instruction), ("prompt", prompt), ("prompt_name", prompt_name))
             if v is not None]
    if len(given) > 1:
        raise TypeError(f"encode: give one of instruction / prompt / prompt_name, got {' and '.join(given)}")
    if prompt_name is not None:
        if prompt_name not in prompts:
            raise ValueError(f"encode: prompt_name={prompt_name!r} is not in model.prompts "
                             f"({sorted(prompts) or 'empty'}); set model.prompts[{prompt_name!r}] = '...'")
        return prompts[prompt_name]
    return prompt if prompt is not None else instruction


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
