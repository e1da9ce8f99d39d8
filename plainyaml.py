"""YAML for config files, as data only: no aliases or anchors, bounded size and depth.

Why: `yaml.safe_load` builds no objects, but it still expands aliases, so a 503-byte file
of nested aliases becomes gigabytes (billion laughs), and deep nesting overflows the stack
(RecursionError). A config never needs either, so both are refused with a YAMLError that
names the line.
"""

from __future__ import annotations

from typing import Any

import yaml
from yaml.composer import ComposerError

__all__ = ["load", "MAX_BYTES", "MAX_DEPTH"]

#: A config or recipe is a few kilobytes; a larger file is refused before it is parsed.
MAX_BYTES = 1 << 20
#: Nesting deeper than this is refused (configs are one level, lists two).
MAX_DEPTH = 64


class _Loader(yaml.SafeLoader):
    _depth = 0

    def compose_node(self, parent, index):
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None) is not None:
            raise ComposerError(None, None, "YAML anchors and aliases (&name, *name) are not "
                                "allowed in a config: write each value out", event.start_mark)
        if self._depth >= MAX_DEPTH:
            raise ComposerError(None, None, f"nested deeper than {MAX_DEPTH} levels",
                                event.start_mark)
        self._depth += 1
        try:
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


def load(text: str) -> Any:
    """The data of one YAML document (plain mappings, lists, scalars). Raises ValueError for
    a file over MAX_BYTES, yaml.YAMLError for anything else it refuses."""
    if len(text) > MAX_BYTES:
        raise ValueError(f"{len(text)} characters, more than a config may hold ({MAX_BYTES})")
    return yaml.load(text, Loader=_Loader)  # noqa: S506 - _Loader is a SafeLoader
