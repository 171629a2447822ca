"""Export to / import from a Hugging Face Llama checkpoint directory, without importing transformers.

Our Transformer follows HF Llama's conventions (rotate_half RoPE, RMSNorm in float32, no biases), so the
mapping is a pure renaming of tensors; no q/k permutation is needed.

    ours                                HF
    embed.weight                        model.embed_tokens.weight
    layers.N.attn_norm.weight           model.layers.N.input_layernorm.weight
    layers.N.attn.{q,k,v,o}_proj.weight model.layers.N.self_attn.{q,k,v,o}_proj.weight
    layers.N.mlp_norm.weight            model.layers.N.post_attention_layernorm.weight
    layers.N.mlp.{gate,up,down}_proj    model.layers.N.mlp.{gate,up,down}_proj.weight
    norm.weight                         model.norm.weight
    lm_head.weight                      lm_head.weight (only when untied)
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from models.checkpoint import CheckpointError, atomic_dir, load_state_strict, write_json
from models.config import ModelConfig
from models.llama import Transformer

_LAYER_RENAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "mlp_norm.weight": "post_attention_layernorm.weight",
    **{f"attn.{p}_proj.weight": f"self_attn.{p}_proj.weight" for p in "qkvo"},
    **{f"mlp.{p}_proj.weight": f"mlp.{p}_proj.weight" for p in ("gate", "up", "down")},
}
_LAYER_RENAMES_BACK = {v: k for k, v in _LAYER_RENAMES.items()}


def to_hf_name(name: str) -> str:
    if name == "embed.weight":
        return "model.embed_tokens.weight"
    if name == "norm.weight":
        return "model.norm.weight"
    if name == "lm_head.weight":
        return "lm_head.weight"
    m = re.fullmatch(r"layers\.(\d+)\.(.+)", name)
    if m and m.group(2) in _LAYER_RENAMES:
        return f"model.layers.{m.group(1)}.{_LAYER_RENAMES[m.group(2)]}"
    raise KeyError(f"no Hugging Face name for parameter {name!r}")


def from_hf_name(name: str) -> str:
    if name == "model.embed_tokens.weight":
        return "embed.weight"
    if name == "model.norm.weight":
        return "norm.weight"
    if name == "lm_head.weight":
        return "lm_head.weight"
    m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)", name)
    if m and m.group(2) in _LAYER_RENAMES_BACK:
        return f"layers.{m.group(1)}.{_LAYER_RENAMES_BACK[m.group(2)]}"
    raise KeyError(f"unsupported tensor {name!r} in a Hugging Face Llama checkpoint")


def hf_config(config: ModelConfig, *, bos_id: int | None, eos_id: int | None, pad_id: int | None) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": config.d_model,
        "intermediate_size": config.ffn_dim,
        "num_attention_heads": config.n_head,
        "num_key_value_heads": config.n_kv_head,
        "num_hidden_layers": config.n_layer,
        "head_dim": config.head_dim,
        "rms_norm_eps": config.norm_eps,
        # transformers >= 5 reads rope_parameters, older versions rope_theta; both say the same thing.
        "rope_theta": config.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": config.rope_theta},
        "max_position_embeddings": config.max_seq_len,
        "vocab_size": config.vocab_size,
        "tie_word_embeddings": config.tie_embeddings,
        "torch_dtype": "float32",  # transformers < 5 reads torch_dtype, >= 5 reads dtype
        "dtype": "float32",
        "hidden_act": "silu",
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "initializer_range": 0.02,
        "use_cache": True,
        "bos_token_id": bos_id,
        "eos_token_id": eos_id,
        "pad_token_id": pad_id,
    }


def _token_strings(tokenizer_json: Path) -> dict[int, str]:
    """id -> token string from a tokenizers tokenizer.json (added tokens override the model vocab)."""
    data = json.loads(Path(tokenizer_json).read_text())
    vocab = (data.get("model") or {}).get("vocab") or {}
    id_to_tok = {i: t for t, i in vocab.items()} if isinstance(vocab, dict) else {}
    for added in data.get("added_tokens") or []:
        id_to_tok[added["id"]] = added["content"]
    return id_to_tok


def export_hf(
    model: Transformer,
    out_dir: Path,
    tokenizer_json: Path | None = None,
    *,
    bos_id: int | None = None,
    eos_id: int | None = None,
    pad_id: int | None = None,
    chat_template: str | None = None,
) -> Path:
    """Write a directory that transformers.AutoModelForCausalLM (and AutoTokenizer, when tokenizer_json is
    given) loads, atomically. Weights are written as float32, whatever the model's dtype."""
    config = model.config
    state = model.state_dict()
    tensors = {
        to_hf_name(k): v.detach().to("cpu", torch.float32).contiguous()
        for k, v in state.items()
        if not (k == "lm_head.weight" and config.tie_embeddings)  # tied: HF re-ties from embed_tokens
    }
    tok_strings: dict[int, str] = {}
    if tokenizer_json is not None:
        if not Path(tokenizer_json).is_file():
            raise FileNotFoundError(f"tokenizer file not found: {tokenizer_json}")
        tok_strings = _token_strings(Path(tokenizer_json))
        for name, tid in (("bos_id", bos_id), ("eos_id", eos_id), ("pad_id", pad_id)):
            if tid is not None and tid not in tok_strings:
                raise ValueError(f"{name}={tid} is not a token id in {tokenizer_json}")

    with atomic_dir(Path(out_dir)) as tmp:
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        write_json(tmp / "config.json", hf_config(config, bos_id=bos_id, eos_id=eos_id, pad_id=pad_id))
        gen = {"bos_token_id": bos_id, "eos_token_id": eos_id, "pad_token_id": pad_id}
        gen = {k: v for k, v in gen.items() if v is not None}
        # HF's default max_length is 20 tokens; the model's own context is the sensible cap.
        write_json(tmp / "generation_config.json", {**gen, "max_length": config.max_seq_len})
        if tokenizer_json is not None:
            shutil.copyfile(tokenizer_json, tmp / "tokenizer.json")
            tok_cfg: dict[str, Any] = {
                "tokenizer_class": "PreTrainedTokenizerFast",
                "model_max_length": config.max_seq_len,
                "clean_up_tokenization_spaces": False,
            }
            for key, tid in (("bos_token", bos_id), ("eos_token", eos_id), ("pad_token", pad_id)):
                if tid is not None:
                    tok_cfg[key] = tok_strings[tid]
            if chat_template is not None:
                tok_cfg["chat_template"] = chat_template
            write_json(tmp / "tokenizer_config.json", tok_cfg)
    return Path(out_dir)


def _check_supported(cfg: dict[str, Any], src: Path) -> None:
    archs = cfg.get("architectures") or []
    if cfg.get("model_type") != "llama" or (archs and "LlamaForCausalLM" not in archs):
        raise ValueError(
            f"{src} describes model_type={cfg.get('model_type')!r} architectures={archs}; "
            "only Llama (LlamaForCausalLM) checkpoints can be imported"
        )
    unsupported = []
    if cfg.get("hidden_act", "silu") != "silu":
        unsupported.append(f"hidden_act={cfg['hidden_act']!r}")
    for key in ("attention_bias", "mlp_bias"):
        if cfg.get(key):
            unsupported.append(f"{key}=true")
    rope = cfg.get("rope_parameters") or cfg.get("rope_scaling")
    if rope and rope.get("rope_type", rope.get("type", "default")) != "default":
        unsupported.append(f"rope scaling {rope}")
    head_dim = cfg.get("head_dim")
    if head_dim is not None and head_dim != cfg["hidden_size"] // cfg["num_attention_heads"]:
        unsupported.append(f"head_dim={head_dim} != hidden_size / num_attention_heads")
    if unsupported:
        raise ValueError(f"{src}: unsupported Llama features: {', '.join(unsupported)}")


def _read_hf_tensors(src: Path) -> dict[str, torch.Tensor]:
    single, index = src / "model.safetensors", src / "model.safetensors.index.json"
    if single.is_file():
        files = [single]
    elif index.is_file():
        files = sorted({src / f for f in json.loads(index.read_text())["weight_map"].values()})
    else:
        raise CheckpointError(f"no model.safetensors (or sharded index) in {src}")
    tensors: dict[str, torch.Tensor] = {}
    for f in files:
        try:
            tensors.update(load_file(str(f)))
        except Exception as e:
            raise CheckpointError(f"cannot read {f} (truncated or corrupt?): {e}") from e
    return tensors


def import_hf(src: Path) -> Transformer:
    """Build our Transformer from a Hugging Face Llama directory (config.json + safetensors)."""
    src = Path(src)
    cfg_path = src / "config.json"
    if not cfg_path.is_file():
        raise CheckpointError(f"Hugging Face config not found: {cfg_path}")
    cfg = json.loads(cfg_path.read_text())
    _check_supported(cfg, cfg_path)
    rope = cfg.get("rope_parameters") or {}
    config = ModelConfig(
        vocab_size=cfg["vocab_size"],
        n_layer=cfg["num_hidden_layers"],
        n_head=cfg["num_attention_heads"],
        n_kv_head=cfg.get("num_key_value_heads") or cfg["num_attention_heads"],
        d_model=cfg["hidden_size"],
        ffn_hidden=cfg["intermediate_size"],
        max_seq_len=cfg.get("max_position_embeddings", 2048),
        rope_theta=float(rope.get("rope_theta", cfg.get("rope_theta", 10000.0))),
        norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
    )
    hf_tensors = _read_hf_tensors(src)
    state: dict[str, torch.Tensor] = {}
    for name, t in hf_tensors.items():
        if name.endswith("rotary_emb.inv_freq"):
            continue  # a buffer some older exports saved; we recompute RoPE from rope_theta
        if name == "lm_head.weight" and config.tie_embeddings:
            continue  # tied: some exporters write the shared tensor twice
        try:
            state[from_hf_name(name)] = t
        except KeyError as e:
            raise CheckpointError(f"{src}: {e.args[0]}") from e
    if ModelConfig(**{**config.to_dict(), "ffn_hidden": 0}).ffn_dim == config.ffn_hidden:
        config.ffn_hidden = 0  # the SwiGLU default width: store it as such, so export/import round-trips
    model = Transformer(config)
    load_state_strict(model, state, source=src)
    return model.eval()
