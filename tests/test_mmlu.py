"""MMLU scoring: parity with a transformers reference, sanity models, loaders, the few-shot policy."""

from __future__ import annotations

import csv
import dataclasses
import json
import random
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from tasks.eval import mmlu, mmlu_data, mmlu_prompt
from tests.helpers.evalhelpers import MMLU_DIR, SUBJECTS, hf_twin, needs_mmlu, tiny_model, train_tokenizer


def reference_prompt(item: mmlu_data.MMLUItem, shots: list[mmlu_data.MMLUItem]) -> str:
    """The harness prompt, written out independently of tasks.mmlu."""

    def block(it):
        a, b, c, d = it.choices
        return f"{it.question.strip()}\nA. {a}\nB. {b}\nC. {c}\nD. {d}\nAnswer:"

    subject = item.subject.replace("_", " ")
    text = f"The following are multiple choice questions (with answers) about {subject}.\n\n"
    text += "".join(f"{block(s)} {'ABCD'[s.answer]}\n\n" for s in shots)
    return text + block(item)


def reference_loglikelihoods(hf, tok, item, shots, max_len) -> list[float]:
    """One item at a time, one full forward per choice, harness left truncation."""
    ctx = [tok.bos_id] + tok.encode(reference_prompt(item, shots))
    out = []
    for letter in "ABCD":
        cont = tok.encode(" " + letter)
        whole = (ctx + cont)[-(max_len + 1) :]
        inp = whole[:-1]
        with torch.no_grad():
            logp = hf(torch.tensor([inp])).logits[0].float().log_softmax(-1)
        first = len(inp) - len(cont)
        out.append(sum(logp[first + k, t].item() for k, t in enumerate(cont)))
    return out


def check_parity(model, hf, tok, data, max_len, monkeypatch) -> dict:
    expanded = []  # the shared few-shot prefix cache must really be used, not silently bypassed
    real = mmlu._fill_prefix
    monkeypatch.setattr(mmlu, "_fill_prefix", lambda *a: expanded.append(len(a[2])) or real(*a))
    ours = mmlu.score_items(model, tok, data.items, data.k_shot, 4, "cpu", shots=data.shots)
    assert expanded and min(expanded) >= mmlu.MIN_SHARED_PREFIX
    ref = [reference_loglikelihoods(hf, tok, it, data.shots[it.subject], max_len) for it in data.items]
    diff = np.abs(np.array(ours["loglikelihoods"]) - np.array(ref)).max()
    assert diff < 1e-4, diff
    assert ours["predictions"] == [int(np.argmax(r)) for r in ref]
    assert ours["acc"] == mmlu.accuracy(data.items, ref)["acc"]
    return ours


# ------------------------------------------------------------------------------------------- parity
@needs_mmlu
def test_parity_single_token_choices_with_shared_prefix(bpe, tmp_path, monkeypatch):
    data = mmlu_data.load_mmlu(str(MMLU_DIR), "val", SUBJECTS, k_shot=5, max_items_per_subject=10)
    assert all(len(bpe.encode(c)) == 1 for c in mmlu_prompt.PROTOCOL["choices"])  # the one-forward path
    it = data.items[0]
    assert mmlu_prompt.harness_prompt(it, data.shots[it.subject])[0] == reference_prompt(
        it, data.shots[it.subject]
    )
    model = tiny_model(1024, 2048)
    res = check_parity(model, hf_twin(model, bpe, tmp_path / "hf"), bpe, data, 2048, monkeypatch)
    assert res["n_truncated"] == 0 and res["n_items"] == len(data.items) == 30
    assert set(res["per_subject"]) == set(SUBJECTS)
    assert res["per_category"]["stem"]["n"] == 20 and res["per_category"]["humanities"]["n"] == 10


@needs_mmlu
def test_parity_multi_token_choices_with_truncation(tmp_path, monkeypatch):
    tok = train_tokenizer(tmp_path / "bytes.json", 263)  # bytes only: " A" is two tokens
    assert len(tok.encode(" A")) == 2
    data = mmlu_data.load_mmlu(str(MMLU_DIR), "val", SUBJECTS[:2], k_shot=1, max_items_per_subject=6)
    model = tiny_model(320, 400, seed=1)
    res = check_parity(model, hf_twin(model, tok, tmp_path / "hf"), tok, data, 400, monkeypatch)
    assert 0 < res["n_truncated"] < res["n_items"]  # both the cached and the truncated route ran


# ------------------------------------------------------------------------------------------- sanity
class LetterModel(nn.Module):
    """Stand-in LM (no KV cache): at every position, prefers the letter that `pick(text)` returns."""

    def __init__(self, tok, pick, vocab=1024, max_len=4096):
        super().__init__()
        self.tok, self.pick = tok, pick
        self.ids = {c: tok.encode(" " + c)[0] for c in "ABCD"}
        self.config = SimpleNamespace(vocab_size=vocab, max_seq_len=max_len)

    def forward(self, tokens):
        logits = torch.zeros(*tokens.shape, self.config.vocab_size)
        for b, row in enumerate(tokens.tolist()):
            logits[b, :, self.ids[self.pick(self.tok.decode(row))]] = 5.0  # decode drops <|pad|>
        return logits


def shuffled(items, seed):
    rng, out = random.Random(seed), []
    for it in items:
        order = list(range(4))
        rng.shuffle(order)
        choices = tuple(it.choices[i] for i in order)
        out.append(dataclasses.replace(it, choices=choices, answer=order.index(it.answer)))
    return out


@needs_mmlu
def test_always_a_scores_share_of_a_and_oracle_ignores_letter_order(bpe):
    data = mmlu_data.load_mmlu(str(MMLU_DIR), "val", SUBJECTS, k_shot=2, max_items_per_subject=10)
    always_a = LetterModel(bpe, lambda text: "A")
    for items in (data.items, shuffled(data.items, 0)):
        share = sum(it.answer == 0 for it in items) / len(items)
        assert mmlu.score_items(always_a, bpe, items, 2, 8, shots=data.shots)["acc"] == share

    def oracle_for(items):
        truth = {it.question.strip(): it.choices[it.answer] for it in items}

        def pick(text):  # the last target question in the prompt, and the letter its true answer sits at
            q = max(truth, key=text.rfind)
            tail = text[text.rfind(q) :]
            return next(c for c in "ABCD" if f"\n{c}. {truth[q]}\n" in tail)

        return LetterModel(bpe, pick)

    results = []
    for seed, items in enumerate((data.items, shuffled(data.items, 1), shuffled(data.items, 2))):
        res = mmlu.score_items(oracle_for(items), bpe, items, 2, 8, shots=data.shots)
        results.append(res)
        assert res["acc"] == 1.0, seed
    assert results[0]["per_subject"] == results[1]["per_subject"] == results[2]["per_subject"]
    assert results[0]["predictions"] != results[1]["predictions"]  # the letters really moved


def test_categories_cover_the_57_subjects_in_harness_groups():
    assert len(mmlu_data.CATEGORIES) == 57
    counts = {c: list(mmlu_data.CATEGORIES.values()).count(c) for c in set(mmlu_data.CATEGORIES.values())}
    assert counts == {"stem": 19, "humanities": 13, "social_sciences": 12, "other": 13}
    if (MMLU_DIR / "val").is_dir():
        assert mmlu_data.list_subjects(str(MMLU_DIR), "val") == list(mmlu_data.SUBJECTS)


def test_protocol_is_recorded_with_k_split_and_bos():
    p = mmlu_prompt.protocol(5, "test", prepend_bos=False)
    assert (p["k_shot"], p["split"], p["prepend_bos"]) == (5, "test", False)
    assert mmlu_prompt.PROTOCOL["prepend_bos"] is True and p["choices"] == [" A", " B", " C", " D"]
    json.dumps(p)


def test_prompt_is_rendered_from_the_protocol_data():
    shot = mmlu_data.MMLUItem("high_school_physics", "Unit of force?", ("J", "N", "W", "Pa"), 1)
    item = mmlu_data.MMLUItem("high_school_physics", " Unit of power? ", ("J", "N", "W", "Pa"), 2)
    custom = {
        **mmlu_prompt.PROTOCOL,
        "description": "Quiz: {subject}\n",
        "subject_format": {"replace": "_", "by": "-"},
        "example": "Q: {question}{options}\n=>",
        "option": " ({label}) {choice}",
        "labels": ["1", "2", "3", "4"],
        "question_strip": False,
        "target_delimiter": "  ",
        "fewshot_delimiter": "\n--\n",
    }
    context, conts = mmlu_prompt.harness_prompt(item, [shot], custom)
    assert context == (
        "Quiz: high-school-physics\n"
        "Q: Unit of force? (1) J (2) N (3) W (4) Pa\n=>  2\n--\n"
        "Q:  Unit of power?  (1) J (2) N (3) W (4) Pa\n=>"
    )
    assert conts == ["  1", "  2", "  3", "  4"]
    default, _ = mmlu_prompt.harness_prompt(item, [shot])
    assert default == reference_prompt(item, [shot])


# ------------------------------------------------------------------------------------------- loaders
def write_csv(path: Path, rows: list[list[str]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as fh:
        csv.writer(fh).writerows(rows)


ROWS = [["What is 1+1?", "1", "2", "3", "4", "B"], ["Pick C", "a", "b", "c", "d", "C"]]


def test_hf_loader_matches_csv_via_local_parquet(tmp_path):
    import datasets

    for split in ("dev", "val"):
        write_csv(tmp_path / "csv" / split / f"toy_{split}.csv", ROWS)
        datasets.Dataset.from_dict(
            {
                "question": [r[0] for r in ROWS],
                "subject": ["toy"] * 2,
                "choices": [r[1:5] for r in ROWS],
                "answer": ["ABCD".index(r[5]) for r in ROWS],
            }
        ).to_parquet(str(tmp_path / "pq" / f"toy_{split}.parquet"))
    from_csv = mmlu_data.load_mmlu(str(tmp_path / "csv"), "val", ["toy"], k_shot=1)
    from_hf = mmlu_data.load_mmlu(
        "hf:cais/mmlu",
        "val",
        ["toy"],
        k_shot=1,
        hf_path="parquet",
        hf_data_files=str(tmp_path / "pq" / "{subject}_{split}.parquet"),
    )
    strip = [dataclasses.replace(i, where="") for i in from_csv.items]
    assert strip == [dataclasses.replace(i, where="") for i in from_hf.items]
    assert from_csv.data_hash == from_hf.data_hash and from_hf.items[1].answer == 2

    datasets.Dataset.from_dict(
        {"question": ["q"], "choices": [["a", "b", "c", "d"]], "answer": [7]}
    ).to_parquet(str(tmp_path / "pq" / "bad_val.parquet"))
    with pytest.raises(mmlu_data.MMLUDataError, match=r"bad_val\.parquet row 0: answer 7"):
        mmlu_data.load_split(
            "hf:x",
            "bad",
            "val",
            hf_path="parquet",
            hf_data_files=str(tmp_path / "pq/{subject}_{split}.parquet"),
        )


def test_bad_csv_rows_name_file_and_line(tmp_path):
    path = tmp_path / "val" / "toy_val.csv"
    write_csv(path, [["multi\nline question", "a", "b", "c", "d", "A"], ["short", "a", "b", "c", "D"]])
    with pytest.raises(mmlu_data.MMLUDataError, match=rf"{path}:3: expected 6 columns .* got 5"):
        mmlu_data.load_split(str(tmp_path), "toy", "val")
    write_csv(path, ROWS + [["q", "a", "b", "c", "d", "E"]])
    with pytest.raises(mmlu_data.MMLUDataError, match=rf"{path}:3: answer 'E' is not one of A, B, C, D"):
        mmlu_data.load_split(str(tmp_path), "toy", "val")
    with pytest.raises(mmlu_data.MMLUDataError, match=r"subject 'nope' not found: no .*nope_val\.csv.*toy"):
        mmlu_data.load_split(str(tmp_path), "nope", "val")
    path.write_text("")
    with pytest.raises(mmlu_data.MMLUDataError, match=rf"{path}: empty split"):
        mmlu_data.load_split(str(tmp_path), "toy", "val")
    write_csv(path, ROWS)
    with pytest.raises(mmlu_data.MMLUDataError, match=r"dev"):  # k-shot needs the dev file too
        mmlu_data.load_mmlu(str(tmp_path), "val", ["toy"], k_shot=1)


# ------------------------------------------------------------------------------------------- few-shot policy
@needs_mmlu
def test_reduce_policy_uses_the_most_shots_that_fit_and_records_them(bpe):
    """Under "reduce" every item gets the largest k' <= k whose prompt fits (checked here by encoding the
    independent reference prompt), scores equal a direct forward of that prompt, and nothing is truncated
    while a 0-shot prompt fits; under "truncate" the same items are cut from the left, recorded per item."""
    data = mmlu_data.load_mmlu(
        str(MMLU_DIR), "val", ["astronomy", "world_religions"], k_shot=5, max_items_per_subject=6
    )
    max_len = 400
    model = tiny_model(1024, max_len, seed=5)

    def prompt_ids(it, k):
        return [bpe.bos_id] + bpe.encode(reference_prompt(it, data.shots[it.subject][:k]))

    expect_k = [
        max([0] + [k for k in range(6) if len(prompt_ids(it, k)) + 1 <= max_len + 1]) for it in data.items
    ]
    assert (
        min(expect_k) > 0 and max(expect_k) < 5 and len(set(expect_k)) > 1
    )  # the test covers real reductions
    res = mmlu.score_items(model, bpe, data.items, 5, 4, shots=data.shots, fewshot_policy="reduce")
    assert res["k_used"] == expect_k and res["n_reduced"] == len(data.items)
    assert res["truncated_tokens"] == [0] * len(data.items) and res["n_truncated"] == 0
    letters = [bpe.encode(" " + c)[0] for c in "ABCD"]
    for it, k, ll in zip(data.items, expect_k, res["loglikelihoods"], strict=True):
        with torch.no_grad():
            logp = model(torch.tensor([prompt_ids(it, k)]))[0, -1].log_softmax(-1)
        assert np.abs(np.array(ll) - logp[letters].numpy()).max() < 1e-4

    cut = mmlu.score_items(model, bpe, data.items, 5, 4, shots=data.shots, fewshot_policy="truncate")
    assert cut["k_used"] == [5] * len(data.items) and cut["n_reduced"] == 0
    assert cut["truncated_tokens"] == [len(prompt_ids(it, 5)) - max_len for it in data.items]
    assert cut["n_truncated"] == len(data.items)
    ctx, conts = mmlu.encode_requests(bpe, ["x\nAnswer:  "], mmlu_prompt.PROTOCOL["choices"])[0]
    assert ctx == bpe.encode("x\nAnswer:") and conts == [
        bpe.encode("  " + c) for c in mmlu_prompt.PROTOCOL["choices"]
    ]


class NoCache(nn.Module):
    """The same weights without `new_cache`: score_items runs every row in full (the plain path)."""

    def __init__(self, model):
        super().__init__()
        self.model, self.config = model, model.config

    def forward(self, tokens):
        return self.model(tokens)


@needs_mmlu
def test_cached_path_equals_plain_path_and_shared_requests(bpe, monkeypatch):
    """Under "reduce" at a short context (items of one subject split into groups by shots, some 0-shot
    prompts truncated), the prefix-cached, batched path gives the plain full-row path's log-likelihoods
    (float32 tolerance) and the same choices; requests encoded once give the same scores for a second
    model, and requests made for other arguments are refused."""
    data = mmlu_data.load_mmlu(
        str(MMLU_DIR), "val", ["astronomy", "world_religions", "high_school_european_history"], 5, 7
    )
    max_len = 300
    model = tiny_model(1024, max_len, seed=3)
    filled = []
    real = mmlu._fill_prefix
    monkeypatch.setattr(mmlu, "_fill_prefix", lambda *a: filled.append(len(a[2])) or real(*a))
    kw = {"shots": data.shots, "fewshot_policy": "reduce"}
    requests = mmlu.encode_items(bpe, data.items, 5, data.shots, max_len=max_len, fewshot_policy="reduce")
    cached = mmlu.score_items(model, bpe, data.items, 5, 3, requests=requests, **kw)
    assert len(filled) >= 3  # groups really shared a cached prefix
    assert cached["n_truncated"] > 0 and len(set(cached["k_used"])) > 1
    plain = mmlu.score_items(NoCache(model), bpe, data.items, 5, 3, **kw)
    diff = np.abs(np.array(cached["loglikelihoods"]) - np.array(plain["loglikelihoods"])).max()
    assert diff < 1e-5, diff
    assert cached["predictions"] == plain["predictions"] and cached["acc"] == plain["acc"]
    assert (cached["k_used"], cached["truncated_tokens"]) == (plain["k_used"], plain["truncated_tokens"])

    other = tiny_model(1024, max_len, seed=4)
    again = mmlu.score_items(other, bpe, data.items, 5, 3, requests=requests, **kw)
    assert again == mmlu.score_items(other, bpe, data.items, 5, 3, **kw)
    with pytest.raises(ValueError, match="requests were encoded for"):
        mmlu.score_items(other, bpe, data.items, 5, 3, shots=data.shots, requests=requests)
