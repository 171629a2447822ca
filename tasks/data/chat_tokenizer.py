"""The tokenizer every stage uses: a byte-level BPE `tokenizers.Tokenizer` plus the chat format.

Chat format, with the default special tokens (their strings come from params and are recorded with the
tokenizer, see below):

    <|bos|><|system|>...<|end|><|user|>...<|end|><|assistant|>...<|end|>

The same format is stored as a Jinja chat template in tokenizer_config.json, generated from the same
special tokens, so `transformers` renders the same ids as `render_chat`. Loss masks cover assistant
content and its closing end token, nothing else. Special tokens are split out before byte-level
pre-tokenization, so encoding the pieces one by one gives the same ids as encoding the rendered string.

Which string plays which part (pad, bos, eos, the three roles, end of turn) is recorded by the tokenizer
stage in tokenizer_config.json under `chat_special_tokens`. A bare tokenizer.json (no config beside it,
e.g. a registered model's artifact) is read positionally: the tokenizer stage always adds the special
tokens first, in SpecialTokens.ordered() order, so they hold ids 0..6.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer

from tasks.core.io import read_json, sha256_file

ROLES = ("system", "user", "assistant")
CONFIG_FILE = "tokenizer_config.json"
SPECIALS_KEY = "chat_special_tokens"


class TokenizerMismatch(ValueError):
    """Data or a model was made with another tokenizer than the one given."""


@dataclass(frozen=True)
class SpecialTokens:
    """The special token strings, by part. ordered() is their id order in a tokenizer we train."""

    pad: str = "<|pad|>"
    bos: str = "<|bos|>"
    eos: str = "<|eos|>"
    system: str = "<|system|>"
    user: str = "<|user|>"
    assistant: str = "<|assistant|>"
    end: str = "<|end|>"

    @classmethod
    def from_params(cls, bos: str, eos: str, pad: str, role_tokens: list[str]) -> SpecialTokens:
        """TokenizerConfig's fields; role_tokens is [system, user, assistant, end of turn]."""
        if len(role_tokens) != 4:
            raise ValueError(
                f"tokenizer.role_tokens must list 4 tokens (system, user, assistant, end of turn), "
                f"got {len(role_tokens)}: {role_tokens}"
            )
        system, user, assistant, end = role_tokens
        return cls(pad=pad, bos=bos, eos=eos, system=system, user=user, assistant=assistant, end=end)

    @classmethod
    def from_dict(cls, data: Any, where: str) -> SpecialTokens:
        names = [f.name for f in fields(cls)]
        if not isinstance(data, dict) or sorted(data) != sorted(names):
            raise ValueError(f"{where}: {SPECIALS_KEY} must map exactly {names} to strings, got {data!r}")
        if not all(isinstance(v, str) and v for v in data.values()):
            raise ValueError(f"{where}: {SPECIALS_KEY} values must be non-empty strings, got {data!r}")
        return cls(**data)

    def ordered(self) -> list[str]:
        return [self.pad, self.bos, self.eos, self.system, self.user, self.assistant, self.end]

    def role(self, role: str) -> str:
        return {"system": self.system, "user": self.user, "assistant": self.assistant}[role]

    def as_dict(self) -> dict[str, str]:
        return asdict(self)


def chat_template(sp: SpecialTokens) -> str:
    """The Jinja template that renders exactly what ChatTokenizer.render_chat encodes."""
    roles = "{" + ", ".join(f"{json.dumps(r)}: {json.dumps(sp.role(r))}" for r in ROLES) + "}"
    return (
        f"{{% set role_tokens = {roles} %}}"
        "{{ bos_token }}{% for message in messages %}"
        "{% if message['role'] not in role_tokens %}"
        "{{ raise_exception('role ' + message['role'] + ' is not one of system, user, assistant') }}"
        "{% endif %}"
        f"{{{{ role_tokens[message['role']] + message['content'] + {json.dumps(sp.end)} }}}}"
        "{% endfor %}"
        f"{{% if add_generation_prompt %}}{{{{ {json.dumps(sp.assistant)} }}}}{{% endif %}}"
    )


CHAT_TEMPLATE = chat_template(SpecialTokens())  # with the default special tokens


def _positional_specials(tok: Tokenizer) -> SpecialTokens | None:
    """Specials of a bare tokenizer.json made in SpecialTokens.ordered() order (ids 0..6), if it was."""
    added = tok.get_added_tokens_decoder()
    first = [added.get(i) for i in range(len(fields(SpecialTokens)))]
    if not all(t is not None and t.special for t in first):
        return None
    return SpecialTokens(*(t.content for t in first if t is not None))


@dataclass
class ChatTokenizer:
    tokenizer: Tokenizer
    fingerprint: str  # sha256 of tokenizer.json
    path: Path
    specials: SpecialTokens = field(default_factory=SpecialTokens)

    @classmethod
    def load(cls, path: Path) -> ChatTokenizer:
        path = Path(path)
        if path.is_dir():
            path = path / "tokenizer.json"
        if not path.exists():
            raise FileNotFoundError(f"tokenizer not found at {path}; run the tokenizer stage first")
        tok = Tokenizer.from_file(str(path))
        config = path.parent / CONFIG_FILE
        specials = None
        if config.exists():
            recorded = read_json(config).get(SPECIALS_KEY)
            if recorded is not None:
                specials = SpecialTokens.from_dict(recorded, str(config))
        specials = specials or _positional_specials(tok) or SpecialTokens()
        chat = cls(tok, sha256_file(path), path, specials)
        for token in specials.ordered():
            chat.token_id(token)  # every special is in the vocabulary, or a clear error now
        return chat

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
        return self.token_id(self.specials.bos)

    @property
    def eos_id(self) -> int:
        return self.token_id(self.specials.eos)

    @property
    def pad_id(self) -> int:
        return self.token_id(self.specials.pad)

    @property
    def end_id(self) -> int:
        return self.token_id(self.specials.end)

    @property
    def chat_template(self) -> str:
        return chat_template(self.specials)

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.tokenizer.encode_batch_fast(texts, add_special_tokens=False)]

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    def render_chat(
        self, messages: list[dict[str, str]], add_generation_prompt: bool = False
    ) -> tuple[list[int], list[bool]]:
        """Token ids of a conversation and a mask that is True on assistant tokens (the SFT targets)."""
        end = self.end_id
        ids = [self.bos_id]
        mask = [False]
        for i, message in enumerate(messages):
            role, content = message.get("role"), message.get("content")
            if role not in ROLES:
                raise ValueError(f"message {i}: role {role!r} is not one of {ROLES}")
            if not isinstance(content, str):
                raise ValueError(f"message {i}: content must be a string, got {type(content).__name__}")
            body = self.encode(content) + [end]
            ids += [self.token_id(self.specials.role(role))] + body
            mask += [False] + [role == "assistant"] * len(body)
        if add_generation_prompt:
            ids.append(self.token_id(self.specials.assistant))
            mask.append(False)
        return ids, mask

    def check_fingerprint(self, expected: str, what: str) -> None:
        if expected != self.fingerprint:
            raise TokenizerMismatch(
                f"{what} was made with tokenizer {expected[:12]}, but {self.path} is {self.fingerprint[:12]}; "
                "re-run the stages after `tokenizer` (dvc repro) so they use the same tokenizer"
            )


def special_tokens(bos: str, eos: str, pad: str, roles: list[str]) -> list[str]:
    """The special tokens in id order (pad first, so pad is id 0); roles = [system, user, assistant, end]."""
    return SpecialTokens.from_params(bos, eos, pad, roles).ordered()


def write_tokenizer_config(out_dir: Path, tok: ChatTokenizer) -> None:
    """tokenizer_config.json so `transformers.PreTrainedTokenizerFast` loads tokenizer.json with our template.

    `chat_special_tokens` records which string is which part; ChatTokenizer.load reads it back.
    """
    from tasks.core.io import write_json

    sp = tok.specials
    write_json(
        out_dir / CONFIG_FILE,
        {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": sp.bos,
            "eos_token": sp.eos,
            "pad_token": sp.pad,
            "additional_special_tokens": [sp.system, sp.user, sp.assistant, sp.end],
            SPECIALS_KEY: sp.as_dict(),
            "chat_template": chat_template(sp),
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
