"""Text for a terminal: control characters shown as escapes, never obeyed.

Prompts, model names, error messages and file names come from producers, plain SQL and backends:
printed as they are, an escape sequence in one could rewrite the operator's screen or hide a line.
The CLI's tables and messages and the console log format both go through :func:`safe`.
"""

from __future__ import annotations

import re

# What a terminal would act on rather than show: C0 and C1 controls (ESC starts a sequence that can
# retitle the window or clear the screen), DEL, bidirectional overrides and isolates (which reorder
# what follows), line and paragraph separators, and lone surrogates (which stdout cannot encode).
_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028\u2029\u202a-\u202e\u2066-\u2069\ud800-\udfff]")


def _escape(match: re.Match[str]) -> str:
    char = match.group()
    code = ord(char)
    return f"\\x{code:02x}" if code <= 0xFF else f"\\u{code:04x}"


def safe(text: object) -> str:
    """``text`` for a terminal: every control character shown as an escape (``\\x1b``), not obeyed.
    Text from the database may hold anything a producer (or plain SQL) put there."""
    return _UNSAFE.sub(_escape, str(text))


def safe_lines(text: str) -> str:
    """:func:`safe` line by line: a traceback keeps its line breaks, nothing else."""
    return "\n".join(safe(line) for line in text.split("\n"))
