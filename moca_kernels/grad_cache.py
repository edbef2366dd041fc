"""GradCache: contrastive batches far larger than activation memory allows (Gao et al., 2021).

A contrastive loss couples every embedding of the batch, so the batch cannot simply be split into
micro-batches with gradient accumulation. GradCache splits only the encoder's work:

1. encode every chunk without grad (activations are freed at once), keeping the embeddings [N, D];
2. compute the loss on the full embedding matrices and its gradient w.r.t. the embeddings (cheap);
3. re-encode each chunk with grad, under the RNG state of its first pass (identical dropout), and
   back-propagate the cached embedding gradient of that chunk into the parameters.

Parameter gradients equal those of one backward through the whole batch (same dropout masks), at the cost of
a second forward. Peak activation memory is that of one chunk.
"""

from __future__ import annotations

import contextlib
import operator
from collections.abc import Mapping
from typing import Any, Callable, List, Optional, Sequence, Union

import torch

from ._checks import BOOL_TYPES

Encoder = Callable[..., torch.Tensor]


class GradCache:
    """Gradient caching engine: one contrastive step over batches split into chunks.

    Args:
        encoders: an ``nn.Module`` or any function mapping one chunk to embeddings [n, D], shared by every
            batch passed to :meth:`step`, or a sequence with one encoder per batch (e.g. a query and a
            document tower). A chunk that is a tensor is passed as ``encoder(chunk)``, a dict as
            ``encoder(**chunk)``, a tuple or list as ``encoder(*chunk)``.
        loss_fn: ``loss_fn(*embeddings, **loss_kwargs) -> scalar tensor``, called once per step with the
            full embedding matrices, in the order the batches were given (e.g. ``mk.info_nce`` with any of
            its options, ``group=`` included). Tensors it closes over that require grad (a learnable
            temperature) receive their gradient directly.
        chunk_sizes: rows per chunk (>= 1): one int for every batch, or a list / tuple with one per batch
            (queries and documents may differ). None, floats and bools raise TypeError.
        split_fn: ``split_fn(batch, chunk_size) -> list of chunks``. The default splits a tensor, or every
            tensor of a dict / tuple / list, along dim 0 (other values are repeated in every chunk). Give
            your own when rows are not along dim 0 (e.g. Qwen2-VL's flattened ``pixel_values``).
        scaler: a ``torch.amp.GradScaler`` (fp16 AMP): the embedding gradient is taken of
            ``scaler.scale(loss)``, so parameter gradients come out scaled, ready for
            ``scaler.step(optimizer)``. Mixed precision itself: call :meth:`step` inside ``torch.autocast``;
            both forward passes (and the loss) run under it, every backward outside it, as PyTorch advises.
        sync_modules: DistributedDataParallel modules whose gradient all-reduce must wait for the last
            chunk. Encoders that are DDP modules are found without this (each syncs on the last chunk it
            encodes); name the DDP module here when the encoder is a function that calls it (it is then
            assumed to run in every chunk and syncs on the very last one). Every chunk but that one runs
            under ``no_sync()``, so gradients are all-reduced once per step. Every rank must run the same
            number of chunks.

    Example (Stage 2: one model for queries and documents, 2 hard negatives per query, documents
    gathered across GPUs)::

        import torch.nn.functional as F
        import moca_kernels as mk

        model = DDP(backbone)                                     # or a plain nn.Module on one GPU

        def encode(batch):                                        # a chunk of tokenised samples -> [n, D]
            hidden = model(**batch).last_hidden_state
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            return F.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)

        def loss_fn(q, d):                                        # d: B positives, then 2 negatives per query
            # bf16 operands run info_nce on tensor cores (fp32 ones use exact fp32 products unless tf32 is on)
            return mk.info_nce(q.bfloat16(), d.bfloat16(), temperature=0.03, hard_negatives=2,
                               hard_negative_scope="own", group=torch.distributed.group.WORLD)

        cache = mk.GradCache(encode, loss_fn, chunk_sizes=(64, 32), sync_modules=[model])
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = cache.step(query_batch, doc_batch)             # every parameter's .grad is now set
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    The returned loss is detached. Gradients accumulate into ``.grad`` as a normal backward would. Inside a
    trainer that calls ``backward`` itself (sentence-transformers, transformers, accelerate), use
    :meth:`loss` instead: the second pass then runs from the loss's backward, with the trainer's scaling.
    """

    def __init__(self, encoders: Union[Encoder, Sequence[Encoder]], loss_fn: Callable[..., torch.Tensor],
                 chunk_sizes: Union[int, Sequence[int]], *,
                 split_fn: Optional[Callable[[Any, int], List[Any]]] = None, scaler=None,
                 sync_modules: Sequence[torch.nn.Module] = ()):
        if isinstance(encoders, (list, tuple)):
            if not encoders or not all(callable(e) for e in encoders):
                raise TypeError("GradCache: encoders must be a callable or a non-empty sequence of callables")
        elif not callable(encoders):
            raise TypeError(f"GradCache: encoders must be callable, got {type(encoders).__name__}")
        if not callable(loss_fn):
            raise TypeError(f"GradCache: loss_fn must be callable, got {type(loss_fn).__name__}")
        chunk_sizes = _check_chunk_sizes(chunk_sizes)
        if split_fn is not None and not callable(split_fn):
            raise TypeError(f"GradCache: split_fn must be callable or None, got {type(split_fn).__name__}")
        if scaler is not None and not callable(getattr(scaler, "scale", None)):
            raise TypeError(f"GradCache: scaler must be a torch.amp.GradScaler (with .scale()) or None, got "
                            f"{type(scaler).__name__}")
        if isinstance(sync_modules, torch.nn.Module) or not isinstance(sync_modules, (list, tuple)):
            raise TypeError(f"GradCache: sync_modules must be a list or tuple of DDP modules, got "
                            f"{type(sync_modules).__name__}")
        self.encoders = encoders
        self.loss_fn = loss_fn
        self.chunk_sizes = chunk_sizes
        self.split_fn = split_fn or split_batch
        self.scaler = scaler
        self.sync_modules = list(sync_modules)

    def __call__(self, *batches, **loss_kwargs) -> torch.Tensor:
        return self.step(*batches, **loss_kwargs)

    def step(self, *batches, **loss_kwargs) -> torch.Tensor:
        """Encode, compute the loss, and back-propagate it into every encoder's parameters; returns the loss.

        batches: one per embedding matrix the loss takes (e.g. queries, documents). loss_kwargs go to loss_fn.
        """
        loss = self.loss(*batches, **loss_kwargs)
        with _outside_autocast():
            (self.scaler.scale(loss) if self.scaler is not None else loss).backward()
        return loss.detach()

    def loss(self, *batches, **loss_kwargs) -> torch.Tensor:
        """The first pass and the loss; the second pass runs when the returned loss is back-propagated.

        For trainers that call ``backward`` themselves (sentence-transformers, transformers' ``Trainer``,
        accelerate): the returned float scalar requires grad, and ``(c * loss).backward()`` (a gradient
        accumulation divisor, a GradScaler's scale, a loss weight) re-encodes every chunk from a backward hook
        and back-propagates ``c`` times the cached embedding gradients, so parameter gradients are exactly
        those of ``(c * loss).backward()`` through one full-batch forward. The second pass replays each chunk
        under the RNG state and the autocast settings of its first pass. ``self.scaler`` is not applied here
        (scale the loss yourself, as the trainer does). Under ``torch.no_grad()`` only the first pass runs
        (evaluation). Each backward of the loss re-encodes once; a loss that is never back-propagated
        costs no second pass.
        """
        if not batches:
            raise ValueError("GradCache.step: no batch given")
        encoders = self._per_batch(self.encoders, len(batches), "encoders")
        sizes = self._per_batch(self.chunk_sizes, len(batches), "chunk_sizes")
        chunks = [list(self.split_fn(b, s)) for b, s in zip(batches, sizes)]
        if any(len(c) == 0 for c in chunks):
            raise ValueError("GradCache.step: a batch split into no chunks (empty batch?)")

        # 1. every chunk without grad, remembering the RNG state each one started from
        states: List[List[_RngState]] = []
        rows: List[List[int]] = []
        embeddings = []
        with torch.no_grad():
            for enc, batch_chunks in zip(encoders, chunks):
                outs, rng = [], []
                for chunk in batch_chunks:
                    rng.append(_RngState.capture())
                    outs.append(_embedding(_call(enc, chunk)))
                states.append(rng)
                rows.append([o.shape[0] for o in outs])
                embeddings.append(torch.cat(outs))

        # 2. the loss on the whole batch; backward reaches the embeddings through _SecondPass, which then
        # runs step 3 (re-encode each chunk with grad, push the embedding gradient of that chunk through it)
        grad_mode = torch.is_grad_enabled()
        if grad_mode:
            replay = _Replay(self, encoders, chunks, states, rows, _autocast_state())
            embeddings = list(_SecondPass.apply(replay, torch.empty(0, requires_grad=True), *embeddings))
        loss = self.loss_fn(*embeddings, **loss_kwargs)
        if not torch.is_tensor(loss) or loss.numel() != 1:
            raise TypeError("GradCache: loss_fn must return a scalar tensor")
        if grad_mode and not loss.requires_grad:
            raise RuntimeError("GradCache: the loss does not depend on the embeddings (no grad_fn)")
        return loss

    def _second_pass(self, encoders, chunks, states, rows, autocast, grads) -> None:
        """Step 3: re-encode each chunk with grad under its first-pass RNG state and autocast settings, and
        back-propagate its slice of ``grads`` (one per batch, None for a batch the loss ignores)."""
        # Batches whose embeddings got no gradient (the loss ignores them) are not re-encoded.
        work = [(b, i) for b in range(len(chunks)) if grads[b] is not None for i in range(len(chunks[b]))]
        grads = [g.split(r) if g is not None else None for g, r in zip(grads, rows)]
        quiet = self._sync_modules(encoders)
        # a DDP encoder syncs on the last chunk it encodes; modules named in sync_modules on the last chunk of all
        last_use = [max((n for n, (b, _) in enumerate(work) if encoders[b] is m or _named(m, self.sync_modules)),
                        default=-1) for m in quiet]
        for n, (b, i) in enumerate(work):
            grad = grads[b][i]
            with contextlib.ExitStack() as stack:
                for m, last in zip(quiet, last_use):
                    if n != last:
                        stack.enter_context(m.no_sync())
                stack.enter_context(states[b][i].replay())
                with torch.enable_grad(), _autocast_region(autocast):
                    out = _embedding(_call(encoders[b], chunks[b][i]))
                if out.shape != grad.shape:
                    raise RuntimeError(f"GradCache: chunk {i} of batch {b} re-encoded to shape "
                                       f"{tuple(out.shape)}, its first pass gave {tuple(grad.shape)}")
                stack.enter_context(_outside_autocast())
                torch.autograd.backward(out, grad.to(out.dtype))

    # -----------------------------------------------------------------------------------------------------

    @staticmethod
    def _per_batch(value, n: int, name: str) -> list:
        if isinstance(value, (list, tuple)):
            if len(value) != n:
                raise ValueError(f"GradCache: {len(value)} {name} for {n} batches")
            return list(value)
        return [value] * n

    def _sync_modules(self, encoders) -> list:
        from torch.nn.parallel import DistributedDataParallel as DDP

        mods = list(self.sync_modules)
        for e in encoders:
            if isinstance(e, DDP) and all(e is not m for m in mods):
                mods.append(e)
        for m in mods:
            if not hasattr(m, "no_sync"):
                raise TypeError(f"GradCache: sync_modules entries need no_sync() (DDP), got {type(m).__name__}")
        return mods


class _Replay:
    """What the second pass needs, kept by :class:`_SecondPass` until backward."""

    def __init__(self, cache, encoders, chunks, states, rows, autocast):
        self.cache, self.encoders, self.chunks, self.states = cache, encoders, chunks, states
        self.rows, self.autocast = rows, autocast


class _SecondPass(torch.autograd.Function):
    """Identity on the first-pass embeddings; its backward receives d loss / d embeddings (times whatever the
    caller scaled the loss by) and runs the second pass with them. ``anchor`` (an empty tensor that requires
    grad) puts the function into the graph although the embeddings themselves were computed without grad."""

    @staticmethod
    def forward(ctx, replay, anchor, *embeddings):
        ctx.replay = replay
        ctx.set_materialize_grads(False)
        return tuple(e.detach() for e in embeddings)

    @staticmethod
    def backward(ctx, *grads):
        r = ctx.replay
        r.cache._second_pass(r.encoders, r.chunks, r.states, r.rows, r.autocast, list(grads))
        return (None, None) + (None,) * len(grads)


def _autocast_state() -> list:
    """(device, dtype, cache_enabled) of every autocast region enclosing the first pass."""
    return [(d, torch.get_autocast_dtype(d), torch.is_autocast_cache_enabled())
            for d in ("cpu", "cuda") if torch.is_autocast_enabled(d)]


def _autocast_region(state) -> contextlib.ExitStack:
    """Re-enter the first pass's autocast settings (a backward hook runs outside the caller's regions)."""
    stack = contextlib.ExitStack()
    on = {d for d, _, _ in state}
    for device in ("cpu", "cuda"):
        if device not in on and torch.is_autocast_enabled(device):
            stack.enter_context(torch.autocast(device, enabled=False))
    for device, dtype, cache in state:
        stack.enter_context(torch.autocast(device, dtype=dtype, cache_enabled=cache))
    return stack


def _check_chunk_sizes(chunk_sizes):
    """An int >= 1, or a list / tuple of them (returned as a tuple); TypeError / ValueError naming chunk_sizes
    for anything else (None, 1.5 or "4" are not truncated or iterated)."""
    def one(s):
        if isinstance(s, BOOL_TYPES + (float,)) or not hasattr(s, "__index__"):
            raise TypeError(f"GradCache: chunk_sizes must be an int >= 1 or a list / tuple of them, got "
                            f"{chunk_sizes!r}"[:300])
        s = operator.index(s)
        if s < 1:
            raise ValueError(f"GradCache: chunk_sizes must be >= 1 (rows per chunk), got {chunk_sizes!r}"[:300])
        return s

    if isinstance(chunk_sizes, (list, tuple)):
        if not chunk_sizes:
            raise ValueError("GradCache: chunk_sizes is empty; give an int >= 1 or one per batch")
        return tuple(one(s) for s in chunk_sizes)
    return one(chunk_sizes)


def _outside_autocast() -> contextlib.ExitStack:
    """Backward passes run outside autocast (PyTorch's advice): parts of the forward kept in float32 on purpose
    (a loss computed with autocast disabled) are differentiated in float32 too, not in the autocast dtype."""
    stack = contextlib.ExitStack()
    for device in ("cpu", "cuda"):
        if torch.is_autocast_enabled(device):
            stack.enter_context(torch.autocast(device, enabled=False))
    return stack


def _named(module, modules) -> bool:
    return any(module is m for m in modules)


class _RngState:
    """The CPU and CUDA generator states a chunk's first pass started from."""

    def __init__(self, cpu: torch.Tensor, cuda: Optional[List[torch.Tensor]]):
        self.cpu, self.cuda = cpu, cuda

    @classmethod
    def capture(cls) -> "_RngState":
        cuda = None
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            cuda = torch.cuda.get_rng_state_all()
        return cls(torch.get_rng_state(), cuda)

    @contextlib.contextmanager
    def replay(self):
        """Run with the captured states; the generators are restored afterwards, as if nothing had drawn."""
        devices = list(range(len(self.cuda))) if self.cuda is not None else []
        with torch.random.fork_rng(devices=devices):
            torch.set_rng_state(self.cpu)
            if self.cuda is not None:
                torch.cuda.set_rng_state_all(self.cuda)
            yield


def _call(encoder, chunk):
    if isinstance(chunk, Mapping):
        return encoder(**chunk)
    if isinstance(chunk, (tuple, list)):
        return encoder(*chunk)
    return encoder(chunk)


def _embedding(out) -> torch.Tensor:
    if not torch.is_tensor(out) or out.dim() < 1:
        raise TypeError("GradCache: an encoder must return a tensor of embeddings [n, D], got "
                        f"{type(out).__name__} (wrap the model in a function that pools its output)")
    return out


def split_batch(batch, size: int) -> list:
    """Split a tensor, or the tensors of a dict / tuple / list, into chunks of ``size`` rows along dim 0."""
    if torch.is_tensor(batch):
        return list(batch.split(size))
    if isinstance(batch, Mapping):
        keys = list(batch)
        parts = split_batch([batch[k] for k in keys], size)
        return [dict(zip(keys, p)) for p in parts]
    if isinstance(batch, (tuple, list)):
        lengths = {v.shape[0] for v in batch if torch.is_tensor(v) and v.dim() > 0}
        if len(lengths) != 1:
            raise ValueError(f"GradCache: cannot split a batch whose tensors have {sorted(lengths) or 'no'} "
                             "row counts along dim 0; pass split_fn")
        n = lengths.pop()
        return [type(batch)(v[s:s + size] if torch.is_tensor(v) and v.dim() > 0 else v for v in batch)
                for s in range(0, n, size)]
    raise TypeError(f"GradCache: cannot split a {type(batch).__name__}; pass split_fn")
