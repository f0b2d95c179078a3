"""The PyTorch reference executor of the three graphs (CPU, or CUDA when the tensors live there)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from dspark_compile.models.dspark import DSparkDraft
from dspark_compile.models.qwen3 import Qwen3Target
from dspark_compile.plugins.spec_verify.reference import spec_verify_torch
from dspark_compile.runtime.backend import DraftOutput, ProgramInfo, VerifyOutput

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def program_info(target: Qwen3Target, draft: DSparkDraft | None, eos_token_ids: tuple[int, ...] = ()) -> ProgramInfo:
    """What the host loop needs to know about a program built from PyTorch modules."""
    return ProgramInfo(
        vocab_size=target.cfg.vocab_size,
        block_size=draft.block_size if draft is not None else 0,
        tap_width=len(target.tap_layer_ids) * target.cfg.hidden_size,
        has_confidence=draft is not None and draft.confidence_head is not None,
        eos_token_ids=eos_token_ids,
    )


class TorchBackend:
    """Holds the grafted program (target + draft sharing embedding and LM head) and its caches."""

    def __init__(self, target: Qwen3Target, draft: DSparkDraft | None, *, block_size: int | None = None,
                 eos_token_ids: tuple[int, ...] = ()) -> None:
        self.target_model = target
        self.draft_model = draft
        self.device = target.embed_tokens.weight.device
        if draft is not None and block_size is not None:
            draft.block_size = int(block_size)
        self.info = program_info(target, draft, eos_token_ids)
        self._kv: torch.Tensor | None = None
        self._draft_kv: torch.Tensor | None = None

    @classmethod
    def from_pair(cls, target_dir: Path, draft_dir: Path | None, *, dtype: str = "fp32", device: str = "cpu",
                  block_size: int | None = None, allow_nonfinite: bool = False) -> TorchBackend:
        from dspark_compile.program import build_program

        program = build_program(target_dir, draft_dir, dtype=dtype, device=device, allow_nonfinite=allow_nonfinite)
        return cls(program.target, program.draft, block_size=block_size, eos_token_ids=program.eos_token_ids)

    def _t(self, a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(a)).to(self.device)

    def start(self, batch: int, slots: int) -> None:
        self._kv = self.target_model.new_cache(batch, slots)
        self._draft_kv = self.draft_model.new_cache(batch, slots) if self.draft_model is not None else None

    @torch.inference_mode()
    def prefill(self, input_ids: np.ndarray, lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        ids = self._t(input_ids)
        zero = torch.zeros(ids.shape[0], dtype=torch.int64, device=self.device)
        hidden, taps, self._kv = self.target_model(ids, zero, self._kv)
        last = hidden[torch.arange(ids.shape[0], device=self.device), self._t(lengths) - 1]
        return self.target_model.logits(last).cpu().numpy(), _host(taps)

    @torch.inference_mode()
    def draft(self, anchor: np.ndarray, ctx_taps: np.ndarray, ctx_count: np.ndarray, cache_len: np.ndarray,
              temperature: np.ndarray | None, uniforms: np.ndarray | None) -> DraftOutput:
        assert self.draft_model is not None
        temp = self._t(temperature) if temperature is not None else None
        uni = self._t(uniforms) if uniforms is not None else None
        tokens, conf, probs, self._draft_kv = self.draft_model(
            self._t(anchor), self._t(ctx_taps), self._t(ctx_count), self._t(cache_len), self._draft_kv, temp, uni
        )
        return DraftOutput(tokens.cpu().numpy(), conf.cpu().numpy(),
                           probs.cpu().numpy() if temp is not None else None)

    @torch.inference_mode()
    def verify(self, tokens: np.ndarray, cache_len: np.ndarray, verify_len: np.ndarray,
               draft_probs: np.ndarray | None, temperature: np.ndarray | None,
               uniforms: np.ndarray | None) -> VerifyOutput:
        hidden, taps, self._kv = self.target_model(self._t(tokens), self._t(cache_len), self._kv)
        logits = self.target_model.logits(hidden)
        t = self._t(tokens)
        if temperature is None:
            accepted, nxt = spec_verify_torch(logits, t[:, 1:], self._t(verify_len), mode="greedy")
        else:
            if draft_probs is None:  # target-only sampling: no drafts to test
                draft_probs = np.zeros((tokens.shape[0], 0, logits.shape[-1]), dtype=np.float32)
            accepted, nxt = spec_verify_torch(logits, t[:, 1:], self._t(verify_len), mode="sampling",
                                              draft_probs=self._t(draft_probs), temperature=self._t(temperature),
                                              uniforms=self._t(uniforms))
        return VerifyOutput(accepted.cpu().numpy(), nxt.cpu().numpy(), _host(taps))

    def select(self, rows: np.ndarray) -> None:
        idx = self._t(rows)
        self._kv = self._kv.index_select(2, idx)
        if self._draft_kv is not None:
            self._draft_kv = self._draft_kv.index_select(2, idx)


def _host(t: torch.Tensor) -> np.ndarray:
    """To NumPy; bf16 (which NumPy lacks) travels as float32 and is cast back when fed to the draft."""
    return (t.float() if t.dtype == torch.bfloat16 else t).cpu().numpy()
