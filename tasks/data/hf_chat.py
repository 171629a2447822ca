"""An open model's own tokenizer and chat template (a Hugging Face folder) behind the ChatTokenizer interface.

    folder/tokenizer.json          the `tokenizers` model (vocabulary, added/special tokens)
    folder/tokenizer_config.json   bos/eos/pad token strings, and the Jinja chat template (or, as
                                   transformers >= 4.43 saves it, folder/chat_template.jinja)

The template is rendered as transformers renders it (a sandboxed Jinja environment with trim_blocks,
lstrip_blocks, loop controls, raise_exception, strftime_now and a JSON tojson), so the ids equal
`AutoTokenizer.apply_chat_template`. The SFT loss mask (assistant tokens) is found by rendering the
conversation up to each assistant turn with the generation prompt and up to its end: the characters in
between are that turn (its content and end-of-turn tokens). A template for which these renders are not
prefixes of the whole conversation is refused with the turn named.

The fingerprint is the sha256 of tokenizer.json plus the template and the special-token strings: a model
trained with this tokenizer records it, and every later stage checks it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer

from tasks.data.chat_tokenizer import ROLES, ChatTokenizer, SpecialTokens

CONFIG = "tokenizer_config.json"
TEMPLATE_FILE = "chat_template.jinja"


class TemplateError(ValueError):
    """The folder's chat template cannot render a conversation, or hides where assistant turns are."""


def _token_str(value: Any) -> str | None:
    """A special token as tokenizer_config.json gives it: a string or {"content": ...} (older files)."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) and value else None


def read_template(folder: Path, config: dict[str, Any]) -> str | None:
    template = config.get("chat_template")
    if isinstance(template, list):  # several named templates: the default one is the chat template
        template = next((t.get("template") for t in template if t.get("name") == "default"), None)
    if template is None and (folder / TEMPLATE_FILE).is_file():
        template = (folder / TEMPLATE_FILE).read_text()
    return template if isinstance(template, str) and template.strip() else None


def is_hf_tokenizer_dir(folder: Path) -> bool:
    """A folder with tokenizer.json and a chat template that our tokenizer stage did not write."""
    folder = Path(folder)
    if not (folder / "tokenizer.json").is_file() or not (folder / CONFIG).is_file():
        return False
    try:
        config = json.loads((folder / CONFIG).read_text())
    except (OSError, ValueError):
        return False
    return (
        isinstance(config, dict)
        and "chat_special_tokens" not in config
        and bool(read_template(folder, config))
    )


def carried_tokenizer(folder: Path) -> ChatTokenizer | None:
    """The tokenizer a checkpoint (or a model folder) carries: an open model's, with its chat template, or
    a copy of the pipeline's own (a line started from a registered model); None when it carries none."""
    folder = Path(folder)
    if is_hf_tokenizer_dir(folder):
        return HFChatTokenizer.load(folder)
    if (folder / "tokenizer.json").is_file():
        return ChatTokenizer.load(folder / "tokenizer.json")
    return None


def _environment() -> Any:
    import jinja2
    from jinja2.ext import Extension
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Generation(Extension):
        """`{% generation %}...{% endgeneration %}` (a transformers extension) renders its body."""

        tags = {"generation"}

        def parse(self, parser: Any) -> Any:
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(["name:endgeneration"], drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller: Any) -> str:
            return str(caller())

    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    def tojson(
        x: Any,
        ensure_ascii: bool = False,
        indent: Any = None,
        separators: Any = None,
        sort_keys: bool = False,
    ) -> str:
        return json.dumps(
            x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
        )

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[Generation, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env


class HFChatTokenizer(ChatTokenizer):
    """ChatTokenizer over an open model's folder; load() checks it before any work."""

    template: str
    token_strings: dict[str, str | None]
    _end: int

    @classmethod
    def load(cls, path: Path) -> HFChatTokenizer:
        folder = Path(path)
        folder = folder.parent if folder.name == "tokenizer.json" else folder
        tok_path = folder / "tokenizer.json"
        if not tok_path.is_file():
            raise FileNotFoundError(
                f"{tok_path} not found: an open model's folder needs its tokenizer.json (save_pretrained writes it)"
            )
        config_path = folder / CONFIG
        config = json.loads(config_path.read_text()) if config_path.is_file() else {}
        template = read_template(folder, config)
        if template is None:
            raise TemplateError(
                f"{folder} has no chat template (tokenizer_config.json chat_template or {TEMPLATE_FILE}); "
                "SFT renders conversations with the model's own template: use an instruct model's folder, or "
                "add a template"
            )
        tok = Tokenizer.from_file(str(tok_path))
        strings = {k: _token_str(config.get(f"{k}_token")) for k in ("bos", "eos", "pad", "unk")}
        if strings["eos"] is None:
            raise TemplateError(f"{config_path}: no eos_token; generation needs to know where a reply stops")
        strings["pad"] = strings["pad"] or strings["eos"]  # Llama 3 has no pad token: pads are masked anyway
        h = hashlib.sha256(tok_path.read_bytes())
        h.update(json.dumps({"template": template, "tokens": strings}, sort_keys=True).encode())
        specials = SpecialTokens(
            pad=strings["pad"] or "",
            bos=strings["bos"] or "",
            eos=strings["eos"] or "",
            system="",
            user="",
            assistant="",
            end="",
        )
        chat = cls(tok, h.hexdigest(), tok_path, specials)
        chat.template, chat.token_strings = template, strings
        for value in (strings["eos"], strings["pad"], strings["bos"]):
            if value is not None:
                chat.token_id(value)  # in the vocabulary, or a clear error now
        chat._end = chat._find_end_of_turn()
        chat.specials = dataclasses.replace(specials, end=str(chat.tokenizer.id_to_token(chat._end)))
        return chat

    # ------------------------------------------------------------------ ids

    @property
    def bos_id(self) -> int:
        if self.token_strings["bos"] is None:
            raise ValueError(f"{self.path.parent} has no bos_token (the model is used without one)")
        return self.token_id(self.token_strings["bos"])

    @property
    def end_id(self) -> int:
        """The token that closes an assistant turn in the template (e.g. <|im_end|>, <|eot_id|>)."""
        return self._end

    @property
    def chat_template(self) -> str:
        return self.template

    # ------------------------------------------------------------------ rendering

    def render_text(self, messages: list[dict[str, str]], add_generation_prompt: bool = False) -> str:
        for i, message in enumerate(messages):
            if message.get("role") not in ROLES:
                raise ValueError(f"message {i}: role {message.get('role')!r} is not one of {ROLES}")
            if not isinstance(message.get("content"), str):
                raise ValueError(f"message {i}: content must be a string")
        import jinja2

        try:
            return str(
                _compiled(self.template).render(
                    messages=messages,
                    add_generation_prompt=add_generation_prompt,
                    **{f"{k}_token": v for k, v in self.token_strings.items() if v is not None},
                )
            )
        except jinja2.exceptions.TemplateError as exc:
            raise TemplateError(f"chat template of {self.path.parent}: {exc}") from exc

    def assistant_spans(self, messages: list[dict[str, str]]) -> Iterator[tuple[int, int]]:
        """Character spans [start, end) of each assistant turn in render_text(messages)."""
        full = self.render_text(messages)
        for i, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            before = self.render_text(messages[:i], add_generation_prompt=True)
            through = self.render_text(messages[: i + 1])
            if not (through.startswith(before) and full.startswith(through)):
                raise TemplateError(
                    f"chat template of {self.path.parent} renders message {i} (assistant) differently inside "
                    "the whole conversation than up to it, so its tokens cannot be found for the loss mask"
                )
            yield len(before), len(through)

    def render_chat(
        self, messages: list[dict[str, str]], add_generation_prompt: bool = False
    ) -> tuple[list[int], list[bool]]:
        """Ids as apply_chat_template gives them, and a mask True on assistant turns (content + end tokens)."""
        text = self.render_text(messages, add_generation_prompt)
        enc = self.tokenizer.encode(text, add_special_tokens=False)
        spans = list(self.assistant_spans(messages))
        mask = [any(a <= start < b for a, b in spans) for start, _ in enc.offsets]
        return list(enc.ids), mask

    def _find_end_of_turn(self) -> int:
        """The first special token after an assistant reply's content; the eos token if there is none."""
        probe = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
        text = self.render_text(probe)
        start, end = list(self.assistant_spans(probe))[-1]
        at = text.index("Hello", start) + len("Hello")
        added = {t.content for t in self.tokenizer.get_added_tokens_decoder().values() if t.special}
        for token_id in self.tokenizer.encode(text[at:end], add_special_tokens=False).ids:
            if self.tokenizer.id_to_token(token_id) in added:
                return token_id
        return self.eos_id


_TEMPLATES: dict[str, Any] = {}


def _compiled(template: str) -> Any:
    if template not in _TEMPLATES:
        _TEMPLATES[template] = _environment().from_string(template)
    return _TEMPLATES[template]


def check_vocab(tokenizer: ChatTokenizer, vocab_size: int, where: str) -> None:
    """Every token id must have an embedding row: a tokenizer larger than the model's embedding is another
    model's tokenizer. (A larger embedding is fine: Qwen pads its table to a multiple of 128.)"""
    if tokenizer.vocab_size > vocab_size:
        raise ValueError(
            f"{where}: tokenizer {tokenizer.path} has {tokenizer.vocab_size} tokens but the model's embedding "
            f"has {vocab_size} rows; the tokenizer belongs to another model"
        )
