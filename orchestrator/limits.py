"""What text and JSON the ledger takes from outside: UTF-8, and within a size.

Python holds the bytes of a command-line argument that are not UTF-8 as lone surrogates
(``surrogateescape``); SQLite stores them, PostgreSQL refuses them, and neither can be sent
as JSON to another process. The sizes themselves are settings
(``Settings.max_subject_chars``, ``Settings.max_json_bytes``).
"""

from __future__ import annotations

import json
from typing import Any

__all__ = ["json_size", "utf8"]


def utf8(text: str) -> bool:
    """``text`` can be stored and sent: no lone surrogate (what Python makes of bytes that
    are not UTF-8 on a command line, ``surrogateescape``)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def json_size(value: Any, what: str, error: type[Exception]) -> int:
    """The size of ``value`` as the ledger stores it (UTF-8 JSON), or ``error`` in one line
    when it is not JSON, or holds text that is not UTF-8 (PostgreSQL refuses a lone
    surrogate, SQLite would store it)."""
    try:
        return len(json.dumps(value, allow_nan=False, ensure_ascii=False).encode("utf-8"))
    except UnicodeEncodeError:  # a ValueError too: first
        raise error(f"{what} hold text that is not UTF-8") from None
    except (TypeError, ValueError) as exc:
        raise error(f"{what} are not JSON: {exc}") from None
