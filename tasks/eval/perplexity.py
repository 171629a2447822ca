"""Held-out perplexity over rolling windows, bits-per-byte and word perplexity.

Rolling windows follow lm-evaluation-harness `loglikelihood_rolling` (get_rolling_token_windows): the
first window scores all of its tokens; every later window is `window` tokens long, ends `stride` tokens
further on and scores only those `stride` new tokens, so every token is scored exactly once, with at least
window - stride tokens of left context (all there is near the start).

    token perplexity = exp(NLL / scored tokens)
    bits per byte    = NLL / ln 2 / UTF-8 bytes of the scored text   (comparable across tokenizers)
    word perplexity  = exp(NLL / whitespace-separated words)

NLL is the sum over scored tokens in nats, computed in float32.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tasks.core.progress import Progress
from tasks.data.shards import read_shard


def logits_checked(model: Any, tokens: torch.Tensor, index: torch.Tensor, cache: Any = None) -> torch.Tensor:
    logits = logits_at(model, tokens, index, cache)
    assert logits is not None  # an index was given
    return logits


def logits_at(
    model: Any, tokens: torch.Tensor, index: torch.Tensor | None, cache: Any = None
) -> torch.Tensor | None:
    """Logits [B, N, V] at positions index [B, N] of tokens [B, T] (None: only fill the cache).

    A model exposing hidden_states + lm_head (our Transformer) projects to the vocabulary only at the
    requested positions, which is most of a forward's cost on CPU when few positions are scored.
    """
    kw = {"cache": cache} if cache is not None else {}
    if hasattr(model, "hidden_states") and hasattr(model, "lm_head"):
        out = model.hidden_states(tokens, **kw)  # [B, T, D]
        project = model.lm_head
    else:
        out, project = model(tokens, **kw), None  # [B, T, V]
    if index is None:
        return None
    out = out.gather(1, index[..., None].expand(-1, -1, out.size(-1)))
    return project(out) if project is not None else out


@dataclass(frozen=True)
class Window:
    """Model input seq[start:end]; its last n_scored predictions (targets seq[end-n_scored+1:end+1])."""

    start: int
    end: int
    n_scored: int


def rolling_windows(n_tokens: int, window: int, stride: int) -> list[Window]:
    """Windows over a sequence of n_tokens; token j (j >= 1) is predicted from tokens < j exactly once."""
    if window < 1 or not 1 <= stride <= window:
        raise ValueError(f"need window >= 1 and 1 <= stride <= window, got window={window} stride={stride}")
    last = n_tokens - 1  # index of the last target
    if last < 1:
        return []
    end = min(window, last)
    out = [Window(0, end, end)]
    while end < last:
        new_end = min(end + stride, last)
        out.append(Window(max(0, new_end - window), new_end, new_end - end))
        end = new_end
    return out


def rolling_nll(
    model: Any,
    seq: np.ndarray | list[int],
    window: int,
    stride: int,
    batch_size: int = 8,
    device: Any = "cpu",
) -> tuple[float, int]:
    """(sum of NLL in nats, number of scored tokens) of seq[1:] given its left context."""
    seq = np.asarray(seq, dtype=np.int64)
    windows = rolling_windows(len(seq), window, stride)
    by_len: dict[int, list[Window]] = {}
    for w in windows:  # all windows but the first share one length: batch them without padding
        by_len.setdefault(w.end - w.start, []).append(w)
    total, count = 0.0, 0
    was_training = getattr(model, "training", False)
    if hasattr(model, "eval"):
        model.eval()
    progress = Progress(len(windows), "perplexity", "window")
    try:
        with torch.no_grad():
            for length, group in by_len.items():
                for i in range(0, len(group), batch_size):
                    batch = group[i : i + batch_size]
                    n = max(w.n_scored for w in batch)
                    tokens = torch.from_numpy(np.stack([seq[w.start : w.end] for w in batch])).to(device)
                    # Score the last n positions of every row; a row scoring fewer masks the rest out.
                    index = torch.arange(length - n, length, device=device).expand(len(batch), n)
                    targets = torch.from_numpy(np.stack([seq[w.end - n + 1 : w.end + 1] for w in batch])).to(
                        device
                    )
                    logp = torch.log_softmax(logits_checked(model, tokens, index).float(), dim=-1)
                    nll = -logp.gather(-1, targets[..., None])[..., 0]  # [B, n]
                    keep = (
                        torch.arange(n, device=device)[None, :]
                        >= torch.tensor([n - w.n_scored for w in batch], device=device)[:, None]
                    )
                    total += nll[keep].double().sum().item()
                    count += int(keep.sum())
                    progress.update(len(batch))
    finally:
        progress.close()
        if hasattr(model, "train"):
            model.train(was_training)
    return total, count


def _summary(nll: float, n_tokens: int, text: str, window: int, stride: int) -> dict[str, Any]:
    n_bytes, n_words = len(text.encode("utf-8")), len(text.split())
    return {
        "nll": nll,
        "tokens": n_tokens,
        "ppl": math.exp(nll / n_tokens) if n_tokens else float("nan"),
        "bytes": n_bytes,
        "bpb": nll / math.log(2) / n_bytes if n_bytes else float("nan"),
        "words": n_words,
        "word_ppl": math.exp(nll / n_words) if n_words else float("nan"),
        "window": window,
        "stride": stride,
    }


def _fit_window(model: Any, window: int, stride: int) -> tuple[int, int]:
    max_len = getattr(getattr(model, "config", None), "max_seq_len", window)
    window = min(window, max_len)  # a window longer than the model's context cannot run
    return window, min(stride, window)


def text_perplexity(
    model: Any,
    tokenizer: Any,
    text: str,
    window: int = 256,
    stride: int = 128,
    *,
    prepend_bos: bool = True,
    batch_size: int = 8,
    device: Any = "cpu",
) -> dict[str, Any]:
    """Perplexity of a text; with prepend_bos every token is scored (the first one given <|bos|>)."""
    window, stride = _fit_window(model, window, stride)
    ids = tokenizer.encode(text)
    seq = ([tokenizer.bos_id] if prepend_bos else []) + ids
    nll, n = rolling_nll(model, seq, window, stride, batch_size, device)
    # Without BOS the first token is context only, so its bytes are not in the denominator either.
    scored_text = text if prepend_bos else tokenizer.decode(ids[1:])
    return _summary(nll, n, scored_text, window, stride)


def text_file_perplexity(model: Any, tokenizer: Any, path: Path, **kw: Any) -> dict[str, Any]:
    return {
        **text_perplexity(model, tokenizer, Path(path).read_text(encoding="utf-8"), **kw),
        "source": str(path),
    }


def shard_perplexity(
    model: Any,
    tokenizer: Any,
    path: Path,
    window: int = 256,
    stride: int = 128,
    max_tokens: int = 50000,
    *,
    batch_size: int = 8,
    device: Any = "cpu",
) -> dict[str, Any]:
    """Perplexity of the first max_tokens of a token shard, read as one stream (documents already carry
    their <|bos|>/<|eos|> markers, so the first token is context and every later one is scored).

    Bytes and words come from decoding the scored tokens without special tokens: those carry NLL but no
    text, which slightly raises bpb against text_perplexity of the same documents.
    """
    window, stride = _fit_window(model, window, stride)
    tokens = read_shard(path)
    tokens = tokens[:max_tokens] if max_tokens > 0 else tokens
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    if vocab is not None and len(tokens) and int(tokens.max()) >= vocab:
        raise ValueError(f"{path}: token id {int(tokens.max())} >= model vocab_size {vocab}")
    nll, n = rolling_nll(model, tokens, window, stride, batch_size, device)
    text = tokenizer.decode([int(t) for t in tokens[1:]])
    return {**_summary(nll, n, text, window, stride), "source": str(path)}


def documents_perplexity(
    model: Any,
    tokenizer: Any,
    documents: list[str],
    window: int = 256,
    stride: int = 128,
    max_tokens: int = 50000,
    *,
    source: str = "",
    batch_size: int = 8,
    device: Any = "cpu",
) -> dict[str, Any]:
    """shard_perplexity for a model with a tokenizer of its own (an open model): the documents framed
    as encode frames them ([bos] + ids + [eos]; no bos when the tokenizer has none), back to back, cut to
    max_tokens, scored the same way. bpb is comparable to shard_perplexity's on the same documents."""
    window, stride = _fit_window(model, window, stride)
    bos = [tokenizer.bos_id] if tokenizer.specials.bos else []
    tokens: list[int] = []
    for doc in documents:
        tokens += [*bos, *tokenizer.encode(doc), tokenizer.eos_id]
        if 0 < max_tokens <= len(tokens):
            tokens = tokens[:max_tokens]
            break
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    if vocab is not None and tokens and max(tokens) >= vocab:
        raise ValueError(f"{source}: token id {max(tokens)} >= model vocab_size {vocab}")
    nll, n = rolling_nll(model, np.asarray(tokens, dtype=np.int64), window, stride, batch_size, device)
    text = tokenizer.decode(tokens[1:])
    return {**_summary(nll, n, text, window, stride), "source": source}
