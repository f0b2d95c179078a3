"""The DSpark draft head (DSPARK.md §2), grafted onto a target: it shares the target's embedding and LM head.

One forward drafts a whole block: the parallel backbone reads the context features (KV injection) and the
block [anchor, mask, ..., mask] (G positions); then x_1..x_G are drawn left to right (argmax, or an
inverse-CDF sample when the row has a temperature), each biased by the Markov head when the draft has one (the
loop is unrolled, so an exported graph contains it), and the confidence head, if any, scores each position.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from dspark_compile.model_config import DraftConfig
from dspark_compile.models.layers import (
    FUNCTIONAL,
    REFERENCE,
    CacheWrite,
    ReferenceAttention,
    RMSNorm,
    RotaryEmbedding,
)
from dspark_compile.models.qwen3 import Qwen3Layer
from dspark_compile.plugins.spec_verify.reference import inverse_cdf_torch  # the one draw rule


class DraftLayer(Qwen3Layer):
    """A Qwen3 decoder layer whose keys/values also come from the context features (KV injection): the
    target layer's modules and equations; only where keys/values come from and go differs."""

    def __init__(self, cfg: DraftConfig) -> None:
        super().__init__(cfg.base)

    def forward(  # type: ignore[override]
        self, x: torch.Tensor, ctx: torch.Tensor, rope_blk: tuple[torch.Tensor, torch.Tensor],
        rope_ctx: tuple[torch.Tensor, torch.Tensor], kv: torch.Tensor, cache_len: torch.Tensor, mask: torch.Tensor,
        *, slots: tuple[torch.Tensor, torch.Tensor] | None = None, cache: CacheWrite = FUNCTIONAL,
        attention: ReferenceAttention = REFERENCE,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``slots`` = (context positions [B, C], block positions [B, G]) for an in-place cache."""
        attn = self.self_attn
        h = self.input_layernorm(x)
        q = attn.query(h, *rope_blk)
        ctx_kv = attn.key_value(ctx, *rope_ctx)  # context entries are cached across rounds
        blk_kv = attn.key_value(h, *rope_blk)  # block entries are attended but never kept
        ctx_slots, blk_slots = slots if slots is not None else (None, None)
        k, v, out = cache.inject(kv, ctx_kv, blk_kv, cache_len, ctx_slots, blk_slots)
        return self.finish(x, attention(q, k, v, mask, attn.scale)), out


class MarkovHead(nn.Module):
    """Low-rank transition bias B(x_{k-1}) = W2 · W1[x_{k-1}], optionally gated or recurrent (``rnn``)."""

    def __init__(self, cfg: DraftConfig) -> None:
        super().__init__()
        r, h, v = cfg.markov_rank, cfg.base.hidden_size, cfg.base.vocab_size
        self.kind = cfg.markov_head_type or "vanilla"
        self.markov_w1 = nn.Embedding(v, r)
        self.markov_w2 = nn.Linear(r, v, bias=False)
        if self.kind == "gated":
            self.gate_proj = nn.Linear(h + r, r)
        if self.kind == "rnn":
            self.joint_proj = nn.Linear(2 * r + h, 3 * r)

    def step(self, prev: torch.Tensor, hidden: torch.Tensor, state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """prev [B] token ids, hidden [B, H], state [B, r] -> (bias [B, V], new state)."""
        e = self.markov_w1(prev)
        if self.kind == "gated":
            e = e * torch.sigmoid(self.gate_proj(torch.cat((hidden, e), dim=-1)))
            return self.markov_w2(e), state
        if self.kind == "rnn":
            gate, cand, out = self.joint_proj(torch.cat((state, e, hidden), dim=-1)).chunk(3, dim=-1)
            g = torch.sigmoid(gate)
            new_state = g * state + (1.0 - g) * torch.tanh(cand)
            return self.markov_w2(torch.tanh(out)), new_state
        return self.markov_w2(e), state


class ConfidenceHead(nn.Module):
    def __init__(self, in_dim: int) -> None:
        super().__init__()
        self.proj = nn.Linear(in_dim, 1)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.proj(features.to(self.proj.weight.dtype)).squeeze(-1).to(torch.float32)


class DSparkDraft(nn.Module):
    """Draft backbone + Markov head + confidence head over a static context cache (docs/PROGRAM.md)."""

    def __init__(self, cfg: DraftConfig, embed_tokens: nn.Embedding, lm_head: nn.Linear) -> None:
        super().__init__()
        base = cfg.base
        self.cfg = cfg
        self.block_size = cfg.block_size
        self.embed_tokens = embed_tokens  # the graft: the target's own modules, not copies
        self.lm_head = lm_head
        self.fc = nn.Linear(cfg.num_taps * base.hidden_size, base.hidden_size, bias=False)
        self.hidden_norm = self.make_norm(cfg)
        self.layers = nn.ModuleList(self.make_layer(cfg, i) for i in range(base.num_hidden_layers))
        self.norm = self.make_norm(cfg)
        self.init_buffers()
        self.markov_head = MarkovHead(cfg) if cfg.markov_rank > 0 else None
        self.confidence_head = None
        if cfg.enable_confidence_head:
            extra = cfg.markov_rank if cfg.confidence_head_with_markov else 0
            self.confidence_head = ConfidenceHead(base.hidden_size + extra)

    # The family seams (a family's draft overrides these three; models/gemma4_draft.py).
    @staticmethod
    def make_layer(cfg: DraftConfig, index: int) -> nn.Module:
        return DraftLayer(cfg)

    @staticmethod
    def make_norm(cfg: DraftConfig) -> nn.Module:
        return RMSNorm(cfg.base.hidden_size, cfg.base.rms_norm_eps)

    def init_buffers(self) -> None:
        """The RoPE table (non-persistent: rebuilt after loading on the meta device)."""
        self.rotary = RotaryEmbedding(self.cfg.base.head_dim, self.cfg.base.rope)

    def context_features(self, taps: torch.Tensor) -> torch.Tensor:
        """ctx = RMSNorm_hidden_norm(fc(taps)) (§2, context features)."""
        return self.hidden_norm(self.fc(taps.to(self.hidden_norm.weight.dtype)))

    def backbone(
        self, anchor: torch.Tensor, ctx_taps: torch.Tensor, ctx_count: torch.Tensor, cache_len: torch.Tensor,
        draft_kv: torch.Tensor, *, cache: CacheWrite = FUNCTIONAL, attention: ReferenceAttention = REFERENCE,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Block hidden states [B, G, H] (after the final norm) and the cache output (see Qwen3Target.forward).

        Context rows c < ctx_count[b] go to slot cache_len[b] + c; the block sits at p = cache_len + ctx_count
        and sees every committed context slot (< p) and the whole block (not causal)."""
        bsz = ctx_taps.shape[0]
        g = self.block_size
        dev = anchor.device
        s = draft_kv.shape[-2]
        ctx, ctx_pos, rope_ctx = self._context(ctx_taps, cache_len)
        anchor_pos = cache_len + ctx_count
        blk_pos = anchor_pos.view(bsz, 1) + torch.arange(g, device=dev).view(1, g)
        block_ids = torch.full((bsz, g), self.cfg.mask_token_id, dtype=torch.int64, device=dev)
        block_ids = torch.cat((anchor.view(bsz, 1).to(torch.int64), block_ids[:, 1:]), dim=1)
        x = self.embed_tokens(block_ids)
        rope_blk = self.rotary(blk_pos, x.dtype)
        group = self.cfg.base.num_attention_heads // self.cfg.base.num_key_value_heads
        if cache.in_place:  # the block was written at p..p+G-1: every row sees slots < p + G
            mask = attention.prepare((anchor_pos + g).view(bsz, 1).expand(bsz, g), cache.window, group, x.dtype)
        else:
            ctx_visible = torch.arange(s, device=dev).view(1, 1, s) < anchor_pos.view(bsz, 1, 1)
            mask = torch.cat((ctx_visible.expand(bsz, g, s), torch.ones(bsz, g, g, dtype=torch.bool, device=dev)),
                             dim=2)
            mask = attention.prepare(mask.unsqueeze(1), None, group, x.dtype)
        outs = []
        for i, layer in enumerate(self.layers):
            x, out = layer(x, ctx, rope_blk, rope_ctx, draft_kv[i], cache_len, mask, slots=(ctx_pos, blk_pos),
                           cache=cache, attention=attention)
            outs.append(out)
        return self.norm(x), None if cache.in_place else torch.stack(outs)

    def _context(self, ctx_taps: torch.Tensor, cache_len: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """The context rows' features, positions (from ``cache_len``) and rotary."""
        bsz, c, _ = ctx_taps.shape
        ctx = self.context_features(ctx_taps)
        ctx_pos = cache_len.view(bsz, 1) + torch.arange(c, device=ctx_taps.device).view(1, c)
        return ctx, ctx_pos, self.rotary(ctx_pos, ctx.dtype)

    def write_context(self, ctx_taps: torch.Tensor, cache_len: torch.Tensor, draft_kv: torch.Tensor, *,
                      cache: CacheWrite = FUNCTIONAL) -> torch.Tensor | None:
        """Only :meth:`backbone`'s context entries: each layer's keys/values of the context features, written
        where backbone writes them, and no block. A round that decodes without drafting
        (``VerifyPolicy.draft_rows``) keeps the draft's cache current with this, at a small part of a draft's
        cost. Returns the cache output as backbone does."""
        ctx, ctx_pos, rope_ctx = self._context(ctx_taps, cache_len)
        outs = []
        for i, layer in enumerate(self.layers):
            k, v = layer.self_attn.key_value(ctx, *rope_ctx)
            outs.append(cache.write(draft_kv[i], k, v, cache_len, ctx_pos)[2])
        return None if cache.in_place else torch.stack(outs)

    def forward(
        self, anchor: torch.Tensor, ctx_taps: torch.Tensor, ctx_count: torch.Tensor, cache_len: torch.Tensor,
        draft_kv: torch.Tensor, temperature: torch.Tensor | None = None, uniforms: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Returns (draft_tokens [B, G], confidence_logits [B, G], draft_probs [B, G, V] or the Markov-adjusted
        logits when greedy, draft_kv_out)."""
        hidden, kv_out = self.backbone(anchor, ctx_taps, ctx_count, cache_len, draft_kv)
        tokens, conf, probs = self.propose(hidden, anchor, temperature, uniforms)
        return tokens, conf, probs, kv_out

    def block_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [B, G, H] -> the LM head's logits [B, G, V] in the model dtype, before any Markov bias."""
        bsz, g, _ = hidden.shape
        # On [B*G, H]: exported as one Gemm(transB=1) over the (shared) weight, never a transposed copy of it.
        return self.lm_head(hidden.reshape(bsz * g, -1)).view(bsz, g, -1)

    def propose(
        self, hidden: torch.Tensor, anchor: torch.Tensor, temperature: torch.Tensor | None,
        uniforms: torch.Tensor | None, *, distributions: bool = True,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Markov sampling left to right (§2): logits_k = U_k + bias(x_{k-1}); x_0 = anchor.

        ``distributions=False`` skips the [B, G, V] output (a greedy round never reads it)."""
        bsz, g, _ = hidden.shape
        base_logits = self.block_logits(hidden).to(torch.float32)
        prev = anchor.to(torch.int64)
        state = hidden.new_zeros(bsz, self.cfg.markov_rank) if self.markov_head is not None else None
        sampling = temperature is not None and uniforms is not None
        if sampling:
            greedy_row = temperature <= 0
            inv_t = 1.0 / torch.where(greedy_row, torch.ones_like(temperature), temperature)
        tokens, confs, outs = [], [], []
        for k in range(g):
            h_k = hidden[:, k]
            logits_k = base_logits[:, k]
            if self.markov_head is not None:
                bias, state = self.markov_head.step(prev, h_k, state)
                logits_k = logits_k + bias.to(torch.float32)
            if self.confidence_head is not None:
                feats = h_k
                if self.cfg.confidence_head_with_markov:
                    feats = torch.cat((h_k, self.markov_head.markov_w1(prev).to(h_k.dtype)), dim=-1)
                confs.append(self.confidence_head(feats))
            else:
                confs.append(torch.zeros(bsz, dtype=torch.float32, device=hidden.device))
            best = torch.argmax(logits_k, dim=-1)
            if sampling:
                probs_k = torch.softmax(logits_k * inv_t.unsqueeze(-1), dim=-1)
                x_k = torch.where(greedy_row, best, inverse_cdf_torch(probs_k, uniforms[:, k]))
                outs.append(probs_k)
            else:
                x_k = best
                outs.append(logits_k)
            tokens.append(x_k)
            prev = x_k
        dist = torch.stack(outs, dim=1) if distributions else base_logits[:, :0]
        return torch.stack(tokens, dim=1), torch.stack(confs, dim=1), dist

    def new_cache(self, batch: int, slots: int, *, dtype: torch.dtype | None = None,
                  device: torch.device | None = None) -> torch.Tensor:
        b = self.cfg.base
        w = self.hidden_norm.weight
        return torch.zeros(b.num_hidden_layers, 2, batch, b.num_key_value_heads, slots, b.head_dim,
                           dtype=dtype or w.dtype, device=device or w.device)

    @classmethod
    def from_weights(cls, cfg: DraftConfig, get: Callable[[str], torch.Tensor], *, embed_tokens: nn.Embedding,
                     lm_head: nn.Linear, dtype: torch.dtype = torch.float32) -> DSparkDraft:
        """Build from DeepSpec tensor names; ``embed_tokens``/``lm_head`` are the target's (the graft)."""
        with torch.device("meta"):
            model = cls(cfg, nn.Embedding(1, 1), nn.Linear(1, 1, bias=False))
        state = {name: get(name).to(dtype) for name, _ in model.named_parameters()
                 if not name.startswith(("embed_tokens.", "lm_head."))}
        model.load_state_dict(state, assign=True, strict=False)
        model.embed_tokens = embed_tokens
        model.lm_head = lm_head
        model.init_buffers()
        missing = [n for n, p in model.named_parameters() if p.is_meta]
        if missing:
            raise RuntimeError(f"draft parameters not loaded: {missing}")
        return model.eval()
