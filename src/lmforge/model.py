"""The lmforge transformer: a decoder-only language model, readable in one sitting.

Architecture (the Llama family's, so it exports to Hugging Face `LlamaForCausalLM` by renaming):
token embedding -> n_layer x [RMSNorm -> causal self-attention with rotary positions (RoPE) -> residual,
RMSNorm -> SwiGLU MLP -> residual] -> RMSNorm -> output projection tied to the token embedding.

Extras: a KV cache for generation (with left-padding support for batched decoding) and an opt-in
path that returns the attention probabilities of every layer and head, for the attention explorer.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

log = logging.getLogger("lmforge")


@dataclass
class GPTConfig:
    vocab_size: int
    n_layer: int = 6
    n_head: int = 6
    n_embd: int = 384
    block_size: int = 256
    dropout: float = 0.0
    mlp_hidden: int = 0  # 0 = 8/3 * n_embd rounded up to a multiple of 64 (the SwiGLU convention)
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def hidden_dim(self) -> int:
        if self.mlp_hidden:
            return self.mlp_hidden
        return 64 * math.ceil(8 * self.n_embd / 3 / 64)


# --------------------------------------------------------------------------- rotary positions


def rope_tables(cfg: GPTConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and signed sin of every position 0..block_size-1, each (block_size, head_dim) in fp32: row p holds
    Hugging Face Llama's cos/sin of position p, with the first half of sin negated (the sign that Llama's
    rotate_half puts on the halves it swaps; see `apply_rope`). Made once per model: computed inside forward,
    torch.compile fuses the cos/sin into every rotary product and recomputes them per head and layer (11-15% of
    the kernel time of a gpt2-124m step in an H100 profile)."""
    d = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float32) / d))
    freqs = torch.arange(cfg.block_size, dtype=torch.float32)[:, None] * inv_freq  # (T, d/2)
    emb = torch.cat([freqs, freqs], dim=-1)
    sign = torch.cat([-torch.ones(d // 2), torch.ones(d // 2)])
    return emb.cos(), emb.sin() * sign


def apply_rope(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """Llama's rotary embedding, x * cos + rotate_half(x) * sin with rotate_half(x) = (-x2, x1) for the halves
    x1, x2 of the last dim, written as x * cos + (x2, x1) * signed_sin: the same numbers, bit for bit. The
    halves are swapped by a roll, not by concatenating them: with torch.cat, PyTorch 2.13's inductor gives NaN
    key gradients on CPU under bf16 autocast when attention dropout is on."""
    return x * cos + x.roll(x.shape[-1] // 2, dims=-1) * signed_sin


# --------------------------------------------------------------------------- KV cache


class KVCache:
    """Keys and values of past positions for every layer, plus per-row padding and positions.

    `valid[b, j]` is False where key j of row b is left padding; `next_pos[b]` is the rotary position
    the next token of row b takes (padding does not advance it).
    """

    def __init__(self, cfg: GPTConfig, batch: int, max_len: int, device: torch.device, dtype: torch.dtype):
        shape = (cfg.n_layer, batch, cfg.n_head, max_len, cfg.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.valid = torch.ones(batch, max_len, dtype=torch.bool, device=device)
        self.next_pos = torch.zeros(batch, dtype=torch.long, device=device)
        self.length = 0
        self.max_len = max_len
        self.has_padding = False

    def select(self, rows: torch.Tensor) -> KVCache:
        """A cache whose row i is a copy of row rows[i] of this one: prompts run once, continued several ways."""
        out = KVCache.__new__(KVCache)
        out.k = self.k.index_select(1, rows)
        out.v = self.v.index_select(1, rows)
        out.valid = self.valid.index_select(0, rows)
        out.next_pos = self.next_pos.index_select(0, rows)
        out.length, out.max_len, out.has_padding = self.length, self.max_len, self.has_padding
        return out


# --------------------------------------------------------------------------- layers


# Training on a CPU, sequences up to this long run attention in PyTorch's math kernel instead of its CPU flash
# kernel, whose backward is slow for short sequences: fine-tuning's (32, 6 heads, 90, 64) in bf16 took 51 ms
# forward and backward with flash and 22 ms with math, (32, 6, 200, 64) 100 against 92; at 256 flash wins
# (83 against 157). Inference keeps the flash kernel, whose forward is the faster one at every length.
CPU_MATH_ATTENTION_MAX_LEN = 192


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, training: bool, **kwargs) -> torch.Tensor:
    """F.scaled_dot_product_attention, in the math kernel when training short sequences on a CPU (eager)."""
    if (
        training
        and q.device.type == "cpu"
        and q.shape[-2] <= CPU_MATH_ATTENTION_MAX_LEN
        and torch.is_grad_enabled()
        and not torch.compiler.is_compiling()
    ):
        with sdpa_kernel(SDPBackend.MATH):
            return F.scaled_dot_product_attention(q, k, v, **kwargs)
    return F.scaled_dot_product_attention(q, k, v, **kwargs)


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype linear layers compute in for input `x`: autocast's (bf16) when it is on, else x's own."""
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype


class Attention(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.cfg = cfg
        self.q_proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=False)
        self.k_proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=False)
        self.v_proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=False)
        self.o_proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=False)
        self.resid_dropout = nn.Dropout(cfg.dropout)
        self.attn_dropout_p = cfg.dropout

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        return x.view(b, t, self.cfg.n_head, self.cfg.head_dim).transpose(1, 2)

    def forward(self, x, cos, signed_sin, mask, cache: KVCache | None, layer: int, capture: list | None):
        b, t, c = x.shape
        q = apply_rope(self._heads(self.q_proj(x)), cos, signed_sin)
        k = apply_rope(self._heads(self.k_proj(x)), cos, signed_sin)
        v = self._heads(self.v_proj(x))
        if cache is not None:
            start = cache.length
            cache.k[layer, :, :, start : start + t] = k
            cache.v[layer, :, :, start : start + t] = v
            k = cache.k[layer, :, :, : start + t]
            v = cache.v[layer, :, :, : start + t]
        dropout_p = self.attn_dropout_p if self.training else 0.0
        if capture is not None:  # explicit softmax so the probabilities can be returned
            scores = (q @ k.transpose(-2, -1)) / math.sqrt(self.cfg.head_dim)
            if mask is None:
                mask = torch.ones(t, k.shape[-2], dtype=torch.bool, device=x.device).tril(k.shape[-2] - t)
            probs = scores.masked_fill(~mask, float("-inf")).softmax(dim=-1)
            capture.append(probs.detach())
            y = F.dropout(probs, dropout_p, self.training) @ v
        elif mask is None:
            # no explicit mask means plain causal attention over exactly these t positions, or one new token
            # against the cache (not causal: it sees every cached key). Without a cache the flag is a constant,
            # so torch.compile with varying sequence lengths (fine-tuning) keeps each block in one graph
            causal = cache is None or t > 1
            y = attention(q, k, v, self.training, dropout_p=dropout_p, is_causal=causal)
        else:
            y = attention(q, k, v, self.training, attn_mask=mask, dropout_p=dropout_p)
        y = y.transpose(1, 2).reshape(b, t, c)
        return self.resid_dropout(self.o_proj(y))


class SwiGLU(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.n_embd, cfg.hidden_dim, bias=False)
        self.up_proj = nn.Linear(cfg.n_embd, cfg.hidden_dim, bias=False)
        self.down_proj = nn.Linear(cfg.hidden_dim, cfg.n_embd, bias=False)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x)))


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.attn_norm = nn.RMSNorm(cfg.n_embd, eps=cfg.norm_eps)
        self.attn = Attention(cfg)
        self.mlp_norm = nn.RMSNorm(cfg.n_embd, eps=cfg.norm_eps)
        self.mlp = SwiGLU(cfg)

    def forward(self, x, cos, signed_sin, mask, cache, layer, capture):
        # the residual stream stays in x's dtype (fp32); each normed input is cast once to the dtype the
        # projections compute in (bf16 under autocast), not once per projection by autocast
        h = self.attn_norm(x).to(cos.dtype)
        x = x + self.attn(h, cos, signed_sin, mask, cache, layer, capture)
        return x + self.mlp(self.mlp_norm(x).to(cos.dtype))


def lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy (in fp32) over positions whose target is not -100."""
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-100)


# --------------------------------------------------------------------------- the model


class GPT(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.emb_dropout = nn.Dropout(cfg.dropout)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.norm = nn.RMSNorm(cfg.n_embd, eps=cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        self.lm_head.weight = self.tok_emb.weight  # tied input/output embeddings
        cos, signed_sin = rope_tables(cfg)  # buffers follow .to(device); not saved with the weights
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_signed_sin", signed_sin, persistent=False)
        self.apply(self._init_weights)
        for name, p in self.named_parameters():  # GPT-2: shrink residual-path projections with depth
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())  # tied weights are counted once

    def set_dropout(self, p: float) -> None:
        for m in self.modules():
            if isinstance(m, nn.Dropout):
                m.p = p
            if isinstance(m, Attention):
                m.attn_dropout_p = p
        self.cfg.dropout = p

    def _positions_and_mask(self, idx, cache: KVCache | None, attention_mask: torch.Tensor | None):
        """Rotary positions (B, T) or None for 0..T-1 in every row, and a boolean attention mask
        (B, 1, T, Tk) or None for plain causal."""
        b, t = idx.shape
        start = cache.length if cache is not None else 0
        if attention_mask is not None:
            attention_mask = attention_mask.to(torch.bool)
            offset = cache.next_pos[:, None] if cache is not None else 0
            positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0) + offset
        elif cache is not None:
            positions = cache.next_pos[:, None] + torch.arange(t, device=idx.device)
        else:
            positions = None  # 0..t-1 in every row
        if cache is not None:
            if attention_mask is not None:
                cache.valid[:, start : start + t] = attention_mask
                cache.has_padding = cache.has_padding or not bool(attention_mask.all())
            cache.next_pos = positions[:, -1] + 1
        needs_mask = attention_mask is not None and not bool(attention_mask.all())
        needs_mask = needs_mask or (cache is not None and (cache.has_padding or (start > 0 and t > 1)))
        if not needs_mask:
            return positions, None
        tk = start + t
        causal = torch.ones(t, tk, dtype=torch.bool, device=idx.device).tril(start)
        valid = cache.valid[:, :tk] if cache is not None else attention_mask
        mask = causal[None] & valid[:, None, :]
        # every query may see itself, so a padding row never has an all-masked (NaN) softmax
        diag = torch.zeros(t, tk, dtype=torch.bool, device=idx.device)
        diag[torch.arange(t), start + torch.arange(t)] = True
        return positions, (mask | diag)[:, None]

    def _run(self, idx, cache, attention_mask, capture, last_only, output_mask=None):
        if idx.shape[1] + (cache.length if cache is not None else 0) > (
            cache.max_len if cache else self.cfg.block_size
        ):
            raise ValueError(f"sequence of {idx.shape[1]} tokens exceeds the model's block size {self.cfg.block_size}")
        positions, mask = self._positions_and_mask(idx, cache, attention_mask)
        x = self.emb_dropout(self.tok_emb(idx))
        if positions is None:  # (1, 1, T, d): one table broadcast over rows and heads
            t = idx.shape[1]
            cos, signed_sin = self.rope_cos[None, None, :t], self.rope_signed_sin[None, None, :t]
        else:  # (B, 1, T, d)
            cos, signed_sin = self.rope_cos[positions][:, None], self.rope_signed_sin[positions][:, None]
        # the rotary tables in the dtype q and k are computed in (bf16 under autocast, as nanochat's), so the
        # rotation does not turn them back into fp32 and autocast need not cast them again for attention
        dtype = compute_dtype(x)
        cos, signed_sin = cos.to(dtype), signed_sin.to(dtype)
        for i, block in enumerate(self.layers):
            x = block(x, cos, signed_sin, mask, cache, i, capture)
        if cache is not None:
            cache.length += idx.shape[1]
        if last_only:
            x = x[:, -1:]
        elif output_mask is not None:
            x = x[output_mask]
        return self.lm_head(self.norm(x))

    def forward(
        self,
        idx: torch.Tensor,
        *,
        cache: KVCache | None = None,
        attention_mask: torch.Tensor | None = None,
        last_only: bool = False,
        output_mask: torch.Tensor | None = None,
        targets: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits (B, T, vocab) for token ids (B, T); (B, 1, vocab) with last_only.

        `attention_mask` (B, T) marks real tokens (1) vs left padding (0). `output_mask` (B, T, bool)
        asks for the logits of the marked positions only, as (N, vocab): fine-tuning scores a few answer
        tokens per sequence, and skipping the output layer elsewhere saves most of its cost.
        With `targets` (B, T) the result is `lm_loss` of the logits instead: inside forward, so that
        torch.compile of the model fuses the fp32 cross-entropy with the output layer rather than making
        extra fp32 copies of the B x T x vocab logits.
        """
        logits = self._run(idx, cache, attention_mask, None, last_only, output_mask)
        return logits if targets is None else lm_loss(logits, targets)

    def forward_with_attention(self, idx: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Logits and, per layer, attention probabilities of shape (B, n_head, T, T)."""
        capture: list[torch.Tensor] = []
        logits = self._run(idx, None, None, capture, False)
        return logits, capture

    def new_cache(self, batch: int, max_len: int | None = None) -> KVCache:
        if max_len is not None and max_len > self.cfg.block_size:  # positions index the rotary tables
            raise ValueError(f"a cache of {max_len} positions exceeds the model's block size {self.cfg.block_size}")
        p = self.tok_emb.weight
        # under autocast the keys and values come out of the projections in the autocast dtype: kept in it
        dtype = torch.get_autocast_dtype(p.device.type) if torch.is_autocast_enabled(p.device.type) else p.dtype
        return KVCache(self.cfg, batch, max_len or self.cfg.block_size, p.device, dtype)

    def resize_vocab(self, new_size: int, old_rows: list[int] | None = None) -> None:
        """Grow or shrink the (tied) embedding to `new_size` rows, keeping the learned rows.

        Row i of the new matrix is old row `old_rows[i]` (-1: a new token); by default rows keep their
        ids. New rows start at the mean of the old embeddings, so new tokens start as an 'average'
        token instead of noise.
        """
        old = self.tok_emb.weight.data
        rows = torch.tensor(old_rows if old_rows is not None else range(new_size), dtype=torch.long)
        if len(rows) != new_size:
            raise ValueError(f"old_rows has {len(rows)} entries for {new_size} new rows")
        rows[rows >= old.shape[0]] = -1
        kept = rows >= 0
        new = old.mean(0, keepdim=True).repeat(new_size, 1)
        new[kept] = old[rows[kept]]
        self.tok_emb = nn.Embedding(new_size, self.cfg.n_embd, device=old.device, dtype=old.dtype)
        self.tok_emb.weight.data.copy_(new)
        self.lm_head = nn.Linear(self.cfg.n_embd, new_size, bias=False, device=old.device, dtype=old.dtype)
        self.lm_head.weight = self.tok_emb.weight
        self.cfg.vocab_size = new_size


def build_model(cfg: GPTConfig) -> GPT:
    model = GPT(cfg)
    log.info(
        "model: %s parameters (%d layers, %d heads, n_embd %d, block %d, vocab %d)",
        f"{model.num_parameters() / 1e6:.2f}M",
        cfg.n_layer,
        cfg.n_head,
        cfg.n_embd,
        cfg.block_size,
        cfg.vocab_size,
    )
    return model
