"""Loading the models a training stage starts from: data/checkpoints/<name>/, checked against the tokenizer.

A policy and its frozen reference must have the same architecture (the reference scores the policy's
tokens position by position); `load_policy_and_reference` loads both and checks it.
"""

from __future__ import annotations

from typing import Any

from models.llama import Transformer
from tasks.core import paths
from tasks.core.stage import StageError


def load_stage_model(name: str, fingerprint: str, kind: str = "causal_lm") -> tuple[Any, dict[str, Any]]:
    """Load data/checkpoints/<name>/ and check it was trained with the tokenizer given by its fingerprint."""
    from models.checkpoint import load_checkpoint
    from tasks.data.chat_tokenizer import TokenizerMismatch

    model, meta = load_checkpoint(paths.checkpoint(name), kind=kind)
    if meta.get("tokenizer_fingerprint") != fingerprint:
        raise TokenizerMismatch(
            f"{paths.checkpoint(name)} was trained with tokenizer {str(meta.get('tokenizer_fingerprint'))[:12]}, "
            f"but data/tokenizer/tokenizer.json is {fingerprint[:12]}; re-run the stages after `tokenizer`"
        )
    return model, meta


def load_causal_lm(name: str, fingerprint: str) -> tuple[Transformer, dict[str, Any]]:
    model, meta = load_stage_model(name, fingerprint, kind="causal_lm")
    assert isinstance(model, Transformer)
    return model, meta


def check_same_architecture(policy: Transformer, reference: Transformer, names: tuple[str, str]) -> None:
    """The reference scores the policy's tokens position by position: same config, or a clear error."""
    if policy.config != reference.config:
        a, b = policy.config.to_dict(), reference.config.to_dict()
        diff = ", ".join(f"{k}: {a[k]} vs {b[k]}" for k in a if a[k] != b.get(k))
        raise StageError(
            f"policy ({paths.checkpoint(names[0])}) and reference ({paths.checkpoint(names[1])}) have "
            f"different shapes ({diff}); the reference must be the policy's own starting model"
        )


def load_policy_and_reference(
    policy_name: str, reference_name: str, fingerprint: str
) -> tuple[Transformer, Transformer, dict[str, Any]]:
    policy, meta = load_causal_lm(policy_name, fingerprint)
    reference, _ = load_causal_lm(reference_name, fingerprint)
    check_same_architecture(policy, reference, (policy_name, reference_name))
    reference.requires_grad_(False)
    return policy, reference, meta
