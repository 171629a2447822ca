"""A Llama-style decoder-only transformer in one file.

    tokens -> embed -> n_layer x [x + attn(rmsnorm(x)); x + swiglu(rmsnorm(x))] -> rmsnorm -> lm_head

Conventions are Hugging Face Llama's, so models/hf.py exports weights by renaming alone:
- RoPE uses the non-interleaved "rotate_half" layout (channel i pairs with channel i + head_dim/2).
- RMSNorm normalises in float32 and multiplies the weight after casting back, as HF does.
- Linear layers have no bias, except q/k/v with config.qkv_bias (Qwen2).
- Optional per-head q/k RMSNorm before RoPE (config.qk_norm, Qwen3) and Llama 3 RoPE scaling.

Shapes: B batch, T sequence, D d_model, H query heads, K kv heads, Hd head_dim, V vocab.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from models.config import ModelConfig
from models.fused_loss import linear_cross_entropy


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in float32: under bf16 the mean of squares loses too much precision.
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(dtype)


def rope_inv_freq(
    head_dim: int, theta: float, scaling: dict | None = None, device: torch.device | None = None
) -> torch.Tensor:
    """Inverse frequencies [Hd/2] in float32: plain RoPE, or Llama 3.1's rescaling when
    scaling["rope_type"] == "llama3" (as transformers' _compute_llama3_parameters): wavelengths longer than
    original_max_position_embeddings / low_freq_factor are stretched by `factor`, shorter than
    .../high_freq_factor kept, and those between interpolated smoothly."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=device).float() / head_dim))
    if scaling is None or scaling.get("rope_type", "default") == "default":
        return inv_freq
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_len = scaling["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < old_len / high) * ~(wavelen > old_len / low)
    return torch.where(is_medium, smoothed, scaled)


def rope_cos_sin(
    positions: torch.Tensor, head_dim: int, theta: float, scaling: dict | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables [B, T, Hd] for integer positions [B, T], computed in float32.

    Computed per forward instead of stored as a buffer: a buffer would be cast by model.to(bfloat16) and
    bf16 angles are visibly wrong at large positions. The cost, B*T*Hd elements, is negligible.
    """
    inv_freq = rope_inv_freq(head_dim, theta, scaling, positions.device)
    freqs = positions.float()[..., None] * inv_freq  # [B, T, Hd/2]
    emb = torch.cat((freqs, freqs), dim=-1)  # [B, T, Hd]: the same angle for channels i and i + Hd/2
    return emb.cos(), emb.sin()


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x [B, heads, T, Hd]; cos/sin [B, T, Hd] broadcast over heads.
    cos, sin = cos[:, None].to(x.dtype), sin[:, None].to(x.dtype)
    return x * cos + rotate_half(x) * sin


class KVCache:
    """Preallocated keys/values for incremental decoding.

    k[layer], v[layer]: [B, K, max_len, Hd]. `pos` is how many positions are filled; the Transformer
    advances it after every layer has written the new tokens.
    """

    def __init__(
        self, config: ModelConfig, batch_size: int, max_len: int, device: torch.device, dtype: torch.dtype
    ) -> None:
        shape = (batch_size, config.n_kv_head, max_len, config.head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layer)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layer)]
        self.batch_size = batch_size
        self.max_len = max_len
        self.pos = 0

    def reset(self) -> None:
        self.pos = 0

    def select_rows(self, rows: torch.Tensor) -> None:
        """Keep only batch rows `rows` (int64 [B']), in that order: drops finished rows of a batched decode."""
        self.k = [k.index_select(0, rows) for k in self.k]
        self.v = [v.index_select(0, rows) for v in self.v]
        self.batch_size = rows.numel()


class Attention(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.n_kv_head, config.head_dim
        bias = config.qkv_bias  # Qwen2: q, k, v have a bias, o does not
        self.q_proj = nn.Linear(config.d_model, config.n_head * config.head_dim, bias=bias)
        self.k_proj = nn.Linear(config.d_model, config.n_kv_head * config.head_dim, bias=bias)
        self.v_proj = nn.Linear(config.d_model, config.n_kv_head * config.head_dim, bias=bias)
        self.o_proj = nn.Linear(config.n_head * config.head_dim, config.d_model, bias=False)
        # Qwen3: one RMSNorm over the Hd channels of every q and k head (weights shared across heads)
        self.q_norm = RMSNorm(config.head_dim, config.norm_eps) if config.qk_norm else None
        self.k_norm = RMSNorm(config.head_dim, config.norm_eps) if config.qk_norm else None

    def forward(
        self,
        x: torch.Tensor,  # [B, T, D]
        cos: torch.Tensor,  # [B, T, Hd]
        sin: torch.Tensor,
        mask: torch.Tensor | None,  # bool [B or 1, 1, T, S], True = may attend; None = plain causal
        cache: KVCache | None,
        layer: int,
    ) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_head, self.head_dim)  # [B, T, H, Hd]
        k = self.k_proj(x).view(B, T, self.n_kv_head, self.head_dim)  # [B, T, K, Hd]
        if self.q_norm is not None and self.k_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)  # per head, before RoPE
        q, k = q.transpose(1, 2), k.transpose(1, 2)  # [B, H, T, Hd], [B, K, T, Hd]
        v = self.v_proj(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)  # [B, K, T, Hd]
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)

        if cache is not None:
            # Write the new keys/values at [pos, pos+T) and attend over everything filled so far.
            start, end = cache.pos, cache.pos + T
            cache.k[layer][:, :, start:end] = k
            cache.v[layer][:, :, start:end] = v
            k, v = cache.k[layer][:, :, :end], cache.v[layer][:, :, :end]  # [B, K, S, Hd], S = pos + T

        # Grouped-query attention: query head h reads kv head h // (H/K), as HF's repeat_kv. An explicit
        # repeat (instead of SDPA's enable_gqa) keeps every SDPA backend available when a mask is passed.
        n_rep = self.n_head // self.n_kv_head
        if n_rep > 1:
            k = k.repeat_interleave(n_rep, dim=1)  # [B, H, S, Hd]
            v = v.repeat_interleave(n_rep, dim=1)

        if mask is None:
            # Plain causal. A single query token (cached decode) may see every key, and SDPA's is_causal
            # would wrongly keep only key 0 there (it aligns the triangle top-left).
            is_causal = q.size(2) > 1
            y = F.scaled_dot_product_attention(q, k, v, is_causal=is_causal)  # fast path (flash on GPU)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        y = y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim)  # [B, T, H*Hd]
        return self.o_proj(y)


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(config.d_model, config.ffn_dim, bias=False)
        self.up_proj = nn.Linear(config.d_model, config.ffn_dim, bias=False)
        self.down_proj = nn.Linear(config.ffn_dim, config.d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(config.d_model, config.norm_eps)
        self.attn = Attention(config)
        self.mlp_norm = RMSNorm(config.d_model, config.norm_eps)
        self.mlp = MLP(config)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: torch.Tensor | None,
        cache: KVCache | None,
        layer: int,
    ) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), cos, sin, mask, cache, layer)
        return x + self.mlp(self.mlp_norm(x))


def document_positions(doc_ids: torch.Tensor) -> torch.Tensor:
    """Positions [B, T] that restart at 0 wherever doc_ids changes value along T."""
    B, T = doc_ids.shape
    idx = torch.arange(T, device=doc_ids.device).expand(B, T)
    is_start = torch.ones_like(doc_ids, dtype=torch.bool)
    is_start[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    # Index of the most recent document start at or before each position.
    last_start = torch.where(is_start, idx, torch.zeros_like(idx)).cummax(dim=1).values
    return idx - last_start


def padding_positions_and_mask(
    attention_mask: torch.Tensor,  # [B, S] bool, True = real token; S = cached + new positions
    start: int,  # positions already in the cache; the new queries are columns start..S-1
) -> tuple[torch.Tensor, torch.Tensor]:  # positions [B, T], mask bool [B, 1, T, S]
    """RoPE positions that count real tokens only (0 at each row's first real token, as the row unpadded;
    RoPE scores depend on position differences only, so this is for float agreement, HF's convention) and a
    causal mask that hides pad keys. A pad query still sees itself: a fully masked row gives NaN in SDPA,
    which would reach the pad's keys/values in the next layer, and 0 * NaN would poison the real rows."""
    keep = attention_mask.bool()
    S = keep.size(1)
    positions = (keep.long().cumsum(dim=1) - 1).clamp(min=0)[:, start:]  # [B, T]
    q_pos = torch.arange(start, S, device=keep.device)[:, None]  # [T, 1]
    k_pos = torch.arange(S, device=keep.device)[None, :]  # [1, S]
    mask = ((k_pos <= q_pos)[None] & keep[:, None, :]) | (k_pos == q_pos)[None]  # [B, T, S]
    return positions, mask[:, None]


def optimizer_groups(module: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW param groups: decay every >=2-D tensor (all matrices, the embedding included, as nanoGPT:
    when tied it is also the output projection), no decay for 1-D tensors (RMSNorm gains, biases), whose
    decay would only pull them towards zero without regularising anything. Frozen params are left out.
    named_parameters() lists a tied tensor once."""
    params = [p for p in module.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


class Transformer(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        config.validate()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.d_model)
        self.layers = nn.ModuleList([Block(config) for _ in range(config.n_layer)])
        self.norm = RMSNorm(config.d_model, config.norm_eps)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        self.apply(self._init_weights)
        if config.tie_embeddings:
            self.lm_head.weight = self.embed.weight  # one tensor, two roles (and half the vocab params)
        # Residual projections write into the residual stream once per sublayer (2 per layer); scaling
        # their init by 1/sqrt(2*n_layer) keeps the stream's variance independent of depth (GPT-2).
        for name, p in self.named_parameters():
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)

    # ------------------------------------------------------------------ forward

    def hidden_states(
        self,
        tokens: torch.Tensor,  # [B, T] int64
        *,
        doc_ids: torch.Tensor | None = None,  # [B, T]: attention stays inside runs of equal id
        cache: KVCache | None = None,
        attention_mask: torch.Tensor | None = None,  # [B, cached + T], True = real token (left padding)
    ) -> torch.Tensor:  # [B, T, D], after the final norm
        if tokens.dim() != 2:
            raise ValueError(f"tokens must be [batch, seq], got shape {tuple(tokens.shape)}")
        B, T = tokens.shape
        max_len = self.config.max_seq_len
        if max_len < T:
            raise ValueError(f"sequence of {T} tokens exceeds the model context max_seq_len={max_len}")
        device = tokens.device

        if cache is not None:
            if doc_ids is not None:
                raise ValueError("doc_ids and cache cannot be combined (the cache is for generation)")
            if cache.batch_size != B:
                raise ValueError(f"cache was made for batch size {cache.batch_size}, got {B}")
            start = cache.pos
            if start + T > cache.max_len:
                raise ValueError(
                    f"sequence of {start + T} tokens (cached {start} + new {T}) exceeds the cache "
                    f"length {cache.max_len} (model context max_seq_len={max_len})"
                )
            positions = torch.arange(start, start + T, device=device).expand(B, T)
            if T == 1 or start == 0:
                mask = None  # one new token sees all keys; a prefill of an empty cache is plain causal
            else:
                # Query i sits at absolute position start+i and may see keys 0..start+i. (SDPA's
                # is_causal aligns the triangle top-left, which is wrong when S > T.)
                q_pos = torch.arange(start, start + T, device=device)[:, None]
                k_pos = torch.arange(start + T, device=device)[None, :]
                mask = (k_pos <= q_pos)[None, None]  # [1, 1, T, S]
        elif doc_ids is not None:
            if doc_ids.shape != tokens.shape:
                raise ValueError(
                    f"doc_ids shape {tuple(doc_ids.shape)} != tokens shape {tuple(tokens.shape)}"
                )
            positions = document_positions(doc_ids)
            # A dense bool mask, chosen by measurement (benchmarks/packing.py, torch 2.13, 2-core EPYC): on
            # CPU SDPA runs its fused flash kernel with a mask, forward and backward, as fast as plain causal;
            # SDPA per document span (a varlen loop) or on the documents gathered into a padded batch was
            # 2-5x slower, and flex_attention has no CPU backward. On CUDA the mask leaves flash attention
            # (the memory-efficient kernel takes it): not measured here.
            same_doc = doc_ids[:, :, None] == doc_ids[:, None, :]  # [B, T, T]
            causal = torch.ones(T, T, dtype=torch.bool, device=device).tril()
            mask = (same_doc & causal)[:, None]  # [B, 1, T, T]; the diagonal is always True, so no NaN rows
        else:
            positions = torch.arange(T, device=device).expand(B, T)
            mask = None

        if attention_mask is not None:
            if doc_ids is not None:
                raise ValueError("doc_ids and attention_mask cannot be combined")
            start = cache.pos if cache is not None else 0
            if attention_mask.shape != (B, start + T):
                raise ValueError(
                    f"attention_mask shape {tuple(attention_mask.shape)} != (batch, cached + new tokens) "
                    f"= {(B, start + T)}"
                )
            positions, mask = padding_positions_and_mask(attention_mask, start)

        c = self.config
        cos, sin = rope_cos_sin(positions, c.head_dim, c.rope_theta, c.rope_scaling)  # [B, T, Hd]
        x = self.embed(tokens)  # [B, T, D]
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, mask, cache, i)
        if cache is not None:
            cache.pos += T
        return self.norm(x)

    def forward(
        self,
        tokens: torch.Tensor,
        *,
        doc_ids: torch.Tensor | None = None,
        cache: KVCache | None = None,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,  # [B, T] int64
        ignore_index: int = -100,
    ) -> torch.Tensor:
        """Logits [B, T, V]; given labels, the mean cross-entropy over the labels != ignore_index instead,
        the head fused with the loss (models/fused_loss.py: the [B, T, V] logits are never materialised)."""
        h = self.hidden_states(tokens, doc_ids=doc_ids, cache=cache, attention_mask=attention_mask)
        if labels is None:
            return self.lm_head(h)
        if hasattr(self.lm_head.weight, "ds_status"):  # ZeRO-3 partitions it: lm_head's forward gathers it
            logits = self.lm_head(h).float().flatten(0, 1)
            return F.cross_entropy(logits, labels.flatten(), ignore_index=ignore_index)
        return linear_cross_entropy(h.flatten(0, 1), self.lm_head.weight, labels.flatten(), ignore_index)

    def new_cache(
        self,
        batch_size: int,
        max_len: int | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> KVCache:
        max_len = self.config.max_seq_len if max_len is None else max_len
        if not 0 < max_len <= self.config.max_seq_len:
            raise ValueError(f"cache max_len={max_len} must be in 1..max_seq_len={self.config.max_seq_len}")
        weight = self.embed.weight
        return KVCache(
            self.config,
            batch_size,
            max_len,
            device=torch.device(device) if device is not None else weight.device,
            dtype=dtype if dtype is not None else weight.dtype,
        )

    # ------------------------------------------------------------------ accounting

    def num_params(self, exclude_embeddings: bool = False) -> int:
        """Parameter count, a tied tensor counted once. exclude_embeddings drops the input embedding table
        unless it is tied (then it is also the lm_head matrix, which does compute)."""
        n = sum(p.numel() for p in self.parameters())
        if exclude_embeddings and not self.config.tie_embeddings:
            n -= self.embed.weight.numel()
        return n

    def flops_per_token(self, seq_len: int | None = None) -> int:
        """Training FLOPs per token (forward + backward), PaLM appendix B / nanoGPT estimate_mfu:
        6*N for the matmuls of N parameters, plus 12*L*H*Hd*T for attention scores and the weighted sum
        over T keys (full T x T, not halved for causality, as PaLM counts it). N leaves out the embedding
        lookup table when untied: a lookup does no multiply-adds."""
        c = self.config
        T = c.max_seq_len if seq_len is None else seq_len
        n = self.num_params(exclude_embeddings=True)
        return 6 * n + 12 * c.n_layer * c.n_head * c.head_dim * T

    def configure_optimizer_groups(self, weight_decay: float) -> list[dict]:
        return optimizer_groups(self, weight_decay)
