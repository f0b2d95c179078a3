"""A tiny stand-in engine and build directory for the Triton target's tests, checked against a reference.

The stand-in implements the Backend protocol with a closed-form "model": the target's greedy next token after
``tok`` at position ``pos`` is ``f(tok, pos)``; the draft proposes the same chain but corrupts some positions,
so rounds accept varying numbers of drafts. It lets the orchestrator and the server be tested without the
onnxruntime backend (``load`` is the factory the served repository names).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from dspark_compile.runtime.backend import DraftOutput, ProgramInfo, VerifyOutput
from dspark_compile.runtime.decode import GenerationParams, generate

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


class StandInBackend:
    def __init__(self, eos_token_ids: tuple[int, ...] = ()) -> None:
        self.info = ProgramInfo(vocab_size=VOCAB, block_size=BLOCK, tap_width=TAPS, has_confidence=False,
                              eos_token_ids=eos_token_ids, max_slots=MAX_SLOTS, sampling=True)
        self.batches: list[int] = []

    @classmethod
    def load(cls, build_dir: Path) -> StandInBackend:
        assert (build_dir / "onnx" / "target_prefill.onnx").is_file(), build_dir
        return cls()

    def start(self, batch: int, slots: int) -> None:
        assert slots <= MAX_SLOTS
        self.batches.append(batch)

    def prefill(self, input_ids: np.ndarray, lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        rows = np.arange(len(lengths))
        logits = np.zeros((len(lengths), VOCAB), dtype=np.float32)
        logits[rows, next_token(input_ids[rows, lengths - 1], lengths - 1)] = 100.0
        return logits, np.zeros((*input_ids.shape, TAPS), dtype=np.float32)

    def draft(self, anchor: np.ndarray, ctx_taps: np.ndarray, ctx_count: np.ndarray, cache_len: np.ndarray,
              temperature: np.ndarray | None, uniforms: np.ndarray | None) -> DraftOutput:
        pos = cache_len + ctx_count
        tokens = np.zeros((len(anchor), BLOCK), dtype=np.int64)
        prev = anchor
        for k in range(BLOCK):
            guess = next_token(prev, pos + k)
            tokens[:, k] = np.where((pos + k) % 3 == 0, (guess + 1) % VOCAB, guess)
            prev = tokens[:, k]
        probs = np.eye(VOCAB, dtype=np.float32)[tokens] if temperature is not None else None
        return DraftOutput(tokens, np.zeros((len(anchor), BLOCK), dtype=np.float32), probs)

    def verify(self, tokens: np.ndarray, cache_len: np.ndarray, verify_len: np.ndarray,
               draft_probs: np.ndarray | None, temperature: np.ndarray | None,
               uniforms: np.ndarray | None) -> VerifyOutput:
        accepted = np.zeros(len(tokens), dtype=np.int64)
        nxt = np.zeros(len(tokens), dtype=np.int64)
        for b in range(len(tokens)):
            j = 0
            while j < verify_len[b] and tokens[b, j + 1] == next_token(tokens[b, j], cache_len[b] + j):
                j += 1
            accepted[b], nxt[b] = j, next_token(tokens[b, j], cache_len[b] + j)
        return VerifyOutput(accepted, nxt, np.zeros((*tokens.shape, TAPS), dtype=np.float32))

    def select(self, rows: np.ndarray) -> None:
        pass


def _value(name: str, elem: int, dims: list[int | str]) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, elem, dims)


F, I = TensorProto.FLOAT, TensorProto.INT64
KV = [LAYERS, 2, "B", KV_HEADS, "S", HEAD_DIM]
DRAFT_KV = [DRAFT_LAYERS, 2, "B", KV_HEADS, "S", HEAD_DIM]
Tensors = list[tuple[str, int, list[int | str]]]
SIGNATURES: dict[str, tuple[Tensors, Tensors]] = {
    "target_prefill": (
        [("input_ids", I, ["B", "T"]), ("input_lengths", I, ["B"]), ("kv_cache", F, KV)],
        [("last_logits", F, ["B", VOCAB]), ("taps", F, ["B", "T", TAPS]), ("kv_cache_out", F, KV)],
    ),
    "target_verify": (
        [("tokens", I, ["B", BLOCK + 1]), ("cache_len", I, ["B"]), ("verify_len", I, ["B"]),
         ("kv_cache", F, KV), ("draft_probs", F, ["B", BLOCK, VOCAB]), ("temperature", F, ["B"]),
         ("uniforms", F, ["B", BLOCK + 1])],
        [("accepted", I, ["B"]), ("next_token", I, ["B"]), ("taps", F, ["B", BLOCK + 1, TAPS]),
         ("kv_cache_out", F, KV)],
    ),
    "draft_propose": (
        [("anchor", I, ["B"]), ("ctx_taps", F, ["B", "C", TAPS]), ("ctx_count", I, ["B"]),
         ("cache_len", I, ["B"]), ("draft_kv", F, DRAFT_KV), ("temperature", F, ["B"]),
         ("uniforms", F, ["B", BLOCK])],
        [("draft_tokens", I, ["B", BLOCK]), ("confidence_logits", F, ["B", BLOCK]),
         ("draft_probs", F, ["B", BLOCK, VOCAB]), ("draft_kv_out", F, DRAFT_KV)],
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
    # What `dspark-compile build` records and the repository writer reads: the program and the spec.
    info = StandInBackend().info
    manifest = {"spec": {"max_context": MAX_SLOTS, "verify_mode": "sampling"}, "program": info.to_json()}
    (root / "manifest.json").write_text(json.dumps(manifest))
    return root


def test_standin_reproduces_its_reference() -> None:
    prompts = [[1, 2, 3], [7], [4, 9, 11, 12, 30, 2, 5]]
    results = generate(StandInBackend(), prompts, GenerationParams(max_new_tokens=20))
    for prompt, result in zip(prompts, results, strict=True):
        assert result.tokens == reference(prompt, 20)
    accepted = {r["accepted"] for res in results for r in res.rounds}
    assert len(accepted) > 1, "the stand-in draft should give rounds of different acceptance"
