"""GRPO on verifiable tasks: the checker, the split by problem (no held-out problem in SFT data or RL
prompts), the reward registry, bad config named, and the objective learning on a tiny model."""

from __future__ import annotations

import csv
import itertools
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from models.config import ModelConfig
from models.llama import Transformer
from tasks.core import checks
from tasks.core.config import ConfigError, GRPOConfig, TrainConfig, resolve_params
from tasks.data import embedded, verifiable
from tasks.grpo import GroupRelative
from tasks.train import rewards
from tasks.train.alerts import kl_runaway, reward_collapse
from tasks.train.loop import train
from tasks.train.losses import GRPO_LOSS_TYPES
from tasks.train.rollouts import sample_responses
from tests.helpers.evalhelpers import train_tokenizer
from tests.helpers.workspace import make_workspace

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    """A byte-level BPE with no merges: every digit is a token of its own."""
    return train_tokenizer(tmp_path_factory.mktemp("tok") / "tokenizer.json", 263)


# ------------------------------------------------------------------------------------------ checker
def test_checker_parses_problem_and_answer_with_whitespace():
    p = verifiable.make_problem("add", 47, 38, phrasing=0)
    assert p.prompt == "What is 47 + 38? Reply with the number only." and p.answer == "85"
    for good in ("85", " 85", "85\n", "\t 85  \n"):
        assert verifiable.check(p.prompt, good), repr(good)
    for bad in ("84", "8 5", "85.", "85 apples", "The answer is 85", "", "  ", "-85"):
        assert not verifiable.check(p.prompt, bad), repr(bad)
    assert verifiable.parse_answer(" -12 ") == -12 and verifiable.parse_answer("12a") is None
    s = verifiable.make_problem("sub", 50, 8, phrasing=3)
    assert s.prompt.startswith("Subtract 8 from 50.") and verifiable.check(s.prompt, "42")
    assert verifiable.parse_problem("  " + s.prompt + "\n") == s.__class__(
        "sub", 50, 8, "  " + s.prompt + "\n"
    )
    # a prompt that is not one of the phrasings, or operands out of the family's range: not checkable
    assert not verifiable.check("What is 2 + 2?", "4")
    assert verifiable.parse_problem("What is 100 + 1? Reply with the number only.") is not None  # add3
    assert verifiable.parse_problem("What is 1000 + 1? Reply with the number only.") is None
    last = verifiable.make_problem("last", 4720, 0, phrasing=0)
    assert (
        last.prompt == "What is the last digit of `4720`? Reply with the number only." and last.answer == "0"
    )
    assert verifiable.check(last.prompt, " 0\n") and not verifiable.check(last.prompt, "4720")
    assert verifiable.make_problem("first", 4720, 0).answer == "4" and last.key == "last(4720)"
    larger = verifiable.make_problem("max", 385, 47, phrasing=2)
    assert larger.answer == "385" and larger.key == verifiable.make_problem("max", 47, 385).key
    with pytest.raises(ValueError, match="outside the family's range"):
        verifiable.make_problem("max", 5, 5)  # no larger side
    count = verifiable.make_problem("digits", 4720, 0, phrasing=0)
    assert count.prompt == "How many digits does `4720` have? Reply with the number only."
    assert count.answer == "4" and count.verbose_answer == "4 digits"
    assert verifiable.make_problem("digits", 7, 0).verbose_answer == "1 digit"
    assert [verifiable.make_problem("digits", 7, 0, i).phrasing for i in range(5)] == [0, 1, 2, 3, 0]
    assert verifiable.parse_problem(larger.prompt).phrasing == 2  # type: ignore[union-attr]
    with pytest.raises(ValueError, match="none of the family's phrasings"):
        _ = verifiable.Problem("digits", 7, 0, "How long is 7?").phrasing
    assert verifiable.check(count.prompt, "4") and not verifiable.check(count.prompt, "4 digits")
    assert verifiable.check_lenient(count.prompt, "4 digits") and not verifiable.check_lenient(
        count.prompt, "5"
    )
    with pytest.raises(KeyError, match="unknown task family 'mul'"):
        verifiable.make_problem("mul", 1, 2)


# -------------------------------------------------------------------------------------------- split
def test_split_is_by_problem_not_by_phrasing():
    fam = verifiable.FAMILIES["add"]
    keys = {fam.key(a, b) for a in range(100) for b in range(100)}
    assert len(keys) == 5050  # a + b and b + a are one problem
    held = [k for k in keys if verifiable.is_heldout(k)]
    assert 0.15 < len(held) / len(keys) < 0.25
    for a, b in [(47, 38), (3, 90), (12, 12)]:
        phrasings = [verifiable.make_problem("add", x, y, i) for i in range(4) for x, y in ((a, b), (b, a))]
        assert len({p.key for p in phrasings}) == 1  # every phrasing and order: one key, one side
    # families whose ranges overlap agree: 3 + 5 is one problem, whichever family asks it
    assert verifiable.make_problem("add_small", 3, 5).key == verifiable.make_problem("add", 5, 3).key
    assert verifiable.make_problem("sub_small", 9, 4).key == verifiable.make_problem("sub", 9, 4).key != "4-9"
    problems = verifiable.heldout_problems(["add", "sub"], 300)
    assert len(problems) == len({p.key for p in problems}) == 300
    assert all(verifiable.is_heldout(p.key) for p in problems)
    assert {p.family for p in problems} == {"add", "sub"}
    assert problems[:50] == verifiable.heldout_problems(["add", "sub"], 50)  # a prefix: same first items


def test_no_heldout_problem_in_sft_data_or_rl_prompts(tok):
    rows = list(itertools.islice(embedded.sft_conversations(seed=1337), 2400))
    tasks = [r for r in rows if r["source"].startswith("task:")]
    assert abs(len(tasks) - 2400 / (embedded.TASK_EVERY + 1)) <= 1
    forms: dict[int, list[bool]] = {}  # phrasing -> is each worked answer the bare number
    for row in tasks:
        turns = row["messages"]
        assert len(turns) == 2 * embedded.TASK_TURNS
        for user, assistant in zip(turns[::2], turns[1::2], strict=True):
            problem = verifiable.parse_problem(user["content"])  # re-derived from the text, not `source`
            assert problem is not None and not verifiable.is_heldout(problem.key), user
            assert assistant["content"] in (problem.answer, problem.verbose_answer)
            assert verifiable.check_lenient(user["content"], assistant["content"])
            forms.setdefault(problem.phrasing, []).append(assistant["content"] == problem.answer)
    # the teacher's habit, per phrasing: "how many digits" (phrasings 0 and 2) with the unit 2 times in
    # 3, the other two always bare; each phrasing is about a quarter of the worked answers
    assert sorted(forms) == [0, 1, 2, 3] and all(forms[1]) and all(forms[3])
    assert all(0.25 < sum(forms[i]) / len(forms[i]) < 0.42 for i in (0, 2)), forms
    assert all(0.2 < len(bare) / (len(tasks) * embedded.TASK_TURNS) < 0.3 for bare in forms.values())
    assert rows[:300] == list(itertools.islice(embedded.sft_conversations(seed=1337), 300))  # deterministic
    # every SFT question that states a problem, whatever its source, is a training problem
    asked = [
        verifiable.parse_problem(m["content"]) for r in rows for m in r["messages"] if m["role"] == "user"
    ]
    assert sum(p is not None for p in asked) == len(tasks) * embedded.TASK_TURNS
    assert not any(p is not None and verifiable.is_heldout(p.key) for p in asked)
    cfg = GRPOConfig(families=["add", "sub"], train=TrainConfig(micro_batch_size=64))
    objective = GroupRelative(cfg, tok, lambda p, c: 0.0, None, [])
    drawn = [p for step in range(50) for p in objective.problems_at(step)]
    assert len(drawn) == 50 * 8 and not any(verifiable.is_heldout(p.key) for p in drawn)
    assert drawn[:8] == objective.problems_at(0)  # a function of (seed, step): resumable


# ---------------------------------------------------------------------------------- rewards, alerts
def test_reward_registry():
    p = verifiable.make_problem("add", 1, 2)
    ctx = rewards.RewardContext(tokenizer=None, load_reward_model=lambda: None)  # type: ignore[arg-type]
    total = rewards.combined(["correct", "format"], [2.0, 0.5], ctx)
    assert total(p.prompt, " 3 ") == 2.5 and total(p.prompt, "4") == 0.5 and total(p.prompt, "three") == 0
    assert rewards.combined(["correct"], [], ctx)(p.prompt, "3") == 1.0
    with pytest.raises(ValueError, match=r"unknown reward\(s\) \['exact'\]"):
        rewards.combined(["exact"], [], ctx)


def test_collapse_and_kl_alerts():
    assert reward_collapse({0: 1.0, 1: 1.0, 2: 0.5, 3: 1.0}, 3) == []
    (msg,) = reward_collapse({0: 0.5, 1: 1.0, 2: 1.0, 3: 1.0, 4: 0.0}, 3)
    assert "3 rollouts in a row (up to step 3)" in msg
    assert kl_runaway({0: 0.1, 5: 0.3}, 0.5, "GRPO") == []
    (msg,) = kl_runaway({0: 0.1, 5: 2.5, 6: 0.9}, 0.5, "GRPO")
    assert "GRPO KL 2.500 (rollout of step 5)" in msg and "2 rollout(s)" in msg


# ------------------------------------------------------------------------------------------ config
@pytest.mark.parametrize(
    "override, message",
    [
        ("grpo.num_generations=1", "grpo.num_generations=1: expected at least 2"),
        ("grpo.beta=-0.1", r"grpo.beta=-0.1: expected a KL coefficient >= 0"),
        ("grpo.epsilon=0", "grpo.epsilon=0.0: expected a positive clip range"),
        ("grpo.loss_type=bnpo", "grpo.loss_type='bnpo': expected one of grpo, dapo, dr_grpo"),
        ("grpo.train.micro_batch_size=10", "micro_batch_size=10 is not a multiple of grpo.num_generations=4"),
        ("grpo.reward_weights=[1.0, 2.0]", "reward_weights has 2 values for 1 grpo.rewards"),
        ("grpo.families=[add, mul]", r"grpo.families\[1\]='mul': expected one of add_small, sub_small, add"),
        ("grpo.rewards=[correct, length]", r"grpo.rewards\[1\]='length': expected one of correct, format"),
        ("evaluate.task_families=[]", "evaluate.task_families: empty"),
        ("grpo.reference=rlhf", "grpo.reference='rlhf': expected one of base, sft"),
    ],
)
def test_bad_grpo_config_is_named(override, message):
    with pytest.raises(ConfigError, match=message):
        resolve_params("tiny", [override])


def test_checked_names_are_the_registries():
    assert tuple(verifiable.FAMILIES) == checks.TASK_FAMILIES
    assert tuple(rewards.REWARDS) == checks.REWARD_NAMES
    assert checks.GRPO_LOSS_TYPES == GRPO_LOSS_TYPES


# ------------------------------------------------------------------------------------------ learning
def test_grpo_objective_raises_the_reward_of_a_tiny_model(tmp_path, tok):
    """A random tiny model asked to answer with a number, rewarded by the checker's format rule (a bare
    number): it rarely does at first; GRPO with groups of 8 makes it the usual answer within a few steps."""
    torch.manual_seed(0)
    model = Transformer(
        ModelConfig(vocab_size=tok.vocab_size, n_layer=1, n_head=2, n_kv_head=2, d_model=32, max_seq_len=64)
    )
    cfg = GRPOConfig(
        families=["add"],
        num_generations=8,
        max_new_tokens=1,
        beta=0.0,
        train=TrainConfig(
            max_steps=12,
            micro_batch_size=64,
            lr=0.03,
            min_lr=0.03,
            warmup_steps=0,
            eval_every=0,
            checkpoint_every=0,
            log_every=1,
            bf16=False,
            weight_decay=0.0,
        ),
    )
    reward = rewards.answer_format
    objective = GroupRelative(cfg, tok, reward, None, [], cache_dir=tmp_path / "rollouts")

    def mean_reward(m: Transformer) -> float:  # fresh problems, fixed sampling seed
        rng = random.Random(5)
        problems = [verifiable.draw(["add"], rng, heldout=False) for _ in range(32)]
        from tasks.eval.tasks_accuracy import completion_text, prompt_ids

        prompts = [prompt_ids(tok, p.prompt) for p in problems]
        batch = sample_responses(m, prompts, objective.sampling, seed=99, n_per_prompt=4)
        scores = []
        for r in range(batch["tokens"].shape[0]):
            start, end = len(prompts[r // 4]), int(batch["lengths"][r])
            scores.append(reward("", completion_text(tok, batch["tokens"][r, start:end].tolist())))
        return sum(scores) / len(scores)

    before = mean_reward(model)
    curve: list[float] = []
    weights, _ = train(
        model,
        objective,
        cfg.train,
        state_dir=tmp_path / "state",
        on_step=lambda step, m: curve.append(m["reward"]),
    )
    trained = Transformer(model.config)
    trained.load_state_dict(weights)
    after = mean_reward(trained.eval())
    assert before < 0.2 and after > before + 0.4, (before, after, curve)
    assert curve[-1] > curve[0]


# --------------------------------------------------------------------------------- the grpo stage
STAGE_OVERRIDES = [
    "grpo.train.max_steps=6",
    "grpo.num_iterations=2",
    "grpo.train.checkpoint_every=3",
    "grpo.train.eval_every=6",
    "grpo.train.log_every=1",
    "grpo.val_problems=8",
    "alerts.grpo_collapse_steps=2",  # a random model never answers right: every reward_std is 0
]
EXPERIMENT = f"grpo-tests-{os.getpid()}"
DRIVER = """
import os, sys
from tasks.core.stage import stage_main
from tasks import grpo
if sys.argv[1] != "0":
    os.environ["PIPELINE_KILL_AT_STEP"] = sys.argv[1]
stage_main("grpo", grpo.run)
"""


def grpo_workspace(root: Path, overrides: list[str] = ()) -> Path:
    """The tiny synthetic workspace with a random-init `sft` checkpoint (what the sft stage would write)."""
    from models.checkpoint import save_checkpoint
    from tasks.core import paths
    from tasks.core.config import load_params
    from tasks.data.chat_tokenizer import ChatTokenizer
    from tasks.pretrain import model_config

    make_workspace(root, STAGE_OVERRIDES + list(overrides))
    tok = ChatTokenizer.load(root / paths.TOKENIZER_JSON)
    config = model_config(load_params(root / "params.yaml"), tok)
    torch.manual_seed(0)
    meta = {"tokenizer_fingerprint": tok.fingerprint, "stage": "sft"}
    save_checkpoint(root / paths.checkpoint("sft"), Transformer(config), config, meta=meta)
    return root


def run_grpo(root: Path, kill_at: int = 0) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO), PIPELINE_EXPERIMENT=EXPERIMENT)
    return subprocess.run(
        [sys.executable, "-c", DRIVER, str(kill_at)],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def weights(path: Path) -> str:
    from models.checkpoint import load_checkpoint, state_dict_hash

    return state_dict_hash(load_checkpoint(path)[0])


def test_grpo_stage_writes_trl_metrics_alerts_and_resumes_to_the_same_weights(tmp_path):
    """The stage end to end: TRL metric names, val/accuracy before and after, the collapse alert; killed
    mid-rollout (step 4 of a 2-iteration rollout made at step 2) and resumed: the same weights."""
    whole = grpo_workspace(tmp_path / "whole")
    proc = run_grpo(whole)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    metrics = json.loads((whole / "data/metrics/grpo.json").read_text())
    for key in (
        "reward",
        "reward_std",
        "kl",
        "completions/mean_length",
        "clip_ratio",
        "val/accuracy",
        "val/accuracy_lenient",
    ):
        assert key in metrics, key
    assert "val/accuracy_initial" in metrics and 0 < metrics["completions/mean_length"] <= 6
    assert "ALERT: GRPO reward collapse" in proc.stdout
    with open(whole / "data/plots/grpo.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert [int(float(r["step"])) for r in rows] == [1, 2, 3, 4, 5, 6] and "reward_std" in rows[0]
    from models.checkpoint import read_checkpoint_config

    assert read_checkpoint_config(whole / "data/checkpoints/grpo")["parent"] == "sft"
    assert not (whole / "data/state/grpo").exists()

    killed = grpo_workspace(tmp_path / "killed")
    proc = run_grpo(killed, kill_at=4)
    assert proc.returncode == -9 and not (killed / "data/checkpoints/grpo").exists()
    proc = run_grpo(killed)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "resumed on the cached rollout of step 2" in proc.stdout
    assert weights(killed / "data/checkpoints/grpo") == weights(whole / "data/checkpoints/grpo")


def test_grpo_stage_with_fail_on_alert_writes_nothing(tmp_path):
    root = grpo_workspace(
        tmp_path, ["alerts.fail_on_alert=true", "grpo.train.max_steps=2", "alerts.grpo_collapse_steps=1"]
    )
    proc = run_grpo(root)
    assert proc.returncode == 1
    assert "health alert (alerts.fail_on_alert=true), nothing written" in proc.stdout
    assert not (root / "data/checkpoints/grpo").exists() and not (root / "data/metrics/grpo.json").exists()
