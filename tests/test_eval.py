"""Evaluation: MMLU parity with a direct transformers implementation of the harness prompt, scoring sanity,
rolling-window perplexity, bad-input errors, and the evaluate stage end to end (tiny models, CPU)."""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import random
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from torch import nn

from models.checkpoint import save_checkpoint
from models.config import ModelConfig
from models.heads import ScalarHeadModel
from models.llama import Transformer
from tasks import chat_data, mmlu, perplexity
from tasks.tokens import ChatTokenizer

MMLU_DIR = Path(__file__).resolve().parents[1] / "data" / "mmlu"  # the vendored copy of shared/mmlu
SUBJECTS = ["abstract_algebra", "anatomy", "world_religions"]
SPECIALS = ["<|pad|>", "<|bos|>", "<|eos|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
needs_mmlu = pytest.mark.skipif(not (MMLU_DIR / "val").is_dir(), reason=f"no MMLU data at {MMLU_DIR}")


def train_tokenizer(path: Path, vocab_size: int) -> ChatTokenizer:
    """Byte-level BPE on the MMLU dev text; vocab_size 263 (alphabet + specials) means no merges at all."""
    from tokenizers import Tokenizer, decoders, pre_tokenizers, trainers
    from tokenizers import models as tok_models

    texts = [p.read_text() for p in sorted((MMLU_DIR / "dev").glob("*.csv"))] or ["Answer: A B C D " * 50]
    tok = Tokenizer(tok_models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIALS,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(texts, trainer)
    path.parent.mkdir(parents=True, exist_ok=True)
    tok.save(str(path))
    return ChatTokenizer.load(path)


@pytest.fixture(scope="module")
def bpe(tmp_path_factory) -> ChatTokenizer:
    return train_tokenizer(tmp_path_factory.mktemp("tok") / "tokenizer.json", 1000)


def tiny_model(vocab: int, max_len: int, seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    model = Transformer(
        ModelConfig(vocab_size=vocab, n_layer=2, n_head=4, n_kv_head=2, d_model=64, max_seq_len=max_len)
    )
    with torch.no_grad():  # sharper than the 0.02 init, so choices do not nearly tie
        model.embed.weight.mul_(20)
    return model.eval()


def hf_twin(model: Transformer, tok: ChatTokenizer, out: Path):
    from transformers import LlamaForCausalLM

    from models.hf import export_hf

    export_hf(model, out, tok.path, bos_id=tok.bos_id, eos_id=tok.eos_id, pad_id=tok.pad_id)
    return LlamaForCausalLM.from_pretrained(out, dtype=torch.float32).eval()


def reference_prompt(item: mmlu.MMLUItem, shots: list[mmlu.MMLUItem]) -> str:
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
    real = mmlu._expand_cache
    monkeypatch.setattr(mmlu, "_expand_cache", lambda *a: expanded.append(a[1].pos) or real(*a))
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
    data = mmlu.load_mmlu(str(MMLU_DIR), "val", SUBJECTS, k_shot=5, max_items_per_subject=10)
    assert all(len(bpe.encode(c)) == 1 for c in mmlu.PROTOCOL["choices"])  # the one-forward path
    it = data.items[0]
    assert mmlu.harness_prompt(it, data.shots[it.subject])[0] == reference_prompt(it, data.shots[it.subject])
    model = tiny_model(1024, 2048)
    res = check_parity(model, hf_twin(model, bpe, tmp_path / "hf"), bpe, data, 2048, monkeypatch)
    assert res["n_truncated"] == 0 and res["n_items"] == len(data.items) == 30
    assert set(res["per_subject"]) == set(SUBJECTS)
    assert res["per_category"]["stem"]["n"] == 20 and res["per_category"]["humanities"]["n"] == 10


@needs_mmlu
def test_parity_multi_token_choices_with_truncation(tmp_path, monkeypatch):
    tok = train_tokenizer(tmp_path / "bytes.json", 263)  # bytes only: " A" is two tokens
    assert len(tok.encode(" A")) == 2
    data = mmlu.load_mmlu(str(MMLU_DIR), "val", SUBJECTS[:2], k_shot=1, max_items_per_subject=6)
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
    data = mmlu.load_mmlu(str(MMLU_DIR), "val", SUBJECTS, k_shot=2, max_items_per_subject=10)
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
    assert len(mmlu.CATEGORIES) == 57
    counts = {c: list(mmlu.CATEGORIES.values()).count(c) for c in set(mmlu.CATEGORIES.values())}
    assert counts == {"stem": 19, "humanities": 13, "social_sciences": 12, "other": 13}
    if (MMLU_DIR / "val").is_dir():
        assert mmlu.list_subjects(str(MMLU_DIR), "val") == list(mmlu.SUBJECTS)


def test_protocol_is_recorded_with_k_split_and_bos():
    p = mmlu.protocol(5, "test", prepend_bos=False)
    assert (p["k_shot"], p["split"], p["prepend_bos"]) == (5, "test", False)
    assert mmlu.PROTOCOL["prepend_bos"] is True and p["choices"] == [" A", " B", " C", " D"]
    json.dumps(p)


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
    from_csv = mmlu.load_mmlu(str(tmp_path / "csv"), "val", ["toy"], k_shot=1)
    from_hf = mmlu.load_mmlu(
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
    with pytest.raises(mmlu.MMLUDataError, match=r"bad_val\.parquet row 0: answer 7"):
        mmlu.load_split(
            "hf:x",
            "bad",
            "val",
            hf_path="parquet",
            hf_data_files=str(tmp_path / "pq/{subject}_{split}.parquet"),
        )


def test_bad_csv_rows_name_file_and_line(tmp_path):
    path = tmp_path / "val" / "toy_val.csv"
    write_csv(path, [["multi\nline question", "a", "b", "c", "d", "A"], ["short", "a", "b", "c", "D"]])
    with pytest.raises(mmlu.MMLUDataError, match=rf"{path}:3: expected 6 columns .* got 5"):
        mmlu.load_split(str(tmp_path), "toy", "val")
    write_csv(path, ROWS + [["q", "a", "b", "c", "d", "E"]])
    with pytest.raises(mmlu.MMLUDataError, match=rf"{path}:3: answer 'E' is not one of A, B, C, D"):
        mmlu.load_split(str(tmp_path), "toy", "val")
    with pytest.raises(mmlu.MMLUDataError, match=r"subject 'nope' not found: no .*nope_val\.csv.*toy"):
        mmlu.load_split(str(tmp_path), "nope", "val")
    path.write_text("")
    with pytest.raises(mmlu.MMLUDataError, match=rf"{path}: empty split"):
        mmlu.load_split(str(tmp_path), "toy", "val")
    write_csv(path, ROWS)
    with pytest.raises(mmlu.MMLUDataError, match=r"dev"):  # k-shot needs the dev file too
        mmlu.load_mmlu(str(tmp_path), "val", ["toy"], k_shot=1)


# ------------------------------------------------------------------------------------------- perplexity
class Uniform(nn.Module):
    def __init__(self, vocab=1024, max_len=64):
        super().__init__()
        self.config = SimpleNamespace(vocab_size=vocab, max_seq_len=max_len)

    def forward(self, tokens):
        return torch.zeros(*tokens.shape, self.config.vocab_size)


def test_rolling_windows_score_every_token_once_with_enough_context():
    for n in range(0, 40):
        for window in range(1, 9):
            for stride in range(1, window + 1):
                seen = []
                for w in perplexity.rolling_windows(n, window, stride):
                    assert 0 < w.end - w.start <= window and 0 < w.n_scored <= w.end - w.start
                    for j in range(w.end - w.n_scored + 1, w.end + 1):
                        assert j - w.start >= min(j, window - stride + 1)  # left context of target j
                        seen.append(j)
                assert seen == list(range(1, n)), (n, window, stride)


def test_uniform_model_perplexity_is_vocab_size(bpe):
    text = (
        (MMLU_DIR / "dev" / "anatomy_dev.csv").read_text() if MMLU_DIR.is_dir() else "some words here " * 40
    )
    res = perplexity.text_perplexity(Uniform(), bpe, text, window=32, stride=16)
    assert res["tokens"] == len(bpe.encode(text))
    assert abs(res["ppl"] / 1024 - 1) < 1e-3
    assert math.isclose(
        res["bpb"], res["tokens"] * math.log(1024) / math.log(2) / len(text.encode()), rel_tol=1e-6
    )
    assert math.isclose(
        res["word_ppl"], math.exp(res["tokens"] * math.log(1024) / len(text.split())), rel_tol=1e-6
    )


def test_rolling_nll_matches_token_by_token_and_shard_reader(bpe, tmp_path):
    model = tiny_model(1024, 64, seed=3)
    seq = [bpe.bos_id] + bpe.encode("def f(x):\n    return x * 2  # doubles the value of x, twice over")[:40]
    window = 8
    brute = 0.0
    for j in range(1, len(seq)):
        ctx = seq[max(0, j - window) : j]
        with torch.no_grad():
            brute -= model(torch.tensor([ctx]))[0, -1].log_softmax(-1)[seq[j]].item()
    nll, n = perplexity.rolling_nll(model, seq, window, stride=1, batch_size=3)
    assert n == len(seq) - 1 and abs(nll - brute) < 1e-3
    full, _ = perplexity.rolling_nll(model, seq, 64, 64)
    halves, n2 = perplexity.rolling_nll(model, seq, 64, 32)
    assert n2 == n and abs(full - halves) < 1e-3  # one window covers it all either way

    np.array(seq, dtype=np.uint16).tofile(tmp_path / "val.bin")
    (tmp_path / "index.json").write_text(
        json.dumps({"dtype": "uint16", "tokenizer_fingerprint": bpe.fingerprint})
    )
    res = perplexity.shard_perplexity(model, bpe, tmp_path / "val.bin", window, 4, max_tokens=20)
    ref, _ = perplexity.rolling_nll(model, seq[:20], window, 4)
    assert res["tokens"] == 19 and abs(res["nll"] - ref) < 1e-4
    assert res["bytes"] == len(bpe.decode(seq[1:20]).encode())


# ------------------------------------------------------------------------------------------- the stage
class Recorder:
    def __init__(self):
        self.metrics, self.artifacts = {}, []

    def log_metrics(self, metrics, step=None):
        self.metrics.update(metrics)

    def log_artifact(self, path, artifact_path=None):
        self.artifacts.append(Path(path).name)


def make_workspace(root: Path, tok: ChatTokenizer, vocab: int = 1024) -> None:
    (root / "data/tokenizer").mkdir(parents=True)
    (root / "data/tokenizer/tokenizer.json").write_bytes(tok.path.read_bytes())
    ids = [tok.bos_id] + tok.encode("The cat sat on the mat. " * 30) + [tok.eos_id]
    (root / "data/tokens").mkdir(parents=True)
    np.array(ids, dtype=np.uint16).tofile(root / "data/tokens/val.bin")
    index = {
        "dtype": "uint16",
        "tokenizer_fingerprint": tok.fingerprint,
        "val_tokens": len(ids),
        "train_tokens": 0,
    }
    (root / "data/tokens/index.json").write_text(json.dumps(index))
    meta = {"tokenizer_fingerprint": tok.fingerprint}
    for i, name in enumerate(("base", "sft", "dpo")):
        m = tiny_model(vocab, 512, seed=10 + i)
        save_checkpoint(root / "data/checkpoints" / name, m, m.config, meta={**meta, "stage": name})
    reward = ScalarHeadModel(tiny_model(vocab, 512))
    save_checkpoint(root / "data/checkpoints/reward", reward, reward.config, meta=meta)
    (root / "data/validated").mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(preference_rows(40)), root / "data/validated/preference.parquet")


def preference_rows(n: int) -> list[dict]:
    words = ["encode", "decode", "parse", "dump", "load", "scan", "quote", "split"]
    return [
        {
            "prompt": f"What does {words[i % 8]} do with item {i}?" + " Explain." * (i % 3),
            "chosen": f"It will {words[i % 8]} item {i}.",
            "rejected": f"zq {i} kk",
        }
        for i in range(n)
    ]


@needs_mmlu
def test_evaluate_stage_writes_scores_summary_table_and_chart(bpe, tmp_path, monkeypatch):
    from tasks import evaluate
    from tasks.config import EvaluateConfig, Params
    from tasks.io import read_json

    make_workspace(tmp_path, bpe)
    monkeypatch.chdir(tmp_path)
    params = Params(
        evaluate=EvaluateConfig(
            mmlu_dir=str(MMLU_DIR),
            subjects=SUBJECTS[:2],
            k_shot=2,
            max_items_per_subject=4,
            ppl_window=32,
            ppl_stride=16,
        )
    )
    params.evaluate.winrate_prompts, params.evaluate.max_new_tokens = 3, 6
    tracker = Recorder()
    summary = evaluate.run(params, tracker)
    assert {k.split("/")[0] for k in summary} == {"base", "sft", "dpo"}  # the reward model is not an LM
    assert {"base/mmlu_acc", "base/ppl", "base/bpb", "sft/mmlu_acc_stem"} <= set(summary)
    # Win rate: the policies only (not base); SFT against itself is exactly a tie on every prompt.
    assert "base/winrate_vs_sft" not in summary and summary["sft/winrate_vs_sft"] == 0.5
    dpo = read_json(Path("data/eval/dpo.json"))
    sft = read_json(Path("data/eval/sft.json"))
    assert sft["winrate"]["n_identical"] == sft["winrate"]["n_prompts"] == 3
    wins = [p["win"] for p in dpo["winrate"]["per_prompt"]]
    assert summary["dpo/winrate_vs_sft"] == sum(wins) / 3 == dpo["scores"]["winrate_vs_sft"]
    for p in dpo["winrate"]["per_prompt"]:
        r, ref = p["reward"], p["reference_reward"]
        assert p["win"] == (0.5 if r == ref else float(r > ref))
    rows = dpo["protocol"]["winrate"]["rows"]
    assert rows == sft["protocol"]["winrate"]["rows"] and len(rows) == 3
    held = set(chat_data.split(40, 0.1, params.reward.train.seed)[1].tolist())
    assert set(rows) <= held  # never a prompt the preference stages trained on
    assert tracker.metrics["dpo/winrate_vs_sft"] == summary["dpo/winrate_vs_sft"]
    assert "winrate_vs_sft" in Path("data/eval/comparison.md").read_text()
    assert read_json(Path("data/eval/summary.json")) == pytest.approx(summary) and tracker.metrics == summary
    base = read_json(Path("data/eval/base.json"))
    assert base["mmlu"]["n_items"] == 8 and base["mmlu"]["k_shot"] == 2 and base["mmlu"]["split"] == "val"
    assert base["protocol"]["mmlu"]["prepend_bos"] is True and len(base["mmlu"]["data_hash"]) == 64
    assert (
        base["scores"]["mmlu/acc"] == summary["base/mmlu_acc"]
        and base["scores"]["ppl/val"] == summary["base/ppl"]
    )
    assert base["tokenizer_fingerprint"] == bpe.fingerprint and "n_truncated" in base["mmlu"]
    assert base["protocol"]["mmlu"]["tokenizer_fingerprint"] == bpe.fingerprint
    assert base["protocol"]["mmlu"]["fewshot_policy"].startswith("truncate")
    assert all(it["k_used"] == 2 and it["truncated_tokens"] == 0 for it in base["mmlu"]["items"])
    assert "| sft |" in Path("data/eval/comparison.md").read_text()
    assert Path("data/eval/comparison.png").read_bytes()[:4] == b"\x89PNG"
    assert {"summary.json", "comparison.md", "comparison.png", "base.json"} <= set(tracker.artifacts)


def test_vocab_smaller_than_tokenizer_is_a_clear_error(bpe, tmp_path, monkeypatch):
    from tasks import evaluate
    from tasks.config import Params
    from tasks.stage import StageError

    with pytest.raises(
        StageError, match=r"ckpt/x: model vocab_size 512 is smaller than the tokenizer's 1000"
    ):
        evaluate.check_vocab(512, bpe, "ckpt/x")
    make_workspace(tmp_path, bpe, vocab=512)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(StageError, match=r"data/checkpoints/base: model vocab_size 512"):
        evaluate.run(Params(), None)


def test_bad_fingerprint_policy_and_empty_split_dir_are_clear_errors(bpe, tmp_path, monkeypatch):
    from tasks import evaluate
    from tasks.config import EvaluateConfig, Params
    from tasks.stage import StageError

    make_workspace(tmp_path, bpe)
    monkeypatch.chdir(tmp_path)
    bad = EvaluateConfig()
    setattr(bad, "fewshot_policy", "drop")  # noqa: B010 (a field of EvaluateConfig once the lead adds it)
    with pytest.raises(StageError, match=r"evaluate.fewshot_policy: .*one of truncate, reduce, got 'drop'"):
        evaluate.run(Params(evaluate=bad), None)
    cfg = Path("data/checkpoints/dpo/config.json")
    cfg.write_text(json.dumps({**json.loads(cfg.read_text()), "tokenizer_fingerprint": "f" * 64}))
    with pytest.raises(StageError, match=r"data/checkpoints/dpo was trained with tokenizer ffffffffffff"):
        evaluate.run(Params(), None)
    (tmp_path / "mmlu/val").mkdir(parents=True)
    with pytest.raises(mmlu.MMLUDataError, match=r"mmlu/val: no \{subject\}_val\.csv files"):
        mmlu.load_mmlu(str(tmp_path / "mmlu"), "val")


# ------------------------------------------------------------------------------------------- few-shot policy
@needs_mmlu
def test_reduce_policy_uses_the_most_shots_that_fit_and_records_them(bpe):
    """Under "reduce" every item gets the largest k' <= k whose prompt fits (checked here by encoding the
    independent reference prompt), scores equal a direct forward of that prompt, and nothing is truncated
    while a 0-shot prompt fits; under "truncate" the same items are cut from the left, recorded per item."""
    data = mmlu.load_mmlu(
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
    ctx, conts = mmlu.encode_requests(bpe, ["x\nAnswer:  "], mmlu.PROTOCOL["choices"])[0]
    assert ctx == bpe.encode("x\nAnswer:") and conts == [
        bpe.encode("  " + c) for c in mmlu.PROTOCOL["choices"]
    ]


# ------------------------------------------------------------------------------------------- win rate
def chat_prompts(tok: ChatTokenizer, n: int) -> list[list[int]]:
    return [
        tok.render_chat([{"role": "user", "content": r["prompt"]}], add_generation_prompt=True)[0]
        for r in preference_rows(n)
    ]


def naive_greedy(model, prompt: list[int], n: int) -> list[int]:
    """n greedy tokens, one prompt at a time, the full sequence re-run every step (no cache, no batch)."""
    seq = list(prompt)
    for _ in range(n):
        with torch.no_grad():
            seq.append(int(model(torch.tensor([seq]))[0, -1].argmax()))
    return seq[len(prompt) :]


def up_to_stop(tokens: list[int], stop: list[int]) -> list[int]:
    """A greedy response with stop tokens is the free-running one cut after its first stop token."""
    return next((tokens[: i + 1] for i, t in enumerate(tokens) if t in stop), tokens)


def untied_model(seed: int, max_len: int = 96) -> Transformer:
    """A random model with its own output head: greedy decoding from it varies (a tied random model repeats
    its last input token forever, so every policy would give the same response)."""
    torch.manual_seed(seed)
    model = Transformer(
        ModelConfig(
            vocab_size=1024,
            n_layer=2,
            n_head=4,
            n_kv_head=2,
            d_model=64,
            max_seq_len=max_len,
            tie_embeddings=False,
        )
    )
    with torch.no_grad():
        model.lm_head.weight.mul_(20)
    return model.eval()


def test_win_rate_matches_direct_greedy_and_reward_loop(bpe):
    from tasks import evaluate

    prompts = chat_prompts(bpe, 6)  # prompts of several lengths: batched generation by length is exercised
    policy, reference = untied_model(21), untied_model(22)
    reward = ScalarHeadModel(untied_model(24)).eval()
    with torch.no_grad():
        reward.value_head.weight.mul_(50)
    free = [naive_greedy(policy, p, 10) for p in prompts]
    stop = [free[2][-1], free[4][6]]  # tokens the policy really emits: rows must stop at them
    got = evaluate.greedy_responses(policy, prompts, 10, stop, bpe.pad_id, batch_size=4)
    assert got == [up_to_stop(f, stop) for f in free] and len(got[4]) <= 7 and got[4][-1] in stop
    assert any(len(g) == 10 and g[-1] not in stop for g in got)  # and rows that never stop run to the limit

    stop = [bpe.end_id, bpe.eos_id]
    pol = [up_to_stop(f[:8], stop) for f in free]
    ref = [up_to_stop(naive_greedy(reference, p, 8), stop) for p in prompts]

    def alone(seq):  # reward of one unpadded sequence at its last token
        with torch.no_grad():
            return float(reward(torch.tensor([seq]))[0, -1])

    wins = []
    for p, a, b in zip(prompts, pol, ref, strict=True):
        ra, rb = alone(p + a), alone(p + b)
        assert abs(ra - rb) > 1e-4  # no near-ties: the decision below is not a rounding accident
        wins.append(float(ra > rb))
    harness = evaluate.WinRate(prompts, list(range(6)), reward, reference, bpe, 8, {})
    res = harness.evaluate("policy", policy)
    assert [r["win"] for r in res["per_prompt"]] == wins and res["winrate"] == sum(wins) / 6
    assert 0 < res["winrate"] < 1  # both outcomes occur
    assert (
        max(abs(r["reward"] - alone(p + a)) for r, p, a in zip(res["per_prompt"], prompts, pol, strict=True))
        < 1e-4
    )
    # The reference against itself (another copy of its weights) ties everywhere; swapping sides mirrors.
    twin = untied_model(22)
    assert harness.evaluate("sft", twin)["winrate"] == 0.5
    swapped = evaluate.WinRate(prompts, list(range(6)), reward, policy, bpe, 8, {}).evaluate("ref", reference)
    assert [r["win"] for r in swapped["per_prompt"]] == [1 - w for w in wins]


def test_heldout_rows_exclude_every_training_split():
    from tasks import evaluate
    from tasks.config import Params, resolve_params

    params = resolve_params("tiny", [])
    lengths = [10 + (i % 50) for i in range(200)]  # rlhf drops the prompts longer than 128 - 12 = 116: none
    rows, how = evaluate.heldout_rows(params, lengths, 128)
    assert rows and how.startswith("intersection")
    for val_fraction, seed in (
        (params.reward.val_fraction, params.reward.train.seed),
        (0.1, params.rlhf.train.seed),
    ):
        train, _ = chat_data.split(200, val_fraction, seed)
        assert not set(rows) & set(train.tolist())
    lengths = [10] * 150 + [200] * 50  # rlhf splits only the 150 prompts that fit: its indices map to rows
    rows, how = evaluate.heldout_rows(params, lengths, 128)
    assert rows and how.startswith("intersection")
    rlhf_train = chat_data.split(150, 0.1, params.rlhf.train.seed)[0]
    assert max(rows) < 150 and not set(rows) & set(rlhf_train.tolist())
    assert not set(rows) & set(chat_data.split(200, 0.1, params.dpo.train.seed)[0].tolist())
    other = Params()
    other.dpo.train.seed = 7
    other.rlhf.train.seed = 8
    rows, how = evaluate.heldout_rows(other, [10] * 20, 128)  # 2 of 20 held out each: disjoint here
    assert how.startswith("reward stage") and rows == sorted(
        chat_data.split(20, 0.1, other.reward.train.seed)[1]
    )
