"""The tokenizer every stage uses: a byte-level BPE `tokenizers.Tokenizer` plus the chat format.

Chat format (also stored as a Jinja chat template in tokenizer_config.json, so `transformers` renders
the same ids):

    <|bos|><|system|>...<|end|><|user|>...<|end|><|assistant|>...<|end|>

Loss masks cover assistant content and its closing <|end|>, nothing else. Special tokens are split out
before byte-level pre-tokenization, so encoding the pieces one by one gives the same ids as encoding
the rendered string.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from tokenizers import Tokenizer

from tasks.io import read_json, sha256_file

ROLES = ("system", "user", "assistant")

CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>' + message['content'] + '<|end|>' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)


class TokenizerMismatch(ValueError):
    """Data or a model was made with another tokenizer than the one given."""


@dataclass
class ChatTokenizer:
    tokenizer: Tokenizer
    fingerprint: str  # sha256 of tokenizer.json
    path: Path

    @classmethod
    def load(cls, path: Path) -> ChatTokenizer:
        path = Path(path)
        if path.is_dir():
            path = path / "tokenizer.json"
        if not path.exists():
            raise FileNotFoundError(f"tokenizer not found at {path}; run the tokenizer stage first")
        tok = Tokenizer.from_file(str(path))
        return cls(tok, sha256_file(path), path)

    def token_id(self, token: str) -> int:
        idx = self.tokenizer.token_to_id(token)
        if idx is None:
            raise ValueError(f"tokenizer {self.path} has no special token {token!r}")
        return idx

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size()

    @property
    def bos_id(self) -> int:
        return self.token_id("<|bos|>")

    @property
    def eos_id(self) -> int:
        return self.token_id("<|eos|>")

    @property
    def pad_id(self) -> int:
        return self.token_id("<|pad|>")

    @property
    def end_id(self) -> int:
        return self.token_id("<|end|>")

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.tokenizer.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    def render_chat(
        self, messages: list[dict[str, str]], add_generation_prompt: bool = False
    ) -> tuple[list[int], list[bool]]:
        """Token ids of a conversation and a mask that is True on assistant tokens (the SFT targets)."""
        ids = [self.bos_id]
        mask = [False]
        for i, message in enumerate(messages):
            role, content = message.get("role"), message.get("content")
            if role not in ROLES:
                raise ValueError(f"message {i}: role {role!r} is not one of {ROLES}")
            if not isinstance(content, str):
                raise ValueError(f"message {i}: content must be a string, got {type(content).__name__}")
            body = self.encode(content) + [self.end_id]
            ids += [self.token_id(f"<|{role}|>")] + body
            mask += [False] + [role == "assistant"] * len(body)
        if add_generation_prompt:
            ids.append(self.token_id("<|assistant|>"))
            mask.append(False)
        return ids, mask

    def check_fingerprint(self, expected: str, what: str) -> None:
        if expected != self.fingerprint:
            raise TokenizerMismatch(
                f"{what} was made with tokenizer {expected[:12]}, but {self.path} is {self.fingerprint[:12]}; "
                "re-run the stages after `tokenizer` (dvc repro) so they use the same tokenizer"
            )


def special_tokens(bos: str, eos: str, pad: str, roles: list[str]) -> list[str]:
    return [pad, bos, eos, *roles]


def write_tokenizer_config(out_dir: Path, tok: ChatTokenizer) -> None:
    """tokenizer_config.json so `transformers.PreTrainedTokenizerFast` loads tokenizer.json with our template."""
    from tasks.io import write_json

    write_json(
        out_dir / "tokenizer_config.json",
        {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": "<|bos|>",
            "eos_token": "<|eos|>",
            "pad_token": "<|pad|>",
            "chat_template": CHAT_TEMPLATE,
            "model_max_length": 1_000_000,
            "clean_up_tokenization_spaces": False,
        },
    )


def read_index(path: Path) -> dict:
    index = read_json(path)
    if not isinstance(index, dict) or "tokenizer_fingerprint" not in index:
        raise ValueError(f"{path} is not a token shard index (no tokenizer_fingerprint)")
    return index


def dumps(obj: object) -> str:
    return json.dumps(obj, sort_keys=True)
