"""JSON Lines manifests (batch jobs, training data): read as bytes and decoded one line at a time, so a line
that is not UTF-8 or not JSON fails alone, named by its number; text fields checked before any work."""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from jaxedit.options import MAX_PROMPT_CHARS


def read_lines(path: str | Path) -> Iterator[tuple[int, Any, str | None]]:
    """(line number from 1, JSON value, None) of each non-blank line, or (line number, None, reason) for a
    line that is not UTF-8 or not JSON."""
    with open(path, "rb") as f:
        yield from parse_lines(f)


def parse_lines(lines: Iterable[bytes], first: int = 1) -> Iterator[tuple[int, Any, str | None]]:
    """`read_lines` of lines in hand (raw bytes, numbered from `first`)."""
    for n, raw in enumerate(lines, start=first):
        if not raw.strip():
            continue
        try:
            text = raw.decode("utf-8-sig" if n == 1 else "utf-8")
        except UnicodeDecodeError as e:
            yield n, None, f"not UTF-8 text (byte 0x{raw[e.start]:02x} at column {e.start + 1})"
            continue
        try:
            value = json.loads(text)
        except json.JSONDecodeError as e:
            yield n, None, f"invalid JSON ({e.msg})"
            continue
        yield n, value, None


def check_text(value: Any, name: str) -> str:
    """`value` if it is a non-blank string a tokenizer can encode (UTF-8) of at most MAX_PROMPT_CHARS characters
    (a tokenizer given megabytes takes gigabytes), else ValueError naming field `name` (a list is refused, never
    turned into its repr)."""
    if value is None:
        raise ValueError(f"field {name!r} is missing")
    if not isinstance(value, str):
        raise ValueError(f"field {name!r} must be a string, got {type(value).__name__}")
    if len(value) > MAX_PROMPT_CHARS:
        chars = f"{len(value):,} characters, over the {MAX_PROMPT_CHARS:,} a prompt may have"
        raise ValueError(f"field {name!r} is {chars}")
    if not value.strip():
        raise ValueError(f"field {name!r} is empty")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(
            f"field {name!r} is not valid Unicode: a lone surrogate {value[e.start]!r} at character {e.start}"
        ) from None
    return value
