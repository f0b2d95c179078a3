"""The TensorRT transport's binding logic against fake engines (the transport itself is unverified on a GPU).

Fake execution contexts run the stand-in graphs on the memory behind the bound addresses, so a decode through
the executor checks that every tensor is bound where it lives and that the caches are bound once per batch.
"""

from __future__ import annotations

import ctypes
import types
from collections import Counter
from typing import Any

import numpy as np
import torch
from onnx import TensorProto
from test_triton_standin import BLOCK, SIGNATURES, reference, stand_in_graph, stand_in_info, stand_in_weights

from dspark_compile.runtime.decode import GenerationParams, generate
from dspark_compile.runtime.executor import GraphExecutor
from dspark_compile.targets.tensorrt.transport import TensorRTTransport

NP = {TensorProto.FLOAT: np.float32, TensorProto.INT64: np.int64}
FAKE_TRT = types.SimpleNamespace(TensorIOMode=types.SimpleNamespace(INPUT="in", OUTPUT="out"))


class FakeContext:
    def __init__(self, graph: str) -> None:
        self.graph = graph
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.addresses: dict[str, int] = {}
        self.set_calls: Counter[str] = Counter()
        self.profiles: list[int] = []

    def set_optimization_profile_async(self, index: int, stream: int) -> None:
        self.profiles.append(index)

    def set_input_shape(self, name: str, shape: tuple[int, ...]) -> None:
        self.shapes[name] = shape

    def set_tensor_address(self, name: str, address: int) -> None:
        self.addresses[name] = address
        self.set_calls[name] += 1

    def execute_async_v3(self, stream: int) -> bool:
        inputs, _ = SIGNATURES[self.graph]
        arrays = {}
        for name, elem, _ in inputs:
            dtype = np.dtype(NP[elem])
            count = int(np.prod(self.shapes[name]))
            buf = (ctypes.c_byte * (count * dtype.itemsize)).from_address(self.addresses[name])
            arrays[name] = np.frombuffer(buf, dtype=dtype, count=count).reshape(self.shapes[name])
        for name, value in stand_in_graph(self.graph, arrays).items():
            value = np.ascontiguousarray(value)
            ctypes.memmove(self.addresses[name], value.ctypes.data, value.nbytes)
        return True


class FakeEngine:
    def __init__(self, graph: str) -> None:
        self.graph = graph
        inputs, outputs = SIGNATURES[graph]
        self.names = [t[0] for t in inputs] + [t[0] for t in outputs]
        self.inputs = {t[0] for t in inputs}
        self.num_io_tensors = len(self.names)
        self.num_optimization_profiles = 2
        self.contexts: list[FakeContext] = []

    def get_tensor_name(self, i: int) -> str:
        return self.names[i]

    def get_tensor_mode(self, name: str) -> str:
        return "in" if name in self.inputs else "out"

    def get_tensor_shape(self, name: str) -> tuple[int, ...]:
        dims = next(d for n, _, d in SIGNATURES[self.graph][0] if n == name)
        return tuple(d if isinstance(d, int) else -1 for d in dims)

    def get_tensor_profile_shape(self, name: str, index: int) -> list[tuple[int, ...]]:
        """Two KV buckets (cache slots 16..48, 49..96); every other dynamic dimension 0..1000."""
        dims = next(d for n, _, d in SIGNATURES[self.graph][0] if n == name)
        slots = [(16, 32, 48), (49, 70, 96)][index]
        return [tuple(d if isinstance(d, int) else s if d == "S" else (0, 8, 1000)[which] for d in dims)
                for which, s in enumerate(slots)]

    def create_execution_context(self) -> FakeContext:
        self.contexts.append(FakeContext(self.graph))
        return self.contexts[-1]


def test_decode_binds_every_tensor_by_address_and_the_caches_once_per_batch() -> None:
    engines = {g: FakeEngine(g) for g in SIGNATURES}
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
