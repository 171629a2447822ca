"""Post-training stages (sft, reward, dpo, rlhf) on the tiny workspace: masks, no leaks across examples,
real learning on the embedded default data, resume after kill -9 to the same weights, health alerts, and
bad input refused.

Training runs are real subprocesses (`python -m tasks.<stage>`-equivalent: several stages per process
through `stage_main`, to pay the import time once). The base model is a random-init checkpoint written
by the fixture: these tests are about post-training, so they skip pretraining.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F

from models.checkpoint import load_checkpoint, save_checkpoint, state_dict_hash
from models.config import ModelConfig
from models.llama import Transformer
from tasks.core import paths
from tasks.core.config import load_params
from tasks.core.stage import StageError
from tasks.data import chat_data
from tasks.data.chat_tokenizer import ChatTokenizer, TokenizerMismatch
from tests.helpers.posttrain_data import make_embedded_workspace
from tests.helpers.workspace import make_workspace

REPO = Path(__file__).resolve().parents[1]

# Short runs with checkpoints every few steps, so each stage can be killed after a checkpoint.
OVERRIDES = [
    "sft.train.max_steps=4",
    "sft.train.checkpoint_every=2",
    "sft.train.eval_every=4",
    "sft.train.log_every=1",
    "reward.train.max_steps=4",
    "reward.train.checkpoint_every=2",
    "reward.train.eval_every=4",
    "reward.train.log_every=1",
    "dpo.train.max_steps=4",
    "dpo.train.checkpoint_every=2",
    "dpo.train.eval_every=4",
    "dpo.train.log_every=1",
    "rlhf.train.max_steps=6",
    "rlhf.ppo_epochs=2",
    "rlhf.max_new_tokens=8",
    "rlhf.train.checkpoint_every=3",
    "rlhf.train.eval_every=6",
    "rlhf.train.log_every=2",
    "rlhf.train.lr=0.003",
    "rlhf.adaptive_kl=true",
    "rlhf.target_kl=0.01",
    # A tight KL bound: the rlhf run raises (and only logs, fail_on_alert being false) the KL alert.
    "alerts.ppo_max_kl=0.005",
]
STAGES = ("sft", "reward", "dpo", "rlhf")
# Each test that runs stages logs to an experiment of its own (a prefix of this), so the run lookups below
# hold whatever ran before them.
EXPERIMENT = f"posttrain-tests-{os.getpid()}"

DRIVER = """
import importlib, os, sys
from tasks.core.stage import stage_main
kill_stage, kill_step = sys.argv[1], sys.argv[2]
for name in sys.argv[3:]:
    os.environ.pop("PIPELINE_KILL_AT_STEP", None)
    if name == kill_stage:
        os.environ["PIPELINE_KILL_AT_STEP"] = kill_step
    stage_main(name, importlib.import_module(f"tasks.{name}").run)
"""


def run_stages(
    cwd: Path,
    stages: tuple[str, ...] | list[str],
    kill: tuple[str, int] | None = None,
    *,
    experiment: str,
) -> subprocess.CompletedProcess:
    """Run the stages in order in one process (as `python -m tasks.<stage>` each would); optionally
    SIGKILL the process after optimizer step n of one of them."""
    # The session's MLflow store (tests/conftest.py), already created: a fresh one costs seconds per test.
    env = dict(os.environ, PYTHONPATH=str(REPO), PIPELINE_EXPERIMENT=experiment)
    kill_stage, kill_step = kill or ("", 0)
    return subprocess.run(
        [sys.executable, "-c", DRIVER, kill_stage, str(kill_step), *stages],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def write_base(root: Path) -> None:
    """A random-init base model with the workspace tokenizer's fingerprint (what pretrain would write)."""
    from tasks.pretrain import model_config

    params = load_params(root / "params.yaml")
    tok = ChatTokenizer.load(root / paths.TOKENIZER_JSON)
    config = model_config(params, tok)
    torch.manual_seed(0)
    save_checkpoint(
        root / paths.checkpoint("base"),
        Transformer(config),
        config,
        meta={"tokenizer_fingerprint": tok.fingerprint, "stage": "pretrain"},
    )


def new_workspace(root: Path, overrides: list[str] | None = None) -> Path:
    make_workspace(root, OVERRIDES + (overrides or []))
    write_base(root)
    return root


def curve(root: Path, stage: str) -> list[dict[str, float]]:
    with open(root / paths.PLOTS / f"{stage}.csv") as fh:
        return [{k: float(v) for k, v in row.items() if v} for row in csv.DictReader(fh)]


def weights_hash(path: Path) -> str:
    model, _ = load_checkpoint(path)
    return state_dict_hash(model)


def ok(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    """sft -> reward -> dpo -> rlhf, uninterrupted, on the tiny workspace."""
    root = new_workspace(tmp_path_factory.mktemp("posttrain"))
    return root, ok(run_stages(root, STAGES, experiment=f"{EXPERIMENT}-chain"))


@pytest.fixture
def in_workspace(tmp_path, monkeypatch):
    """A tiny workspace as the current directory (stages read and write relative paths)."""
    new_workspace(tmp_path)
    monkeypatch.chdir(tmp_path)
    return tmp_path


# ------------------------------------------------------------------------------------------------ SFT
def test_sft_mask_is_exactly_assistant_content_and_end(tmp_path):
    make_workspace(tmp_path)
    tok = ChatTokenizer.load(tmp_path / paths.TOKENIZER_JSON)
    messages = [
        {"role": "system", "content": "You answer questions about Python."},
        {"role": "user", "content": "What does json.dumps do?"},
        {"role": "assistant", "content": "It serializes obj to a JSON formatted str."},
        {"role": "user", "content": "And json.loads?"},
        {"role": "assistant", "content": "It deserializes a str to a Python object."},
    ]
    ids, mask = tok.render_chat(messages)
    # The expected mask, built from the pieces independently of render_chat's own bookkeeping.
    expected_ids, expected_mask = [tok.bos_id], [False]
    for m in messages:
        body = tok.encode(m["content"]) + [tok.end_id]
        expected_ids += [tok.token_id(f"<|{m['role']}|>")] + body
        expected_mask += [False] + [m["role"] == "assistant"] * len(body)
    assert ids == expected_ids and mask == expected_mask
    trained = [t for t, m in zip(ids, mask, strict=True) if m]
    answers = [m["content"] for m in messages if m["role"] == "assistant"]
    assert trained == tok.encode(answers[0]) + [tok.end_id] + tok.encode(answers[1]) + [tok.end_id]
    role_ids = {tok.token_id(f"<|{r}|>") for r in ("system", "user", "assistant")} | {tok.bos_id}
    assert not role_ids & set(trained)
    # The same text decoded: every trained token is assistant text or <|end|>, nothing else.
    assert tok.decode(trained) == "".join(answers)

    # The batch the SFT objective trains on: targets are exactly the masked tokens, shifted by one.
    batch = chat_data.lm_batch([chat_data.Example(ids, mask)], tok.pad_id)
    targets = batch["y"][0][batch["y"][0] != chat_data.IGNORE].tolist()
    assert targets == trained
    assert batch["x"][0].tolist() == ids[:-1]


def tiny_model(vocab: int = 384) -> Transformer:
    torch.manual_seed(0)
    return Transformer(
        ModelConfig(vocab_size=vocab, n_layer=2, n_head=4, n_kv_head=2, d_model=64, max_seq_len=128)
    )


def token_losses(model: Transformer, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    logits = model(batch["x"], doc_ids=batch.get("doc_ids"))
    y = batch["y"]
    return F.cross_entropy(
        logits.flatten(0, 1), y.flatten(), ignore_index=chat_data.IGNORE, reduction="none"
    ).view(y.shape)


def test_right_padding_and_packing_do_not_leak_across_examples():
    model = tiny_model().eval()
    g = torch.Generator().manual_seed(1)
    examples = []
    for n in (9, 23, 14):
        ids = torch.randint(7, 384, (n,), generator=g).tolist()
        ids[0] = 1
        examples.append(chat_data.Example(ids, [False] * 3 + [True] * (n - 3)))
    with torch.no_grad():
        alone = [token_losses(model, chat_data.lm_batch([e], 0)).sum() for e in examples]
        padded = token_losses(model, chat_data.lm_batch(examples, 0)).sum(-1)  # rows padded to 23
        rows = chat_data.pack(examples, seq_len=64)
        assert len(rows) == 1 and rows[0].doc == [0] * 9 + [1] * 23 + [2] * 14
        packed_batch = chat_data.packed_batch(rows, 0)
        packed = token_losses(model, packed_batch)[0]
        leaky = token_losses(model, {"x": packed_batch["x"], "y": packed_batch["y"]})[0]
    for i in range(3):
        assert torch.allclose(padded[i], alone[i], atol=1e-4), (i, padded[i], alone[i])
    # Per conversation: the packed row gives the loss each conversation has alone.
    bounds = [(0, 9), (9, 32), (32, 46)]
    for (a, b), loss in zip(bounds, alone, strict=True):
        assert torch.allclose(packed[a : b - 1].sum(), loss, atol=1e-4)
    assert int((packed_batch["y"] != chat_data.IGNORE).sum()) == sum(len(e.ids) - 3 for e in examples)
    # Without doc_ids the later conversations would read the earlier ones: a different loss.
    assert not torch.allclose(leaky.sum(), packed.sum(), atol=1e-2)


def test_sft_objective_packs_when_asked(in_workspace):
    from tasks.sft import SupervisedChat

    tok = ChatTokenizer.load(paths.TOKENIZER_JSON)
    examples = chat_data.sft_examples(tok, 128)
    padded = SupervisedChat(examples, tok.pad_id, 4, 1, 0.1, 1)
    packed = SupervisedChat(examples, tok.pad_id, 4, 1, 0.1, 1, packing=True, seq_len=128)
    a, b = padded.batch(0, 0, None), packed.batch(0, 0, None)  # type: ignore[arg-type]
    assert "doc_ids" in b and b["x"].shape == b["doc_ids"].shape
    assert packed.tokens_in(b) > 2 * padded.tokens_in(a)  # several conversations per packed row
    loss, _ = packed.loss(tiny_model(), b)
    assert torch.isfinite(loss)


# --------------------------------------------------------------------------------- trained stages
def stage_run_tags(stage: str, experiment: str) -> list[dict[str, str]]:
    import mlflow
    from mlflow.tracking import MlflowClient

    mlflow.set_tracking_uri(os.environ["MLFLOW_TRACKING_URI"])
    client = MlflowClient()
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id], f"tags.`pipeline.stage` = '{stage}'", max_results=50)
    return [dict(r.data.tags, status=r.info.status) for r in runs]


def test_stages_learn_with_trl_metrics(chain):
    root, stdout = chain
    sft = curve(root, "sft")
    assert sft[-1]["loss"] < sft[0]["loss"]
    reward = json.loads((root / "data/metrics/reward.json").read_text())
    assert reward["val/accuracy"] > 0.5 and reward["val/margin"] > 0, reward
    dpo = curve(root, "dpo")
    for key in (
        "rewards/chosen",
        "rewards/rejected",
        "rewards/margins",
        "rewards/accuracies",
        "logps/chosen",
    ):
        assert key in dpo[0] and f"val/{key}" in dpo[-1], key
    assert dpo[-1]["val/rewards/accuracies"] > 0.5
    assert dpo[-1]["rewards/margins"] > dpo[0]["rewards/margins"]
    assert dpo[-1]["val/rewards/margins"] > 0
    rlhf = curve(root, "rlhf")
    for key in (
        "reward/mean",
        "completions/clipped_ratio",
        "kl",
        "kl_coef",
        "entropy",
        "policy/clipfrac",
        "loss/value",
        "val/reward_mean",
    ):
        assert key in rlhf[-1], key
    # Adaptive KL with a target far below the observed KL: the coefficient goes up.
    assert rlhf[-1]["kl_coef"] > rlhf[0]["kl_coef"]


def test_embedded_rejected_answers_are_wrong_truncated_or_shuffled():
    """Each embedded pair's rejected answer is what its recorded kind says, and the stages read the kind."""
    import itertools
    import random

    from tasks.data import embedded

    def words(text: str) -> list[str]:
        return sorted(w.rstrip(".!?:;,") for w in text.split())

    answers = {e.qual: e.answer for e in embedded.doc_entries()}
    pairs = list(itertools.islice(embedded.preference_pairs(), 600))
    kinds = [chat_data.rejected_kind(p["source"]) for p in pairs]
    assert set(kinds) == set(embedded.REJECTED_KINDS)
    assert min(kinds.count(k) for k in embedded.REJECTED_KINDS) > 110  # about a quarter each
    for pair, kind in zip(pairs, kinds, strict=True):
        qual, about = pair["source"].removeprefix("embedded:").split(f"|{kind}:")
        chosen, rejected = pair["chosen"], pair["rejected"]
        assert chosen == answers[qual] and rejected.strip() and rejected != chosen
        if kind == "other":  # another object's paragraph
            assert rejected == answers[about] and about != qual
            continue
        assert about == qual
        if kind == "filler":  # the right paragraph and the SFT teacher's pleasantry
            assert rejected == f"{chosen} {embedded.FILLER}"
            continue
        if kind == "truncated":  # a prefix of the words, cut where no sentence ends
            full, kept = chosen.split(), rejected.split()
            assert 0 < len(kept) < len(full) and kept[:-1] == full[: len(kept) - 1]
            assert full[len(kept) - 1].startswith(kept[-1]) and rejected[-1] not in ".!?:;,"
        else:  # the same words in another order, the final punctuation kept at the end
            assert words(rejected) == words(chosen)
            assert rejected[-1] == chosen[-1] or chosen[-1] not in ".!?:;,"
    assert embedded.truncated("Word", random.Random(0)) == ""
    assert embedded.shuffled("Word.", random.Random(0)) == ""
    assert chat_data.rejected_kind("files data/pairs.jsonl#3") == ""


# The tiny profile, except: SFT trains longer and faster, so that PPO samples from a policy that writes
# docstring-like text rather than near-uniform noise; more held-out pairs (300) so accuracies are figures
# and not coin flips; reward ~1 epoch of the 900 training pairs; no mid-run checkpoints (resume is tested on
# the chain above); PPO with enough rollouts and held-out prompts (64) to measure its gain.
EMBEDDED_OVERRIDES = [
    *(f"{s}.train.checkpoint_every=0" for s in STAGES),
    "sft.train.max_steps=60",
    "sft.train.micro_batch_size=16",
    "sft.train.lr=0.003",
    "sft.train.min_lr=0.0003",
    "sft.train.warmup_steps=5",
    "sft.train.eval_every=60",
    "reward.val_fraction=0.25",
    "reward.train.max_steps=120",
    "reward.train.eval_every=60",
    "dpo.val_fraction=0.25",
    "dpo.train.max_steps=40",
    "dpo.train.lr=0.001",
    "dpo.train.min_lr=0.0001",
    "dpo.train.eval_every=40",
    "rlhf.train.max_steps=20",
    "rlhf.rollout_batch_size=16",
    "rlhf.train.micro_batch_size=16",
    "rlhf.train.lr=0.001",
    "rlhf.kl_coef=0.2",
    "rlhf.train.eval_every=20",
    "rlhf.train.eval_batches=4",
]


@pytest.fixture(scope="module")
def embedded_chain(tmp_path_factory):
    """sft -> reward -> dpo -> rlhf on the embedded default chat data (1000 conversations, 1200 pairs)."""
    root = tmp_path_factory.mktemp("posttrain-embedded")
    kinds = make_embedded_workspace(root, EMBEDDED_OVERRIDES, sft_rows=1000, pairs=1200)
    write_base(root)
    # Its own MLflow experiment: the alert tests below count the runs of the chain's experiment.
    return root, kinds, ok(run_stages(root, STAGES, experiment=f"{EXPERIMENT}-embedded"))


def test_stages_learn_the_embedded_default_preferences(embedded_chain):
    """Held-out figures on the data `make run` trains on (measured on 2 cores, seed 1337, with the row split
    that preceded the split by object; the bounds leave room and held under both splits):
    reward accuracy 0.65 (truncated 0.93, shuffled 0.56, other 0.50); DPO accuracy 0.65, margin 0.09;
    PPO held-out reward 0.85 -> 1.47 with every rollout KL at most 4.6 (bound: alerts.ppo_max_kl, 10)."""
    root, kinds, stdout = embedded_chain
    assert set(kinds) == {"other", "truncated", "shuffled", "filler"} and min(kinds.values()) > 230, kinds
    metrics = {s: json.loads((root / f"data/metrics/{s}.json").read_text()) for s in STAGES}

    reward = metrics["reward"]
    assert reward["val/pairs"] == 300
    assert reward["val/accuracy"] >= 0.6 and reward["val/margin"] > 0, reward
    # The overall figure is not one kind carrying the rest at chance: truncated answers are learnt well.
    # (A wrong object's paragraph, "other", needs question-answer matching: at chance at this size.)
    assert reward["val/accuracy/truncated"] >= 0.8, reward

    dpo = metrics["dpo"]
    assert dpo["val/pairs"] == 300
    # The implicit rewards start at exactly 0 (policy == reference): a positive held-out margin is a rise.
    assert dpo["val/rewards/accuracies"] >= 0.58 and dpo["val/rewards/margins"] > 0.03, dpo

    rlhf, rlhf_curve = metrics["rlhf"], curve(root, "rlhf")
    # Same 64 held-out prompts and sampling seeds before and after PPO.
    assert rlhf["val/reward_mean"] >= rlhf["val/reward_mean_initial"] + 0.15, rlhf
    kls = [row["kl"] for row in rlhf_curve if "kl" in row]  # one per rollout
    bound = load_params(root / "params.yaml").alerts.ppo_max_kl
    assert len(kls) == 10 and max(kls) <= bound, (kls, bound)
    assert "ALERT" not in stdout


def test_ppo_kl_alert_is_logged_and_tagged(chain):
    _, stdout = chain
    assert "ALERT: PPO KL" in stdout and "alerts.ppo_max_kl 0.005" in stdout
    (tags,) = [t for t in stage_run_tags("rlhf", f"{EXPERIMENT}-chain") if t["status"] == "FINISHED"]
    assert "PPO KL" in tags["health.alerts"]
    (dpo_tags,) = stage_run_tags("dpo", f"{EXPERIMENT}-chain")
    assert dpo_tags["health.alerts"] == "none"


def test_dpo_alert_with_fail_on_alert_fails_and_writes_nothing(chain, tmp_path):
    """A DPO run that learns nothing (lr 0): margin collapse -> exit 1, no checkpoint or metrics written."""
    import shutil

    root, _ = chain
    make_workspace(
        tmp_path,
        [
            *OVERRIDES,
            "dpo.train.lr=1.0e-12",  # learns nothing (a zero lr is refused up front)
            "dpo.train.min_lr=1.0e-12",
            "dpo.train.max_steps=2",
            "alerts.dpo_min_margin=0.01",
            "alerts.fail_on_alert=true",
        ],
    )
    shutil.copytree(root / "data/checkpoints", tmp_path / "data/checkpoints")
    shutil.copytree(root / "data/metrics", tmp_path / "data/metrics")
    before = weights_hash(tmp_path / "data/checkpoints/dpo")
    metrics_before = (tmp_path / "data/metrics/dpo.json").read_text()
    proc = run_stages(tmp_path, ["dpo"], experiment=f"{EXPERIMENT}-dpo-alert")
    assert proc.returncode == 1, proc.stdout[-3000:]
    assert "ALERT: DPO held-out rewards/margins" in proc.stdout
    assert "health alert (alerts.fail_on_alert=true), nothing written" in proc.stdout
    assert weights_hash(tmp_path / "data/checkpoints/dpo") == before
    assert (tmp_path / "data/metrics/dpo.json").read_text() == metrics_before
    failed = [t for t in stage_run_tags("dpo", f"{EXPERIMENT}-dpo-alert") if t["status"] == "FAILED"]
    assert len(failed) == 1 and "rewards/margins" in failed[0]["health.alerts"]


def test_stages_resume_after_kill_to_the_same_weights(chain, tmp_path):
    """kill -9 each stage after a checkpoint and rerun: the same final weights as the uninterrupted chain.
    DPO's cached reference log-probs and PPO's cached rollout are reused on resume."""
    root, _ = chain
    new_workspace(tmp_path)
    steps = [
        (["sft"], ("sft", 3)),
        (["sft", "reward"], ("reward", 3)),
        (["reward", "dpo"], ("dpo", 3)),
        (["dpo", "rlhf"], ("rlhf", 5)),
    ]
    out = []
    for stages, kill in steps:
        proc = run_stages(tmp_path, stages, kill=kill, experiment=f"{EXPERIMENT}-resume")
        assert proc.returncode == -9, proc.stdout[-3000:] + proc.stderr[-3000:]
        assert not (tmp_path / paths.checkpoint(kill[0])).exists(), "a killed stage leaves no output"
        out.append(proc.stdout)
    final = ok(run_stages(tmp_path, ["rlhf"], experiment=f"{EXPERIMENT}-resume"))
    assert "resumed from data/state/sft at step 2" in out[1]
    assert "resumed from data/state/reward at step 2" in out[2]
    assert "reference log-probs: computed for 64 pairs" in out[2]
    assert "resumed from data/state/dpo at step 2" in out[3]
    assert "reference log-probs: reused the cache" in out[3]
    assert "resumed from data/state/rlhf at step 3" in final
    assert "resumed on the cached rollout of step 2" in final
    for stage, name in (("sft", "sft"), ("reward", "reward"), ("dpo", "dpo"), ("rlhf", "rlhf")):
        assert weights_hash(tmp_path / paths.checkpoint(name)) == weights_hash(
            root / paths.checkpoint(name)
        ), stage
        steps_logged = [row["step"] for row in curve(tmp_path, stage)]
        assert steps_logged == sorted(set(steps_logged)), stage
    assert not (tmp_path / paths.STATE / "rlhf").exists()


# ------------------------------------------------------------------------------- objectives, units
def test_adaptive_kl_controller_tracks_the_target():
    from tasks.train.rollouts import KLController

    fixed = KLController(0.1, adaptive=False, target=1.0, horizon=100)
    assert fixed.update(50.0, 10) == 0.1
    up = KLController(0.1, adaptive=True, target=1.0, horizon=100)
    assert up.update(5.0, 10) == pytest.approx(0.1 * (1 + 0.2 * 10 / 100))  # error clipped at +0.2
    down = KLController(0.1, adaptive=True, target=1.0, horizon=100)
    assert down.update(0.9, 10) == pytest.approx(0.1 * (1 - 0.1 * 10 / 100))
    for _ in range(200):
        down.update(0.0, 10)
    assert down.value < 0.1 * 0.99**150  # KL far below target: the penalty keeps shrinking
    with pytest.raises(StageError, match="target_kl"):
        KLController(0.1, adaptive=True, target=0.0, horizon=100)


@pytest.mark.parametrize("loss_type,smoothing", [("sigmoid", 0.2), ("ipo", 0.0)])
def test_dpo_objective_options_raise_the_margin(in_workspace, loss_type, smoothing):
    """Label smoothing and IPO through the DPO objective (plain sigmoid runs in the stage chain)."""
    import dataclasses

    from tasks.dpo import DirectPreference, reference_logps

    params = load_params()
    cfg = dataclasses.replace(params.dpo, loss_type=loss_type, label_smoothing=smoothing, beta=0.1)
    tok = ChatTokenizer.load(paths.TOKENIZER_JSON)
    pairs = chat_data.preference_pairs(tok, 128)
    policy = tiny_model()
    reference = tiny_model().requires_grad_(False)
    objective = DirectPreference(pairs, reference_logps(reference, pairs, tok.pad_id, 16), cfg, tok.pad_id)
    opt = torch.optim.AdamW(policy.parameters(), lr=1e-3)
    margins = []
    for step in range(3):
        loss, metrics = objective.loss(policy, objective.batch(step, 0, policy))
        margins.append(metrics["rewards/margins"])
        opt.zero_grad()
        loss.backward()
        opt.step()
    last = objective.evaluate(policy)
    assert abs(margins[0]) < 1e-4  # policy == reference: the implicit rewards start at 0
    assert last["val/rewards/margins"] > 0.05 and last["val/rewards/accuracies"] > 0.5, last


# ----------------------------------------------------------------------------------------- bad input
def write_sft(root: Path, rows: list[dict]) -> None:
    pq.write_table(pa.Table.from_pylist(rows), root / "data/validated/sft.parquet")


def write_preference(root: Path, rows: list[dict]) -> None:
    pq.write_table(pa.Table.from_pylist(rows), root / "data/validated/preference.parquet")


def copy_checkpoint(root: Path, src: str, dst: str, fingerprint: str | None = None) -> None:
    model, meta = load_checkpoint(root / paths.checkpoint(src))
    meta = {k: v for k, v in meta.items() if k not in ("model", "kind")}
    if fingerprint is not None:
        meta["tokenizer_fingerprint"] = fingerprint
    save_checkpoint(root / paths.checkpoint(dst), model, model.config, meta=meta)  # type: ignore[arg-type]


def untouched(root: Path, name: str) -> str:
    """An existing output of the stage, to check that a refused run leaves it alone."""
    copy_checkpoint(root, "base", name)
    return weights_hash(root / paths.checkpoint(name))


def test_sft_refuses_a_conversation_not_ending_with_assistant(in_workspace):
    from tasks import sft

    rows = pq.read_table(in_workspace / "data/validated/sft.parquet").to_pylist()
    rows[5]["messages"] = rows[5]["messages"] + [{"role": "user", "content": "And then?"}]
    write_sft(in_workspace, rows)
    before = untouched(in_workspace, "sft")
    with pytest.raises(StageError, match="row 5: conversation does not end with an assistant turn"):
        sft.run(load_params(), None)
    assert weights_hash(in_workspace / paths.checkpoint("sft")) == before
    assert not (in_workspace / paths.STATE / "sft").exists()


@pytest.mark.parametrize("stage", ["reward", "dpo"])
@pytest.mark.parametrize(
    "bad,message",
    [
        ({"rejected": "It will dump the value 3 correctly."}, "row 3: chosen == rejected"),
        ({"chosen": "   "}, "row 3: empty chosen response"),
    ],
)
def test_bad_preference_pairs_are_refused(in_workspace, stage, bad, message):
    import importlib

    rows = pq.read_table(in_workspace / "data/validated/preference.parquet").to_pylist()
    assert rows[3]["chosen"] == "It will dump the value 3 correctly."
    rows[3].update(bad)
    write_preference(in_workspace, rows)
    copy_checkpoint(in_workspace, "base", "sft")
    before = untouched(in_workspace, stage)
    with pytest.raises(StageError, match=message):
        importlib.import_module(f"tasks.{stage}").run(load_params(), None)
    assert weights_hash(in_workspace / paths.checkpoint(stage)) == before
    assert not (in_workspace / paths.STATE / stage).exists()


def test_reward_model_from_another_tokenizer_is_refused(in_workspace):
    from tasks import rlhf

    copy_checkpoint(in_workspace, "base", "sft")
    from models.heads import ScalarHeadModel

    base, meta = load_checkpoint(in_workspace / paths.checkpoint("base"))
    reward = ScalarHeadModel(base)  # type: ignore[arg-type]
    save_checkpoint(
        in_workspace / paths.checkpoint("reward"), reward, reward.config, {"tokenizer_fingerprint": "f" * 64}
    )
    with pytest.raises(TokenizerMismatch, match="reward was trained with tokenizer ffffffffffff"):
        rlhf.run(load_params(), None)
    assert not (in_workspace / paths.checkpoint("rlhf")).exists()


def test_policy_and_reference_of_different_shapes_are_refused(in_workspace):
    from tasks.train.checkpoints import load_policy_and_reference

    tok = ChatTokenizer.load(paths.TOKENIZER_JSON)
    copy_checkpoint(in_workspace, "base", "sft")
    base, _ = load_checkpoint(in_workspace / paths.checkpoint("base"))
    config = ModelConfig.from_dict({**base.config.to_dict(), "n_layer": 3})  # type: ignore[union-attr]
    save_checkpoint(
        in_workspace / paths.checkpoint("other"),
        Transformer(config),
        config,
        meta={"tokenizer_fingerprint": tok.fingerprint},
    )
    with pytest.raises(StageError, match="different shapes \\(n_layer: 2 vs 3\\)"):
        load_policy_and_reference("sft", "other", tok.fingerprint)


def test_ppo_critic_reads_the_policy_features_without_moving_them():
    """The value loss trains the value head only; logits and values equal PolicyWithValue's (same weights)."""
    from models.heads import PolicyWithValue
    from tasks.rlhf import PolicyWithCritic

    config = ModelConfig(vocab_size=64, n_layer=1, n_head=2, n_kv_head=2, d_model=32, max_seq_len=16)
    torch.manual_seed(0)
    critic = PolicyWithCritic(Transformer(config))
    shared = PolicyWithValue(Transformer(config))
    shared.load_state_dict(critic.state_dict())
    tokens = torch.randint(0, 64, (2, 8))
    (logits, values), (logits_shared, values_shared) = critic(tokens), shared(tokens)
    assert torch.equal(logits, logits_shared) and torch.equal(values, values_shared)
    values.pow(2).sum().backward()
    assert critic.value_head.weight.grad is not None and critic.value_head.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in critic.transformer.parameters())


def test_rlhf_held_out_prompts_do_not_depend_on_the_training_seed():
    """A seed sweep of rlhf.train.seed holds out (and evaluate scores) the same prompts; split_seed moves them."""
    lengths = [10] * 300 + [250] * 20  # the last 20 leave no room for a response
    params = load_params(REPO / "params.yaml")
    split = chat_data.rlhf_split(params.rlhf, lengths, 256)
    params.rlhf.train.seed += 1
    assert chat_data.rlhf_split(params.rlhf, lengths, 256) == split
    params.rlhf.split_seed += 1
    assert chat_data.rlhf_split(params.rlhf, lengths, 256)[1] != split[1]
    assert len(split[1]) == 30 and max(split[0] + split[1]) < 300
