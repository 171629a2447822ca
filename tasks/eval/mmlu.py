"""MMLU under the lm-evaluation-harness protocol: batched log-likelihood scoring of the prompts that
tasks/eval/mmlu_prompt.py renders from the protocol (PROTOCOL, data; the items: tasks/eval/mmlu_data.py).

Speed without changing a single log-likelihood (tests/test_mmlu.py checks parity against a direct
`transformers` implementation of the harness prompt):
- when each of " A".." D" is one token, one forward of the context gives all four scores (the harness
  runs four forwards per item);
- the description + k dev examples are the same for every item of a subject, so their keys/values are
  computed once per subject into a KV cache and shared by every batch of that subject;
- rows are sorted by length so batches carry little padding, and the vocabulary projection runs only at
  the positions that are scored;
- the prompts do not depend on the weights: encode_items encodes them (and runs the "reduce" search) once,
  and tasks/evaluate.py hands the same Requests to every model of one tokenizer.

Prompts longer than the context: fewshot_policy "truncate" (the default, the harness's behaviour) cuts the
k-shot prompt from the left exactly as HFLM._loglikelihood_tokens does; "reduce" first drops few-shot
examples (the last ones first, down to 0) until the prompt fits, and truncates only a 0-shot prompt that
still does not fit. Either way the shots used and the tokens cut are recorded per item.
Checked against lm-eval 0.4.13 itself (benchmarks/lm_eval_parity.py): equal per-item log-likelihoods
(max abs diff 2e-6) and predictions, with and without truncation, single- and multi-token choices.
"""

from __future__ import annotations

import copy
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from tasks.core.progress import Progress
from tasks.eval.mmlu_data import CATEGORIES, MMLUDataError, MMLUItem
from tasks.eval.mmlu_prompt import PROTOCOL, check_fewshot_policy, continuations, harness_prompt


@dataclass
class _Row:
    """One model input; targets are (choice, logit position of its first token, its token ids)."""

    item: int
    tokens: list[int]
    targets: list[tuple[int, int, list[int]]]
    prefix_len: int = 0  # leading tokens whose keys/values come from the subject's shared cache


def _rows_for_item(i: int, ctx: list[int], conts: list[list[int]], max_len: int) -> tuple[list[_Row], int]:
    """The model inputs of one item and how many tokens left truncation cut (the most over its choices).

    Left truncation is the harness's (lm_eval/models/huggingface.py, HFLM._loglikelihood_tokens, causal
    backend): ``inp = (context_enc + continuation_enc)[-(self.max_length + 1):][:-1]``, i.e. keep the last
    max_len + 1 tokens of context + continuation, BOS included, and feed all but the last.
    """
    if all(len(c) == 1 for c in conts):
        # Logits after the last context token give every single-token continuation at once; this is the
        # harness's input for each of them, since (ctx + [c])[-(max_len + 1):][:-1] == ctx[-max_len:].
        tokens = ctx[-max_len:]
        return [_Row(i, tokens, [(c, len(tokens) - 1, cont) for c, cont in enumerate(conts)])], len(
            ctx
        ) - len(tokens)
    rows, cut = [], 0
    for c, cont in enumerate(conts):
        whole = ctx + cont
        cut = max(cut, len(whole) - (max_len + 1))
        tokens = whole[-(max_len + 1) :][:-1]
        if len(tokens) < len(cont):
            raise ValueError(f"continuation of {len(cont)} tokens does not fit max_seq_len={max_len}")
        rows.append(_Row(i, tokens, [(c, len(tokens) - len(cont), cont)]))
    return rows, cut


def _fits(ctx: list[int], conts: list[list[int]], max_len: int) -> bool:
    return len(ctx) + max(len(c) for c in conts) <= max_len + 1


def _split_trailing_space(ctx: str) -> tuple[str, str]:
    body = ctx.rstrip()
    return body, ctx[len(body) :]


def _encode(tokenizer: Any, texts: list[str]) -> list[list[int]]:
    if hasattr(tokenizer, "encode_batch"):
        return list(tokenizer.encode_batch(texts))
    return [tokenizer.encode(t) for t in texts]


def encode_requests(
    tokenizer: Any,
    contexts: Sequence[str],
    choices: Sequence[str],
    context_ids: Sequence[list[int]] | None = None,
) -> list[tuple[list[int], list[list[int]]]]:
    """(context ids, continuation ids per choice) for every context, as the harness's
    TemplateLM._encode_pair does for causal models (lm_eval/api/model.py): trailing whitespace of the
    context moves to the continuation, then continuation_enc = encode(context + continuation)
    [len(encode(context)):]. With a byte-level BPE whose pre-tokenizer splits before " A", this equals
    encode(" A"); it is computed, not assumed. context_ids: encode(context without its trailing
    whitespace) when the caller already has it (_context_ids)."""
    pairs = [_split_trailing_space(ctx) for ctx in contexts]
    ctx_ids = list(context_ids) if context_ids is not None else _context_ids(tokenizer, contexts)
    wholes = _encode(tokenizer, [c + sp + choice for c, sp in pairs for choice in choices])
    out = []
    for i, ids in enumerate(ctx_ids):
        conts = [wholes[i * len(choices) + c][len(ids) :] for c in range(len(choices))]
        if any(not cont for cont in conts):
            raise ValueError(f"a choice of {list(choices)} encodes to no tokens after context {i}")
        out.append((ids, conts))
    return out


def _context_ids(tokenizer: Any, contexts: Sequence[str]) -> list[list[int]]:
    return _encode(tokenizer, [_split_trailing_space(ctx)[0] for ctx in contexts])


@dataclass
class Requests:
    """What score_items feeds the model: per item (bos + context ids, continuation ids per choice) and
    the shots used. They depend on the tokenizer, bos, k_shot, the policy and max_len, never on the
    weights, so one encoding serves every model that shares those (tasks/evaluate.py)."""

    pairs: list[tuple[list[int], list[list[int]]]]
    k_used: list[int]
    k_shot: int
    max_len: int
    fewshot_policy: str
    prepend_bos: bool


def encode_items(
    tokenizer: Any,
    items: Sequence[MMLUItem],
    k_shot: int,
    shots: Mapping[str, Sequence[MMLUItem]],
    *,
    max_len: int,
    prepend_bos: bool = True,
    fewshot_policy: str = "truncate",
) -> Requests:
    """Every item's prompt, encoded: k shots for all ("truncate"); under "reduce", the largest k' <= k
    whose prompt fits max_len (checked from k down, as the policy defines it)."""
    check_fewshot_policy(fewshot_policy)
    bos = [tokenizer.bos_id] if prepend_bos else []
    choices = continuations(PROTOCOL)
    k_used = [k_shot] * len(items)
    pairs: list[Any] = [None] * len(items)
    pending = list(range(len(items)))
    for k in range(k_shot, -1, -1):
        contexts = [harness_prompt(items[i], list(shots.get(items[i].subject, ()))[:k])[0] for i in pending]
        ids = _context_ids(tokenizer, contexts)
        still, fit_check = [], fewshot_policy == "reduce" and k > 0
        if fit_check:
            # Every continuation has >= 1 token, so a context that alone fills max_len cannot fit: skip the
            # four encodes of context + choice it would need (most of the tokenizer's work at a short
            # context, where most items go down several k).
            over = {j for j, x in enumerate(ids) if len(bos) + len(x) > max_len}
            still = [pending[j] for j in sorted(over)]
            keep = [j for j in range(len(pending)) if j not in over]
            pending, contexts, ids = (
                [pending[j] for j in keep],
                [contexts[j] for j in keep],
                [ids[j] for j in keep],
            )
        for i, (ctx, conts) in zip(pending, encode_requests(tokenizer, contexts, choices, ids), strict=True):
            pairs[i], k_used[i] = (bos + ctx, conts), k
            if fit_check and not _fits(bos + ctx, conts, max_len):
                still.append(i)
        pending = sorted(still)
        if not pending:
            break
    return Requests(pairs, k_used, k_shot, max_len, fewshot_policy, prepend_bos)


def _common_prefix(rows: list[_Row]) -> int:
    first = rows[0].tokens
    n = min(min(len(r.tokens) for r in rows), min(t[1] for r in rows for t in r.targets))
    for r in rows[1:]:
        k = 0
        while k < n and r.tokens[k] == first[k]:
            k += 1
        n = k
    return n


def _rows_of(cache: Any, rows: int, pos: int) -> Any:
    """The first `rows` batch rows of `cache`, `pos` positions filled: views, so the model's writes land
    in `cache`. One cache then serves every batch of a call (allocating and zeroing a batch-sized cache
    per batch cost more than the copies it needs)."""
    view = copy.copy(cache)
    view.k, view.v = [k[:rows] for k in cache.k], [v[:rows] for v in cache.v]
    view.batch_size, view.pos = rows, pos
    return view


def _fill_prefix(model: Any, cache: Any, prefix: list[int], rows: int, device: Any) -> None:
    """Keys/values of `prefix` at positions [0, len(prefix)) of the first `rows` rows of `cache`: one
    forward of batch 1, copied to the other rows."""
    import torch

    from tasks.eval.perplexity import logits_at

    p = len(prefix)
    logits_at(model, torch.tensor([prefix], device=device), None, _rows_of(cache, 1, 0))
    for t in cache.k + cache.v:  # [B, K, max_len, Hd]
        t[1:rows, :, :p] = t[:1, :, :p]


MIN_SHARED_PREFIX = 16  # below this a shared cache saves less than the copy costs


def score_items(
    model: Any,
    tokenizer: Any,
    items: Sequence[MMLUItem],
    k_shot: int,
    batch_size: int = 16,
    device: Any = "cpu",
    *,
    shots: Mapping[str, Sequence[MMLUItem]] | None = None,
    prepend_bos: bool = True,
    max_seq_len: int | None = None,
    fewshot_policy: str = "truncate",
    requests: Requests | None = None,
) -> dict[str, Any]:
    """Log-likelihood of " A".." D" for every item; returns loglikelihoods, predictions and accuracy, and
    per item the number of shots used (`k_used`) and of context tokens cut by left truncation
    (`truncated_tokens`).

    `model(tokens [B,T]) -> logits [B,T,V]`, already on `device`. A model with `new_cache` (our
    Transformer) shares the few-shot prefix through its KV cache; any other callable is run on full rows.
    requests: encode_items' output for these items and arguments (encoded here when None).
    """
    import torch

    from tasks.eval.perplexity import logits_checked

    check_fewshot_policy(fewshot_policy)
    shots = shots or {}
    if k_shot > 0 and any(len(shots.get(it.subject, ())) < k_shot for it in items):
        missing = sorted({it.subject for it in items if len(shots.get(it.subject, ())) < k_shot})
        raise MMLUDataError(f"k_shot={k_shot} but fewer dev examples were given for {missing[:5]}")
    max_len = max_seq_len or model.config.max_seq_len
    choices = continuations(PROTOCOL)

    if requests is None:
        requests = encode_items(
            tokenizer,
            items,
            k_shot,
            shots,
            max_len=max_len,
            prepend_bos=prepend_bos,
            fewshot_policy=fewshot_policy,
        )
    made_for = (requests.k_shot, requests.max_len, requests.fewshot_policy, requests.prepend_bos)
    if made_for != (k_shot, max_len, fewshot_policy, prepend_bos) or len(requests.pairs) != len(items):
        raise ValueError(
            f"requests were encoded for (k_shot, max_len, fewshot_policy, prepend_bos) = {made_for} and "
            f"{len(requests.pairs)} items, not {(k_shot, max_len, fewshot_policy, prepend_bos)} and {len(items)}"
        )
    k_used = list(requests.k_used)

    groups: dict[Any, list[_Row]] = defaultdict(list)
    cut_tokens = []
    for i, (it, (ctx, conts)) in enumerate(zip(items, requests.pairs, strict=True)):
        rows, cut = _rows_for_item(i, ctx, conts, max_len)
        cut_tokens.append(cut)
        # A truncated context lost its prefix, so it cannot share the subject's cache; items of one subject
        # share the prefix only with items that use the same number of shots.
        groups[None if cut else (it.subject, k_used[i])] += rows
    use_cache = hasattr(model, "new_cache")
    for key, rows in groups.items():
        shared = _common_prefix(rows) if key is not None and use_cache and len(rows) > 1 else 0
        for r in rows:
            r.prefix_len = shared if shared >= MIN_SHARED_PREFIX else 0

    lls = [[0.0] * len(choices) for _ in items]
    pad = getattr(tokenizer, "pad_id", 0)
    was_training = getattr(model, "training", False)
    if hasattr(model, "eval"):
        model.eval()
    progress = Progress(sum(len(rows) for rows in groups.values()), "MMLU", "row")  # one row per choice set
    # One KV cache for the whole call, batch_size x the longest row (a row is never longer than max_len).
    cache = None
    if use_cache and any(r.prefix_len for rows in groups.values() for r in rows):
        longest = max(len(r.tokens) for rows in groups.values() for r in rows)
        cache = model.new_cache(batch_size, max_len=longest, device=device)
    try:
        with torch.no_grad():
            for rows in groups.values():
                p = rows[0].prefix_len
                rows = sorted(rows, key=lambda r: -len(r.tokens))  # longest first: memory peaks early
                if p:
                    _fill_prefix(model, cache, rows[0].tokens[:p], min(batch_size, len(rows)), device)
                for start in range(0, len(rows), batch_size):
                    batch = rows[start : start + batch_size]
                    width = len(batch[0].tokens) - p
                    tokens = torch.full((len(batch), width), pad, dtype=torch.long)
                    positions = []
                    for b, r in enumerate(batch):
                        tail = r.tokens[p:]
                        tokens[b, : len(tail)] = torch.tensor(tail)
                        pos = [t[1] - p + j for t in r.targets for j in range(len(t[2]))]
                        positions.append(pos)
                    n = max(len(x) for x in positions)
                    index = torch.tensor([x + [x[-1]] * (n - len(x)) for x in positions], device=device)
                    # Every row of the shared cache holds the prefix at [0, p); the forward writes the
                    # batch's own tokens after it, so a later batch overwrites what an earlier one left.
                    view = _rows_of(cache, len(batch), p) if p else None
                    targets = [[t for tr in r.targets for t in tr[2]] for r in batch]
                    target = torch.tensor([x + [0] * (n - len(x)) for x in targets], device=device)
                    logp = torch.log_softmax(
                        logits_checked(model, tokens.to(device), index, view).float(), -1
                    )
                    picked = logp.gather(-1, target[..., None])[..., 0].cpu().tolist()  # one sync per batch
                    for b, r in enumerate(batch):
                        j = 0
                        for choice, _, ids in r.targets:
                            lls[r.item][choice] = sum(picked[b][j : j + len(ids)])
                            j += len(ids)
                    progress.update(len(batch))
    finally:
        progress.close()
        if hasattr(model, "train"):
            model.train(was_training)
    return {
        **accuracy(items, lls),
        "n_truncated": sum(c > 0 for c in cut_tokens),
        "n_reduced": sum(k < k_shot for k in k_used),
        "k_used": k_used,
        "truncated_tokens": cut_tokens,
        "mean_k": sum(k_used) / len(k_used) if k_used else float("nan"),
        "fewshot_policy": fewshot_policy,
        "max_seq_len": max_len,
    }


def _argmax_first(values: Sequence[float]) -> int:
    """Index of the largest value, the first one on ties (as numpy's argmax in the harness)."""
    return max(range(len(values)), key=lambda c: (values[c], -c))


def accuracy(items: Sequence[MMLUItem], loglikelihoods: Sequence[Sequence[float]]) -> dict[str, Any]:
    """Predictions (argmax, the first on ties as numpy's argmax in the harness) and accuracies."""
    preds = [_argmax_first(ll) for ll in loglikelihoods]
    by_subject: dict[str, list[int]] = defaultdict(list)
    by_category: dict[str, list[int]] = defaultdict(list)
    for it, pred in zip(items, preds, strict=True):
        hit = int(pred == it.answer)
        by_subject[it.subject].append(hit)
        by_category[CATEGORIES.get(it.subject, "uncategorized")].append(hit)
    hits = [h for v in by_subject.values() for h in v]
    return {
        "loglikelihoods": [list(map(float, ll)) for ll in loglikelihoods],
        "predictions": preds,
        "answers": [it.answer for it in items],
        "n_items": len(hits),
        "acc": sum(hits) / len(hits) if hits else float("nan"),
        "per_subject": {s: {"acc": sum(v) / len(v), "n": len(v)} for s, v in sorted(by_subject.items())},
        "per_category": {c: {"acc": sum(v) / len(v), "n": len(v)} for c, v in sorted(by_category.items())},
    }
