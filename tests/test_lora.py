"""LoRA adapters: a merged adapter checkpoint equals the peft model it was trained as, disabled adapters are
the base model, and DPO with LoRA scores its reference with the adapters disabled (one model, no copy)."""

from __future__ import annotations

import contextlib
import json
import signal
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from models.adapters import save_adapter_checkpoint, sha256_file
from models.checkpoint import load_checkpoint, save_checkpoint, state_dict_hash
from models.config import ModelConfig
from models.heads import ScalarHeadModel
from models.llama import Transformer
from tasks.core import paths
from tasks.core.config import LoRAConfig, TrainConfig, load_params
from tasks.data import chat_data
from tasks.data.chat_tokenizer import ChatTokenizer
from tasks.dpo import reference_logps
from tasks.register import merged_checkpoint
from tasks.train.lora import AdaptersOff, adapters_disabled, add_adapters, base_of
from tests.helpers.hfmodels import ok, stage
from tests.helpers.workspace import make_workspace


def tokens(T: int, vocab: int = 64) -> torch.Tensor:
    return torch.randint(0, vocab, (2, T), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("kind", ["causal_lm", "scalar_head"])
def test_merged_adapter_checkpoint_equals_the_peft_model(tmp_path: Path, kind: str) -> None:
    torch.manual_seed(0)
    base = Transformer(
        ModelConfig(vocab_size=64, n_layer=2, n_head=4, n_kv_head=2, d_model=32, max_seq_len=32)
    )
    save_checkpoint(tmp_path / "base", base, base.config, meta={"stage": "test"})
    model = base if kind == "causal_lm" else ScalarHeadModel(base)
    cfg = LoRAConfig(enabled=True, rank=4, alpha=8.0, target_modules=["q_proj", "v_proj", "down_proj"])
    keep = () if kind == "causal_lm" else ("value_head.weight", "value_head.bias")
    adapters = add_adapters(
        model, cfg, TrainConfig(), base_of(tmp_path / "base", "checkpoint"), where="t", keep=keep
    )
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_" in n or n in keep for n in trainable)
    x = tokens(20)
    with torch.no_grad():
        before = model(x).clone()
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0.0, 0.2)  # as after training: B != 0, a changed head
        trained = model(x)
    tensors = adapters.tensors(model.state_dict())
    save_adapter_checkpoint(tmp_path / "ckpt", tensors, base.config, kind, adapters.describe())
    merged, meta = load_checkpoint(tmp_path / "ckpt")
    # what register logs: the merged model as a plain checkpoint, lineage kept
    with merged_checkpoint(tmp_path / "ckpt", merged, meta) as logged:
        assert sorted(p.name for p in logged.iterdir()) == ["config.json", "model.safetensors"]
        plain, plain_meta = load_checkpoint(logged)
        assert state_dict_hash(plain) == state_dict_hash(merged)
        assert plain_meta["merged_adapter"] == adapters.describe()
    with torch.no_grad():
        assert (merged(x) - trained).abs().max().item() < 1e-5
        assert (trained - before).abs().max().item() > 1e-3


def test_disabled_adapters_give_the_base_model() -> None:
    torch.manual_seed(0)
    model = Transformer(
        ModelConfig(vocab_size=64, n_layer=1, n_head=2, n_kv_head=2, d_model=32, max_seq_len=32)
    )
    x = tokens(12)
    with torch.no_grad():
        base = model(x).clone()
    add_adapters(model, LoRAConfig(enabled=True, rank=2), TrainConfig(), {}, where="t")
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0.0, 0.5)
        assert (model(x) - base).abs().max().item() > 1e-3
        with adapters_disabled(model):
            assert torch.equal(model(x), base)
        assert (AdaptersOff(model)(x) - base).abs().max().item() == 0
        assert (model(x) - base).abs().max().item() > 1e-3, "adapters are back on after the context"


def test_dpo_with_lora_scores_the_reference_with_adapters_disabled(tmp_path: Path) -> None:
    """One model: the cached reference log-probs are those of the SFT model itself (the policy's frozen base),
    and the checkpoint holds adapters pointing at data/checkpoints/sft."""
    root = tmp_path / "ws"
    root.mkdir()
    dpo = [
        "dpo.lora.enabled=true",
        "dpo.train.max_steps=4",
        "dpo.train.checkpoint_every=2",
        "dpo.train.eval_every=4",
    ]
    make_workspace(root, dpo)
    tok = ChatTokenizer.load(root / paths.TOKENIZER_JSON)
    torch.manual_seed(0)
    sft = Transformer(
        ModelConfig(vocab_size=384, n_layer=2, n_head=4, n_kv_head=2, d_model=64, max_seq_len=128)
    )
    meta = {"tokenizer_fingerprint": tok.fingerprint, "stage": "sft"}
    save_checkpoint(root / paths.checkpoint("sft"), sft, sft.config, meta=meta)
    assert stage(root, "dpo", kill_at=3).returncode == -signal.SIGKILL  # the state (and its cache) stays
    with contextlib.chdir(root):
        params = load_params(root / "params.yaml")
        pairs = chat_data.preference_pairs(tok, params.dpo.seq_len)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=params.dpo.train.bf16):
            pack_width = min(params.dpo.seq_len, sft.config.max_seq_len) if params.dpo.packing else 0
            expected = reference_logps(sft.eval(), pairs, tok.pad_id, batch_size=16, pack_width=pack_width)
    cached = load_file(str(root / paths.STATE / "dpo" / "reference_logps.safetensors"))["logps"]
    assert (cached - expected).abs().max().item() < 1e-4
    ok(stage(root, "dpo"))
    meta = json.loads((root / paths.checkpoint("dpo") / "config.json").read_text())
    assert meta["adapter"]["base"] == {
        "path": "data/checkpoints/sft",
        "format": "checkpoint",
        "sha256": sha256_file(root / paths.checkpoint("sft") / "model.safetensors"),
    }
    assert not (root / paths.checkpoint("dpo") / "model.safetensors").exists()


def test_reward_and_rlhf_with_lora_keep_their_heads_and_reference(tmp_path: Path) -> None:
    """reward: adapters + the scalar head trained in full, loaded back as a ScalarHeadModel; rlhf (whose
    reference is AdaptersOff(policy), tested above): adapters only, the value head dropped as without LoRA."""
    root = tmp_path / "ws"
    root.mkdir()
    overrides = [
        "reward.lora.enabled=true",
        "reward.train.max_steps=2",
        "reward.train.warmup_steps=1",
        "reward.train.eval_every=2",
        "rlhf.lora.enabled=true",
        "rlhf.train.max_steps=2",
        "rlhf.ppo_epochs=1",
        "rlhf.max_new_tokens=6",
        "rlhf.train.eval_every=2",
    ]
    make_workspace(root, overrides)
    tok = ChatTokenizer.load(root / paths.TOKENIZER_JSON)
    torch.manual_seed(0)
    sft = Transformer(
        ModelConfig(vocab_size=384, n_layer=2, n_head=4, n_kv_head=2, d_model=64, max_seq_len=128)
    )
    save_checkpoint(
        root / paths.checkpoint("sft"), sft, sft.config, meta={"tokenizer_fingerprint": tok.fingerprint}
    )
    ok(stage(root, "reward"))
    ok(stage(root, "rlhf"))
    reward_file = load_file(str(root / paths.checkpoint("reward") / "adapter.safetensors"))
    assert {"value_head.weight", "value_head.bias"} <= set(reward_file)
    rlhf_file = load_file(str(root / paths.checkpoint("rlhf") / "adapter.safetensors"))
    assert (
        rlhf_file
        and all(".lora_" in k for k in rlhf_file)
        and not any("transformer." in k for k in rlhf_file)
    )
    with contextlib.chdir(root):
        reward, _ = load_checkpoint(paths.checkpoint("reward"))
        policy, meta = load_checkpoint(paths.checkpoint("rlhf"))
    assert isinstance(reward, ScalarHeadModel) and isinstance(policy, Transformer)
    assert torch.equal(reward.value_head.weight, reward_file["value_head.weight"])
    assert meta["adapter"]["base"]["path"] == "data/checkpoints/sft"
    x = tokens(20, vocab=384)
    with torch.no_grad():
        assert (policy(x) - sft.eval()(x)).abs().max().item() > 0, "PPO's adapters changed the policy"


def test_grpo_with_lora_trains_adapters_on_sft(tmp_path: Path) -> None:
    """grpo.lora: the same hook as the other stages; the KL reference is the policy with its adapters off
    (no second model), the checkpoint holds the adapters and a pointer to data/checkpoints/sft."""
    from tests.test_grpo import grpo_workspace, run_grpo

    root = grpo_workspace(
        tmp_path / "ws", ["grpo.lora.enabled=true", "grpo.lora.rank=4", "grpo.train.max_steps=2"]
    )
    ok(run_grpo(root))
    adapters = load_file(str(root / paths.checkpoint("grpo") / "adapter.safetensors"))
    assert adapters and all(".lora_" in k for k in adapters)
    assert len(adapters) == 2 * 7 * 2  # A, B x 7 targets x 2 layers
    assert not (root / paths.checkpoint("grpo") / "model.safetensors").exists()
    metrics = json.loads((root / "data/metrics/grpo.json").read_text())
    assert metrics["kl"] >= 0
    with contextlib.chdir(root):
        policy, meta = load_checkpoint(paths.checkpoint("grpo"))
        sft, _ = load_checkpoint(paths.checkpoint("sft"))
    assert meta["adapter"]["base"]["path"] == "data/checkpoints/sft"
    assert isinstance(policy, Transformer) and policy.config == sft.config
