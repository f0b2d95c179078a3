"""The PyTorch reference: partition's graph modules run eagerly by the one :class:`GraphExecutor`."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from dspark_compile.models.dspark import DSparkDraft
from dspark_compile.models.qwen3 import Qwen3Target
from dspark_compile.program import program_info
from dspark_compile.runtime.executor import GraphExecutor


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
        from dspark_compile.passes.partition import shared_weights

        super().__init__(program_info(target, draft, eos_token_ids), TorchTransport(target, draft, g),
                         shared_weights(target))

    @classmethod
    def from_pair(cls, target_dir: Path, draft_dir: Path | None, *, dtype: str = "fp32", device: str = "cpu",
                  block_size: int | None = None, allow_nonfinite: bool = False) -> TorchBackend:
        from dspark_compile.program import build_program

        program = build_program(target_dir, draft_dir, dtype=dtype, device=device, allow_nonfinite=allow_nonfinite)
        return cls.from_program(program, block_size=block_size)

    @classmethod
    def from_program(cls, program: Any, *, block_size: int | None = None) -> TorchBackend:
        """Over a :class:`~dspark_compile.program.DecodeProgram`'s modules."""
        return cls(program.target, program.draft, block_size=block_size, eos_token_ids=program.eos_token_ids)
