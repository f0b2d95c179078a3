"""The TensorRT transport's binding logic against fake engines (the transport itself is unverified on a GPU).

The fakes stand in for a GPU and a full TensorRT, which cannot exist here. Fake execution contexts run the
stand-in graphs on the memory behind the bound addresses, so a decode through the executor checks that every
tensor is bound where it lives and that the caches are bound once per batch; a target_step split into three
segment engines (issue 14) checks the chain: launch order, intermediates handed from producer to consumer by
address, no allocation in steady state, and the final outputs written into the caller's buffers.
"""

from __future__ import annotations

import ctypes
import types
from collections import Counter
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch
from onnx import TensorProto
from test_triton_standin import (
    BLOCK,
    HEAD_DIM,
    KV_HEADS,
    LAYERS,
    SIGNATURES,
    TAPS,
    VOCAB,
    F,
    _kv_rows,
    reference,
    stand_in_graph,
    stand_in_info,
    stand_in_weights,
)

from dspark_compile.errors import UsageError
from dspark_compile.runtime.decode import GenerationParams, generate
from dspark_compile.runtime.executor import GraphExecutor
from dspark_compile.targets.tensorrt.transport import TensorRTTransport, plan_chains

NP = {TensorProto.FLOAT: np.float32, TensorProto.INT64: np.int64}
FAKE_TRT = types.SimpleNamespace(TensorIOMode=types.SimpleNamespace(INPUT="in", OUTPUT="out"),
                                 DataType=types.SimpleNamespace(FLOAT=TensorProto.FLOAT, INT64=TensorProto.INT64))
Tensors = list[tuple[str, int, list[int | str]]]
GraphFn = Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]


class FakeContext:
    """Runs its engine's function on the memory behind the bound addresses; records what was set, in order."""

    def __init__(self, engine: FakeEngine, log: list[str]) -> None:
        self.engine = engine
        self.log = log
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.addresses: dict[str, int] = {}
        self.set_calls: Counter[str] = Counter()
        self.profiles: list[int] = []
        self.strategy: str | None = None
        self.device_memory: tuple[int, int] | None = None

    def set_device_memory(self, address: int, size: int) -> None:
        self.device_memory = (address, size)

    def set_optimization_profile_async(self, index: int, stream: int) -> None:
        self.profiles.append(index)

    def set_input_shape(self, name: str, shape: tuple[int, ...]) -> None:
        self.shapes[name] = shape
        self.log.append(f"{self.engine.name}:shape:{name}")

    def get_tensor_shape(self, name: str) -> tuple[int, ...]:
        """An output's shape from the symbols the input shapes bind (what TensorRT infers); -1 when unbound."""
        symbols: dict[str, int] = {}
        for n, _, dims in self.engine.inputs:
            for d, v in zip(dims, self.shapes.get(n, ()), strict=False):
                if isinstance(d, str):
                    symbols[d] = v
        dims = next(d for n, _, d in self.engine.inputs + self.engine.outputs if n == name)
        return tuple(d if isinstance(d, int) else symbols.get(d, -1) for d in dims)

    def set_tensor_address(self, name: str, address: int) -> None:
        self.addresses[name] = address
        self.set_calls[name] += 1
        self.log.append(f"{self.engine.name}:address:{name}")

    def _array(self, name: str, elem: int, shape: tuple[int, ...]) -> np.ndarray:
        dtype = np.dtype(NP[elem])
        count = int(np.prod(shape))
        buf = (ctypes.c_byte * (count * dtype.itemsize)).from_address(self.addresses[name])
        return np.frombuffer(buf, dtype=dtype, count=count).reshape(shape)

    def execute_async_v3(self, stream: int) -> bool:
        self.log.append(f"{self.engine.name}:execute")
        arrays = {name: self._array(name, elem, self.shapes[name]) for name, elem, _ in self.engine.inputs}
        for name, value in self.engine.fn(arrays).items():
            elem = next(e for n, e, _ in self.engine.outputs if n == name)
            assert value.shape == self.get_tensor_shape(name), (name, value.shape)
            self._array(name, elem, value.shape)[...] = value  # through the bound address, as a GPU would
        return True


class FakeEngine:
    """An engine of the given I/O signature whose context runs ``fn``; two profiles, as two KV buckets."""

    def __init__(self, name: str, inputs: Tensors, outputs: Tensors, fn: GraphFn,
                 log: list[str] | None = None) -> None:
        self.name = name
        self.inputs, self.outputs, self.fn = inputs, outputs, fn
        self.names = [t[0] for t in inputs] + [t[0] for t in outputs]
        self.num_io_tensors = len(self.names)
        self.num_optimization_profiles = 2
        self.contexts: list[FakeContext] = []
        self.log = log if log is not None else []

    @classmethod
    def of_graph(cls, graph: str) -> FakeEngine:
        inputs, outputs = SIGNATURES[graph]
        return cls(graph, inputs, outputs, lambda x: stand_in_graph(graph, x))

    def _dims(self, name: str) -> list[int | str]:
        return next(d for n, _, d in self.inputs + self.outputs if n == name)

    def get_tensor_name(self, i: int) -> str:
        return self.names[i]

    def get_tensor_mode(self, name: str) -> str:
        return "in" if any(n == name for n, _, _ in self.inputs) else "out"

    def get_tensor_dtype(self, name: str) -> int:
        return next(e for n, e, _ in self.inputs + self.outputs if n == name)

    def get_tensor_shape(self, name: str) -> tuple[int, ...]:
        return tuple(d if isinstance(d, int) else -1 for d in self._dims(name))

    def get_tensor_profile_shape(self, name: str, index: int) -> list[tuple[int, ...]]:
        """Two KV buckets (cache slots 16..48, 49..96); every other dynamic dimension 0..1000."""
        slots = [(16, 32, 48), (49, 70, 96)][index]
        return [tuple(d if isinstance(d, int) else s if d == "S" else (0, 8, 1000)[which] for d in self._dims(name))
                for which, s in enumerate(slots)]

    def create_execution_context(self, strategy: str | None = None) -> FakeContext:
        self.contexts.append(FakeContext(self, self.log))
        self.contexts[-1].strategy = strategy
        return self.contexts[-1]


def test_decode_binds_every_tensor_by_address_and_the_caches_once_per_batch() -> None:
    engines = {g: FakeEngine.of_graph(g) for g in SIGNATURES}
    transport = TensorRTTransport(engines, FAKE_TRT, device=torch.device("cpu"), stream=0)
    weights = {k: torch.from_numpy(v) for k, v in stand_in_weights().items()}
    executor = GraphExecutor(stand_in_info(), transport, weights)
    prompts = [[1, 2, 3], [9], [4, 4, 4, 4, 4, 4]]
    lengths = [5, 17, 11]
    results = generate(executor, prompts, GenerationParams(max_new_tokens=max(lengths)))
    for prompt, result in zip(prompts, results, strict=True):
        assert result.tokens == reference(prompt, max(lengths))
    verify: Any = engines["target_step"].contexts[0]
    rounds = len(results[1].rounds)
    assert rounds > 3 and all(r["accepted"] <= BLOCK + 1 for r in results[1].rounds)
    # 17 tokens fit 17 + 17 + 4 + 2 = 40 slots: the first profile; the cache is rebound only when the batch
    # changes (start, and the one select() when all requests but the longest have finished)
    assert verify.profiles == [0]
    assert verify.set_calls["kv_cache"] <= 3 < rounds
    assert verify.set_calls["embed_tokens"] == 1  # the weight inputs: bound once, for the engine's lifetime
    assert engines["draft_propose"].contexts[0].set_calls["draft_kv"] <= 4


# target_step as a chain of three segment engines split by decoder layer (the issue-14 segmentation contract):
# segment 0 embeds and writes layer 0's K/V rows, segment 1 layer 1's, segment 2 gathers both into `kv_new` and
# decides. Intermediates: the hidden states and each earlier layer's rows.
LAYER_KV_NEW = [1, 2, "B", KV_HEADS, "T", HEAD_DIM]
HIDDEN = [("hidden0", F, ["B", "T", TAPS]), ("hidden1", F, ["B", "T", TAPS])]
TARGET_INPUTS, TARGET_OUTPUTS = SIGNATURES["target_step"]


def _seg0(x: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {"hidden0": x["embed_tokens"][x["tokens"]], "kv_rows0": _kv_rows(x["tokens"], 1)}


def _seg1(x: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {"hidden1": x["hidden0"].copy(), "kv_rows1": _kv_rows(x["hidden0"][..., 0], 1)}


def _seg2(x: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    tokens = x["hidden1"][..., 0].astype(np.int64)  # the stand-in's embedding row i holds i
    whole = stand_in_graph("target_step", {**x, "tokens": tokens})
    kv_new = np.concatenate((x["kv_rows0"], x["kv_rows1"]))
    assert np.array_equal(kv_new, whole["kv_new"]), "earlier layers' rows not handed on"
    return {**whole, "kv_new": kv_new}


def segment_engines(log: list[str]) -> list[FakeEngine]:
    by_name = {t[0]: t for t in TARGET_INPUTS + HIDDEN}
    rows = [("kv_rows0", F, LAYER_KV_NEW), ("kv_rows1", F, LAYER_KV_NEW)]
    return [
        FakeEngine("seg0", [by_name["tokens"], by_name["embed_tokens"]], [HIDDEN[0], rows[0]], _seg0, log),
        FakeEngine("seg1", [HIDDEN[0], by_name["kv_cache"], by_name["cache_len"]], [HIDDEN[1], rows[1]], _seg1,
                   log),
        FakeEngine("seg2", [HIDDEN[1], *rows, *(t for t in TARGET_INPUTS if t[0] != "tokens")], TARGET_OUTPUTS,
                   _seg2, log),
    ]


def test_a_segmented_target_decodes_through_the_executor() -> None:
    log: list[str] = []
    segments = segment_engines(log)
    engines: dict[str, Any] = {"target_step": segments, "draft_propose": FakeEngine.of_graph("draft_propose")}
    transport = TensorRTTransport(engines, FAKE_TRT, device=torch.device("cpu"), stream=0)
    # The chain's external I/O is the whole graph's: intermediates are neither fed nor returned.
    assert set(transport.inputs("target_step")) == {t[0] for t in TARGET_INPUTS}
    assert transport.outputs("target_step") == tuple(t[0] for t in TARGET_OUTPUTS)
    weights = {k: torch.from_numpy(v) for k, v in stand_in_weights().items()}
    executor = GraphExecutor(stand_in_info(), transport, weights)
    prompts = [[1, 2, 3], [9], [4, 4, 4, 4, 4, 4]]
    results = generate(executor, prompts, GenerationParams(max_new_tokens=17))
    for prompt, result in zip(prompts, results, strict=True):
        assert result.tokens == reference(prompt, 17)
    assert [e for e in log if e.endswith("execute")][:3] == ["seg0:execute", "seg1:execute", "seg2:execute"]
    for seg in segments:  # each segment chose its own profile once; the cache was bound once per batch
        assert seg.contexts[0].profiles == [0]
    assert segments[1].contexts[0].set_calls["kv_cache"] <= 3 < len(results[1].rounds)


def _verify_feeds(rows: int, width: int, slots: int) -> dict[str, torch.Tensor]:
    """A verification call's inputs at cache_len 0 (the stand-in then checks no cache row)."""
    rng = np.random.default_rng(0)
    feeds = {"tokens": rng.integers(0, VOCAB, (rows, width)), "cache_len": np.zeros(rows, np.int64),
             "kv_cache": np.zeros((LAYERS, 2, rows, KV_HEADS, slots, HEAD_DIM), np.float32),
             "logit_rows": np.tile(np.arange(width), (rows, 1)), "verify_len": np.full(rows, width - 1),
             "draft_probs": np.full((rows, width - 1, VOCAB), 1 / VOCAB, np.float32),
             "temperature": np.zeros(rows, np.float32), "uniforms": np.zeros((rows, width), np.float32),
             **stand_in_weights()}
    return {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in feeds.items()}


def test_a_chain_binds_intermediates_once_and_writes_the_callers_buffers(monkeypatch: pytest.MonkeyPatch) -> None:
    log: list[str] = []
    segments = segment_engines(log)
    transport = TensorRTTransport({"target_step": segments}, FAKE_TRT, device=torch.device("cpu"), stream=0)
    feeds = _verify_feeds(2, BLOCK + 1, 32)
    expected = stand_in_graph("target_step", {k: v.numpy() for k, v in feeds.items()})
    outputs = {name: torch.full(expected[name].shape, -1, dtype=torch.from_numpy(expected[name]).dtype)
               for name in transport.outputs("target_step")}
    transport.run("target_step", feeds, outputs)

    # Binding order: per segment, in chain order, every input's shape and address, then every output's address
    # (TensorRT infers the intermediates' shapes from the input shapes), then the launch.
    want = []
    for seg in segments:
        for name, _, _ in seg.inputs:
            want += [f"{seg.name}:shape:{name}", f"{seg.name}:address:{name}"]
        want += [f"{seg.name}:address:{name}" for name, _, _ in seg.outputs] + [f"{seg.name}:execute"]
    assert log == want
    ctx = [seg.contexts[0] for seg in segments]
    # Intermediates: the consumer reads the very buffer its producer wrote, by address.
    assert ctx[0].addresses["hidden0"] == ctx[1].addresses["hidden0"]
    assert ctx[1].addresses["hidden1"] == ctx[2].addresses["hidden1"]
    assert ctx[0].addresses["kv_rows0"] == ctx[2].addresses["kv_rows0"]
    assert ctx[0].addresses["embed_tokens"] == ctx[2].addresses["embed_tokens"] == feeds["embed_tokens"].data_ptr()
    # Final outputs: written straight into the caller's buffers.
    for name, buf in outputs.items():
        assert ctx[2].addresses[name] == buf.data_ptr()
        assert np.array_equal(buf.numpy(), expected[name]), name

    # The same call again: no allocation, no address re-set, only the shapes and the launches.
    allocations: list[tuple[Any, ...]] = []
    empty = torch.empty
    monkeypatch.setattr(torch, "empty", lambda *a, **k: allocations.append(a) or empty(*a, **k))
    for buf in outputs.values():
        buf.fill_(-1)
    log.clear()
    transport.run("target_step", feeds, outputs)
    assert allocations == []
    assert not [e for e in log if ":address:" in e]
    assert [e for e in log if e.endswith("execute")] == ["seg0:execute", "seg1:execute", "seg2:execute"]
    for name, buf in outputs.items():
        assert np.array_equal(buf.numpy(), expected[name]), name
    monkeypatch.undo()

    # A new batch size: the intermediates are re-allocated at the new shapes and re-bound.
    feeds = _verify_feeds(3, BLOCK + 1, 32)
    expected = stand_in_graph("target_step", {k: v.numpy() for k, v in feeds.items()})
    outputs = {name: torch.empty(expected[name].shape, dtype=torch.from_numpy(expected[name]).dtype)
               for name in transport.outputs("target_step")}
    transport.run("target_step", feeds, outputs)
    assert ctx[0].shapes["tokens"] == (3, BLOCK + 1) and ctx[1].shapes["hidden0"] == (3, BLOCK + 1, TAPS)
    assert ctx[1].addresses["hidden0"] == ctx[0].addresses["hidden0"]
    for name, buf in outputs.items():
        assert np.array_equal(buf.numpy(), expected[name]), name


def test_manifest_plan_records_give_each_graph_its_chain() -> None:
    seg = {"graph": "target_step", "segments": 3}
    manifest = {"engines": {"plans": [
        {"graph": "draft_propose", "plan": "draft_propose.plan"},
        *({**seg, "segment": k, "plan": f"target_step.seg{k}.plan"} for k in (2, 0, 1))]}}
    assert plan_chains(manifest) == {"draft_propose": ["draft_propose.plan"],
                                     "target_step": [f"target_step.seg{k}.plan" for k in range(3)]}
    manifest["engines"]["plans"].pop()
    with pytest.raises(UsageError, match=r"segment plans \[0, 2\] of 3"):
        plan_chains(manifest)


def test_a_graph_output_read_by_a_later_segment_is_still_returned() -> None:
    """``graph_outputs``: a whole-graph output a later segment also reads stays an output; the caller's buffer
    is bound, and the later segment reads that buffer."""
    y = ("y", F, ["B"])
    engines = [FakeEngine("a", [("x", F, ["B"])], [y], lambda v: {"y": v["x"] + 1}),
               FakeEngine("b", [y], [("z", F, ["B"])], lambda v: {"z": v["y"] * 2})]
    assert TensorRTTransport({"g": engines}, FAKE_TRT, device=torch.device("cpu"), stream=0).outputs("g") == ("z",)
    engines = [FakeEngine(e.name, e.inputs, e.outputs, e.fn) for e in engines]
    transport = TensorRTTransport({"g": engines}, FAKE_TRT, device=torch.device("cpu"), stream=0,
                                  graph_outputs={"g": ("y", "z")})
    assert transport.inputs("g") == ("x",) and transport.outputs("g") == ("y", "z")
    outputs = {"y": torch.zeros(3), "z": torch.zeros(3)}
    transport.run("g", {"x": torch.arange(3.0)}, outputs)
    assert engines[1].contexts[0].addresses["y"] == outputs["y"].data_ptr()
    assert outputs["y"].tolist() == [1, 2, 3] and outputs["z"].tolist() == [2, 4, 6]


def test_every_context_shares_one_scratch_of_the_largest_engine() -> None:
    """The engines run one after another on one stream, so one activation scratch of the largest engine's size
    serves them all (user-managed contexts); without the strategy API TensorRT allocates per context."""
    trt = types.SimpleNamespace(**vars(FAKE_TRT), ExecutionContextAllocationStrategy=types.SimpleNamespace(
        USER_MANAGED="user"))
    segments = segment_engines([])
    draft = FakeEngine.of_graph("draft_propose")
    for engine, size in zip([*segments, draft], [300, 700, 500, 200], strict=True):
        engine.device_memory_size_v2 = size
    transport = TensorRTTransport({"target_step": segments, "draft_propose": draft}, trt,
                                  device=torch.device("cpu"), stream=0)
    assert transport.scratch is not None and transport.scratch.numel() == 700
    contexts = [e.contexts[0] for e in [*segments, draft]]
    assert {c.strategy for c in contexts} == {"user"}
    assert {c.device_memory for c in contexts} == {(transport.scratch.data_ptr(), 700)}
    plain = TensorRTTransport({"target_step": segment_engines([])}, FAKE_TRT, device=torch.device("cpu"), stream=0)
    assert plain.scratch is None and plain.chains["target_step"][0].context.device_memory is None
