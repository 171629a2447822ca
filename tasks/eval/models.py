"""The models evaluate scores and the tokenizer each was trained with.

`available_models` lists the language models whose checkpoints exist (in pipeline order), `model_tokenizers`
gives each its own tokenizer (the copy an open model's checkpoint carries, else data/tokenizer/), and
`load_lm` loads one in float32 eval mode after checking that its vocabulary and tokenizer fingerprint match.
`heldout_documents` is the text perplexity is measured on for a model with its own tokenizer.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from tasks.core import paths, stages
from tasks.core.config import Params
from tasks.core.stage import StageError
from tasks.data.chat_tokenizer import ChatTokenizer
from tasks.data.hf_chat import carried_tokenizer

log = logging.getLogger(__name__)

LM_MODELS = tuple(stages.language_models())  # in pipeline order; "reward" is not a language model


def available_models(root: Path = paths.CHECKPOINTS) -> list[str]:
    return [name for name in LM_MODELS if (Path(root) / name / "config.json").is_file()]


def model_tokenizers(names: Sequence[str]) -> dict[str, ChatTokenizer]:
    """Each checkpoint's own tokenizer: the copy it carries (a line started from an open model), else
    data/tokenizer/ (loaded once, only when a checkpoint needs it)."""
    out: dict[str, ChatTokenizer] = {}
    pipeline: ChatTokenizer | None = None
    for name in names:
        path = paths.checkpoint(name)
        try:
            carried = carried_tokenizer(path)
            if carried is not None:
                out[name] = carried
                continue
            pipeline = pipeline or ChatTokenizer.load(paths.TOKENIZER_JSON)
        except (OSError, ValueError) as exc:
            raise StageError(f"{path}: cannot load the tokenizer it was trained with: {exc}") from exc
        out[name] = pipeline
    return out


def own_tokenizer(tokenizer: ChatTokenizer) -> bool:
    """A tokenizer other than data/tokenizer/ (whose token shards data/tokens/ holds)."""
    return Path(tokenizer.path).resolve() != paths.TOKENIZER_JSON.resolve()


def heldout_documents(params: Params) -> list[str]:
    """The held-out pretrain documents (encode's val split of data/validated/pretrain.parquet), the text
    perplexity is measured on for a model with its own tokenizer."""
    import pyarrow.parquet as pq

    from tasks.data.shards import split_assignment

    source = paths.validated("pretrain")
    if not source.is_file():
        raise StageError(f"{source} not found: perplexity needs the held-out pretrain text (run validate)")
    texts = pq.read_table(source, columns=["text"]).column(0).to_pylist()
    is_val = split_assignment(len(texts), params.encode.seed, params.encode.val_fraction)
    return [t for t, v in zip(texts, is_val.tolist(), strict=True) if v and t]


def check_vocab(model_vocab: int, tokenizer: ChatTokenizer, where: str) -> None:
    """A model whose embedding is smaller than the tokenizer would index out of range (or, worse, be
    scored with another tokenizer's ids)."""
    if model_vocab < tokenizer.vocab_size:
        raise StageError(
            f"{where}: model vocab_size {model_vocab} is smaller than the tokenizer's {tokenizer.vocab_size} "
            f"({tokenizer.path}); the checkpoint was trained with another tokenizer: re-run the pipeline"
        )


def load_lm(path: Path, tokenizer: ChatTokenizer) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The causal LM in a checkpoint (the policy of a policy+value checkpoint), in float32 eval mode."""
    from models.checkpoint import load_checkpoint

    model: Any
    model, meta = load_checkpoint(path)
    if meta.get("kind") == "scalar_head":
        raise StageError(f"{path} is a reward (scalar head) checkpoint, not a language model")
    if meta.get("kind") == "policy_value":
        model = model.transformer  # PPO's value head is training machinery; the policy is the model
    check_vocab(model.config.vocab_size, tokenizer, str(path))
    expected = meta.get("tokenizer_fingerprint")
    if expected:
        tokenizer.check_fingerprint(expected, str(path))
    else:
        log.warning("%s records no tokenizer fingerprint; assuming %s", path, tokenizer.path)
    return model.float().eval(), meta
