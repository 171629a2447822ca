"""Dataset rows -> the pipeline's three record types (pretrain text, SFT conversation, preference pair).

Each `*_record(row, text_field)` returns the extracted value, or a drop reason ("missing_field",
"wrong_type", "identical_pair") with a preview of what was found. Accepted layouts: plain text; chat
`messages` lists (OpenAI or ShareGPT roles); preference pairs as chosen/rejected strings, message lists
(UltraFeedback) or Anthropic HH transcripts. The parquet schemas of data/raw/ are defined here too.
"""

from collections.abc import Callable
from typing import Any

import pyarrow as pa

from tasks.data.textclean import normalize

MESSAGES_TYPE = pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))
SCHEMAS = {
    "pretrain": pa.schema([("text", pa.string()), ("source", pa.string())]),
    "sft": pa.schema([("messages", MESSAGES_TYPE), ("source", pa.string())]),
    "preference": pa.schema(
        [("prompt", pa.string()), ("chosen", pa.string()), ("rejected", pa.string()), ("source", pa.string())]
    ),
}
ROLES = ("system", "user", "assistant")
ROLE_ALIASES = {"human": "user", "gpt": "assistant"}  # ShareGPT-style {"from", "value"} turns
HH_ASSISTANT = "\n\nAssistant:"


# ------------------------------------------------------------------------------------ pure helpers
def _clip(value: Any, limit: int) -> Any:
    """Long strings cut before repr: a 50 MB row must not be copied whole just to show its start."""
    if isinstance(value, str) and len(value) > limit:
        return value[:limit] + f"...<{len(value)} chars>"
    if isinstance(value, dict):
        return {k: _clip(v, limit) for k, v in value.items()}
    return value


def preview(value: Any, limit: int = 160) -> str:
    text = repr(_clip(value, limit))
    return text if len(text) <= limit else text[:limit] + "..."


Extracted = tuple[dict[str, Any] | None, str | None, str]  # record, drop reason, text for the filters


def pretrain_record(row: dict, text_field: str) -> Extracted:
    value = row.get(text_field)
    if value is None:
        return None, "missing_field", ""
    if not isinstance(value, str):
        return None, "wrong_type", ""
    return {"text": value}, None, value


def _messages(value: Any) -> list[dict[str, str]] | str:
    """A list of {role, content} (ShareGPT {from, value} accepted), or the drop reason."""
    if not isinstance(value, list):
        return "wrong_type"
    out = []
    for msg in value:
        if not isinstance(msg, dict):
            return "wrong_type"
        # `or`, not a .get default: mixed files unify structs, so absent keys are present as None
        role = msg.get("role") or msg.get("from")
        content = msg.get("content") if msg.get("content") is not None else msg.get("value")
        if role is None or content is None:
            return "missing_field"
        if not isinstance(role, str) or not isinstance(content, str):
            return "wrong_type"
        role = ROLE_ALIASES.get(role, role)
        if role not in ROLES:
            return "wrong_type"
        out.append({"role": role, "content": content})
    return out if out else "missing_field"


def sft_record(row: dict, text_field: str) -> Extracted:
    value = row.get(text_field)
    if value is None:
        return None, "missing_field", ""
    messages = _messages(value)
    if isinstance(messages, str):
        return None, messages, ""
    if not any(m["content"].strip() for m in messages if m["role"] == "assistant"):
        return None, "missing_field", ""
    return {"messages": messages}, None, "\n".join(f"{m['role']}: {m['content']}" for m in messages)


def split_hh(transcript: str) -> tuple[str, str]:
    """HH-RLHF '\\n\\nHuman: q\\n\\nAssistant: a' -> (prompt, answer), split at the last assistant turn."""
    idx = transcript.rfind(HH_ASSISTANT)
    prompt, answer = transcript[:idx].strip(), transcript[idx + len(HH_ASSISTANT) :].strip()
    if prompt.startswith("Human:") and HH_ASSISTANT.strip() not in prompt:
        prompt = prompt[len("Human:") :].strip()  # single-turn: the question itself
    return prompt, answer


def _last_content(messages: list, role: str, last: bool) -> Any:
    picked = [m.get("content") for m in messages if isinstance(m, dict) and m.get("role") == role]
    return (picked[-1] if last else picked[0]) if picked else None


def preference_record(row: dict, text_field: str) -> Extracted:
    prompt, chosen, rejected = row.get(text_field), row.get("chosen"), row.get("rejected")
    if chosen is None or rejected is None:
        return None, "missing_field", ""
    if isinstance(chosen, list) and isinstance(rejected, list):  # UltraFeedback-binarized message lists
        if not (isinstance(prompt, str) and prompt.strip()):
            prompt = _last_content(chosen, "user", last=False)
        chosen = _last_content(chosen, "assistant", last=True)
        rejected = _last_content(rejected, "assistant", last=True)
    elif prompt is None and isinstance(chosen, str) and HH_ASSISTANT in chosen and isinstance(rejected, str):
        prompt, chosen = split_hh(chosen)  # HH-RLHF full transcripts
        _, rejected = split_hh(rejected)
    values = (prompt, chosen, rejected)
    if any(v is None for v in values):
        return None, "missing_field", ""
    if not (isinstance(prompt, str) and isinstance(chosen, str) and isinstance(rejected, str)):
        return None, "wrong_type", ""
    if not (prompt.strip() and chosen.strip() and rejected.strip()):
        return None, "missing_field", ""
    if normalize(chosen) == normalize(rejected):
        return None, "identical_pair", ""
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected}, None, f"{prompt}\n{chosen}\n{rejected}"


EXTRACTORS: dict[str, Callable[[dict, str], Extracted]] = {
    "pretrain": pretrain_record,
    "sft": sft_record,
    "preference": preference_record,
}
