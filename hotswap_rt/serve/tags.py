"""Text held back while it may still become a tag (``<tool_call>``, ``</think>``)."""

from __future__ import annotations


def partial_tag(text: str, tag: str) -> int:
    """Length of the longest end of ``text`` that could begin ``tag`` (0: none)."""
    for size in range(min(len(text), len(tag) - 1), 0, -1):
        if tag.startswith(text[-size:]):
            return size
    return 0
