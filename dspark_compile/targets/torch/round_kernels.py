"""A round's bookkeeping in a few launches: its tokens and verify lengths, positions, the commit, the draft's
inputs and the packed output.

Written as torch ops, the work of a round graph besides the model's layers was about 50 launches at batch 1
(counted on the CPU; ``tests/targets/test_round_kernels.py`` counts what is left), each a few microseconds of the
round, and the same in every dtype. It is integer work and copies only, so each kernel gives the torch ops' bits:
:class:`~.cuda_graph_backend.CudaGraphBackend` runs these on a GPU (and the interpreter tests on the CPU) and the
torch ops elsewhere; the interpreter test checks the two against each other.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from dspark_compile.targets.torch.kernels import _uniforms_at, pdl_enter, pdl_options

ROWS_PER_PROGRAM = 128  # commit(): rows of the batch per program


def _options(t: torch.Tensor, rows: int) -> dict[str, object]:
    return {"num_warps": 1, **pdl_options(t, rows)}


@triton.jit
def _round_inputs_kernel(anchor_ptr, drafts_ptr, G, vlen_in_ptr, live_ptr, tok_ptr, vlen_ptr, W,
                         BLOCK: tl.constexpr, PDL: tl.constexpr = False):
    pdl_enter(PDL)
    b = tl.program_id(0).to(tl.int64)
    j = tl.arange(0, BLOCK)
    d = tl.load(drafts_ptr + b * G + j - 1, mask=(j > 0) & (j < W), other=0)
    tl.store(tok_ptr + b * W + j, tl.where(j == 0, tl.load(anchor_ptr + b), d), mask=j < W)
    v = tl.minimum(tl.maximum(tl.load(vlen_in_ptr + b), 0), W - 1)
    tl.store(vlen_ptr + b, tl.where(tl.load(live_ptr + b) != 0, v, 0))


def round_inputs(anchor: torch.Tensor, drafts: torch.Tensor, verify_len: torch.Tensor, live: torch.Tensor,
                 width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The target's tokens [R, width] (the anchor, then the first width − 1 pending drafts) and each row's verify
    length, clamped to [0, width − 1] and 0 for a row with no request."""
    rows, g = drafts.shape
    assert drafts.is_contiguous() and width <= g + 1
    tokens = torch.empty(rows, width, dtype=torch.int64, device=anchor.device)
    vlen = torch.empty(rows, dtype=torch.int64, device=anchor.device)
    _round_inputs_kernel[(rows,)](anchor, drafts, g, verify_len, live, tokens, vlen, width,
                                  BLOCK=triton.next_power_of_2(width), **_options(anchor, rows))
    return tokens, vlen


@triton.jit
def _positions_kernel(len_ptr, pos_ptr, limit_ptr, T, BLOCK: tl.constexpr, PDL: tl.constexpr = False):
    pdl_enter(PDL)
    b = tl.program_id(0).to(tl.int64)
    j = tl.arange(0, BLOCK)
    p = tl.load(len_ptr + b) + j
    tl.store(pos_ptr + b * T + j, p, mask=j < T)
    tl.store(limit_ptr + b * T + j, p + 1, mask=j < T)


def positions(cache_len: torch.Tensor, t: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions [B, t] of ``t`` tokens after each row's ``cache_len``, and the attention limit of each (one past
    it: causal over the committed prefix and the chunk)."""
    bsz = cache_len.shape[0]
    pos = torch.empty(bsz, t, dtype=torch.int64, device=cache_len.device)
    limit = torch.empty_like(pos)
    _positions_kernel[(bsz,)](cache_len, pos, limit, t, BLOCK=triton.next_power_of_2(t),
                              **_options(pos, bsz * t))
    return pos, limit


@triton.jit
def _draft_inputs_kernel(anchor_ptr, count_ptr, len_ptr, ids_ptr, pos_ptr, slot_ptr, limit_ptr, C, G, MASK_ID,
                         BLOCK: tl.constexpr, PDL: tl.constexpr = False):
    pdl_enter(PDL)
    b = tl.program_id(0).to(tl.int64)
    j = tl.arange(0, BLOCK)
    start = tl.load(len_ptr + b)
    anchor_pos = start + tl.load(count_ptr + b)
    ctx = j < C
    inside = j < C + G
    p = tl.where(ctx, start + j, anchor_pos + j - C)
    tl.store(pos_ptr + b * (C + G) + j, p, mask=inside)
    tl.store(slot_ptr + b * (C + G) + j, tl.where(ctx & (start + j >= anchor_pos), -1, p), mask=inside)
    if G > 0:
        k = j - C
        block = (j >= C) & inside
        tl.store(ids_ptr + b * G + k, tl.where(k == 0, tl.load(anchor_ptr + b), MASK_ID), mask=block)
        tl.store(limit_ptr + b * G + k, anchor_pos + G, mask=block)


def draft_inputs(anchor: torch.Tensor | None, ctx_count: torch.Tensor, cache_len: torch.Tensor, c: int, g: int,
                 mask_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The draft backbone's inputs (``DSparkDraft.backbone``): the block's ids [B, g] (the anchor, then mask
    tokens); the positions [B, c + g] of the ``c`` context rows (from ``cache_len``) and of the block (from
    cache_len + ctx_count); their cache slots (−1 for a context row past ``ctx_count``: not written); and the
    block's attention limit [B, g] (it sees its whole block). ``g`` = 0 (no ``anchor``): the context rows only
    (``StaticProgram.draft_context``)."""
    assert anchor is not None or g == 0
    anchor = ctx_count if anchor is None else anchor  # not read without a block
    bsz = anchor.shape[0]
    dev = anchor.device
    ids = torch.empty(bsz, g, dtype=torch.int64, device=dev)
    pos = torch.empty(bsz, c + g, dtype=torch.int64, device=dev)
    slots = torch.empty_like(pos)
    limit = torch.empty_like(ids)
    _draft_inputs_kernel[(bsz,)](anchor, ctx_count, cache_len, ids, pos, slots, limit, c, g, mask_id,
                                 BLOCK=triton.next_power_of_2(c + g), **_options(ids, bsz * g))
    return ids, pos, slots, limit


@triton.jit
def _commit_kernel(acc_ptr, next_ptr, live_ptr, len_ptr, anchor_ptr, counter_ptr, count_ptr, R, PER_CALL,
                   BLOCK: tl.constexpr, PDL: tl.constexpr = False):
    pdl_enter(PDL)
    r = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = r < R
    live = tl.load(live_ptr + r, mask=m, other=0) != 0
    step = tl.where(live, tl.load(acc_ptr + r, mask=m, other=0) + 1, 0)
    tl.store(len_ptr + r, tl.load(len_ptr + r, mask=m, other=0) + step, mask=m)
    tl.store(anchor_ptr + r, tl.load(next_ptr + r, mask=m, other=0), mask=m)
    tl.store(counter_ptr + r, tl.load(counter_ptr + r, mask=m, other=0) + tl.where(live, PER_CALL, 0), mask=m)
    tl.store(count_ptr + r, step, mask=m)


def commit(accepted: torch.Tensor, next_token: torch.Tensor, live: torch.Tensor, length: torch.Tensor,
           anchor: torch.Tensor, counter: torch.Tensor, count: torch.Tensor, per_call: int) -> None:
    """A round's commit, in place: each live row's length grows by its accepted drafts plus one (written to
    ``count`` too: the taps rows the draft has not seen), its anchor becomes the next token and its uniforms'
    counter moves ``per_call`` on (the caches already hold the accepted rows)."""
    rows = live.shape[0]
    _commit_kernel[(triton.cdiv(rows, ROWS_PER_PROGRAM),)](accepted, next_token, live, length, anchor, counter,
                                                           count, rows, per_call, BLOCK=ROWS_PER_PROGRAM,
                                                           **_options(length, rows))


@triton.jit
def _finish_kernel(acc_ptr, next_ptr, count_ptr, dlen_ptr, new_ptr, drafts_ptr, conf_ptr, conf_stride, out_ptr,
                   G, C, len_ptr, seed_ptr, counter_ptr, ref_ptr, REF_W, prof_ptr, VOCAB, KEY,
                   DRAFT: tl.constexpr, REPLAY: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr = False):
    pdl_enter(PDL)
    b = tl.program_id(0).to(tl.int64)
    j = tl.arange(0, BLOCK)
    out = out_ptr + b * (2 + G + C)
    if DRAFT > 0:  # the draft's context grew
        tl.store(dlen_ptr + b, tl.load(dlen_ptr + b) + tl.load(count_ptr + b))
    if DRAFT == 2:  # drafted nothing: no drafts pending
        tl.store(out + 2 + j, tl.full([BLOCK], -1.0, tl.float32), mask=j < G)
    if DRAFT == 1:
        new = tl.load(new_ptr + b * G + j, mask=j < G, other=0)
        if REPLAY:  # the rows' references from the drawn cut on made wrong (CudaGraphBackend._replayed)
            at = tl.minimum(tl.load(len_ptr + b) + 1 + j, REF_W - 1)
            right = tl.load(ref_ptr + b * REF_W + at, mask=j < G, other=0)
            u = _uniforms_at(tl.load(seed_ptr + b) ^ KEY, tl.load(counter_ptr + b), j)
            cut = tl.min(tl.where((u < tl.load(prof_ptr + j, mask=j < G, other=0.0)) | (j >= G), G, j), axis=0)
            new = tl.where(j < cut, right, (right + 1) % VOCAB)
        tl.store(drafts_ptr + b * G + j, new, mask=j < G)
        tl.store(out + 2 + j, new.to(tl.float32), mask=j < G)
    tl.store(out, tl.load(acc_ptr + b).to(tl.float32))
    tl.store(out + 1, tl.load(next_ptr + b).to(tl.float32))
    tl.store(out + 2 + G + j, tl.load(conf_ptr + b * conf_stride + j, mask=j < C, other=0.0).to(tl.float32),
             mask=j < C)


def finish(accepted: torch.Tensor, next_token: torch.Tensor, count: torch.Tensor, draft_len: torch.Tensor,
           proposals: torch.Tensor | None, drafts: torch.Tensor, confidence: torch.Tensor, *,
           replay: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, int, int] | None = None,
           plain: bool = False) -> torch.Tensor:
    """The round's end: the draft's cache length grows by ``count``, the ``proposals`` [R, G] become the pending
    ``drafts`` (None: target-only, nothing drafted), and the round's one output is packed as float32 [R, 2 + G + C]:
    accepted, next token, drafts, the confidences [R, C] (ids < 2^24 are exact). ``plain`` (no ``proposals``): a
    round that decoded without drafting (``VerifyPolicy.draft_rows``): the draft's cache length grows, the
    pending drafts stay (the next round's tokens read them) and the output's drafts are −1 (none to verify).

    ``replay`` (benchmark only, ``CudaGraphBackend.set_replay``): (length, seed, counter, reference, profile,
    vocabulary, key): the proposals become each row's reference after its anchor, wrong from the first position
    whose uniform (stream seed ^ key) is not below the profile's acceptance."""
    rows, g = drafts.shape
    c = confidence.shape[1]
    confidence = confidence if confidence.stride(-1) == 1 else confidence.contiguous()
    assert drafts.is_contiguous()
    out = torch.empty(rows, 2 + g + c, dtype=torch.float32, device=drafts.device)
    length, seed, counter, ref, prof, vocab, key = replay or (count, count, count, count, confidence, 1, 0)
    if proposals is not None:
        assert proposals.shape == drafts.shape and not plain, (proposals.shape, drafts.shape)
        proposals = proposals.contiguous()
    _finish_kernel[(rows,)](accepted, next_token, count, draft_len, proposals if proposals is not None else drafts,
                            drafts, confidence, confidence.stride(0), out, g, c, length, seed, counter, ref,
                            ref.shape[-1], prof, vocab, key, DRAFT=2 if plain else int(proposals is not None),
                            REPLAY=replay is not None,
                            BLOCK=max(2, triton.next_power_of_2(max(g, c))), **_options(out, rows))
    return out
