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
# Values that look like credentials whatever their key is called: Hugging Face, OpenAI-style, GitHub and AWS
# tokens, and 40 hex digits (a wandb API key).
_TOKEN = r"hf_[A-Za-z0-9]{20,}|sk-[A-Za-z0-9\-_]{20,}|gh[pousr]_[A-Za-z0-9]{20,}|github_pat_[A-Za-z0-9_]{20,}|AKIA[0-9A-Z]{16}"
_HEX = r"[a-f0-9]{40}"
_SECRET_VALUE = re.compile(rf"(?:{_TOKEN}|{_HEX})")  # fullmatch: the whole value
# The same inside a longer text, not glued to letters or digits (`task-...` is no `sk-` key).
_TOKEN_IN_TEXT = re.compile(rf"(?<![A-Za-z0-9])(?:{_TOKEN})(?![A-Za-z0-9])")
_ANY_IN_TEXT = re.compile(rf"(?<![A-Za-z0-9])(?:{_TOKEN}|{_HEX})(?![A-Za-z0-9])")
# scheme://user:password@host: group 1 is `://user`. (Anchored on `://`, not on the scheme's letters,
# so that a long run of letters cannot make the search quadratic.)
_URL_PASSWORD = re.compile(r"(://[^\s/?#:@]*):[^\s/?#]+@")
REDACTED = "***REDACTED***"
REDACTED_NAME = "REDACTED"  # in names that become folder names or tracker runs, where `*` does not belong


def is_secret_key(name: str) -> bool:
    return bool(_SECRET_KEY.search(str(name)))


def redact(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: (REDACTED if is_secret_key(k) and v not in (None, "") else redact(v)) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(redact(v) for v in obj)
    if isinstance(obj, str):
        if _SECRET_VALUE.fullmatch(obj):
            return REDACTED
        # 40 hex digits inside a longer value stay: there they are as likely a commit hash in a model
        # snapshot path, which a saved recipe must keep to reload
        return _URL_PASSWORD.sub(r"\1:***@", _TOKEN_IN_TEXT.sub(REDACTED, obj))
    return obj


def redact_text(text: str) -> str:
    """`text` (an error message, a printed value) with every credential-shaped part replaced: tokens by
    REDACTED, the password of a `scheme://user:password@host` URL by `***`."""
    return _URL_PASSWORD.sub(r"\1:***@", _ANY_IN_TEXT.sub(REDACTED, str(text)))


def redact_name(name: str) -> str:
    """A run name or tag with every credential-shaped part replaced by REDACTED_NAME: still a valid folder name."""
    return _URL_PASSWORD.sub(rf"\1:{REDACTED_NAME}@", _ANY_IN_TEXT.sub(REDACTED_NAME, str(name)))


def redact_override(text: str) -> str:
    """A `section.key=value` command-line override as it may be printed (launch, dry runs): the value is
    replaced when the key names a credential or the value holds one (also inside a YAML list/mapping)."""
    key, sep, value = str(text).partition("=")
    if not sep:
        return redact_text(text)
    if value.strip() and is_secret_key(key.strip().rsplit(".", 1)[-1]):
        return f"{redact_text(key)}={REDACTED}"
    if _SECRET_VALUE.fullmatch(value.strip()) or (len(value) <= 100_000 and _holds_secret(value)):
        return f"{redact_text(key)}={REDACTED}"
    return redact_text(text)


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
