"""Perplexity, win rate and the evaluate stage end to end on tiny models."""

from __future__ import annotations

import json
import math
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
from tasks.data import chat_data
from tasks.data.chat_tokenizer import ChatTokenizer
from tasks.eval import mmlu_data, perplexity
from tests.helpers.datahelpers import tree_hashes
from tests.helpers.evalhelpers import MMLU_DIR, SUBJECTS, needs_mmlu, tiny_model


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
def logged(run_id: str) -> SimpleNamespace:
    """What the MLflow store (the session's sqlite one) holds for a run: its metrics and eval/ artifacts."""
    from tasks.core import tracking

    client = tracking.client()
    artifacts = [Path(a.path).name for a in client.list_artifacts(run_id, "eval")]
    return SimpleNamespace(metrics=client.get_run(run_id).data.metrics, artifacts=artifacts)


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
    from tasks.core.config import EvaluateConfig, Params
    from tasks.core.io import read_json

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
    params.evaluate.task_problems = params.evaluate.task_samples = 6
    params.evaluate.task_families = ["add_small", "sub"]
    from tasks.core import tracking

    encodes = []  # a spy on the real function: MMLU prompts are encoded once for the three models
    real_encode = evaluate.mmlu.encode_items
    monkeypatch.setattr(
        evaluate.mmlu, "encode_items", lambda *a, **k: encodes.append(1) or real_encode(*a, **k)
    )
    with tracking.stage_run("evaluate", params) as run:
        summary = evaluate.run(params, run)
    assert len(encodes) == 1
    tracker = logged(run.run_id)  # read back from the store: what a user sees in the MLflow UI
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
    for name, res in (("sft", sft), ("dpo", dpo)):  # mean tokens of the greedy responses, each >= 1
        tokens = [p["tokens"] for p in res["winrate"]["per_prompt"]]
        assert min(tokens) >= 1 and summary[f"{name}/response_length"] == pytest.approx(sum(tokens) / 3)
    # The same answers against the rows' true (chosen) answers, recomputed here from what was written.
    from tasks.eval.similarity import rouge_l, token_f1

    truth = {i: r["chosen"] for i, r in enumerate(preference_rows(40))}
    for name, res in (("sft", sft), ("dpo", dpo)):
        f1 = [token_f1(p["response"], truth[p["row"]]) for p in res["winrate"]["per_prompt"]]
        rl = [rouge_l(p["response"], truth[p["row"]]) for p in res["winrate"]["per_prompt"]]
        assert [p["answer_f1"] for p in res["winrate"]["per_prompt"]] == f1
        assert summary[f"{name}/answer_f1"] == pytest.approx(sum(f1) / 3)
        assert summary[f"{name}/answer_rouge_l"] == pytest.approx(sum(rl) / 3)
    assert "base/answer_f1" not in summary and "answer_f1" in Path("data/eval/comparison.md").read_text()
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
    # Held-out task accuracy for every language model: greedy answers checked, 6 held-out problems.
    from tasks.data import verifiable

    for name in ("base", "sft", "dpo"):
        task = read_json(Path(f"data/eval/{name}.json"))["tasks"]
        assert task["n"] == len(task["samples"]) == 6
        assert all(verifiable.is_heldout(verifiable.parse_problem(x["prompt"]).key) for x in task["samples"])
        checked = [verifiable.check(x["prompt"], x["answer"]) for x in task["samples"]]
        assert [x["correct"] for x in task["samples"]] == checked
        assert summary[f"{name}/task_acc"] == task["accuracy"] == sum(checked) / 6
        lenient = [verifiable.check_lenient(x["prompt"], x["answer"]) for x in task["samples"]]
        assert summary[f"{name}/task_acc_lenient"] == task["accuracy_lenient"] == sum(lenient) / 6
    assert "task_samples.md" in tracker.artifacts
    assert Path("data/eval/task_samples.md").read_text().count("| dpo |") == 6


def test_vocab_smaller_than_tokenizer_is_a_clear_error(bpe, tmp_path, monkeypatch):
    from tasks import evaluate
    from tasks.core.config import Params
    from tasks.core.stage import StageError

    with pytest.raises(
        StageError, match=r"ckpt/x: model vocab_size 512 is smaller than the tokenizer's 1000"
    ):
        evaluate.check_vocab(512, bpe, "ckpt/x")
    make_workspace(tmp_path, bpe, vocab=512)
    monkeypatch.chdir(tmp_path)
    before = previous_eval_outputs(tmp_path)
    with pytest.raises(StageError, match=r"data/checkpoints/base: model vocab_size 512"):
        evaluate.run(Params(), None)
    assert tree_hashes(tmp_path / "data") == before


def previous_eval_outputs(root: Path) -> dict[str, str]:
    """A previous run's evaluate outputs in the workspace; the hashes of everything under data/."""
    for name in ("summary.json", "base.json", "comparison.md"):
        path = root / "data/eval" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"previous": name}))
    (root / "data/metrics").mkdir(parents=True, exist_ok=True)
    (root / "data/metrics/evaluate.json").write_text('{"previous": 1}')
    return tree_hashes(root / "data")


def test_bad_fingerprint_policy_and_empty_split_dir_are_clear_errors(bpe, tmp_path, monkeypatch):
    from tasks import evaluate
    from tasks.core.config import EvaluateConfig, Params
    from tasks.core.stage import StageError

    make_workspace(tmp_path, bpe)
    monkeypatch.chdir(tmp_path)
    before = previous_eval_outputs(tmp_path)
    bad = EvaluateConfig()
    setattr(bad, "fewshot_policy", "drop")  # noqa: B010 (a field of EvaluateConfig once the lead adds it)
    with pytest.raises(StageError, match=r"evaluate.fewshot_policy: .*one of truncate, reduce, got 'drop'"):
        evaluate.run(Params(evaluate=bad), None)
    assert tree_hashes(tmp_path / "data") == before
    cfg = Path("data/checkpoints/dpo/config.json")
    cfg.write_text(json.dumps({**json.loads(cfg.read_text()), "tokenizer_fingerprint": "f" * 64}))
    before = tree_hashes(tmp_path / "data")
    with pytest.raises(StageError, match=r"data/checkpoints/dpo was trained with tokenizer ffffffffffff"):
        evaluate.run(Params(), None)
    assert tree_hashes(tmp_path / "data") == before  # base and sft were fine: still nothing written
    (tmp_path / "mmlu/val").mkdir(parents=True)
    with pytest.raises(mmlu_data.MMLUDataError, match=r"mmlu/val: no \{subject\}_val\.csv files"):
        mmlu_data.load_mmlu(str(tmp_path / "mmlu"), "val")


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
    from tasks.eval.winrate import WinRate
    from tasks.train.rollouts import greedy_responses

    prompts = chat_prompts(bpe, 6)  # prompts of several lengths: batched generation by length is exercised
    policy, reference = untied_model(21), untied_model(22)
    reward = ScalarHeadModel(untied_model(24)).eval()
    with torch.no_grad():
        reward.value_head.weight.mul_(50)
    free = [naive_greedy(policy, p, 10) for p in prompts]
    stop = [free[2][-1], free[4][6]]  # tokens the policy really emits: rows must stop at them
    got = greedy_responses(policy, prompts, 10, stop, bpe.pad_id, batch_size=4)
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
    harness = WinRate(prompts, list(range(6)), reward, reference, bpe, 8, {})
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
    swapped = WinRate(prompts, list(range(6)), reward, policy, bpe, 8, {}).evaluate("ref", reference)
    assert [r["win"] for r in swapped["per_prompt"]] == [1 - w for w in wins]


def test_answer_similarity_matches_hand_computations():
    from tasks.eval.similarity import answer_similarity, lcs_length, rouge_l, token_f1, words

    assert words("Return `Queue.empty()`, else None!") == ["return", "queue", "empty", "else", "none"]
    # 7 answer words, all in the 9 reference words: P = 1, R = 7/9, F1 = 2 * 7/9 / (16/9) = 14/16.
    answer, truth = (
        "Return True if the queue is empty.",
        "Return True if the queue is empty, False otherwise.",
    )
    assert token_f1(answer, truth) == pytest.approx(0.875) and rouge_l(answer, truth) == pytest.approx(0.875)
    # Same words, reversed order: F1 ignores order (1.0); the longest common subsequence is 1 word of 4.
    assert token_f1("empty is queue the", "the queue is empty") == 1.0
    assert rouge_l("empty is queue the", "the queue is empty") == pytest.approx(0.25)
    # Multisets: "the" x3 in the answer matches "the" x1; shared 2 of 4 and of 3 words: F1 = 2*(1/2)(2/3)/(7/6).
    assert token_f1("the the the cat", "the cat sat") == pytest.approx(4 / 7)
    assert rouge_l("the the the cat", "the cat sat") == pytest.approx(4 / 7)
    assert lcs_length(list("ABCBDAB"), list("BDCABA")) == 4  # the textbook example (CLRS 15.4)
    assert lcs_length([], ["a"]) == 0 and lcs_length(list("abc"), list("abc")) == 3
    assert token_f1("", "") == rouge_l("...", "") == 1.0 and token_f1("a", "") == rouge_l("", "b") == 0.0
    assert token_f1("cat", "dog") == 0.0
    got = answer_similarity(["the queue is empty", "dog"], ["the queue is empty", "cat"])
    assert got.answer_f1 == got.answer_rouge_l == 0.5 and got.f1 == [1.0, 0.0] and got.rouge_l == [1.0, 0.0]
    with pytest.raises(ValueError, match="2 answers but 1 reference"):
        answer_similarity(["a", "b"], ["a"])


def test_heldout_rows_exclude_every_training_split():
    from tasks.core.config import Params, resolve_params
    from tasks.eval import winrate

    params = resolve_params("tiny", [])
    lengths = [10 + (i % 50) for i in range(200)]  # rlhf drops the prompts longer than 128 - 12 = 116: none
    rows, how = winrate.heldout_rows(params, lengths, 128)
    assert rows and how.startswith("intersection")
    for val_fraction, seed in (
        (params.reward.val_fraction, params.reward.train.seed),
        (params.rlhf.val_fraction, params.rlhf.train.seed),
    ):
        train, _ = chat_data.split(200, val_fraction, seed)
        assert not set(rows) & set(train.tolist())
    lengths = [10] * 150 + [200] * 50  # rlhf splits only the 150 prompts that fit: its indices map to rows
    rows, how = winrate.heldout_rows(params, lengths, 128)
    assert rows and how.startswith("intersection")
    rlhf_train = chat_data.split(150, params.rlhf.val_fraction, params.rlhf.train.seed)[0]
    assert max(rows) < 150 and not set(rows) & set(rlhf_train.tolist())
    assert not set(rows) & set(
        chat_data.split(200, params.dpo.val_fraction, params.dpo.train.seed)[0].tolist()
    )
    other = Params()
    other.dpo.train.seed = 7
    other.rlhf.train.seed = 8
    rows, how = winrate.heldout_rows(other, [10] * 20, 128)  # 2 of 20 held out each: disjoint here
    assert how.startswith("reward stage") and rows == sorted(
        chat_data.split(20, other.reward.val_fraction, other.reward.train.seed)[1]
    )


# ------------------------------------------------------------------------- outputs all or nothing
# The stage run as `python -m tasks.evaluate` in a workspace (make_workspace + a tiny params.yaml) and as
# evaluate.run in this process. data/eval is built in data/.eval.tmp-<pid> and swapped in at once.
SMALL_EVAL = [
    f"evaluate.mmlu_dir={MMLU_DIR}",
    f"evaluate.subjects=[{SUBJECTS[0]}]",
    "evaluate.k_shot=1",
    "evaluate.max_items_per_subject=3",
    "evaluate.ppl_window=32",
    "evaluate.ppl_stride=16",
    "evaluate.ppl_max_tokens=256",
    "evaluate.winrate_prompts=2",
    "evaluate.max_new_tokens=4",
    "evaluate.task_problems=2",
    "evaluate.task_samples=2",
]
EVAL_FILES = {  # what a run of SMALL_EVAL writes to data/eval
    "base.json",
    "sft.json",
    "dpo.json",
    "summary.json",
    "comparison.md",
    "comparison.png",
    "report.html",
    "task_samples.md",
}


@pytest.fixture(scope="module")
def eval_store(tmp_path_factory) -> Path:
    """One MLflow sqlite store for this module's stage processes (a fresh store costs seconds)."""
    return tmp_path_factory.mktemp("mlflow") / "mlflow.db"


def eval_project(root: Path, tok: ChatTokenizer) -> Path:
    from tasks.core.config import dump_params, resolve_params

    make_workspace(root, tok)
    dump_params(resolve_params("tiny", SMALL_EVAL), root / "params.yaml")
    return root


def run_evaluate(root: Path, store: Path, **env: str):
    import os
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[1]
    full_env = dict(
        os.environ, PYTHONPATH=str(repo), MLFLOW_TRACKING_URI=f"sqlite:///{store}", OMP_NUM_THREADS="1", **env
    )
    return subprocess.run(
        [sys.executable, "-m", "tasks.evaluate"],
        cwd=root,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def staging_leftovers(root: Path) -> list[str]:
    """Hidden entries under data/: staging directories and temp files (and a disk-full test's filler)."""
    return sorted(p.relative_to(root / "data").as_posix() for p in (root / "data").rglob(".*"))


def assert_a_complete_new_run(root: Path) -> None:
    """data/eval holds exactly this run's files (none of the previous ones) and nothing is left beside it."""
    from tasks.core.io import read_json

    assert {p.name for p in (root / "data/eval").iterdir()} == EVAL_FILES
    summary = read_json(root / "data/eval/summary.json")
    assert "base/mmlu_acc" in summary and read_json(root / "data/metrics/evaluate.json") == summary
    assert read_json(root / "data/eval/base.json")["model"] == "base"
    assert staging_leftovers(root) == []


@needs_mmlu
def test_a_failure_while_writing_leaves_every_previous_eval_file(bpe, tmp_path, monkeypatch):
    """An exception after some outputs are written (here the chart) keeps every previous file of data/eval
    and data/metrics/evaluate.json byte for byte, leaves no staging directory, and the next run completes."""
    from tasks import evaluate
    from tasks.core.config import resolve_params
    from tasks.eval import outputs

    eval_project(tmp_path, bpe)
    monkeypatch.chdir(tmp_path)
    before = previous_eval_outputs(tmp_path)
    params = resolve_params("tiny", SMALL_EVAL)

    def broken_chart(results):
        raise RuntimeError("the chart failed")

    with monkeypatch.context() as patched:
        patched.setattr(outputs, "comparison_png", broken_chart)
        with pytest.raises(RuntimeError, match="the chart failed"):
            evaluate.run(params, None)
    assert tree_hashes(tmp_path / "data") == before
    evaluate.run(params, None)
    assert_a_complete_new_run(tmp_path)


@needs_mmlu
def test_a_kill_while_writing_leaves_every_previous_eval_file_and_the_next_run_completes(
    bpe, tmp_path, eval_store
):
    """Killed (SIGKILL) with every new file staged, before the swap: every previous file of data/eval and
    data/metrics/evaluate.json is unchanged; the next run clears the staging directory and completes."""
    eval_project(tmp_path, bpe)
    before = previous_eval_outputs(tmp_path)
    proc = run_evaluate(tmp_path, eval_store, PIPELINE_KILL_AT="evaluate-staged")
    assert proc.returncode == -9, proc.stdout[-3000:] + proc.stderr[-3000:]
    after = tree_hashes(tmp_path / "data")
    left = staging_leftovers(tmp_path)
    assert [name.split("-")[0] for name in left] == [".eval.tmp", "metrics/.evaluate.json.tmp"], left
    assert {k: v for k, v in after.items() if not k.startswith(tuple(left))} == before
    rerun = run_evaluate(tmp_path, eval_store)
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    assert_a_complete_new_run(tmp_path)


@needs_mmlu
def test_a_full_disk_while_writing_leaves_every_previous_eval_file_and_names_the_path(
    bpe, tmp_path, eval_store
):
    """data/ on a real 64 MiB tmpfs with 24 KiB left: the stage fails naming the data/eval file it could
    not write, with no traceback; every previous file is unchanged and nothing is left beside data/eval.
    With the space back, the next run completes."""
    import re

    from tests.helpers.smallfs import FILLER, small_disk

    eval_project(tmp_path, bpe)
    previous_eval_outputs(tmp_path)
    with small_disk(tmp_path / "data", free=24 * 1024):
        before = tree_hashes(tmp_path / "data")
        proc = run_evaluate(tmp_path, eval_store)
        out = proc.stdout + proc.stderr
        assert proc.returncode == 1, out[-3000:]
        assert re.search(r"cannot write data/eval/\S+: No space left on device; data/eval and ", out), out[
            -3000:
        ]
        assert "Traceback" not in out
        assert tree_hashes(tmp_path / "data") == before
        assert staging_leftovers(tmp_path) == [FILLER]
        (tmp_path / "data" / FILLER).unlink()
        rerun = run_evaluate(tmp_path, eval_store)
        assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
        assert_a_complete_new_run(tmp_path)


def test_an_mmlu_file_linked_out_of_the_mmlu_dir_is_refused_naming_it(tmp_path):
    """The policy of ingest's source directories: a CSV that a symlink takes out of the MMLU directory is
    never read, whether the subjects are listed from the directory or named in params; a link that stays
    inside is read."""
    import shutil

    mmlu = tmp_path / "mmlu"
    for split in ("dev", "val"):
        (mmlu / split).mkdir(parents=True)
        shutil.copy(MMLU_DIR / split / f"{SUBJECTS[0]}_{split}.csv", mmlu / split)
    (mmlu / "val/inside_val.csv").symlink_to(mmlu / "val" / f"{SUBJECTS[0]}_val.csv")
    (mmlu / "dev/inside_dev.csv").symlink_to(Path("..") / "dev" / f"{SUBJECTS[0]}_dev.csv")
    assert mmlu_data.list_subjects(str(mmlu), "val") == [SUBJECTS[0], "inside"]
    assert len(mmlu_data.load_mmlu(str(mmlu), "val", ["inside"], k_shot=1).items) > 0
    outside = tmp_path / "elsewhere/secret.csv"
    outside.parent.mkdir()
    outside.write_text('"What is 1+1?",1,2,3,4,B\n')
    (mmlu / "val/leak_val.csv").symlink_to(outside)
    message = (
        r"mmlu/val/leak_val\.csv is a link out of the MMLU directory .*mmlu \(to .*elsewhere/secret\.csv\)"
    )
    with pytest.raises(mmlu_data.MMLUDataError, match=message):
        mmlu_data.list_subjects(str(mmlu), "val")
    with pytest.raises(mmlu_data.MMLUDataError, match=message):
        mmlu_data.load_mmlu(str(mmlu), "val", ["leak"], k_shot=0)
    with pytest.raises(mmlu_data.MMLUDataError, match=message):
        mmlu_data.load_mmlu(str(mmlu), "val", k_shot=1)
    (mmlu / "val/leak_val.csv").unlink()
    linked_split = tmp_path / "elsewhere/val"
    shutil.copytree(mmlu / "val", linked_split, symlinks=True)
    shutil.rmtree(mmlu / "val")
    (mmlu / "val").symlink_to(linked_split)  # the split directory itself links out
    with pytest.raises(mmlu_data.MMLUDataError, match=r"is a link out of the MMLU directory"):
        mmlu_data.list_subjects(str(mmlu), "val")
