"""The next product's weight into L2 while the current one runs: decode's idle bandwidth, put to use.

At batch 1 a step streams every weight once, but HBM is busy only while the large products stream: the small
products spend 5–8 µs each not streaming, and norms, RoPE and attention read almost nothing (docs/BENCH.md). So
before each product of the decode GEMM (:func:`.decode_gemm.decode_linear`: every CUDA product of the step,
cuBLAS ones included) a kernel on a forked stream issues bulk L2 prefetches (``cp.async.bulk.prefetch.L2``, fire
and forget) of the weight that came next the last time this weight ran, up to a byte budget: the first bytes
of each of its rows, as every program of a product starts at its rows' first K tile. The fork is joined right
after the product's launch, so a captured graph holds a branch per product and nothing dangles.

A prefetch is a hint: values never change, only where they are read from. Which product comes next is learned
from the calls themselves (the first eager warm-up run records the order; the capture replays it), keyed by the
weight's address and held weakly (a dead model's weights are never prefetched). ``DSPARK_L2_PREFETCH_MB`` sets
the budget per product (0: off).
"""

from __future__ import annotations

import os
import weakref
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import triton
import triton.language as tl

LANES = 128  # rows per program, one bulk prefetch each
MAX_ROW_BYTES = 1 << 20  # one prefetch instruction per row: rows longer than this are cut to it
_NEXT: dict[int, weakref.ref[torch.Tensor]] = {}
_last: list[int] = [0]  # address of the weight of the previous product
_STREAMS: dict[torch.device, torch.cuda.Stream] = {}

_PREFETCH = tl.constexpr("""{
 .reg .pred p;
 setp.ne.s32 p, $2, 0;
 @p cp.async.bulk.prefetch.L2.global [$1], $2;
 mov.u32 $0, 0;
}""")
_PREFETCH_EVICT_LAST = tl.constexpr("""{
 .reg .pred p;
 .reg .b64 pol;
 createpolicy.fractional.L2::evict_last.b64 pol, 1.0;
 setp.ne.s32 p, $2, 0;
 @p cp.async.bulk.prefetch.L2.global.L2::cache_hint [$1], $2, pol;
 mov.u32 $0, 0;
}""")


@triton.jit
def _prefetch_kernel(w_ptr, rows, row_stride, prefix, LANES: tl.constexpr, EVICT_LAST: tl.constexpr):
    """Lane r prefetches bytes [0, prefix) of row r (a multiple of 16, as the bulk copy needs)."""
    r = tl.program_id(0) * LANES + tl.arange(0, LANES)
    addr = w_ptr + r.to(tl.int64) * row_stride
    size = tl.where(r < rows, prefix, 0)
    if EVICT_LAST:
        tl.inline_asm_elementwise(_PREFETCH_EVICT_LAST, "=r,l,r", [addr, size], dtype=tl.int32, is_pure=False,
                                  pack=1)
    else:
        tl.inline_asm_elementwise(_PREFETCH, "=r,l,r", [addr, size], dtype=tl.int32, is_pure=False, pack=1)


def budget_bytes() -> int:
    return int(float(os.environ.get("DSPARK_L2_PREFETCH_MB", "0")) * (1 << 20))


def plan(weight: torch.Tensor, budget: int) -> tuple[int, int, int]:
    """(rows, row stride in bytes, bytes per row) of a row-major weight's prefetch: every row's first bytes,
    in 16-byte units, as many as the budget spreads over its rows (0 bytes: too little budget to bother)."""
    rows = weight.shape[0]
    stride = weight.stride(0) * weight.element_size()
    row_bytes = min(weight.shape[1] * weight.element_size(), MAX_ROW_BYTES)
    per_row = min(row_bytes, budget // max(rows, 1)) // 16 * 16
    return rows, stride, per_row


def prefetch(weight: torch.Tensor, budget: int) -> None:
    """Launch the prefetch of ``weight``'s first bytes per row on the current stream."""
    rows, stride, per_row = plan(weight, budget)
    if per_row == 0 or weight.data_ptr() % 16 or stride % 16:
        return
    _prefetch_kernel[(triton.cdiv(rows, LANES),)](weight.view(torch.uint8) if weight.element_size() == 1
                                                 else weight.view(torch.int16).view(torch.uint8), rows, stride,
                                                 per_row, LANES=LANES, EVICT_LAST=os.environ.get("DSPARK_L2_EVICT_LAST") == "1",
                                                 num_warps=LANES // 32)


_pending: list[tuple[torch.cuda.Stream, torch.cuda.Stream]] = []


def join() -> None:
    """Join a prefetch still forked ("after" mode) into its stream: a capture must end with none open."""
    while _pending:
        main, side = _pending.pop()
        main.wait_stream(side)


@contextmanager
def ahead_of(weight: torch.Tensor) -> Iterator[None]:
    """Around one product of ``weight``: record it as the successor of the previous product, and prefetch its
    own recorded successor on a forked stream: "before" the product (alongside it; joined after its launch), or
    "after" it (from its end, alongside what follows; joined after the next product's launch)."""
    ptr = weight.data_ptr()
    if _last[0]:
        _NEXT[_last[0]] = weakref.ref(weight)
    _last[0] = ptr
    budget = budget_bytes()
    ref = _NEXT.get(ptr)
    nxt = ref() if ref is not None else None
    if budget <= 0 or nxt is None or not weight.is_cuda or nxt.device != weight.device or nxt.dim() != 2:
        yield
        join()
        return
    main = torch.cuda.current_stream(weight.device)
    side = _STREAMS.get(weight.device)
    if side is None:
        side = _STREAMS[weight.device] = torch.cuda.Stream(weight.device)
    after = os.environ.get("DSPARK_L2_PREFETCH_AT", "before") == "after"
    if after:
        yield
        join()
    side.wait_stream(main)
    with torch.cuda.stream(side):
        prefetch(nxt, budget)
    if after:
        _pending.append((main, side))
        return
    yield
    main.wait_stream(side)
