"""The one redaction of secrets in anything the pipeline prints, logs or stores.

A value under a key that names a credential (`hf_token`, `db.password`, `aws_secret_access_key`,
`X-Amz-Signature`, ...) becomes `***`; in any other text every URL loses its password (even one holding
`/` or `@`, or digits and a `/` that read as a port), a user name standing alone (a token), and secret
query or fragment values, and `key=value` pairs with a secret key lose the value. The tokenizer section's
`*_token` keys name vocabulary and stay.
"""

from __future__ import annotations

import re
import urllib.parse
from collections.abc import Mapping
from typing import Any

# A key names a secret when its last word is one of these (`hf_token`, `auth`, `X-Amz-Signature`) ...
SECRET_LAST_WORDS = {"token", "key", "pwd", "auth", "authorization", "sig", "signature", "cookie", "sas"}
# ... or when these letters appear anywhere in it (`db_password`, `aws_secret_access_key`, `apiKey`).
SECRET_PARTS = (
    "password",
    "passwd",
    "passphrase",
    "secret",
    "credential",
    "privatekey",
    "apikey",
    "accesskey",
)
_URL = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^\s'\"<>()\[\]{}`]+")
_PAIR = re.compile(r"([A-Za-z_][\w.-]*)=([^\s&#'\"]*)")


def secret_key(key: str) -> bool:
    """Does this (dotted) key name a credential? The tokenizer section's *_token keys name vocabulary."""
    parts = key.lower().split(".")
    words = re.findall(r"[a-z0-9]+", re.sub(r"([a-z0-9])([A-Z])", r"\1_\2", key.split(".")[-1]).lower())
    compact = "".join(words)
    if any(part in compact for part in SECRET_PARTS):
        return True
    return bool(words) and words[-1] in SECRET_LAST_WORDS and "tokenizer" not in parts[:-1]


def _redact_url(url: str) -> str:
    """A URL without its password, a user-only token, or a secret query/fragment value."""
    scheme, rest = url.split("://", 1)
    # The authority ends at the first / ? #; a password containing one of them (invalid but common)
    # shows as `user:pa/ss@host`: a colon before the separator, no port digits after it, and an @ later.
    end = min([i for i in (rest.find(c) for c in "/?#") if i >= 0], default=len(rest))
    at = rest.rfind("@", 0, end)  # the last @ of the authority: a raw @ in a password comes before it
    head = rest[:end]
    if at < 0 and ":" in head and not head.split(":", 1)[1].isdigit():
        at = rest.find("@", end)
    elif at < 0 and ":" in head and rest[end : end + 1] == "/":
        # Digits then `/` read as a port, but `user:1234/5@host` is a password of digits and `/`: an @ in
        # the path ends the userinfo, the last one before ? or #, unless it opens a path segment (npm's
        # `/@scope`, Vite's `/@vite`). Redacting an @ of a path after a port (an e-mail) is the safe error.
        stop = min([i for i in (rest.find(c, end) for c in "?#") if i >= 0], default=len(rest))
        at = max((i for i in range(end + 1, stop) if rest[i] == "@" and rest[i - 1] != "/"), default=-1)
    if at >= 0:
        userinfo, rest = rest[:at], rest[at + 1 :]
        user = userinfo.split(":", 1)[0] if ":" in userinfo else ""
        rest = (f"{user}:***@" if ":" in userinfo else "***@") + rest
    parts = urllib.parse.urlsplit(f"{scheme}://{rest}")
    for field in (parts.query, parts.fragment):
        if "=" in field and any(
            secret_key(k) for k, _ in urllib.parse.parse_qsl(field, keep_blank_values=True)
        ):
            rest = rest.replace(field, _PAIR.sub(_redact_pair, field), 1)
    return f"{scheme}://{rest}"


def _redact_pair(m: re.Match[str]) -> str:
    return f"{m.group(1)}=***" if secret_key(m.group(1)) else m.group(0)


def redact(key: str, value: Any) -> str:
    """The one redaction of anything printed, logged or stored: a value under a key that names a secret
    becomes `***`; in any other text, every URL loses its password, a user name that stands alone (a
    token), and secret query/fragment values, and `key=value` pairs with a secret key lose the value."""
    if key and secret_key(key):
        return "***"
    text = _URL.sub(lambda m: _redact_url(m.group(0)), str(value))
    return _PAIR.sub(_redact_pair, text)


def redact_tree(obj: Any, prefix: str = "") -> Any:
    """A copy of nested mappings/lists with every string leaf passed through `redact` under its dotted key."""
    if isinstance(obj, Mapping):
        return {k: redact_tree(v, f"{prefix}{k}.") for k, v in obj.items()}
    if isinstance(obj, list):
        return [redact_tree(v, prefix) for v in obj]
    return redact(prefix.rstrip("."), obj) if isinstance(obj, str) else obj
