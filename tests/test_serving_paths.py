"""The served pyfunc in-process (as `mlflow models serve` and `pipeline chat` load it): the paths a user
takes besides plain greedy chat.

Sampling parameters reach generation (top_k=1 and a tiny nucleus give the greedy answer at any
temperature; seeds reproduce and differ); predict_stream answers one conversation and refuses several;
a reward model (scalar head) is served as a scorer: its scores equal the checkpoint's own head on the
rendered chat (the last max_seq_len tokens of a long one) and it refuses to chat; a checkpoint logged with
another tokenizer than it was trained with is refused when the model loads.
"""

from __future__ import annotations

from pathlib import Path

import mlflow
import pytest
import torch
from mlflow.exceptions import MlflowException

from models.checkpoint import load_checkpoint, save_checkpoint
from models.config import ModelConfig
from models.heads import ScalarHeadModel
from models.llama import Transformer
from tasks.core import registry, tracking
from tasks.data.chat_tokenizer import ChatTokenizer
from tests.helpers.workspace import make_workspace
from tests.test_serving import tiny_registered_model

CONFIG = ModelConfig(vocab_size=384, n_layer=2, n_head=4, n_kv_head=2, d_model=64, max_seq_len=128)
M = [{"role": "user", "content": "What does json.loads do with a string?"}]


@pytest.fixture(scope="module")
def chat(tmp_path_factory):
    """A tiny random chat model registered in the session's store, loaded through MLflow."""
    uri = tiny_registered_model(tmp_path_factory.mktemp("serving-paths"), "serving-paths-chat")
    return mlflow.pyfunc.load_model(uri)


def answer(model, **params) -> str:
    return model.predict([{"messages": M}], params={"max_new_tokens": 12, **params})[0]


def test_sampling_parameters_reach_generation(chat):
    greedy = answer(chat, temperature=0.0)
    assert greedy.strip()
    # Only the most likely token survives top_k=1 or a nucleus of 1e-6: greedy, whatever the temperature.
    assert answer(chat, temperature=1.5, top_k=1, seed=3) == greedy
    assert answer(chat, temperature=1.5, top_p=1e-6, seed=3) == greedy
    sampled = [answer(chat, temperature=1.5, seed=s) for s in range(4)]
    assert answer(chat, temperature=1.5, seed=2) == sampled[2]  # a seed reproduces its answer
    assert len(set(sampled)) > 1 and any(s != greedy for s in sampled)  # seeds and temperature matter


def test_predict_stream_answers_one_conversation_and_refuses_several(chat):
    params = {"max_new_tokens": 12, "temperature": 0.0}
    pieces = list(chat.predict_stream({"messages": M}, params=params))
    assert pieces and "".join(pieces) == answer(chat, temperature=0.0)
    two = [{"messages": M}, {"messages": M}]
    with pytest.raises(MlflowException, match="'predict_stream' requires single input"):  # MLflow's check
        list(chat.predict_stream(two, params=params))
    with pytest.raises(MlflowException, match="predict_stream answers one conversation at a time"):  # ours
        list(chat.unwrap_python_model().predict_stream(None, two, params))


def log_checkpoint(root: Path, model: torch.nn.Module, fingerprint: str | None = None) -> str:
    """Save `model` with the workspace tokenizer's fingerprint (or the one given), log and register it."""
    tok_json = root / "data/tokenizer/tokenizer.json"
    meta = {"tokenizer_fingerprint": fingerprint or ChatTokenizer.load(tok_json).fingerprint}
    ckpt = save_checkpoint(root / "ckpt", model, CONFIG, meta)
    name = f"serving-paths-{root.name}"
    with tracking.stage_run("serving-paths"):
        info = registry.log_chat_model("model", name, ckpt, tok_json)
    return f"models:/{name}/{info.registered_model_version}"


def test_a_served_reward_model_scores_conversations_and_does_not_chat(tmp_path):
    make_workspace(tmp_path)
    torch.manual_seed(0)
    uri = log_checkpoint(tmp_path, ScalarHeadModel(Transformer(CONFIG)))
    served = mlflow.pyfunc.load_model(uri)
    tok = ChatTokenizer.load(tmp_path / "data/tokenizer/tokenizer.json")
    head, _ = load_checkpoint(tmp_path / "ckpt", kind="scalar_head")
    long = [{"role": "user", "content": " ".join(f"word{i}" for i in range(300))}, *M]
    conversations = [M, [*M, {"role": "assistant", "content": "It parses JSON."}], long]
    ids = [tok.render_chat(c)[0] for c in conversations]
    assert len(ids[2]) > CONFIG.max_seq_len  # scored on its last max_seq_len tokens
    with torch.no_grad():
        expected = [float(head(torch.tensor([i[-CONFIG.max_seq_len :]]))[0, -1]) for i in ids]
    scores = served.predict([{"messages": c} for c in conversations])
    assert scores == pytest.approx(expected, abs=1e-6) and len(set(scores)) == 3
    with pytest.raises(ValueError, match="this is a reward model: it scores conversations"):
        next(served.unwrap_python_model().stream_chat(M, {"max_new_tokens": 4}))


def test_a_checkpoint_of_another_tokenizer_is_refused_at_load(tmp_path):
    make_workspace(tmp_path)
    uri = log_checkpoint(tmp_path, Transformer(CONFIG), fingerprint="0" * 64)
    with pytest.raises(ValueError, match="checkpoint and tokenizer artifacts come from different tokenizers"):
        mlflow.pyfunc.load_model(uri)
