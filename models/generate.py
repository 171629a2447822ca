"""Autoregressive sampling from a Transformer, with or without the KV cache.

`generate` is batched and returns a tensor; `stream` yields one token id at a time for a terminal chat.
Both share `_next_tokens`, the single sampling loop.

They run under torch.no_grad, not torch.inference_mode: inference tensors cannot be saved for backward,
and PPO feeds generated sequences straight back into a training forward.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch

from models.llama import Transformer


def sample_next(
    logits: torch.Tensor,  # [B, V], logits of the next token
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:  # [B] int64
    """Greedy when temperature == 0; otherwise temperature, then top-k, then nucleus (top-p) filtering."""
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None:
        if top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {top_k}")
        kth = torch.topk(logits, min(top_k, logits.size(-1)), dim=-1).values[:, -1:]  # [B, 1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None:
        if not 0 < top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {top_p}")
        sorted_logits, sorted_idx = torch.sort(logits, dim=-1, descending=True)
        cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        # Drop a token when the tokens ranked above it already reach top_p; the top token always stays.
        drop_sorted = (cum - sorted_logits.softmax(dim=-1)) >= top_p
        drop = drop_sorted.scatter(-1, sorted_idx, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


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
    logits = model(prompt, cache=cache)[:, -1]  # [B, V]; prefill (fills the cache)
    for step in range(n):
        tok = sample_next(logits, temperature=temperature, top_k=top_k, top_p=top_p, generator=generator)
        yield tok
        if step == n - 1:
            break
        if cache is not None:
            logits = model(tok[:, None], cache=cache)[:, -1]  # one new position
        else:
            seq = torch.cat([seq, tok[:, None]], dim=1)
            logits = model(seq)[:, -1]  # recompute over the whole sequence


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
