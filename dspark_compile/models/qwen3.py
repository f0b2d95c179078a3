"""Our Qwen3 target with an explicit static KV cache and hidden-state taps (DSPARK.md §2, "context features").

``transformers`` is only a test oracle; nothing here imports it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from dspark_compile.model_config import TargetConfig
from dspark_compile.models.layers import (
    FUNCTIONAL,
    REFERENCE,
    AttentionProjections,
    CacheWrite,
    CausalTarget,
    GatedMLP,
    ReferenceAttention,
    RMSNorm,
    RotaryEmbedding,
    load_hf_target,
)


class Qwen3Layer(nn.Module):
    """One Qwen3 decoder layer. Where new keys/values go (``cache``) and how queries attend (``attention``) are
    strategies (models/layers.py), so the exported graphs, the CUDA-graph target and the draft share it."""

    def __init__(self, cfg: TargetConfig) -> None:
        super().__init__()
        self.self_attn = AttentionProjections(cfg)
        self.mlp = GatedMLP(cfg.hidden_size, cfg.intermediate_size)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, kv: torch.Tensor, cache_len: torch.Tensor,
                mask: torch.Tensor, *, positions: torch.Tensor | None = None, cache: CacheWrite = FUNCTIONAL,
                attention: ReferenceAttention = REFERENCE) -> tuple[torch.Tensor, torch.Tensor | None]:
        """kv [2, B, KV, S, D]; new rows at slots cache_len[b] + t (``positions``). Returns the layer output and
        the cache strategy's output (the updated kv, the new rows, or None when written in place)."""
        attn = self.self_attn
        h = self.input_layernorm(x)
        q = attn.query(h, cos, sin)
        k, v, out = cache.write(kv, *attn.key_value(h, cos, sin), cache_len, positions)
        return self.finish(x, attention(q, k, v, mask, attn.scale)), out

    def finish(self, x: torch.Tensor, attended: torch.Tensor) -> torch.Tensor:
        """Output projection, residual, post-attention norm, MLP, residual."""
        x = x + self.self_attn.o_proj(attended)
        return x + self.mlp(self.post_attention_layernorm(x))


class Qwen3Target(CausalTarget):
    """Qwen3ForCausalLM forward over a static cache: slot = absolute position (docs/PROGRAM.md)."""

    fused_kernels = True  # targets/torch/static_forward.py's fused q|k|v, gate|up and Triton kernels apply

    def __init__(self, cfg: TargetConfig, tap_layer_ids: Sequence[int] = ()) -> None:
        super().__init__()
        self.cfg = cfg
        self.tap_layer_ids = tuple(int(i) for i in tap_layer_ids)
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Qwen3Layer(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.init_buffers()

    def init_buffers(self) -> None:
        """The RoPE table (non-persistent: rebuilt after loading on the meta device)."""
        self.rotary = RotaryEmbedding(self.cfg.head_dim, self.cfg.rope)

    def forward(
        self, input_ids: torch.Tensor, cache_len: torch.Tensor, kv_cache: torch.Tensor, *,
        cache: CacheWrite = FUNCTIONAL, attention: ReferenceAttention = REFERENCE,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """input_ids [B, T] at positions cache_len[b] + t; kv_cache [L, 2, B, KV, S, D].

        Returns (hidden after the final norm [B, T, H], taps [B, T, NT*H], the cache output: kv_cache_out for
        the functional cache, the new rows [L, 2, B, KV, T, D] for ``RowsCache``, None in place).
        Tap id -1 is the embedding output, id i the output of decoder layer i (HF hidden_states[i + 1]).
        """
        bsz, t = input_ids.shape
        s = kv_cache.shape[-2]
        positions = cache_len.view(bsz, 1) + torch.arange(t, device=input_ids.device).view(1, t)
        x = self.embed_tokens(input_ids)
        cos, sin = self.rotary(positions, x.dtype)
        group = self.cfg.num_attention_heads // self.cfg.num_key_value_heads
        if cache.in_place:  # causal: query (b, t) sees slots <= its position, within the window
            mask = attention.prepare(positions + 1, cache.window, group, x.dtype)
        else:  # causal over the committed prefix and this chunk
            slots = torch.arange(s, device=input_ids.device).view(1, 1, 1, s)
            mask = attention.prepare(slots <= positions.view(bsz, 1, t, 1), None, group, x.dtype)
        taps: dict[int, torch.Tensor] = {-1: x}
        outs = []
        for i, layer in enumerate(self.layers):
            x, out = layer(x, cos, sin, kv_cache[i], cache_len, mask, positions=positions, cache=cache,
                           attention=attention)
            outs.append(out)
            taps[i] = x
        return self.outputs(x, taps, outs, cache.in_place)

    @classmethod
    def from_weights(cls, cfg: TargetConfig, get: Callable[[str], torch.Tensor], *, tap_layer_ids: Sequence[int] = (),
                     dtype: torch.dtype = torch.float32) -> Qwen3Target:
        """Build from Hugging Face tensor names (``get(name)`` returns one tensor)."""
        return load_hf_target(cls, cfg, get, tap_layer_ids, dtype)
