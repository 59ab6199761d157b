"""Redaction of secrets from anything logged or saved (configs, plans, env reports)."""

from __future__ import annotations

import re
from typing import Any

# A key whose name says it holds a credential. `max_length` or `tokens_per_s` are not secrets,
# so match whole words of the key: api_key, hf_token, secret, password, auth... `key`, `token` and
# `auth` only as the key's last word: model config keys such as pad_token_id, eos_token_id or
# num_key_value_heads are numbers that a saved recipe must keep (redacted, it no longer reloads).
_SECRET_KEY = re.compile(r"(^|[_\-.])(secret|password|passwd|credentials?|authorization|bearer)($|[_\-.])"
                         r"|(^|[_\-.])(api[_\-]?key|key|token|auth)$", re.I)
# Values that look like credentials whatever their key is called.
_SECRET_VALUE = re.compile(r"^(hf_[A-Za-z0-9]{20,}|sk-[A-Za-z0-9\-_]{20,}|[a-f0-9]{40})$")
REDACTED = "***REDACTED***"


def is_secret_key(name: str) -> bool:
    return bool(_SECRET_KEY.search(str(name)))


def redact(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: (REDACTED if is_secret_key(k) and v not in (None, "") else redact(v)) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(redact(v) for v in obj)
    if isinstance(obj, str) and _SECRET_VALUE.match(obj):
        return REDACTED
    return obj


def redact_override(text: str) -> str:
    """A `section.key=value` command-line override as it may be printed (launch, dry runs): the value is
    replaced when the key names a credential or the value holds one (also inside a YAML list/mapping)."""
    key, sep, value = str(text).partition("=")
    if not sep:
        return REDACTED if _SECRET_VALUE.match(key.strip()) else text
    if value.strip() and is_secret_key(key.strip().rsplit(".", 1)[-1]):
        return f"{key}={REDACTED}"
    if _SECRET_VALUE.match(value.strip()) or (len(value) <= 100_000 and _holds_secret(value)):
        return f"{key}={REDACTED}"
    return text


def _holds_secret(value: str) -> bool:
    import yaml

    try:
        parsed = yaml.safe_load(value)
    except (yaml.YAMLError, ValueError, RecursionError):
        return False
    try:
        return isinstance(parsed, (dict, list)) and redact(parsed) != parsed
    except RecursionError:
        return True
