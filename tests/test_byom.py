"""Bring your own model: open models (Llama 3, SmolLM2, Qwen2, Qwen3, Mistral) imported into the native
Transformer with logits equal to transformers', exported back; unsupported ones refused before any weight
is read; the model's own tokenizer and chat template; sft started from an open model with LoRA through the
real stage, exported merged (transformers reloads it with the same logits), resumed after kill -9; bad
settings and folders named before any work. tests/test_lora.py: adapters merge, disable, DPO reference."""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import signal
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file

from models.adapters import folder_sha256
from models.checkpoint import CheckpointError, load_checkpoint, state_dict_hash
from models.config import ModelConfig
from models.hf import export_hf, import_hf
from tasks.core import paths
from tasks.core.config import ConfigError, dump_params, resolve_params
from tasks.data.hf_chat import HFChatTokenizer, TemplateError
from tasks.train.open_model import export_merged
from tests.helpers.hfmodels import (
    FAMILIES,
    SFT,
    hf_logits,
    hf_model,
    ok,
    open_model_workspace,
    reload_logits,
    save_chat_tokenizer,
    save_hf,
    stage,
)

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


# ---------------------------------------------------------------------- the model's own tokenizer


@pytest.mark.parametrize("style", ["chatml", "llama3"])
def test_hf_chat_tokenizer_renders_as_transformers_and_masks_assistant_turns(
    tmp_path: Path, style: str
) -> None:
    folder = save_chat_tokenizer(tmp_path / "m", style, vocab_size=300)
    ours = HFChatTokenizer.load(folder)
    theirs = transformers.AutoTokenizer.from_pretrained(folder)
    conv = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What does json.dumps do?"},
        {"role": "assistant", "content": "It encodes a value."},
        {"role": "user", "content": "And then?"},
        {"role": "assistant", "content": "It returns the text."},
    ]
    ids, mask = ours.render_chat(conv)
    assert ids == list(theirs.apply_chat_template(conv, tokenize=True, return_dict=False))
    prompt, _ = ours.render_chat(conv[:2], add_generation_prompt=True)
    assert prompt == list(theirs.apply_chat_template(conv[:2], add_generation_prompt=True, return_dict=False))
    end = ours.end_id
    targets = ours.decode([i for i, m in zip(ids, mask, strict=True) if m], skip_special_tokens=False)
    end_text = ours.tokenizer.id_to_token(end)
    assert targets.replace("\n", "") == f"It encodes a value.{end_text}It returns the text.{end_text}"
    assert end_text == {"chatml": "<|im_end|>", "llama3": "<|eot_id|>"}[style]
    # the fingerprint covers the template, not only tokenizer.json
    cfg = json.loads((folder / "tokenizer_config.json").read_text())
    cfg["chat_template"] += "{# another revision of the template #}"
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg))
    assert HFChatTokenizer.load(folder).fingerprint != ours.fingerprint


def test_folder_without_chat_template_or_eos_is_refused(tmp_path: Path) -> None:
    folder = save_chat_tokenizer(tmp_path / "m", "chatml", vocab_size=300)
    cfg = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**cfg, "chat_template": None}))
    with pytest.raises(TemplateError, match="has no chat template"):
        HFChatTokenizer.load(folder)
    (folder / "tokenizer_config.json").write_text(json.dumps({**cfg, "eos_token": None}))
    with pytest.raises(TemplateError, match="no eos_token"):
        HFChatTokenizer.load(folder)


# ---------------------------------------------------------------------- sft from an open model, with LoRA


@pytest.fixture(scope="module")
def sft_lora(tmp_path_factory) -> Path:
    root = open_model_workspace(tmp_path_factory.mktemp("sft-lora"), SFT)
    ok(stage(root, "sft"))
    return root


def test_sft_with_lora_from_an_open_model_exports_merged(sft_lora: Path, tmp_path: Path) -> None:
    ckpt = sft_lora / paths.checkpoint("sft")
    assert sorted(p.name for p in ckpt.iterdir()) == [
        "adapter.safetensors",
        "config.json",
        "tokenizer.json",
        "tokenizer_config.json",
    ]
    meta = json.loads((ckpt / "config.json").read_text())
    folder = sft_lora / "init/qwen3"
    assert meta["init"]["sha256"] == folder_sha256(folder) == meta["adapter"]["base"]["sha256"]
    assert meta["tokenizer_fingerprint"] == HFChatTokenizer.load(folder).fingerprint
    adapters = load_file(str(ckpt / "adapter.safetensors"))
    assert all(".lora_" in k for k in adapters) and len(adapters) == 2 * 7 * 2  # A, B x 7 targets x 2 layers
    assert all(adapters[k].abs().max() > 0 for k in adapters if "lora_B" in k), "B starts at 0: it learned"

    with contextlib.chdir(sft_lora):
        merged, _ = load_checkpoint(ckpt)
    base = import_hf(folder)
    x = tokens(vocab=300)
    with torch.no_grad():
        ours, before = merged(x), base(x)
    assert (ours - before).abs().max().item() > 1e-4, "the merged adapters change the model"
    with contextlib.chdir(sft_lora):
        export_merged(paths.checkpoint("sft"), tmp_path / "export")
    assert (reload_logits(tmp_path / "export", x) - ours).abs().max().item() < TOL
    assert json.loads((tmp_path / "export" / "config.json").read_text())["model_type"] == "qwen3"
    # the exported tokenizer renders the chat template as the one sft trained with
    conv = [{"role": "user", "content": "What does it return?"}]
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "export")
    ids = hf_tok.apply_chat_template(conv, add_generation_prompt=True, return_dict=False)
    assert list(ids) == HFChatTokenizer.load(folder).render_chat(conv, add_generation_prompt=True)[0]


def test_dpo_with_lora_after_an_open_model_sft_exports_merged(sft_lora: Path, tmp_path: Path) -> None:
    """dpo reads the tokenizer sft carries; its adapters sit on sft's adapters on the open model (merged in
    turn on load), and the export equals the merged model in transformers."""
    root = tmp_path / "ws"
    shutil.copytree(sft_lora, root)
    dpo = ["dpo.lora.enabled=true", "dpo.lora.rank=4", "dpo.train.max_steps=2", "dpo.train.eval_every=2"]
    dump_params(resolve_params("tiny", SFT + dpo), root / "params.yaml")
    ok(stage(root, "dpo"))
    meta = json.loads((root / paths.checkpoint("dpo") / "config.json").read_text())
    assert meta["adapter"]["base"]["path"] == "data/checkpoints/sft"
    assert meta["tokenizer_fingerprint"] == HFChatTokenizer.load(root / "init/qwen3").fingerprint
    with contextlib.chdir(root):
        merged, _ = load_checkpoint(paths.checkpoint("dpo"))
        sft, _ = load_checkpoint(paths.checkpoint("sft"))
        export_merged(paths.checkpoint("dpo"), tmp_path / "export")
    x = tokens(vocab=300)
    with torch.no_grad():
        ours = merged(x)
        assert (ours - sft(x)).abs().max().item() > 0, "dpo's adapters change the sft model"
    assert (reload_logits(tmp_path / "export", x) - ours).abs().max().item() < TOL


def test_lora_resumes_after_kill_to_the_same_adapters(sft_lora: Path, tmp_path: Path) -> None:
    root = open_model_workspace(tmp_path / "ws", SFT)
    killed = stage(root, "sft", kill_at=3)
    assert killed.returncode == -signal.SIGKILL
    assert not (root / paths.checkpoint("sft")).exists()
    ok(stage(root, "sft"))
    metrics = json.loads((root / paths.METRICS / "sft.json").read_text())
    assert metrics["resumed_from_step"] == 2
    name = "adapter.safetensors"
    resumed = (root / paths.checkpoint("sft") / name).read_bytes()
    assert resumed == (sft_lora / paths.checkpoint("sft") / name).read_bytes()


def test_adapter_checkpoint_refuses_a_changed_base(sft_lora: Path, tmp_path: Path) -> None:
    root = tmp_path / "ws"
    shutil.copytree(sft_lora, root)
    cfg = json.loads((root / "init/qwen3/config.json").read_text())
    (root / "init/qwen3/config.json").write_text(json.dumps({**cfg, "rms_norm_eps": 1e-5}))
    with (
        contextlib.chdir(root),
        pytest.raises(CheckpointError, match="changed since the adapters were trained"),
    ):
        load_checkpoint(paths.checkpoint("sft"))


# ---------------------------------------------------------------------- bad input, before any work


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("pretrain.lora.enabled=true", "unknown config key.*pretrain.lora"),
        ("grpo.lora.rank=0", "grpo.lora: lora.rank must be an integer >= 1"),
        (
            "sft.lora.target_modules=[q_proj, qkv]",
            "sft.lora: lora.target_modules\\[1\\]='qkv' matches no module",
        ),
        ("dpo.lora.rank=0", "dpo.lora: lora.rank must be an integer >= 1"),
        ("reward.lora.dropout=1.0", "reward.lora: lora.dropout must be in \\[0, 1\\)"),
        ("sft.init=hf:HuggingFaceTB/SmolLM2-135M", "sft.init=.*with the revision .* pinned"),
        ("sft.init=/models/qwen", "sft.init='/models/qwen': expected `pipeline`, hf:"),
        ("sft.init=init/../data", "sft.init='init/../data': expected"),
        ("sft.init=models:/pipeline-sft", "sft.init='models:/pipeline-sft': a registered model is models:/"),
    ],
)
def test_bad_init_and_lora_settings_name_the_key(override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        resolve_params("tiny", [override])


@pytest.mark.parametrize(
    ("setup", "overrides", "message"),
    [
        ("big-tokenizer", [], "has 300 tokens but the model's embedding has 96 rows"),
        ("missing", ["sft.init=init/absent"], "sft.init='init/absent': no such folder"),
        (
            "long-context",
            ["model.max_seq_len=256", "sft.seq_len=256"],
            "seq_len=256 exceeds the model's context 128",
        ),
        ("sliding-window", [], "sliding_window=16 < max_position_embeddings"),
        ("no-template", [], "has no chat template"),
        ("not-causal-lm", [], "not a causal language model"),
        (
            "bf16-base",
            ["sft.lora.base_bf16=true", "sft.train.bf16=false"],
            "sft.lora.base_bf16=true needs sft.train.bf16",
        ),
    ],
)
def test_bad_open_model_fails_before_any_work(
    tmp_path: Path, setup: str, overrides: list[str], message: str
) -> None:
    root = open_model_workspace(tmp_path / "ws", SFT + overrides)
    folder = root / "init/qwen3"
    if setup == "big-tokenizer":
        save_hf(hf_model("qwen3", vocab_size=96), folder)
    if setup == "sliding-window":
        save_hf(hf_model("qwen2", vocab_size=320, use_sliding_window=True, sliding_window=16), folder)
    if setup == "not-causal-lm":
        cfg = json.loads((folder / "config.json").read_text())
        cfg["architectures"] = ["Qwen3ForSequenceClassification"]
        (folder / "config.json").write_text(json.dumps(cfg))
    if setup == "no-template":
        cfg = json.loads((folder / "tokenizer_config.json").read_text())
        (folder / "tokenizer_config.json").write_text(json.dumps({**cfg, "chat_template": None}))
    proc = stage(root, "sft")
    assert proc.returncode != 0
    assert re.search(message, proc.stdout + proc.stderr), proc.stderr[-2000:]
    assert not (root / "data/checkpoints/sft").exists() and not (root / "data/state/sft").exists()
