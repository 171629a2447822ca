"""Export to / import from Hugging Face checkpoint directories (Llama, Qwen2, Qwen3, Mistral), no transformers.

Our Transformer follows HF Llama's conventions (rotate_half RoPE, RMSNorm in float32), so the mapping is a
pure renaming of tensors; no q/k permutation is needed. The families differ only by flags of ModelConfig:

    family   model_type  what differs from Llama                   ModelConfig
    Llama    llama       (SmolLM2 is one), llama3 RoPE scaling      rope_scaling
    Qwen2    qwen2       bias on q/k/v projections                 qkv_bias=True
    Qwen3    qwen3       per-head RMSNorm on q and k, head_dim      qk_norm=True, attn_head_dim
    Mistral  mistral     sliding window (accepted only when off)    (imported as Llama; exported as Llama)

    ours                                HF
    embed.weight                        model.embed_tokens.weight
    layers.N.attn_norm.weight           model.layers.N.input_layernorm.weight
    layers.N.attn.{q,k,v,o}_proj.weight model.layers.N.self_attn.{q,k,v,o}_proj.weight
    layers.N.attn.{q,k,v}_proj.bias     model.layers.N.self_attn.{q,k,v}_proj.bias (Qwen2)
    layers.N.attn.{q,k}_norm.weight     model.layers.N.self_attn.{q,k}_norm.weight (Qwen3)
    layers.N.mlp_norm.weight            model.layers.N.post_attention_layernorm.weight
    layers.N.mlp.{gate,up,down}_proj    model.layers.N.mlp.{gate,up,down}_proj.weight
    norm.weight                         model.norm.weight
    lm_head.weight                      lm_head.weight (only when untied)

Import reads config.json and names every unsupported feature (architecture, MoE, sliding window, RoPE
type, biases, activation) before it reads any weight file. Weights are read from safetensors only
(model.safetensors or a sharded model.safetensors.index.json), never from a pickle.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from models.checkpoint import CheckpointError, atomic_dir, load_state_strict, refuse_pickle, write_json
from models.config import LLAMA3_ROPE_KEYS, ModelConfig
from models.llama import Transformer

# model_type -> the causal-LM class transformers builds for it
FAMILIES = {
    "llama": "LlamaForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "mistral": "MistralForCausalLM",
}
INDEX_FILE = "model.safetensors.index.json"

_LAYER_RENAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "mlp_norm.weight": "post_attention_layernorm.weight",
    **{f"attn.{p}_proj.weight": f"self_attn.{p}_proj.weight" for p in "qkvo"},
    **{f"attn.{p}_proj.bias": f"self_attn.{p}_proj.bias" for p in "qkv"},
    **{f"attn.{p}_norm.weight": f"self_attn.{p}_norm.weight" for p in "qk"},
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
    raise KeyError(f"unsupported tensor {name!r} in a Hugging Face checkpoint")


# ---------------------------------------------------------------------------------------------- export


def export_family(config: ModelConfig) -> str:
    """The model_type a config exports as: qk_norm -> qwen3, qkv_bias -> qwen2, otherwise llama."""
    if config.qk_norm and config.qkv_bias:
        raise ValueError("no Hugging Face family has both per-head q/k norms and q/k/v biases")
    return "qwen3" if config.qk_norm else "qwen2" if config.qkv_bias else "llama"


def hf_config(config: ModelConfig, *, bos_id: int | None, eos_id: int | None, pad_id: int | None) -> dict:
    family = export_family(config)
    rope: dict[str, Any] = {"rope_type": "default"}
    if config.rope_scaling is not None:
        rope = dict(config.rope_scaling)
    out: dict[str, Any] = {
        "architectures": [FAMILIES[family]],
        "model_type": family,
        "hidden_size": config.d_model,
        "intermediate_size": config.ffn_dim,
        "num_attention_heads": config.n_head,
        "num_key_value_heads": config.n_kv_head,
        "num_hidden_layers": config.n_layer,
        "head_dim": config.head_dim,
        "rms_norm_eps": config.norm_eps,
        # transformers >= 5 reads rope_parameters, older versions rope_theta (+ rope_scaling); all say the same.
        "rope_theta": config.rope_theta,
        "rope_parameters": {**rope, "rope_theta": config.rope_theta},
        "max_position_embeddings": config.max_seq_len,
        "vocab_size": config.vocab_size,
        "tie_word_embeddings": config.tie_embeddings,
        "torch_dtype": "float32",  # transformers < 5 reads torch_dtype, >= 5 reads dtype
        "dtype": "float32",
        "hidden_act": "silu",
        "attention_dropout": 0.0,
        "initializer_range": 0.02,
        "use_cache": True,
        "bos_token_id": bos_id,
        "eos_token_id": eos_id,
        "pad_token_id": pad_id,
    }
    if config.rope_scaling is not None and config.rope_scaling.get("rope_type") != "default":
        out["rope_scaling"] = dict(config.rope_scaling)
    if family == "llama":
        out.update(attention_bias=False, mlp_bias=False)
    else:  # Qwen2/3: no sliding window on any layer
        no_window = ["full_attention"] * config.n_layer
        out.update(use_sliding_window=False, sliding_window=None, layer_types=no_window)
        out["max_window_layers"] = config.n_layer
        if family == "qwen3":
            out["attention_bias"] = False
    return out


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
    hf_cfg = hf_config(config, bos_id=bos_id, eos_id=eos_id, pad_id=pad_id)  # unexportable: fail first
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
        write_json(tmp / "config.json", hf_cfg)
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


# ---------------------------------------------------------------------------------------------- import


def read_hf_config(src: Path) -> dict[str, Any]:
    cfg_path = Path(src) / "config.json"
    if not cfg_path.is_file():
        raise CheckpointError(f"Hugging Face config not found: {cfg_path} (is {src} a model folder?)")
    try:
        cfg = json.loads(cfg_path.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"cannot read {cfg_path}: {e}") from e
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{cfg_path} is not a JSON object")
    return cfg


def _rope(cfg: dict[str, Any]) -> tuple[float, dict[str, Any] | None, list[str]]:
    """(theta, rope_scaling for ModelConfig, problems) from rope_parameters (transformers >= 5) or
    rope_theta + rope_scaling (older files)."""
    params = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    if not isinstance(params, dict):
        return 10000.0, None, [f"rope_parameters={params!r} (per-layer RoPE)"]
    theta = float(params.get("rope_theta", cfg.get("rope_theta", 10000.0)))
    kind = params.get("rope_type", params.get("type", "default"))
    problems = []
    if params.get("partial_rotary_factor", cfg.get("partial_rotary_factor", 1.0)) != 1.0:
        problems.append("partial_rotary_factor != 1 (RoPE on part of each head)")
    if kind == "default":
        return theta, None, problems
    if kind == "llama3":
        missing = [k for k in LLAMA3_ROPE_KEYS if k not in params]
        if missing:
            return theta, None, [*problems, f"llama3 RoPE scaling without {missing}"]
        scaling = {"rope_type": "llama3", **{k: params[k] for k in LLAMA3_ROPE_KEYS}}
        return theta, scaling, problems
    return theta, None, [*problems, f"rope_type={kind!r} (supported: default, llama3)"]


def config_from_hf(cfg: dict[str, Any], where: str | Path) -> ModelConfig:
    """ModelConfig for an HF config.json dict, or ValueError naming every unsupported feature. Reads no
    weights, so a caller can check the model (e.g. its vocabulary against a tokenizer) before loading."""
    family = cfg.get("model_type")
    archs = cfg.get("architectures") or []
    if family not in FAMILIES:
        raise ValueError(
            f"{where}: model_type={family!r} architectures={archs} is not supported; "
            f"supported: {', '.join(f'{k} ({v})' for k, v in FAMILIES.items())}"
        )
    if archs and archs != [FAMILIES[family]]:
        raise ValueError(
            f"{where}: architectures={archs} is not a causal language model of model_type {family!r}; "
            f"only {FAMILIES[family]} can be imported"
        )
    sizes = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
    missing = [k for k in sizes if not isinstance(cfg.get(k), int)]
    if missing:
        raise ValueError(f"{where}: config.json lacks {missing}")
    problems = []
    if cfg.get("hidden_act", "silu") != "silu":
        problems.append(f"hidden_act={cfg['hidden_act']!r} (only silu)")
    for key in ("num_experts", "num_local_experts", "n_routed_experts"):
        if cfg.get(key):
            problems.append(f"{key}={cfg[key]} (mixture of experts)")
    if cfg.get("mlp_bias"):
        problems.append("mlp_bias=true")
    if family in ("llama", "mistral", "qwen3") and cfg.get("attention_bias"):
        problems.append("attention_bias=true (bias on the output projection too)")
    windowed = cfg.get("use_sliding_window", family == "mistral") and cfg.get("sliding_window") is not None
    if windowed and cfg["sliding_window"] < cfg.get("max_position_embeddings", 0):
        problems.append(
            f"sliding_window={cfg['sliding_window']} < max_position_embeddings="
            f"{cfg.get('max_position_embeddings')} (sliding-window attention)"
        )
    if "sliding_attention" in (cfg.get("layer_types") or []) and not problems:
        problems.append("layer_types with sliding_attention (sliding-window attention)")
    theta, scaling, rope_problems = _rope(cfg)
    problems += rope_problems
    if problems:
        raise ValueError(f"{where}: unsupported {family} features: {'; '.join(problems)}")
    n_head, d_model = cfg["num_attention_heads"], cfg["hidden_size"]
    head_dim = cfg.get("head_dim") or d_model // n_head
    try:
        config = ModelConfig(
            vocab_size=cfg["vocab_size"],
            n_layer=cfg["num_hidden_layers"],
            n_head=n_head,
            n_kv_head=cfg.get("num_key_value_heads") or n_head,
            d_model=d_model,
            ffn_hidden=cfg["intermediate_size"],
            max_seq_len=cfg.get("max_position_embeddings", 2048),
            rope_theta=theta,
            norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            attn_head_dim=0 if head_dim * n_head == d_model else head_dim,
            qkv_bias=family == "qwen2",
            qk_norm=family == "qwen3",
            rope_scaling=scaling,
        )
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from e
    if ModelConfig(**{**config.__dict__, "ffn_hidden": 0}).ffn_dim == config.ffn_hidden:
        config.ffn_hidden = 0  # the SwiGLU default width: store it as such, so export/import round-trips
    return config


def weight_files(src: Path) -> list[Path]:
    """The safetensors files of an HF folder (one file or the shards its index names), all present."""
    single, index = src / "model.safetensors", src / INDEX_FILE
    if single.is_file():
        return [single]
    if not index.is_file():
        raise CheckpointError(f"no model.safetensors (or sharded {INDEX_FILE}) in {src}")
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
        names = sorted(set(weight_map.values()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise CheckpointError(f"{index} is not a safetensors index (no weight_map): {e}") from e
    files = []
    for name in names:
        f = src / name
        if Path(name).is_absolute() or ".." in Path(name).parts or not f.is_file():
            raise CheckpointError(f"{index} names shard {name!r}, which is not a file in {src}")
        files.append(f)
    return files


def _read_hf_tensors(src: Path) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for f in weight_files(src):
        refuse_pickle(f)
        try:
            tensors.update(load_file(str(f)))
        except Exception as e:
            raise CheckpointError(f"cannot read {f} (truncated or corrupt?): {e}") from e
    return tensors


def import_hf(src: Path, dtype: torch.dtype | None = None) -> Transformer:
    """Build our Transformer from a Hugging Face directory (config.json + safetensors), in eval mode.
    dtype: cast the weights (default: float32)."""
    src = Path(src)
    config = config_from_hf(read_hf_config(src), src / "config.json")
    weight_files(src)  # a missing shard is named before any file is read
    state: dict[str, torch.Tensor] = {}
    for name, t in _read_hf_tensors(src).items():
        if name.endswith("rotary_emb.inv_freq"):
            continue  # a buffer some older exports saved; we recompute RoPE from the config
        if name == "lm_head.weight" and config.tie_embeddings:
            continue  # tied: some exporters write the shared tensor twice
        try:
            state[from_hf_name(name)] = t.to(dtype or torch.float32)
        except KeyError as e:
            raise CheckpointError(f"{src}: {e.args[0]}") from e
    model = Transformer(config)
    load_state_strict(model, state, source=src)
    return model.to(dtype or torch.float32).eval()
