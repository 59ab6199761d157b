"""Reading user-written YAML (recipes, accelerate configs): safe types only and no aliases.

Anchors and aliases let a few lines expand into gigabytes ("billion laughs"); neither recipes nor
accelerate configs need them, so an alias is an error that names its line.
"""

from __future__ import annotations

import re
from typing import Any

import yaml


class _NoAliasLoader(yaml.SafeLoader):
    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise yaml.YAMLError(f"YAML aliases (*{event.anchor}) are not allowed (line {event.start_mark.line + 1})")
        return super().compose_node(parent, index)


class _Yaml12FloatLoader(_NoAliasLoader):
    pass


# YAML 1.1 (PyYAML) reads 3e-5 and 1.5e3 as strings: it wants a dot and a signed exponent. Recipes and
# overrides are full of such learning rates, so there floats in exponent notation are read as YAML 1.2 does.
_Yaml12FloatLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."))


def load_no_alias(text: str, *, yaml12_floats: bool = False) -> Any:
    """yaml.safe_load without aliases. yaml12_floats=True also reads `3e-5` as a float (recipes); without
    it the text is read exactly as yaml.safe_load reads it (accelerate configs: what accelerate sees).

    Raises yaml.YAMLError (an alias, bad syntax), and RecursionError or ValueError for YAML that cannot
    be built (brackets nested thousands deep, an integer of thousands of digits)."""
    return yaml.load(text, Loader=_Yaml12FloatLoader if yaml12_floats else _NoAliasLoader)
