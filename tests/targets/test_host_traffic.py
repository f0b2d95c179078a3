"""Host traffic does not grow with the cache capacity (docs/PROGRAM.md, KV contract), for the onnxruntime and
BLS transports: 256 vs 4096 slots, the same prompts.

Counted are the bytes of every array handed across (1) the decode loop <-> executor boundary per call
(``admit``/``round``/``select`` arguments and the returned Proposal) and (2) the transport <-> graph boundary
per call, all inputs and outputs except the caches, which must be the executor's own tensors (bound by
pointer / passed by DLPack, never copied).
"""

from __future__ import annotations

import dataclasses
import json
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from test_triton_orchestrator import BLS_CALLS, FAKE_MODELS, _bls_executor, orch  # noqa: F401  (fixture)
from test_triton_standin import reference, stand_in_graph, stand_in_info

from dspark_compile.runtime.backend import Proposal
from dspark_compile.runtime.decode import GenerationParams, generate
from dspark_compile.runtime.executor import GraphExecutor

CACHES = ("kv_cache", "draft_kv")
CAPACITIES = (256, 4096)


class BoundaryCounter:
    """A DecodeBackend proxy that counts the bytes crossing the loop <-> executor boundary, per call, and runs
    the executor at a fixed capacity."""

    def __init__(self, inner: GraphExecutor, capacity: int) -> None:
        self.inner, self.capacity, self.info = inner, capacity, inner.info
        self.calls: list[tuple[str, int]] = []

    def start(self, rows: int, slots: int, *, speculative: bool = True) -> None:
        assert slots <= self.capacity
        self.inner.start(rows, self.capacity, speculative=speculative)

    def _count(self, name: str, arrays: list[np.ndarray], result: Proposal | None) -> None:
        out = [result.accepted, result.next_token, result.drafts, result.confidence_logits] if result else []
        self.calls.append((name, sum(np.asarray(a).nbytes for a in arrays + out)))

    def admit(self, input_ids: np.ndarray, lengths: np.ndarray, temperature: np.ndarray,
              seeds: np.ndarray) -> Proposal:
        result = self.inner.admit(input_ids, lengths, temperature, seeds)
        self._count("admit", [input_ids, lengths, temperature, seeds], result)
        return result

    def round(self, verify_len: np.ndarray) -> Proposal:
        result = self.inner.round(verify_len)
        self._count("round", [verify_len], result)
        return result

    def select(self, rows: np.ndarray) -> None:
        self.inner.select(rows)
        self._count("select", [rows], None)


def _traffic(executor: GraphExecutor, capacity: int, prompts: list[list[int]], max_new: int,
             transport_bytes: Any) -> tuple[list[Any], list[tuple[str, int]], list[tuple[str, int]]]:
    counter = BoundaryCounter(executor, capacity)
    results = generate(counter, prompts, GenerationParams(max_new_tokens=max_new, temperature=0.0))
    assert executor.kv.shape[4] == capacity
    return [r.tokens for r in results], counter.calls, transport_bytes()


def _assert_flat(runs: dict[int, Any]) -> None:
    """``runs[capacity]`` = (tokens, loop bytes per call, graph I/O bytes per call, bytes of one target cache)."""
    small, large = runs[CAPACITIES[0]], runs[CAPACITIES[1]]
    assert small[0] == large[0]  # the same tokens
    assert small[1] == large[1] and any(n == "round" for n, _ in small[1])  # loop <-> executor, per call
    assert small[2] == large[2] and len(small[2]) > 3  # transport <-> graphs, per call, caches excluded
    assert max(b for _, b in large[2]) < large[3] / 8  # far below one cache of the large capacity


# ------------------------------------------------------------------------------------------- onnxruntime


def test_onnxruntime_transport_traffic_is_independent_of_capacity(golden_build: Path, golden_dir: Path) -> None:
    pytest.importorskip("onnxruntime")
    from dspark_compile.runtime.onnxruntime_backend import load_onnxruntime

    cases = json.loads((golden_dir / "dspark_tiny" / "decode_greedy.json").read_text())["greedy"][:2]
    runs: dict[int, Any] = {}
    for capacity in CAPACITIES:
        executor = load_onnxruntime(golden_build)
        executor.info = dataclasses.replace(executor.info, max_slots=None)  # the graphs' slots are dynamic
        transport = executor.transport
        per_call: list[tuple[str, int]] = []
        run = transport.run

        def counting(graph: str, feeds: dict[str, torch.Tensor], outputs: dict[str, torch.Tensor],
                     run: Any = run, per_call: list[tuple[str, int]] = per_call,
                     executor: GraphExecutor = executor, transport: Any = transport) -> None:
            names = transport.inputs(graph)
            for cache in CACHES:  # bound where the executor keeps it (a new-row batch at admit)
                if cache in names and feeds["cache_len"].any():
                    own = executor.kv if cache == "kv_cache" else executor.draft_kv
                    assert feeds[cache].data_ptr() == own.data_ptr()
            moved = [feeds[n] for n in names if n not in CACHES] + list(outputs.values())
            per_call.append((graph, sum(t.numel() * t.element_size() for t in moved)))
            run(graph, feeds, outputs)

        transport.run = counting
        prompts = [c["prompt"] for c in cases]
        tokens, loop, graphs = _traffic(executor, capacity, prompts, 24, lambda per_call=per_call: per_call)
        assert tokens == [c["tokens"][:24] for c in cases]
        runs[capacity] = (tokens, loop, graphs, executor.kv.numel() * executor.kv.element_size())
    _assert_flat(runs)


# ------------------------------------------------------------------------------------------- BLS


def test_fake_pb_utils_bls_transport_traffic_is_independent_of_capacity(orch: types.ModuleType,  # noqa: F811
                                                                         tmp_path: Path) -> None:
    base = _bls_executor(orch, tmp_path)
    models = base.transport.models
    current: dict[str, Any] = {}

    def model(graph: str) -> Any:
        def run(x: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
            executor = current["executor"]
            for cache in CACHES:  # passed by DLPack: the engine model sees the executor's own memory
                if cache in x:
                    assert x[cache].shape[4] == current["capacity"]
                    if x["cache_len"].any():
                        own = executor.kv if cache == "kv_cache" else executor.draft_kv
                        assert x[cache].ctypes.data == own.data_ptr()
            return stand_in_graph(graph, x)
        return run

    FAKE_MODELS.clear()
    FAKE_MODELS.update({name: model(graph) for graph, name in models.items()})
    prompts = [[1, 2, 3], [9], [4, 4, 4, 4, 4, 4]]
    runs: dict[int, Any] = {}
    for capacity in CAPACITIES:
        executor = GraphExecutor(dataclasses.replace(stand_in_info(), max_slots=None), base.transport, base.weights)
        current.update(executor=executor, capacity=capacity)
        BLS_CALLS.clear()

        def per_call() -> list[tuple[str, int]]:
            return [(call["model"], sum(a.nbytes for n, a in [*call["inputs"].items(), *call["outputs"].items()]
                                        if n not in CACHES)) for call in BLS_CALLS]

        tokens, loop, graphs = _traffic(executor, capacity, prompts, 17, per_call)
        assert tokens == [reference(p, 17) for p in prompts]
        runs[capacity] = (tokens, loop, graphs, executor.kv.numel() * executor.kv.element_size())
    _assert_flat(runs)


@pytest.fixture(autouse=True)
def _no_grad() -> Iterator[None]:
    with torch.inference_mode():
        yield
