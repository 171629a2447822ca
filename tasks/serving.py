"""MLflow pyfunc "model from code" for every registered model.

`mlflow models serve -m models:/<name>@champion --env-manager local` loads this file. Artifacts: the
safetensors checkpoint directory and tokenizer.json. A causal LM answers chat requests
({"messages": [...]} in, generated text out); a reward model scores the conversation instead.
Requests are bounded: records per request, message count and size, and max_new_tokens; a request over
a bound is refused with a message naming it, before any generation.

Concurrency: `mlflow models serve` runs uvicorn with `-w/--workers N` processes (default 1); each worker
holds its own copy of the model and handles one prediction at a time, so N workers answer N requests
in parallel and use N times the model's memory. Torch uses all cores for one request on CPU: on a CPU host
keep N small (1-2) and set OMP_NUM_THREADS=cores/N. `-t/--timeout` (default 60 s) bounds one request;
worst-case request time is MAX_RECORDS * max_new_tokens decoding steps. `ChatModel.stream_chat` (used
by `pipeline chat`, and by `predict_stream` for MLflow clients) yields text as it is generated.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import mlflow
from mlflow.pyfunc import PythonModel

MAX_MESSAGES = 32
MAX_CHARS = 16_000
MAX_NEW_TOKENS = 256
MAX_RECORDS = 16  # conversations per request


def _conversations(model_input: Any) -> list[list[dict[str, str]]]:
    """Accept a DataFrame / dict / list of records with a `messages` field; validate the shape."""
    if hasattr(model_input, "to_dict"):
        model_input = model_input.to_dict(orient="records")
    if isinstance(model_input, dict):
        model_input = [model_input]
    if not isinstance(model_input, list) or not model_input:
        raise ValueError("input must be a record or a list of records with a 'messages' field")
    if len(model_input) > MAX_RECORDS:
        raise ValueError(f"{len(model_input)} records in one request, more than the limit {MAX_RECORDS}")
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

    def _generation(self, params: dict[str, Any] | None) -> dict[str, Any]:
        """Checked generation parameters: max_new_tokens (bounded), temperature, top_k, seed."""
        params = params or {}
        max_new = int(params.get("max_new_tokens", 64))
        if not 0 < max_new <= MAX_NEW_TOKENS:
            raise ValueError(f"max_new_tokens must be in 1..{MAX_NEW_TOKENS}, got {max_new}")
        temperature = float(params.get("temperature", 0.0))
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {temperature}")
        return {
            "max_new_tokens": max_new,
            "temperature": temperature,
            "top_k": int(params.get("top_k", 0)) or None,
            "seed": int(params.get("seed", 0)),
        }

    def _prompt(self, messages: list[dict[str, str]], max_new: int) -> list[int]:
        ids, _ = self.tokenizer.render_chat(messages, add_generation_prompt=True)
        room = self.model.config.max_seq_len - max_new
        if room < 1:
            raise ValueError(f"max_new_tokens={max_new} leaves no room in the context")
        return ids[-room:]

    def predict(self, context: Any, model_input: Any, params: dict[str, Any] | None = None) -> list[Any]:
        import torch

        from models.generate import generate

        gen = self._generation(params)
        results: list[Any] = []
        for messages in _conversations(model_input):
            if self.meta["kind"] == "scalar_head":
                ids, _ = self.tokenizer.render_chat(messages)
                ids = ids[-self.model.config.max_seq_len :]
                with torch.no_grad():
                    results.append(float(self.model(torch.tensor([ids]))[0, -1]))
                continue
            prompt = torch.tensor([self._prompt(messages, gen["max_new_tokens"])])
            out = generate(
                self.model,
                prompt,
                max_new_tokens=gen["max_new_tokens"],
                temperature=gen["temperature"],
                top_k=gen["top_k"],
                stop_tokens=[self.tokenizer.end_id, self.tokenizer.eos_id],
                pad_id=self.tokenizer.pad_id,
                generator=torch.Generator().manual_seed(gen["seed"]),
            )
            results.append(self.tokenizer.decode(out[0, prompt.shape[1] :].tolist()))
        return results

    def stream_chat(
        self, messages: list[dict[str, str]], params: dict[str, Any] | None = None
    ) -> Iterator[str]:
        """The reply to one conversation, yielded as text pieces while tokens are generated.

        Greedy (temperature 0) gives exactly the text `predict` returns. A piece is held back while it
        ends inside a multi-byte character (the byte-level decoder shows it as U+FFFD until complete).
        """
        import torch

        from models.generate import stream

        if self.meta["kind"] == "scalar_head":
            raise ValueError("this is a reward model: it scores conversations and does not generate text")
        (conversation,) = _conversations({"messages": messages})
        gen = self._generation(params)
        ids: list[int] = []
        shown = ""
        for token in stream(
            self.model,
            self._prompt(conversation, gen["max_new_tokens"]),
            max_new_tokens=gen["max_new_tokens"],
            temperature=gen["temperature"],
            top_k=gen["top_k"],
            stop_tokens=[self.tokenizer.end_id, self.tokenizer.eos_id],
            generator=torch.Generator().manual_seed(gen["seed"]),
        ):
            ids.append(token)
            text = self.tokenizer.decode(ids)
            if text.endswith("\ufffd") or not text.startswith(shown):
                continue
            if len(text) > len(shown):
                yield text[len(shown) :]
                shown = text
        text = self.tokenizer.decode(ids)
        if text.startswith(shown) and len(text) > len(shown):
            yield text[len(shown) :]

    def predict_stream(
        self, context: Any, model_input: Any, params: dict[str, Any] | None = None
    ) -> Iterator[str]:
        conversations = _conversations(model_input)
        if len(conversations) != 1:
            raise ValueError("predict_stream answers one conversation at a time")
        yield from self.stream_chat(conversations[0], params)


mlflow.models.set_model(ChatModel())
