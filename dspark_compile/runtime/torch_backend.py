"""The PyTorch reference: partition's graph modules run eagerly by the one :class:`GraphExecutor`."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch

from dspark_compile.models.dspark import DSparkDraft
from dspark_compile.models.qwen3 import Qwen3Target
from dspark_compile.runtime.backend import ProgramInfo
from dspark_compile.runtime.executor import TORCH_DTYPES, GraphExecutor

DTYPES = TORCH_DTYPES


def program_info(target: Qwen3Target, draft: DSparkDraft | None, eos_token_ids: tuple[int, ...] = ()) -> ProgramInfo:
    """What the host loop and the executor need to know about a program built from PyTorch modules."""
    dtype = next(k for k, v in DTYPES.items() if v == target.embed_tokens.weight.dtype)
    tc = target.cfg
    info = ProgramInfo(
        vocab_size=tc.vocab_size,
        block_size=draft.block_size if draft is not None else 0,
        tap_width=len(target.tap_layer_ids) * tc.hidden_size,
        has_confidence=draft is not None and draft.confidence_head is not None,
        eos_token_ids=eos_token_ids, dtype=dtype, hidden_size=tc.hidden_size,
        target_layers=tc.num_hidden_layers, kv_heads=tc.num_key_value_heads, head_dim=tc.head_dim,
        tap_layer_ids=target.tap_layer_ids,
    )
    if draft is None:
        return info
    dc = draft.cfg.base
    return ProgramInfo(**{**info.__dict__, "draft_layers": dc.num_hidden_layers,
                          "draft_kv_heads": dc.num_key_value_heads, "draft_head_dim": dc.head_dim})


class TorchTransport:
    """Runs partition's modules (the graphs before export, verification included) eagerly."""

    def __init__(self, target: Qwen3Target, draft: DSparkDraft | None, block_size: int) -> None:
        from dspark_compile.passes.partition import graph_specs

        self.graphs = {g.name: g for g in graph_specs(target, draft, block_size, "sampling")}
        self.device = target.embed_tokens.weight.device

    def has_graph(self, graph: str) -> bool:
        return graph in self.graphs

    def inputs(self, graph: str) -> tuple[str, ...]:
        return tuple(self.graphs[graph].inputs)

    def outputs(self, graph: str) -> tuple[str, ...]:
        return self.graphs[graph].outputs

    @torch.inference_mode()
    def run(self, graph: str, feeds: Mapping[str, torch.Tensor], outputs: Mapping[str, torch.Tensor]) -> None:
        spec = self.graphs[graph]
        got = dict(zip(spec.outputs, spec.module(*(feeds[n] for n in spec.inputs)), strict=True))
        for name, buf in outputs.items():
            buf.copy_(got[name])


class TorchBackend(GraphExecutor):
    """The :class:`GraphExecutor` over the PyTorch reference transport (CPU, or CUDA when the modules are)."""

    def __init__(self, target: Qwen3Target, draft: DSparkDraft | None, *, block_size: int | None = None,
                 eos_token_ids: tuple[int, ...] = ()) -> None:
        g = int(block_size) if block_size is not None else (draft.block_size if draft is not None else 0)
        if draft is not None:
            draft.block_size = g
        self.target_model, self.draft_model = target, draft
        super().__init__(program_info(target, draft, eos_token_ids), TorchTransport(target, draft, g))

    @classmethod
    def from_pair(cls, target_dir: Path, draft_dir: Path | None, *, dtype: str = "fp32", device: str = "cpu",
                  block_size: int | None = None, allow_nonfinite: bool = False) -> TorchBackend:
        from dspark_compile.program import build_program

        program = build_program(target_dir, draft_dir, dtype=dtype, device=device, allow_nonfinite=allow_nonfinite)
        return cls(program.target, program.draft, block_size=block_size, eos_token_ids=program.eos_token_ids)
