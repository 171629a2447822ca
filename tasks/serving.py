"""MLflow pyfunc "model from code" for every registered model.

`mlflow models serve -m models:/<name>@champion --env-manager local` loads this file. Artifacts: the
safetensors checkpoint directory and tokenizer.json. A causal LM answers chat requests
({"messages": [...]} in, generated text out); a reward model scores the conversation instead.
Requests are bounded: message count and size, and max_new_tokens.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import mlflow
from mlflow.pyfunc import PythonModel

MAX_MESSAGES = 32
MAX_CHARS = 16_000
MAX_NEW_TOKENS = 256


def _conversations(model_input: Any) -> list[list[dict[str, str]]]:
    """Accept a DataFrame / dict / list of records with a `messages` field; validate the shape."""
    if hasattr(model_input, "to_dict"):
        model_input = model_input.to_dict(orient="records")
    if isinstance(model_input, dict):
        model_input = [model_input]
    if not isinstance(model_input, list) or not model_input:
        raise ValueError("input must be a record or a list of records with a 'messages' field")
    out = []
    for i, record in enumerate(model_input):
        messages: Any = record.get("messages") if isinstance(record, dict) else None
        if hasattr(messages, "tolist"):
            messages = messages.tolist()
        if not isinstance(messages, list) or not messages:
            raise ValueError(f"record {i}: 'messages' must be a non-empty list of {{role, content}}")
        if len(messages) > MAX_MESSAGES:
            raise ValueError(f"record {i}: {len(messages)} messages, more than the limit {MAX_MESSAGES}")
        if sum(len(str(m.get("content", ""))) for m in messages) > MAX_CHARS:
            raise ValueError(f"record {i}: messages exceed {MAX_CHARS} characters")
        out.append([{"role": str(m["role"]), "content": str(m["content"])} for m in messages])
    return out


class ChatModel(PythonModel):
    def load_context(self, context: Any) -> None:
        from models.checkpoint import load_checkpoint
        from tasks.tokens import ChatTokenizer

        self.model: Any
        self.model, self.meta = load_checkpoint(Path(context.artifacts["checkpoint"]))
        self.tokenizer = ChatTokenizer.load(Path(context.artifacts["tokenizer"]))
        if self.meta.get("tokenizer_fingerprint") not in (None, self.tokenizer.fingerprint):
            raise ValueError("checkpoint and tokenizer artifacts come from different tokenizers")

    def predict(self, context: Any, model_input: Any, params: dict[str, Any] | None = None) -> list[Any]:
        import torch

        from models.generate import generate

        params = params or {}
        max_new = int(params.get("max_new_tokens", 64))
        if not 0 < max_new <= MAX_NEW_TOKENS:
            raise ValueError(f"max_new_tokens must be in 1..{MAX_NEW_TOKENS}, got {max_new}")
        temperature = float(params.get("temperature", 0.0))
        top_k = int(params.get("top_k", 0)) or None
        results: list[Any] = []
        for messages in _conversations(model_input):
            if self.meta["kind"] == "scalar_head":
                ids, _ = self.tokenizer.render_chat(messages)
                ids = ids[-self.model.config.max_seq_len :]
                with torch.no_grad():
                    results.append(float(self.model(torch.tensor([ids]))[0, -1]))
                continue
            ids, _ = self.tokenizer.render_chat(messages, add_generation_prompt=True)
            room = self.model.config.max_seq_len - max_new
            if room < 1:
                raise ValueError(f"max_new_tokens={max_new} leaves no room in the context")
            prompt = torch.tensor([ids[-room:]])
            out = generate(
                self.model,
                prompt,
                max_new_tokens=max_new,
                temperature=temperature,
                top_k=top_k,
                stop_tokens=[self.tokenizer.end_id, self.tokenizer.eos_id],
                pad_id=self.tokenizer.pad_id,
                generator=torch.Generator().manual_seed(int(params.get("seed", 0))),
            )
            results.append(self.tokenizer.decode(out[0, prompt.shape[1] :].tolist()))
        return results


mlflow.models.set_model(ChatModel())
