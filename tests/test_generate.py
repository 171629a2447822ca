"""Batched generation over prompts of different lengths (models.generate.generate_batch): left padding,
per-row RoPE positions and the pad mask through the KV cache give the same tokens as one prompt at a time."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from models.generate import generate, generate_batch, left_pad
from models.llama import Transformer
from tests.test_models import random_tokens, tiny_model

LENGTHS = [5, 17, 1, 30, 9, 12, 23]  # 7 prompts, all different, the longest not first


def sharp_model() -> Transformer:
    """tiny_model with its matrices (the embedding aside) scaled 8x. At init scale the residual stream is
    nearly the current token's embedding, greedy decoding repeats one token whatever the context, and a
    broken pad mask would go unseen; scaled, each row's tokens depend on what it attends to."""
    model = tiny_model()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2 and not name.startswith("embed"):
                p.mul_(8.0)
    return model


def prompts(lengths: list[int] = LENGTHS) -> list[list[int]]:
    return [random_tokens(1, n, seed=10 + i)[0].tolist() for i, n in enumerate(lengths)]


def one_at_a_time(model: Transformer, ps: list[list[int]], stop: list[int], **kw: Any) -> list[list[int]]:
    """The reference: `generate` on each prompt alone, cut after its first stop token."""
    rows = []
    for p in ps:
        out = generate(model, torch.tensor([p]), stop_tokens=stop, pad_id=-1, **kw)[0, len(p) :].tolist()
        row = []
        for t in out:
            if t == -1:
                break
            row.append(t)
            if t in stop:
                break
        rows.append(row)
    return rows


def test_padded_prefill_and_decode_logits_match_each_prompt_alone() -> None:
    model = sharp_model()
    ps = prompts()
    tokens, mask = left_pad(ps, pad_id=3)  # [7, 30]
    T = tokens.size(1)
    nxt = random_tokens(len(ps), 4, seed=99)  # [7, 4], fed one step at a time after the prefill
    with torch.no_grad():
        padded = model(tokens, attention_mask=mask)  # [7, 30, V], no cache
        cache = model.new_cache(len(ps), max_len=T + 4)
        cached = [model(tokens, cache=cache, attention_mask=mask)]
        for t in range(4):
            mask = torch.cat([mask, torch.ones(len(ps), 1, dtype=torch.bool)], dim=1)
            cached.append(model(nxt[:, t : t + 1], cache=cache, attention_mask=mask))
        steps = torch.cat(cached, dim=1)  # [7, 34, V]
        unmasked = model(tokens)  # the same padded batch without the mask
        for i, p in enumerate(ps):
            alone = model(torch.tensor([p + nxt[i].tolist()]))[0]  # [len + 4, V]
            n = len(p)
            torch.testing.assert_close(padded[i, T - n :], alone[:n], atol=1e-5, rtol=0)
            torch.testing.assert_close(steps[i, T - n :], alone, atol=1e-5, rtol=0)
    # The mask is what makes it work: the shortest row, unmasked, sees 29 pad tokens and drifts.
    assert (unmasked[2, -1] - padded[2, -1]).abs().max() > 1e-3


@pytest.mark.parametrize("use_cache", [True, False])
def test_greedy_batch_equals_one_at_a_time_with_early_stops(use_cache: bool) -> None:
    model = sharp_model()
    ps = prompts()
    free = one_at_a_time(model, ps, [], max_new_tokens=20, temperature=0.0)
    stop = free[0][2]  # row 0 emits this as its 3rd new token
    expected = one_at_a_time(model, ps, [stop], max_new_tokens=20, temperature=0.0)
    lengths = [len(r) for r in expected]
    assert min(lengths) < 20 and max(lengths) == 20  # some rows stop early, some run to the end

    out = generate_batch(
        model, ps, max_new_tokens=20, temperature=0.0, stop_tokens=[stop], pad_id=-1, use_cache=use_cache
    )
    assert out.rows() == expected
    assert out.lengths.tolist() == lengths
    assert out.tokens.shape == (len(ps), 20)
    for row, n in zip(out.tokens, lengths, strict=True):
        assert (row[n:] == -1).all()  # finished rows carry pad_id after their stop token

    # Without stop tokens every row runs max_new_tokens, and still equals the unpadded reference.
    assert generate_batch(model, ps, max_new_tokens=20, temperature=0.0, use_cache=use_cache).rows() == free


def test_sampled_batch_with_a_generator_per_row_equals_one_at_a_time() -> None:
    model = sharp_model()
    ps = prompts()
    kw: dict[str, Any] = dict(max_new_tokens=15, temperature=1.0, top_k=20, top_p=0.9)
    gens = [torch.Generator().manual_seed(100 + i) for i in range(len(ps))]
    out = generate_batch(model, ps, generator=gens, **kw)
    expected = [
        generate(model, torch.tensor([p]), generator=torch.Generator().manual_seed(100 + i), **kw)[
            0, len(p) :
        ]
        for i, p in enumerate(ps)
    ]
    assert out.rows() == [e.tolist() for e in expected]
    # One generator for the whole batch: the same seed gives the same batch, another seed another one.
    a = generate_batch(model, ps, generator=torch.Generator().manual_seed(7), **kw).rows()
    b = generate_batch(model, ps, generator=torch.Generator().manual_seed(7), **kw).rows()
    c = generate_batch(model, ps, generator=torch.Generator().manual_seed(8), **kw).rows()
    assert a == b and a != c


def test_batch_shares_the_context_of_its_longest_prompt() -> None:
    model = tiny_model()  # max_seq_len 64
    out = generate_batch(model, prompts([60, 3]), max_new_tokens=50, temperature=0.0)
    assert out.lengths.tolist() == [4, 4]


@pytest.mark.parametrize(
    "ps, kw, message",
    [
        ([], {}, "prompts is empty"),
        ([[1, 2], []], {}, "prompt 1 is empty"),
        ([[1, 2]], {"max_new_tokens": 0}, "max_new_tokens must be an integer >= 1, got 0"),
        (
            [[1, 2], [5] * 64],
            {},
            "prompt 1 has 64 tokens, no room for a new one in the model context max_seq_len=64",
        ),
        ([[1, 2], [5, 128]], {}, "prompt 1 holds token id 128, outside vocab_size=128"),
        ([[1, 2], [-1]], {}, "prompt 1 holds token id -1"),
        ([[1], [2]], {"generator": [torch.Generator()]}, "1 generators for 2 prompts"),
        ([[1], [2]], {"temperature": -1.0}, "temperature must be >= 0, got -1.0"),
        ([[1], [2]], {"top_p": 1.5}, r"top_p must be in \(0, 1\], got 1.5"),
    ],
)
def test_bad_input_is_refused_naming_it(ps: list[list[int]], kw: dict[str, Any], message: str) -> None:
    kw = {"max_new_tokens": 4, **kw}
    with pytest.raises(ValueError, match=message):
        generate_batch(tiny_model(), ps, **kw)


def test_attention_mask_of_the_wrong_shape_is_refused() -> None:
    model = tiny_model()
    tokens, mask = left_pad(prompts([3, 5]), pad_id=0)
    cache = model.new_cache(2, max_len=10)
    with pytest.raises(ValueError, match=r"attention_mask shape \(2, 4\) != \(batch, cached \+ new tokens\)"):
        model(tokens, cache=cache, attention_mask=mask[:, 1:])
    with pytest.raises(ValueError, match="doc_ids and attention_mask cannot be combined"):
        model(tokens, doc_ids=torch.zeros_like(tokens), attention_mask=mask)
