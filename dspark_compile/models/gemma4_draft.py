"""The DSpark draft for Gemma4 targets (DeepSpec's ``Gemma4DSparkModel``): :class:`DSparkDraft` with Gemma4 layers.

Every draft layer is a non-causal global-attention Gemma4 layer: the global head dim, shared K/V when
``attention_k_eq_v`` (V = the scale-less value norm of k_proj's output), attention scale 1, the full-attention
(proportional) RoPE, sandwich norms and ``layer_scalar``. Context features, the block, the Markov and confidence
heads and the graft are :class:`DSparkDraft`'s; the shared LM head soft-caps the base logits.
"""

from __future__ import annotations

from torch import nn

from dspark_compile.model_config import DraftConfig, Gemma4Config
from dspark_compile.models.dspark import DraftLayer, DSparkDraft
from dspark_compile.models.gemma4 import Gemma4Layer, GemmaRMSNorm
from dspark_compile.models.layers import RotaryEmbedding


class Gemma4DraftLayer(Gemma4Layer):
    """A Gemma4 layer with KV injection: context rows are cached, block rows attended but never cached."""

    forward = DraftLayer.forward  # type: ignore[assignment]  # the one KV-injection forward, on Gemma4's modules
    reads_fused_qkv = False  # it projects context and block rows apart (DraftLayer.forward)


class Gemma4Draft(DSparkDraft):
    """DeepSpec's Gemma4 DSpark draft over our static context cache."""

    @staticmethod
    def make_layer(cfg: DraftConfig, index: int) -> nn.Module:
        assert isinstance(cfg.base, Gemma4Config)
        return Gemma4DraftLayer(cfg.base, index)

    @staticmethod
    def make_norm(cfg: DraftConfig) -> nn.Module:
        return GemmaRMSNorm(cfg.base.hidden_size, cfg.base.rms_norm_eps)

    def init_buffers(self) -> None:
        base = self.cfg.base
        assert isinstance(base, Gemma4Config)
        self.rotary = RotaryEmbedding(base.global_head_dim, base.rope)
