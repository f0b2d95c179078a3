"""A tiny stand-in engine and build directory for the Triton target's tests, checked against a reference.

The stand-in is two graph functions with a closed-form "model", run by the graph executor: the target's
greedy next token after ``tok`` at position ``pos`` is ``f(tok, pos)``; the draft proposes the same chain but
corrupts some positions, so rounds accept varying numbers of drafts. It lets the orchestrator and the server
be tested without the onnxruntime backend (``load`` is the factory the served repository names).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

from dspark_compile.runtime.backend import ProgramInfo
from dspark_compile.runtime.decode import GenerationParams, generate
from dspark_compile.runtime.executor import GraphExecutor, NumpyTransport

VOCAB = 50
BLOCK = 4
TAPS = 8
MAX_SLOTS = 96
LAYERS, DRAFT_LAYERS, KV_HEADS, HEAD_DIM = 2, 1, 2, 4


def next_token(tok: int | np.ndarray, pos: int | np.ndarray) -> int | np.ndarray:
    return (tok * 31 + pos * 7 + 1) % VOCAB


def reference(prompt: list[int], max_new_tokens: int) -> list[int]:
    seq = list(prompt)
    for _ in range(max_new_tokens):
        seq.append(int(next_token(seq[-1], len(seq) - 1)))
    return seq[len(prompt):]


def _kv_rows(values: np.ndarray, layers: int) -> np.ndarray:
    """K/V rows [layers, 2, B, KV, T, D] that hold each position's token id: what the executor must keep."""
    b, t = values.shape
    return np.broadcast_to(values.astype(np.float32)[None, None, :, None, :, None],
                           (layers, 2, b, KV_HEADS, t, HEAD_DIM)).copy()


def stand_in_weights() -> dict[str, np.ndarray]:
    """The stand-in's weight inputs: the graphs check they were bound (row i of each holds i)."""
    rows = np.repeat(np.arange(VOCAB, dtype=np.float32)[:, None], TAPS, axis=1)
    return {"embed_tokens": rows, "lm_head": rows}


def stand_in_graph(graph: str, x: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The stand-in's two graphs under the KV contract of docs/PROGRAM.md (only new rows come back).

    Its caches hold token ids, so target_step checks that the executor wrote the rows of earlier calls where
    they belong: the first decided token must follow the token the cache holds at ``cache_len - 1``.
    """
    for name, want in stand_in_weights().items():
        assert np.array_equal(x[name], want), f"weight input {name} not bound"
    if graph == "draft_propose":
        anchor, pos = x["anchor"], x["cache_len"] + x["ctx_count"]
        tokens = np.zeros((len(anchor), BLOCK), dtype=np.int64)
        prev = anchor
        for k in range(BLOCK):
            guess = next_token(prev, pos + k)
            tokens[:, k] = np.where((pos + k) % 3 == 0, (guess + 1) % VOCAB, guess)
            prev = tokens[:, k]
        return {"draft_tokens": tokens, "confidence_logits": np.zeros((len(anchor), BLOCK), dtype=np.float32),
                "draft_probs": np.eye(VOCAB, dtype=np.float32)[tokens],
                "draft_kv_new": _kv_rows(x["ctx_taps"][..., 0], DRAFT_LAYERS)}
    tokens, cache_len, verify_len, kv = x["tokens"], x["cache_len"], x["verify_len"], x["kv_cache"]
    rows, first = np.arange(len(tokens)), x["logit_rows"][:, 0]
    drafts = x["logit_rows"].shape[1] - 1
    held = kv[0, 1, rows, 0, np.maximum(cache_len - 1, 0), 0].astype(np.int64)
    ok = (cache_len == 0) | (tokens[:, 0] == next_token(held, cache_len - 1))
    assert ok.all(), "cache rows not where they belong"
    accepted = np.zeros(len(tokens), dtype=np.int64)
    nxt = np.zeros(len(tokens), dtype=np.int64)
    for b in range(len(tokens)):
        j, r = 0, first[b]
        while j < min(verify_len[b], drafts) and tokens[b, r + j + 1] == next_token(tokens[b, r + j],
                                                                                  cache_len[b] + r + j):
            j += 1
        accepted[b], nxt[b] = j, next_token(tokens[b, r + j], cache_len[b] + r + j)
    taps = np.zeros((*tokens.shape, TAPS), dtype=np.float32)
    taps[..., 0] = tokens
    return {"accepted": accepted, "next_token": nxt, "taps": taps, "kv_new": _kv_rows(tokens, LAYERS)}


def stand_in_info(eos_token_ids: tuple[int, ...] = ()) -> ProgramInfo:
    return ProgramInfo(vocab_size=VOCAB, block_size=BLOCK, tap_width=TAPS, has_confidence=False,
                       eos_token_ids=eos_token_ids, max_slots=MAX_SLOTS, sampling=True, target_layers=LAYERS,
                       kv_heads=KV_HEADS, head_dim=HEAD_DIM, draft_layers=DRAFT_LAYERS, draft_kv_heads=KV_HEADS,
                       draft_head_dim=HEAD_DIM)


class StandInBackend(GraphExecutor):
    """The graph executor over the stand-in graphs; records each batch it starts."""

    def __init__(self, eos_token_ids: tuple[int, ...] = ()) -> None:
        io = {g: (tuple(t[0] for t in ins), tuple(t[0] for t in outs)) for g, (ins, outs) in SIGNATURES.items()}
        weights = {k: torch.from_numpy(v) for k, v in stand_in_weights().items()}
        super().__init__(stand_in_info(eos_token_ids), NumpyTransport(stand_in_graph, io), weights)
        self.batches: list[int] = []

    @classmethod
    def load(cls, build_dir: Path) -> StandInBackend:
        assert (build_dir / "onnx" / "target_step.onnx").is_file(), build_dir
        return cls()

    def start(self, rows: int, slots: int, *, speculative: bool = True) -> None:
        assert slots <= MAX_SLOTS
        self.batches.append(rows)
        super().start(rows, slots, speculative=speculative)


def _value(name: str, elem: int, dims: list[int | str]) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, elem, dims)


F, I = TensorProto.FLOAT, TensorProto.INT64
KV = [LAYERS, 2, "B", KV_HEADS, "S", HEAD_DIM]
DRAFT_KV = [DRAFT_LAYERS, 2, "B", KV_HEADS, "S", HEAD_DIM]
KV_NEW = [LAYERS, 2, "B", KV_HEADS, "T", HEAD_DIM]  # only the rows a call wrote
DRAFT_KV_NEW = [DRAFT_LAYERS, 2, "B", KV_HEADS, "C", HEAD_DIM]
Tensors = list[tuple[str, int, list[int | str]]]
WEIGHTS: Tensors = [("embed_tokens", F, [VOCAB, TAPS]), ("lm_head", F, [VOCAB, TAPS])]
SIGNATURES: dict[str, tuple[Tensors, Tensors]] = {
    "target_step": (
        [("tokens", I, ["B", "T"]), ("cache_len", I, ["B"]), ("kv_cache", F, KV), ("logit_rows", I, ["B", "W"]),
         ("verify_len", I, ["B"]), *WEIGHTS, ("draft_probs", F, ["B", "G", VOCAB]), ("temperature", F, ["B"]),
         ("uniforms", F, ["B", "W"])],
        [("accepted", I, ["B"]), ("next_token", I, ["B"]), ("taps", F, ["B", "T", TAPS]), ("kv_new", F, KV_NEW)],
    ),
    "draft_propose": (
        [("anchor", I, ["B"]), ("ctx_taps", F, ["B", "C", TAPS]), ("ctx_count", I, ["B"]),
         ("cache_len", I, ["B"]), ("draft_kv", F, DRAFT_KV), *WEIGHTS, ("temperature", F, ["B"]),
         ("uniforms", F, ["B", BLOCK])],
        [("draft_tokens", I, ["B", BLOCK]), ("confidence_logits", F, ["B", BLOCK]),
         ("draft_probs", F, ["B", BLOCK, VOCAB]), ("draft_kv_new", F, DRAFT_KV_NEW)],
    ),
}


def write_fake_build(root: Path, *, engines: bool = False, draft: bool = True) -> Path:
    """BUILD/onnx with graphs that have the documented I/O signatures (not meant to run) and external data."""
    onnx_dir = root / "onnx"
    onnx_dir.mkdir(parents=True)
    for graph, (inputs, outputs) in SIGNATURES.items():
        if graph == "draft_propose" and not draft:
            continue
        weight = numpy_helper.from_array(np.arange(256, dtype=np.float32).reshape(16, 16), "w")
        nodes = [helper.make_node("Identity", ["w"], ["w_copy"])]
        model = helper.make_model(helper.make_graph(
            nodes, graph, [_value(*i) for i in inputs], [_value(*o) for o in outputs], [weight]))
        onnx.save(model, onnx_dir / f"{graph}.onnx", save_as_external_data=True, all_tensors_to_one_file=True,
                  location=f"{graph}.onnx.data", size_threshold=0)
        if engines:
            (root / "engines").mkdir(exist_ok=True)
            (root / "engines" / f"{graph}.plan").write_bytes(b"not a real engine")
    # What `dspark-compile build` records and the repository writer reads: the program, the spec and where the
    # weight inputs are stored (one region for both: the stand-in's embedding and LM head are equal, as tied).
    info = StandInBackend().info
    weight = stand_in_weights()["embed_tokens"]
    (onnx_dir / "weights.bin").write_bytes(weight.tobytes())
    record = {"file": "onnx/weights.bin", "offset": 0, "bytes": weight.nbytes, "dtype": "float32",
              "shape": list(weight.shape)}
    manifest = {"spec": {"max_context": MAX_SLOTS, "verify_mode": "sampling"}, "program": info.to_json(),
                "weight_inputs": {"embed_tokens": record, "lm_head": record}}
    (root / "manifest.json").write_text(json.dumps(manifest))
    return root


def test_standin_reproduces_its_reference() -> None:
    prompts = [[1, 2, 3], [7], [4, 9, 11, 12, 30, 2, 5]]
    results = generate(StandInBackend(), prompts, GenerationParams(max_new_tokens=20))
    for prompt, result in zip(prompts, results, strict=True):
        assert result.tokens == reference(prompt, 20)
    accepted = {r["accepted"] for res in results for r in res.rounds}
    assert len(accepted) > 1, "the stand-in draft should give rounds of different acceptance"
