"""MLflow pyfunc "model from code" for every registered model.

`mlflow models serve -m models:/<name>@champion --env-manager local` loads this file. Artifacts: the
safetensors checkpoint directory and tokenizer.json. A causal LM answers chat requests
({"messages": [...]} in, generated text out); a reward model scores the conversation instead.
Requests are bounded: records per request, message count and size, and max_new_tokens; a request over
a bound is refused (HTTP 400) with a message naming it, before any generation. Every other field is
checked the same way: roles, message types and fields, top_k (integer >= 0), temperature (finite >= 0),
top_p (0, 1], seed (0..2**63-1); MLflow's schema check answers wrong JSON types first, also with 400. The HTTP body itself is
read whole by the scoring server before these checks: beyond loopback, put a proxy with a body limit
(e.g. nginx `client_max_body_size 1m`) in front.

Concurrency, three bounds (each one refuses cleanly instead of queueing without end):
- generation slots, in this pyfunc: at most PIPELINE_SERVE_MAX_CONCURRENT generations run at once per
  server process (default 1: on CPU one generation already uses every core); up to
  PIPELINE_SERVE_MAX_WAITING more requests (default 8) wait at most PIPELINE_SERVE_WAIT_S seconds
  (default 30) for a slot. Beyond that a request gets HTTP 503 "server busy ..." at once.
- connections, in uvicorn: `mlflow models serve` passes its environment to uvicorn, which reads
  UVICORN_* variables; `UVICORN_LIMIT_CONCURRENCY=N` answers 503 "Service Unavailable" to any request
  arriving while N connections are open. The scoring server runs predictions on a thread pool of
  min(32, cores + 4) threads whose queue is unbounded: this limit is what bounds it.
- time: `-t/--timeout` (MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT, default 60 s) answers 504 to a request
  still running; the prediction thread still finishes its work, so keep WAIT_S + the longest
  generation under it.
`-w/--workers N` runs N uvicorn processes, each with its own model copy and its own limits. On CPU keep
N small and set OMP_NUM_THREADS=cores/N. `ChatModel.stream_chat` (used by `pipeline chat`, and by
`predict_stream` for MLflow clients) yields text as it is generated, holding one slot while it does.
"""

from __future__ import annotations

import contextlib
import math
import os
import threading
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import mlflow
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE, TEMPORARILY_UNAVAILABLE
from mlflow.pyfunc import PythonModel

MAX_MESSAGES = 32
MAX_CHARS = 16_000
MAX_NEW_TOKENS = 256
MAX_RECORDS = 16  # conversations per request
CONCURRENT_ENV, WAITING_ENV, WAIT_ENV = (
    "PIPELINE_SERVE_MAX_CONCURRENT",
    "PIPELINE_SERVE_MAX_WAITING",
    "PIPELINE_SERVE_WAIT_S",
)


class RequestError(MlflowException, ValueError):
    """A request over a bound or of the wrong shape: HTTP 400 with this message (a ValueError in-process)."""

    def __init__(self, message: str) -> None:
        super().__init__(message, error_code=INVALID_PARAMETER_VALUE)


class ServerBusy(MlflowException):
    """Every generation slot is taken and the wait queue is full or timed out: HTTP 503, retry later."""

    def __init__(self, message: str) -> None:
        super().__init__(message, error_code=TEMPORARILY_UNAVAILABLE)


class Admission:
    """At most `slots` generations at once; up to `max_waiting` more wait up to `wait_s` for a slot.

    A request that finds the queue full, or waits in vain, raises ServerBusy: it is refused, never left
    to pile up. Thread-safe (the scoring server calls predict from a thread pool).
    """

    def __init__(self, slots: int = 1, max_waiting: int = 8, wait_s: float = 30.0) -> None:
        if not (slots >= 1 and max_waiting >= 0 and 0 <= wait_s < float("inf")):
            raise ValueError(
                f"bad limits: slots={slots} (>= 1), max_waiting={max_waiting} (>= 0), wait_s={wait_s}"
            )
        self.slots, self.max_waiting, self.wait_s = slots, max_waiting, wait_s
        self._free = threading.BoundedSemaphore(slots)
        self._lock = threading.Lock()
        self.running = 0
        self.waiting = 0

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> Admission:
        """Limits from PIPELINE_SERVE_*; a malformed value is an error naming the variable."""

        def number(name: str, default: float, kind: type, low: float) -> Any:
            raw = environ.get(name, "").strip()
            try:
                value = kind(raw) if raw else kind(default)
            except ValueError:
                value = None
            if value is None or not low <= value < float("inf"):
                raise ValueError(f"{name}={raw!r} must be a finite {kind.__name__} >= {low:g}")
            return value

        return cls(
            number(CONCURRENT_ENV, 1, int, 1), number(WAITING_ENV, 8, int, 0), number(WAIT_ENV, 30, float, 0)
        )

    def _busy(self, why: str) -> ServerBusy:
        return ServerBusy(
            f"server busy: {why} ({self.running} of {self.slots} generation slots in use, {self.waiting} "
            f"requests waiting; limits {CONCURRENT_ENV}={self.slots}, {WAITING_ENV}={self.max_waiting}, "
            f"{WAIT_ENV}={self.wait_s:g}); retry later"
        )

    @contextlib.contextmanager
    def slot(self) -> Iterator[None]:
        if not self._free.acquire(blocking=False):
            with self._lock:
                if self.waiting >= self.max_waiting:
                    raise self._busy("the wait queue is full")
                self.waiting += 1
            try:
                got = self._free.acquire(timeout=self.wait_s)
            finally:
                with self._lock:
                    self.waiting -= 1
            if not got:
                raise self._busy(f"no generation slot came free within {self.wait_s:g} s")
        with self._lock:
            self.running += 1
        try:
            yield
        finally:
            with self._lock:
                self.running -= 1
            self._free.release()


def _conversations(model_input: Any) -> list[list[dict[str, str]]]:
    """Accept a DataFrame / dict / list of records with a `messages` field; validate the shape."""
    if hasattr(model_input, "to_dict"):
        model_input = model_input.to_dict(orient="records")
    if isinstance(model_input, dict):
        model_input = [model_input]
    if not isinstance(model_input, list) or not model_input:
        raise RequestError("input must be a record or a list of records with a 'messages' field")
    if len(model_input) > MAX_RECORDS:
        raise RequestError(f"{len(model_input)} records in one request, more than the limit {MAX_RECORDS}")
    out = []
    for i, record in enumerate(model_input):
        messages: Any = record.get("messages") if isinstance(record, dict) else None
        if hasattr(messages, "tolist"):
            messages = messages.tolist()
        if not isinstance(messages, list) or not messages:
            raise RequestError(f"record {i}: 'messages' must be a non-empty list of {{role, content}}")
        if len(messages) > MAX_MESSAGES:
            raise RequestError(f"record {i}: {len(messages)} messages, more than the limit {MAX_MESSAGES}")
        out.append([_message(m, f"record {i}, message {j}") for j, m in enumerate(messages)])
        if sum(len(m["content"]) for m in out[-1]) > MAX_CHARS:
            raise RequestError(f"record {i}: messages exceed {MAX_CHARS} characters")
    return out


def _message(m: Any, where: str) -> dict[str, str]:
    """One {role, content} message, checked field by field (`pipeline chat` calls without MLflow's schema)."""
    from tasks.data.chat_tokenizer import ROLES

    if not isinstance(m, dict):
        raise RequestError(f"{where} must be an object with role and content, got {type(m).__name__}")
    extra = sorted(str(k) for k in set(m) - {"role", "content"})
    if extra:
        raise RequestError(f"{where}: unknown field(s) {extra}; a message has only role and content")
    if m.get("role") not in ROLES:
        raise RequestError(f"{where}: role {m.get('role')!r} is not one of {', '.join(ROLES)}")
    if not isinstance(m.get("content"), str):
        raise RequestError(f"{where}: content must be a string, got {type(m.get('content')).__name__}")
    return {"role": m["role"], "content": m["content"]}


def _param(params: dict[str, Any], name: str, default: Any) -> Any:
    value = params.get(name, default)
    return value.item() if hasattr(value, "item") else value  # numpy scalars from MLflow's param schema


def _integer(params: dict[str, Any], name: str, default: int, low: int, high: int, bounds: str) -> int:
    value = _param(params, name, default)
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise RequestError(f"{name} must be an integer, got {value!r}")
    if not low <= value <= high:
        raise RequestError(f"{name} must be {bounds}, got {value}")
    return value


def _real(params: dict[str, Any], name: str, default: float) -> float:
    value = _param(params, name, default)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise RequestError(f"{name} must be a number, got {value!r}")
    return float(value)


class ChatModel(PythonModel):
    def load_context(self, context: Any) -> None:
        # Before any other module of the model's code/ is imported: its files, weights and tokenizer
        # against the manifest whose sha256 MLmodel records (README: "What you can trust").
        from tasks.core.manifest import ManifestError, verify

        if "manifest" not in context.artifacts:
            raise ManifestError(
                "this model has no integrity manifest (registered before manifests); register it again"
            )
        root = Path(context.artifacts["manifest"]).parents[1]
        recorded = (context.model_config or {}).get("manifest_sha256", "")
        verify(root, recorded, "the manifest_sha256 in MLmodel", ignore_pycache=True)

        from models.checkpoint import load_checkpoint
        from tasks.data.chat_tokenizer import ChatTokenizer
        from tasks.data.hf_chat import carried_tokenizer

        self.admission = Admission.from_env()  # a malformed limit stops the server before it serves
        self.model: Any
        checkpoint = Path(context.artifacts["checkpoint"])
        self.model, self.meta = load_checkpoint(checkpoint)
        # an open model's line carries its own tokenizer and chat template in the checkpoint
        self.tokenizer = carried_tokenizer(checkpoint) or ChatTokenizer.load(
            Path(context.artifacts["tokenizer"])
        )
        if self.meta.get("tokenizer_fingerprint") not in (None, self.tokenizer.fingerprint):
            raise ValueError("checkpoint and tokenizer artifacts come from different tokenizers")

    def _generation(self, params: dict[str, Any] | None) -> dict[str, Any]:
        """Checked generation parameters: max_new_tokens (bounded), temperature, top_k, top_p, seed."""
        params = params or {}
        max_new = _integer(params, "max_new_tokens", 64, 1, MAX_NEW_TOKENS, f"in 1..{MAX_NEW_TOKENS}")
        temperature = _real(params, "temperature", 0.0)
        if not 0 <= temperature < math.inf:  # NaN fails too
            raise RequestError(f"temperature must be a finite number >= 0, got {temperature}")
        top_k = _integer(params, "top_k", 0, 0, 2**31 - 1, ">= 0 (0: off)")
        top_p = _real(params, "top_p", 1.0)
        if not 0 < top_p <= 1:
            raise RequestError(f"top_p must be in (0, 1], got {top_p}")
        seed = _integer(params, "seed", 0, 0, 2**63 - 1, f"in 0..{2**63 - 1}")
        return {
            "max_new_tokens": max_new,
            "temperature": temperature,
            "top_k": top_k or None,
            "top_p": top_p if top_p < 1 else None,  # 1: no nucleus filtering
            "seed": seed,
        }

    def _prompt(self, messages: list[dict[str, str]], max_new: int) -> list[int]:
        """The rendered chat, left-truncated to leave room for max_new tokens in the context."""
        ids, _ = self.tokenizer.render_chat(messages, add_generation_prompt=True)
        room = self.model.config.max_seq_len - max_new
        if room < 1:
            raise RequestError(
                f"max_new_tokens={max_new} leaves no room in the context of "
                f"{self.model.config.max_seq_len} tokens"
            )
        return ids[-room:]

    def _sampling(self, gen: dict[str, Any]) -> dict[str, Any]:
        """Keyword arguments of models.generate.generate / stream: the same sampling for both paths."""
        import torch

        return {
            "max_new_tokens": gen["max_new_tokens"],
            "temperature": gen["temperature"],
            "top_k": gen["top_k"],
            "top_p": gen["top_p"],
            "stop_tokens": [self.tokenizer.end_id, self.tokenizer.eos_id],
            "pad_id": self.tokenizer.pad_id,
            "generator": torch.Generator().manual_seed(gen["seed"]),
        }

    def predict(self, context: Any, model_input: Any, params: dict[str, Any] | None = None) -> list[Any]:
        import torch

        from models.generate import generate

        gen = self._generation(params)
        conversations = _conversations(model_input)
        if self.meta["kind"] == "scalar_head":
            prompts = [
                self.tokenizer.render_chat(m)[0][-self.model.config.max_seq_len :] for m in conversations
            ]
        else:
            prompts = [self._prompt(m, gen["max_new_tokens"]) for m in conversations]
        results: list[Any] = []
        with self.admission.slot():  # every check above ran first: a bad request never takes a slot
            for ids in prompts:
                prompt = torch.tensor([ids])
                if self.meta["kind"] == "scalar_head":
                    with torch.no_grad():
                        results.append(float(self.model(prompt)[0, -1]))
                    continue
                out = generate(self.model, prompt, **self._sampling(gen))
                results.append(self.tokenizer.decode(out[0, prompt.shape[1] :].tolist()))
        return results

    def stream_chat(
        self, messages: list[dict[str, str]], params: dict[str, Any] | None = None
    ) -> Iterator[str]:
        """The reply to one conversation, yielded as text pieces while tokens are generated.

        Greedy (temperature 0) gives exactly the text `predict` returns. A piece is held back while it
        ends inside a multi-byte character (the byte-level decoder shows it as U+FFFD until complete).
        One generation slot is held until the stream ends or is closed.
        """

        from models.generate import stream

        if self.meta["kind"] == "scalar_head":
            raise ValueError("this is a reward model: it scores conversations and does not generate text")
        (conversation,) = _conversations({"messages": messages})
        gen = self._generation(params)
        prompt = self._prompt(conversation, gen["max_new_tokens"])
        ids: list[int] = []
        shown = ""
        with self.admission.slot():
            for token in stream(self.model, prompt, **self._sampling(gen)):
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
            raise RequestError("predict_stream answers one conversation at a time")
        yield from self.stream_chat(conversations[0], params)


mlflow.models.set_model(ChatModel())
