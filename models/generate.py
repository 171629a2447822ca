"""Autoregressive sampling from a Transformer, with or without the KV cache.

`generate` is batched over prompts of equal length and returns a tensor; `stream` yields one token id at a
time for a terminal chat. Both share `_next_tokens`, the single sampling loop. `generate_batch` takes prompts
of different lengths (left-padded, with an attention mask through the KV cache) and returns per-row ids and
lengths: one batch of rollouts instead of a loop over prompts.

They run under torch.no_grad, not torch.inference_mode: inference tensors cannot be saved for backward,
and PPO feeds generated sequences straight back into a training forward.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from models.llama import KVCache, Transformer


def check_sampling(temperature: float, top_k: int | None, top_p: float | None) -> None:
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")


def sample_next(
    logits: torch.Tensor,  # [B, V], logits of the next token
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | Sequence[torch.Generator] | None = None,
) -> torch.Tensor:  # [B] int64
    """Greedy when temperature == 0; otherwise temperature, then top-k, then nucleus (top-p) filtering.
    `generator`: one for the batch, or one per row (row i then draws as a batch of one would with it)."""
    check_sampling(temperature, top_k, top_p)
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.size(-1)), dim=-1).values[:, -1:]  # [B, 1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None:
        sorted_logits, sorted_idx = torch.sort(logits, dim=-1, descending=True)
        cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        # Drop a token when the tokens ranked above it already reach top_p; the top token always stays.
        drop_sorted = (cum - sorted_logits.softmax(dim=-1)) >= top_p
        drop = drop_sorted.scatter(-1, sorted_idx, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    probs = logits.softmax(dim=-1)  # [B, V]
    if generator is None or isinstance(generator, torch.Generator):
        return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
    # The filtering above is row-wise, so only the draw itself has to be made row by row.
    return torch.cat([torch.multinomial(probs[i : i + 1], 1, generator=g) for i, g in enumerate(generator)])[
        :, 0
    ]


def last_logits(model: Transformer, tokens: torch.Tensor, **kw: Any) -> torch.Tensor:  # [B, V]
    """Logits of the last position only: a prefill through lm_head would cost T x d_model x vocab for
    logits nobody reads (a quarter of a cpu-profile prefill)."""
    return model.lm_head(model.hidden_states(tokens, **kw)[:, -1])


def _check_prompt(model: Transformer, prompt: torch.Tensor) -> None:
    if prompt.dim() != 2 or prompt.size(1) == 0:
        raise ValueError(f"prompt must be a non-empty [batch, seq] tensor, got shape {tuple(prompt.shape)}")
    max_len = model.config.max_seq_len
    if prompt.size(1) > max_len:
        raise ValueError(f"prompt of {prompt.size(1)} tokens exceeds the model context max_seq_len={max_len}")


def _next_tokens(
    model: Transformer,
    prompt: torch.Tensor,  # [B, T]
    n: int,
    *,
    temperature: float,
    top_k: int | None,
    top_p: float | None,
    use_cache: bool,
    generator: torch.Generator | None,
) -> Iterator[torch.Tensor]:
    """Yield n sampled next-token tensors [B]; the caller must stop pulling when it is done."""
    if n <= 0:
        return
    seq = prompt
    cache = None
    if use_cache:
        cache = model.new_cache(prompt.size(0), max_len=prompt.size(1) + n, device=prompt.device)
    logits = last_logits(model, prompt, cache=cache)  # [B, V]; prefill (fills the cache)
    for step in range(n):
        tok = sample_next(logits, temperature=temperature, top_k=top_k, top_p=top_p, generator=generator)
        yield tok
        if step == n - 1:
            break
        if cache is not None:
            logits = last_logits(model, tok[:, None], cache=cache)  # one new position
        else:
            seq = torch.cat([seq, tok[:, None]], dim=1)
            logits = last_logits(model, seq)  # recompute over the whole sequence


@torch.no_grad()
def generate(
    model: Transformer,
    prompt: torch.Tensor,  # [B, T] int64
    *,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    stop_tokens: Iterable[int] = (),
    pad_id: int = 0,
    use_cache: bool = True,
    generator: torch.Generator | None = None,
) -> torch.Tensor:  # [B, T + n], n <= max_new_tokens
    """Sample up to max_new_tokens per row, never past the model's max_seq_len.

    A row that samples a stop token keeps it and is filled with pad_id afterwards; the loop ends early
    once every row has stopped, so n can be smaller than max_new_tokens.
    """
    _check_prompt(model, prompt)
    n = max(0, min(max_new_tokens, model.config.max_seq_len - prompt.size(1)))
    stops = torch.tensor(sorted(set(stop_tokens)), dtype=torch.long, device=prompt.device)
    done = torch.zeros(prompt.size(0), dtype=torch.bool, device=prompt.device)  # [B]
    out = [prompt]
    steps = _next_tokens(
        model,
        prompt,
        n,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        use_cache=use_cache,
        generator=generator,
    )
    for tok in steps:
        tok = torch.where(done, torch.full_like(tok, pad_id), tok)  # rows already stopped get padding
        out.append(tok[:, None])
        if stops.numel() == 0:
            continue  # nothing can stop a row; skip the per-step device sync below
        done = done | torch.isin(tok, stops)
        if bool(done.all()):
            break
    return torch.cat(out, dim=1)


def stream(
    model: Transformer,
    prompt: list[int],
    *,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    stop_tokens: Iterable[int] = (),
    pad_id: int = 0,  # accepted for signature parity with generate; a single row never pads
    use_cache: bool = True,
    generator: torch.Generator | None = None,
) -> Iterator[int]:
    """Yield generated token ids one by one for a single prompt. A stop token ends the stream and is not
    yielded (a chat client would only have to hide it). The prompt is checked now, not at the first next().
    """
    del pad_id
    tokens = torch.tensor([prompt], dtype=torch.long, device=model.embed.weight.device)  # [1, T]
    _check_prompt(model, tokens)
    n = max(0, min(max_new_tokens, model.config.max_seq_len - tokens.size(1)))
    steps = _next_tokens(
        model,
        tokens,
        n,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        use_cache=use_cache,
        generator=generator,
    )
    return _stream_ids(steps, set(stop_tokens))


# On a generator function, no_grad wraps every resumption, so grad mode is restored while the caller runs.
@torch.no_grad()
def _stream_ids(steps: Iterator[torch.Tensor], stops: set[int]) -> Iterator[int]:
    for tok in steps:
        token = int(tok.item())
        if token in stops:
            return
        yield token


# ---------------------------------------------------------------------- prompts of different lengths


def left_pad(
    prompts: Sequence[Sequence[int]], pad_id: int, device: torch.device | str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:  # tokens [B, T] int64, attention_mask [B, T] bool
    """Right-align prompts in one [B, max_len] tensor; attention_mask is True on real tokens."""
    T = max(len(p) for p in prompts)
    tokens = torch.full((len(prompts), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), T), dtype=torch.bool)
    for i, p in enumerate(prompts):
        if len(p):
            tokens[i, T - len(p) :] = torch.as_tensor(p, dtype=torch.long)
            mask[i, T - len(p) :] = True
    return tokens.to(device), mask.to(device)


@dataclass
class Generation:
    """Output of generate_batch. tokens [B, n] int64: row i's generated ids in tokens[i, :lengths[i]], a
    stop token included, then pad_id; n = lengths.max(). lengths [B] int64."""

    tokens: torch.Tensor
    lengths: torch.Tensor

    def rows(self) -> list[list[int]]:
        return [row[:n] for row, n in zip(self.tokens.tolist(), self.lengths.tolist(), strict=True)]


def _as_ids(prompt: Sequence[int] | torch.Tensor) -> list[int]:
    return prompt.tolist() if isinstance(prompt, torch.Tensor) else [int(t) for t in prompt]


def _check_batch(
    model: Transformer, prompts: list[list[int]], max_new_tokens: int, generators: list | None
) -> None:
    if not prompts:
        raise ValueError("generate_batch: prompts is empty, expected at least one prompt")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"generate_batch: max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
    max_len, vocab = model.config.max_seq_len, model.config.vocab_size
    for i, p in enumerate(prompts):
        if not p:
            raise ValueError(f"generate_batch: prompt {i} is empty")
        if len(p) >= max_len:
            raise ValueError(
                f"generate_batch: prompt {i} has {len(p)} tokens, no room for a new one in the model "
                f"context max_seq_len={max_len}"
            )
        if min(p) < 0 or max(p) >= vocab:
            bad = next(t for t in p if not 0 <= t < vocab)
            raise ValueError(f"generate_batch: prompt {i} holds token id {bad}, outside vocab_size={vocab}")
    if generators is not None and len(generators) != len(prompts):
        raise ValueError(
            f"generate_batch: {len(generators)} generators for {len(prompts)} prompts (one per row, or a "
            "single generator for the batch)"
        )


PREFILL_GROUP = 4  # rows per prefill forward; rows sorted by length, so a group pads to its own longest


def _prefill(model: Transformer, ids: list[list[int]], cache: KVCache) -> torch.Tensor:  # [B, V]
    """Fill cache (rows right-aligned at its first T = longest prompt positions) and return each row's
    next-token logits. Prompts go through in groups of similar length, each left-padded to its own longest
    only: one padded [B, T] forward would spend a third of its work on pad positions when lengths spread
    over 16..96."""
    T = max(len(p) for p in ids)
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    device = cache.k[0].device
    logits: torch.Tensor | None = None
    for g in range(0, len(ids), PREFILL_GROUP):
        rows = order[g : g + PREFILL_GROUP]
        tokens, mask = left_pad([ids[i] for i in rows], 0, device)  # [b, Tg], Tg <= T
        Tg = tokens.size(1)
        part = model.new_cache(len(rows), max_len=Tg, device=device, dtype=cache.k[0].dtype)
        out = last_logits(model, tokens, cache=part, attention_mask=mask)  # [b, V]
        if logits is None:
            logits = out.new_empty(len(ids), out.size(1))
        idx = torch.tensor(rows, device=device)
        logits[idx] = out
        for layer in range(len(cache.k)):  # slots left of T - Tg stay zero: they are pad, masked
            cache.k[layer][idx, :, T - Tg : T] = part.k[layer]
            cache.v[layer][idx, :, T - Tg : T] = part.v[layer]
    cache.pos = T
    assert logits is not None
    return logits


@torch.no_grad()
def generate_batch(
    model: Transformer,
    prompts: Sequence[Sequence[int] | torch.Tensor],
    *,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    stop_tokens: Iterable[int] = (),
    pad_id: int = 0,
    use_cache: bool = True,
    generator: torch.Generator | Sequence[torch.Generator] | None = None,
) -> Generation:
    """Sample up to max_new_tokens for each prompt of a batch of different lengths, in one pass.

    Prompts are left-padded; RoPE positions count from each row's first real token and pad keys are
    masked at prefill and at every decode step, so greedy rows equal one-at-a-time `generate`. A row ends
    at its first stop token (kept, counted in lengths) and leaves the batch and the cache at once. Rows
    share the context of the longest prompt: n <= max_seq_len - longest. `generator`: one for the whole
    batch, or one per row (then row i samples exactly as `generate` would with generator[i] alone).
    Raises ValueError on an empty batch or prompt, max_new_tokens < 1, a prompt that fills the context, a
    token id outside the vocab or a bad sampling option, before any compute.
    """
    ids = [_as_ids(p) for p in prompts]
    generators = (
        list(generator) if generator is not None and not isinstance(generator, torch.Generator) else None
    )
    _check_batch(model, ids, max_new_tokens, generators)
    check_sampling(temperature, top_k, top_p)
    device = model.embed.weight.device
    B = len(ids)
    # Pad slots hold token 0 whatever pad_id is: they are masked, and pad_id need not be a vocab id.
    tokens, mask = left_pad(ids, 0, device)  # [B, T], [B, T]
    n = min(max_new_tokens, model.config.max_seq_len - tokens.size(1))
    stops = torch.tensor(sorted(set(stop_tokens)), dtype=torch.long, device=device)

    out = torch.full((B, n), pad_id, dtype=torch.long, device=device)
    lengths = torch.zeros(B, dtype=torch.long, device=device)
    rows = torch.arange(B, device=device)  # original row of each live batch row
    cache = model.new_cache(B, max_len=tokens.size(1) + n, device=device) if use_cache else None
    seq = tokens  # [b, S], the no-cache path re-reads everything
    if cache is not None:
        logits = _prefill(model, ids, cache)  # [B, V]
    else:
        logits = last_logits(model, tokens, attention_mask=mask)  # [B, V]
    for step in range(n):
        live = generator if generators is None else [generators[r] for r in rows.tolist()]
        tok = sample_next(logits, temperature=temperature, top_k=top_k, top_p=top_p, generator=live)  # [b]
        out[rows, step] = tok
        lengths[rows] += 1
        if step == n - 1:
            break
        if stops.numel():
            done = torch.isin(tok, stops)  # [b]
            n_done = int(done.sum())  # one sync per step, as generate's done.all()
            if n_done == rows.numel():
                break
            if n_done:
                # Drop finished rows now: their keys and queries would only cost compute. (A finished row
                # left in would also have to be kept out of lengths and out.)
                keep = (~done).nonzero().squeeze(1)
                rows, tok, mask, seq = rows[keep], tok[keep], mask[keep], seq[keep]
                if cache is not None:
                    cache.select_rows(keep)
        mask = torch.cat([mask, mask.new_ones(rows.numel(), 1)], dim=1)  # [b, S + 1]
        if cache is not None:
            logits = last_logits(model, tok[:, None], cache=cache, attention_mask=mask)  # one new position
        else:
            seq = torch.cat([seq, tok[:, None]], dim=1)
            logits = last_logits(model, seq, attention_mask=mask)
    width = int(lengths.max())
    return Generation(tokens=out[:, :width], lengths=lengths)
