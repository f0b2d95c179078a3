"""The contract between the host decode loop and the executors of a build (docs/PROGRAM.md).

:class:`DecodeBackend` is the device-resident round: the executor owns the KV caches, the taps, the draft
probabilities and each row's random stream; per call the host sees only O(B·G) numbers (accept counts, tokens,
the next block's drafts and confidences), fetched with one synchronisation.

:class:`ProgramInfo` is the one description of a built program that the manifest, the Triton repository and
every executor read.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any, Protocol

import numpy as np


@dataclass(frozen=True)
class ProgramInfo:
    """What a runtime needs to drive a program without its checkpoints; computed once (partition) per build."""

    vocab_size: int
    block_size: int  # G: drafts per round (0: no draft, target-only)
    tap_width: int  # NT * H
    has_confidence: bool
    eos_token_ids: tuple[int, ...] = ()
    max_slots: int | None = None  # cache capacity the graphs/engines were built for (None = unbounded)
    sampling: bool = True  # whether the graphs take temperature/uniforms (verify mode "sampling")
    dtype: str = "fp32"
    family: str = "qwen3"
    hidden_size: int = 0
    target_layers: int = 0
    kv_heads: int = 0
    head_dim: int = 0
    draft_layers: int = 0
    draft_kv_heads: int = 0
    draft_head_dim: int = 0
    tap_layer_ids: tuple[int, ...] = ()
    markov_head: str | None = None
    # Sliding-window layers kept as a ring (Gemma4; models/gemma4.RingWindow): target_step's ``kv_ring``
    # [ring_layers, 2, B, ring_kv_heads, ring_slots, ring_head_dim]; then kv_heads/head_dim are the global
    # layers' (unpadded) and ``kv_cache`` holds only those (:attr:`cache_layers`). ring_slots 0: no ring.
    ring_layers: int = 0
    ring_kv_heads: int = 0
    ring_head_dim: int = 0
    ring_slots: int = 0

    @property
    def cache_layers(self) -> int:
        """Layers of the target's full-length ``kv_cache``: all of them, less those in the ring."""
        return self.target_layers - self.ring_layers

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["eos_token_ids"] = list(self.eos_token_ids)
        out["tap_layer_ids"] = list(self.tap_layer_ids)
        if not self.ring_slots:  # builds without a ring describe themselves as before the ring existed
            for key in ("ring_layers", "ring_kv_heads", "ring_head_dim", "ring_slots"):
                del out[key]
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ProgramInfo:
        known = {f.name for f in fields(cls)}
        kw = {k: v for k, v in data.items() if k in known}
        for key in ("eos_token_ids", "tap_layer_ids"):
            if key in kw:
                kw[key] = tuple(int(t) for t in kw[key])
        return cls(**kw)


# ------------------------------------------------------------------------------------ device-resident round
@dataclass(frozen=True)
class Proposal:
    """The host's view of one device call (prefill or round): O(B·G) numbers, fetched with one sync.

    After ``admit``: ``accepted`` is all zeros and ``next_token`` is the first generated token. After
    ``round``: ``accepted[b]`` drafts of the block verified this round were accepted, and ``next_token[b]`` is
    the target's correction (accepted < verify_len) or bonus token; the round committed
    ``previous.drafts[b, :accepted[b]] + [next_token[b]]``. ``drafts``/``confidence_logits`` are the *next*
    block, drafted in the same call from the context just committed ([B, 0] when decoding target-only; −1 where
    the round drafted nothing, ``round(..., draft=False)``: none to verify next).
    """

    accepted: np.ndarray  # [B] int64
    next_token: np.ndarray  # [B] int64
    drafts: np.ndarray  # [B, G] int64
    confidence_logits: np.ndarray  # [B, G] float32


class DecodeBackend(Protocol):
    """Up to ``rows`` concurrent requests whose whole decode state lives where the executor runs.

    Live requests are rows ``0..n-1``, in the order they were admitted: ``admit`` appends rows, ``select``
    keeps some and compacts them (order kept). That is enough for continuous batching: requests join between
    rounds (``admit``) and leave (``select``) while the others keep their caches.

    Random numbers come from :func:`dspark_compile.runtime.sampling.counter_uniforms`: a row draws
    ``uniforms_per_call(G)`` numbers per device call (admit or round), at counter ``calls * uniforms_per_call(G)``
    of the stream keyed by its seed (verification / first token at ``[0, G+1)``, drafts at ``[G+1, 2G+1)``), so
    its output depends on its prompt, temperature and seed, never on which rows share its batch.
    """

    info: ProgramInfo
    # round() computes all G+1 positions of every row whatever verify_len says (the CUDA-graph round, the graph
    # executor): a shorter ℓ saves no time, which the scheduler must know (VerifyPolicy.lengths). Read with
    # getattr(..., False): a backend whose verify cost grows with ℓ leaves it out.
    verifies_whole_block: bool
    # round(verify_len, draft=False) / launch(..., draft=False): a plain step (VerifyPolicy.draft_rows): the target
    # over one position per row, nothing verified, the draft's context kept current, nothing drafted (the
    # Proposal's drafts −1). CudaGraphBackend writes only the draft's context; the graph executor, whose draft graph
    # has no context-only form, holds the taps for its next draft call. Read with getattr(..., False): a backend
    # without it is never asked.
    takes_plain_rounds: bool

    def start(self, rows: int, slots: int, *, speculative: bool = True) -> None:
        """Caches for up to ``rows`` requests of up to ``slots`` positions each; no live rows yet.
        ``speculative=False`` decodes target-only (G = 0: no drafts, ``verify_len`` all zero)."""

    def admit(self, input_ids: np.ndarray, lengths: np.ndarray, temperature: np.ndarray,
              seeds: np.ndarray) -> Proposal:
        """Prefill ``k`` new requests (prompts [k, T] right-padded, lengths/temperature/seeds [k]) into rows
        ``n..n+k-1``: their first token and first block of drafts."""

    def round(self, verify_len: np.ndarray) -> Proposal:
        """Every live row: verify ``verify_len[b]`` ≤ G pending drafts, commit, draft the next block."""

    # Optional, for overlapping the host's per-round work with the device: ``launch(verify_len)`` starts what
    # ``round`` does and returns at once; ``collect()`` waits for the oldest round launched and returns its
    # Proposal. Up to ``rounds_in_flight`` (an int attribute, 1 when absent) rounds may be launched before the
    # first is collected: each verifies what the one before it drafts, so its verify_len cannot depend on those
    # drafts' confidences (VerifyPolicy "fixed", or target-only). Between launch and collect the host must not
    # call the backend otherwise. A backend without them is driven through ``round``.
    # Optional with them, where ``queues_admission`` is true: ``admit_queued(...)`` queues what ``admit`` does and
    # returns at once, rounds may be launched behind it, and ``admitted()`` waits for its Proposal (before any
    # ``collect``). RoundQueue.admit uses it for a batch admitted alone, so round 1 follows the prefill on the device.

    def select(self, rows: np.ndarray) -> None:
        """Keep only these live rows (increasing), compacted to ``0..len(rows)-1``; all per-row state moves."""


def cache_slots_needed(prompt_len: int, max_new_tokens: int, block_size: int) -> int:
    """Cache slots a request needs (docs/PROGRAM.md): its prompt, the tokens it may generate, and one round's
    G + 2 rows written past the last committed token."""
    return prompt_len + max_new_tokens + block_size + 2


def uniforms_per_call(block_size: int) -> int:
    """Random numbers one row consumes per device call: G+1 for verification (or the first token), G drafts."""
    return 2 * block_size + 1


def describe_backend(backend: Any) -> dict[str, Any]:
    """The backend's own description (``describe()``), or its class, device and dtype: what a benchmark records
    beside its numbers, and what ``--draft-rows auto`` compares the serving backend with."""
    if hasattr(backend, "describe"):
        return backend.describe()
    target = getattr(backend, "target_model", None)
    dtype = str(target.embed_tokens.weight.dtype).removeprefix("torch.") if target is not None else "?"
    return {"backend": type(backend).__name__, "device": str(getattr(backend, "device", "?")), "dtype": dtype}


def backend_device(backend: Any) -> str:
    """The GPU's name for a backend on CUDA (speed differs between GPUs of one kind, e.g. the H100 and H200), else
    ``"cpu"``."""
    device = getattr(backend, "device", None)
    if device is None or not str(device).startswith("cuda"):
        return "cpu"
    import torch

    return torch.cuda.get_device_name(torch.device(device))
