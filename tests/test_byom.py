"""Bring your own model: open models (Llama 3, SmolLM2, Qwen2, Qwen3, Mistral) imported into the native
Transformer with logits equal to transformers', exported back; unsupported ones refused before any weight
is read."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from models.checkpoint import CheckpointError, state_dict_hash
from models.config import ModelConfig
from models.hf import export_hf, import_hf
from tests.helpers.hfmodels import FAMILIES, hf_logits, hf_model, reload_logits, save_hf

TOL = 1e-4


def tokens(B: int = 2, T: int = 48, vocab: int = 96, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, vocab, (B, T), generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------- architectures


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_import_matches_transformers_and_export_round_trips(tmp_path: Path, family: str) -> None:
    theirs = hf_model(family)
    src = save_hf(theirs, tmp_path / "src")
    x = tokens()
    expected = hf_logits(theirs, x)

    ours = import_hf(src)
    with torch.no_grad():
        got = ours(x)
    assert (got - expected).abs().max().item() < TOL
    # the padded batch path (generation) agrees too: a left-padded row equals the row alone
    with torch.no_grad():
        padded = torch.cat([torch.zeros(1, 5, dtype=torch.long), x[:1, :20]], dim=1)
        mask = torch.cat([torch.zeros(1, 5, dtype=torch.bool), torch.ones(1, 20, dtype=torch.bool)], dim=1)
        assert (ours(padded, attention_mask=mask)[:, 5:] - ours(x[:1, :20])).abs().max().item() < 1e-5

    export_hf(ours, tmp_path / "out")
    assert (reload_logits(tmp_path / "out", x) - expected).abs().max().item() < TOL
    back = import_hf(tmp_path / "out")
    assert back.config == ours.config
    assert state_dict_hash(back) == state_dict_hash(ours)


def test_each_family_sets_the_features_it_needs(tmp_path: Path) -> None:
    configs = {f: import_hf(save_hf(hf_model(f), tmp_path / f)).config for f in FAMILIES}
    assert configs["qwen2"].qkv_bias and not configs["qwen2"].qk_norm
    assert configs["qwen3"].qk_norm and configs["qwen3"].attn_head_dim == 32 and not configs["qwen3"].qkv_bias
    assert configs["llama3-tied"].rope_scaling == {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 16,
    }
    assert configs["llama3-tied"].tie_embeddings and not configs["llama-untied"].tie_embeddings
    assert configs["smollm2"].norm_eps == 1e-5


def test_llama3_rope_scaling_changes_the_logits(tmp_path: Path) -> None:
    """The llama3 parity above is not plain RoPE passing by accident: without the scaling logits differ."""
    ours = import_hf(save_hf(hf_model("llama3-tied"), tmp_path / "src"))
    plain = type(ours)(ModelConfig(**{**ours.config.__dict__, "rope_scaling": None})).eval()
    plain.load_state_dict(ours.state_dict())
    x = tokens()
    with torch.no_grad():
        assert (plain(x) - ours(x)).abs().max().item() > 1e-3


def test_sharded_checkpoint_imports(tmp_path: Path) -> None:
    theirs = hf_model("qwen2")
    src = save_hf(theirs, tmp_path / "src", max_shard_size="20KB")
    assert (src / "model.safetensors.index.json").is_file() and not (src / "model.safetensors").exists()
    x = tokens()
    assert (import_hf(src)(x) - hf_logits(theirs, x)).abs().max().item() < TOL


def test_default_config_serialises_as_before() -> None:
    """Checkpoints of today's models stay byte-identical: the new fields are absent while default."""
    assert list(ModelConfig().to_dict()) == [
        "vocab_size",
        "n_layer",
        "n_head",
        "n_kv_head",
        "d_model",
        "ffn_hidden",
        "max_seq_len",
        "rope_theta",
        "norm_eps",
        "tie_embeddings",
    ]
    qwen3 = ModelConfig(qk_norm=True, attn_head_dim=128)
    assert ModelConfig.from_dict(qwen3.to_dict()) == qwen3


# ---------------------------------------------------------------------- refused before any weight is read


def _broken_weights(src: Path) -> None:
    """Corrupt every weight file: an import that reads weights would fail on them with another message."""
    for f in [*src.glob("*.safetensors")]:
        f.write_bytes(b"\x00" * 64)


@pytest.mark.parametrize(
    ("family", "edit", "message"),
    [
        ("qwen2", {"use_sliding_window": True, "sliding_window": 16}, "sliding_window=16 < max_position"),
        ("mistral", {"sliding_window": 32}, "sliding_window=32 < max_position_embeddings=128"),
        (
            "llama-untied",
            {"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}},
            "rope_type='yarn'",
        ),
        ("llama-untied", {"attention_bias": True}, "attention_bias=true"),
        ("llama-untied", {"mlp_bias": True}, "mlp_bias=true"),
        ("llama-untied", {"hidden_act": "gelu"}, "hidden_act='gelu'"),
        (
            "qwen3",
            {"model_type": "qwen3_moe", "architectures": ["Qwen3MoeForCausalLM"]},
            "model_type='qwen3_moe'",
        ),
        ("qwen2", {"num_experts": 8}, "num_experts=8 \\(mixture of experts\\)"),
        (
            "llama-untied",
            {"architectures": ["LlamaForSequenceClassification"]},
            "not a causal language model",
        ),
        ("llama-untied", {"partial_rotary_factor": 0.5}, "partial_rotary_factor"),
    ],
)
def test_unsupported_features_are_named_before_weights_are_read(
    tmp_path: Path, family: str, edit: dict, message: str
) -> None:
    src = save_hf(hf_model(family), tmp_path / "src")
    cfg = json.loads((src / "config.json").read_text())
    cfg.update(edit)
    (src / "config.json").write_text(json.dumps(cfg))
    _broken_weights(src)
    with pytest.raises(ValueError, match=message):
        import_hf(src)


def test_folder_that_is_not_a_model_is_named(tmp_path: Path) -> None:
    (tmp_path / "tok").mkdir()
    (tmp_path / "tok" / "tokenizer.json").write_text("{}")
    with pytest.raises(CheckpointError, match="config.json.*is .* a model folder"):
        import_hf(tmp_path / "tok")
    src = save_hf(hf_model("qwen2"), tmp_path / "src", max_shard_size="20KB")
    shard = sorted(src.glob("model-*.safetensors"))[-1]
    shard.unlink()
    with pytest.raises(CheckpointError, match=f"names shard '{shard.name}', which is not a file"):
        import_hf(src)
    shutil.rmtree(src)
    src = save_hf(hf_model("qwen2"), tmp_path / "src")
    (src / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        import_hf(src)
