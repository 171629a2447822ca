"""Tiny open models made locally with transformers' own config and model classes, saved as save_pretrained
writes them (config.json + model.safetensors, or shards + index), for the bring-your-own-model tests.

No hub: every family is a random model of a few thousand parameters, with non-trivial norm gains and biases
so that a wrong mapping of either cannot hide behind ones and zeros.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

from tests.helpers.workspace import make_workspace

LLAMA3_ROPE = {
    "rope_type": "llama3",
    "rope_theta": 500000.0,
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 16,  # below the test sequence length: the scaling matters
}
# family name -> (config class, model class, config overrides)
FAMILIES: dict[str, tuple[str, str, dict[str, Any]]] = {
    "llama3-tied": (
        "LlamaConfig",
        "LlamaForCausalLM",
        {"tie_word_embeddings": True, "rope_parameters": LLAMA3_ROPE},
    ),
    "llama-untied": ("LlamaConfig", "LlamaForCausalLM", {"tie_word_embeddings": False}),
    "smollm2": ("LlamaConfig", "LlamaForCausalLM", {"tie_word_embeddings": True, "rms_norm_eps": 1e-5}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {"tie_word_embeddings": True}),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {"head_dim": 32, "tie_word_embeddings": False}),
    "mistral": ("MistralConfig", "MistralForCausalLM", {"sliding_window": None}),
}
SIZES = dict(
    vocab_size=96,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
)


def hf_model(family: str, seed: int = 0, **overrides: Any) -> Any:
    """A random transformers causal LM of `family` (fp32, eval)."""
    import transformers

    config_cls, model_cls, extra = FAMILIES[family]
    config = getattr(transformers, config_cls)(**{**SIZES, **extra, **overrides})
    torch.manual_seed(seed)
    model = getattr(transformers, model_cls)(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.uniform_(0.5, 1.5) if "norm" in name else p.normal_(0.0, 0.1)
    return model


def save_hf(model: Any, out: Path, max_shard_size: str | None = None) -> Path:
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(out, **kwargs)
    return out


def hf_logits(model: Any, tokens: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(tokens).logits


def reload_logits(folder: Path, tokens: torch.Tensor) -> torch.Tensor:
    """Logits of `folder` loaded back by transformers' AutoModelForCausalLM."""
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    return hf_logits(model, tokens)


# ---------------------------------------------------------------------- tokenizers with chat templates

CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
    "'<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
LLAMA3_CHAT = (
    "{{ bos_token }}{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + "
    "'<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)
# template -> (special tokens in id order, tokenizer_config token fields)
CHAT_STYLES: dict[str, tuple[str, list[str], dict[str, str]]] = {
    "chatml": (
        CHATML,
        ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"},
    ),
    "llama3": (
        LLAMA3_CHAT,
        ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
        {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"},
    ),
}


def save_chat_tokenizer(folder: Path, style: str = "chatml", vocab_size: int = 96) -> Path:
    """A byte-level BPE (trained on a little English) with the style's special tokens and chat template, as
    tokenizer.json + tokenizer_config.json, the files an instruct model's folder holds."""
    import json

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    template, specials, fields = CHAT_STYLES[style]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    words = "the value of a function is what it returns when called with its arguments " * 20
    tok.train_from_iterator([words, "What does json.dumps do? It encodes a value as JSON text."], trainer)
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "chat_template": template, **fields}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


# ---------------------------------------------------------------------- stage runs in a workspace

REPO = Path(__file__).resolve().parents[2]
# sft from a Qwen3 model in init/qwen3 with LoRA, short, resumable every 2 steps

SFT = [
    "sft.init=init/qwen3",
    "sft.lora.enabled=true",
    "sft.lora.rank=4",
    "sft.train.max_steps=4",
    "sft.train.checkpoint_every=2",
    "sft.train.eval_every=4",
    "sft.train.log_every=1",
]


def stage(root: Path, name: str, kill_at: int | None = None) -> subprocess.CompletedProcess:
    """`python -m tasks.<name>` in the workspace, optionally killed (SIGKILL) after optimizer step kill_at."""
    env = dict(os.environ, PYTHONPATH=str(REPO), PIPELINE_EXPERIMENT=f"byom-{os.getpid()}")
    env.pop("PIPELINE_KILL_AT_STEP", None)
    if kill_at is not None:
        env["PIPELINE_KILL_AT_STEP"] = str(kill_at)
    cmd = [sys.executable, "-m", f"tasks.{name}"]
    return subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=600)


def ok(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def open_model_workspace(root: Path, overrides: list[str]) -> Path:
    """The tiny workspace (chat data, params) with a Qwen3 model and its ChatML tokenizer in init/qwen3/."""
    make_workspace(root, overrides)
    save_chat_tokenizer(root / "init/qwen3", "chatml", vocab_size=300)
    save_hf(hf_model("qwen3", vocab_size=320), root / "init/qwen3")  # an embedding padded past the tokenizer
    return root
