"""Helpers shared by the evaluation tests: a BPE tokenizer on the MMLU dev text, tiny models, HF twins."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from models.config import ModelConfig
from models.llama import Transformer
from tasks.data.chat_tokenizer import ChatTokenizer

MMLU_DIR = Path(__file__).resolve().parents[2] / "data" / "mmlu"  # the vendored copy of shared/mmlu
SUBJECTS = ["abstract_algebra", "anatomy", "world_religions"]
SPECIALS = ["<|pad|>", "<|bos|>", "<|eos|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
needs_mmlu = pytest.mark.skipif(not (MMLU_DIR / "val").is_dir(), reason=f"no MMLU data at {MMLU_DIR}")


def train_tokenizer(path: Path, vocab_size: int) -> ChatTokenizer:
    """Byte-level BPE on the MMLU dev text; vocab_size 263 (alphabet + specials) means no merges at all."""
    from tokenizers import Tokenizer, decoders, pre_tokenizers, trainers
    from tokenizers import models as tok_models

    texts = [p.read_text() for p in sorted((MMLU_DIR / "dev").glob("*.csv"))] or ["Answer: A B C D " * 50]
    tok = Tokenizer(tok_models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIALS,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(texts, trainer)
    path.parent.mkdir(parents=True, exist_ok=True)
    tok.save(str(path))
    return ChatTokenizer.load(path)


def tiny_model(vocab: int, max_len: int, seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    model = Transformer(
        ModelConfig(vocab_size=vocab, n_layer=2, n_head=4, n_kv_head=2, d_model=64, max_seq_len=max_len)
    )
    with torch.no_grad():  # sharper than the 0.02 init, so choices do not nearly tie
        model.embed.weight.mul_(20)
    return model.eval()


def hf_twin(model: Transformer, tok: ChatTokenizer, out: Path):
    from transformers import LlamaForCausalLM

    from models.hf import export_hf

    export_hf(model, out, tok.path, bos_id=tok.bos_id, eos_id=tok.eos_id, pad_id=tok.pad_id)
    return LlamaForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
