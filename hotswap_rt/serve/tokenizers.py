"""Tokenizers behind the one small interface the server uses: :class:`ByteTokenizer` (the
built-in model's) and :class:`HFTokenizer` (any ``transformers`` tokenizer)."""

from __future__ import annotations

from typing import Any, Protocol

PAD_ID, BOS_ID, EOS_ID = 256, 257, 258


class Tokenizer(Protocol):
    """What the server needs: ids <-> text, a chat template, the special ids."""

    pad_token_id: int
    eos_token_id: int | None

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...

    def chat_prompt(self, messages: list[dict[str, str]]) -> str: ...


class ByteTokenizer:
    """UTF-8 bytes as token ids; ``<pad>``=256, ``<bos>``=257, ``<eos>``=258."""

    pad_token_id, bos_token_id, eos_token_id = PAD_ID, BOS_ID, EOS_ID

    def encode(self, text: str) -> list[int]:
        """``text`` -> ``[bos, byte, byte, ...]``."""
        return [BOS_ID, *text.encode("utf-8")]

    def decode(self, ids: list[int]) -> str:
        """Token ids -> text; special ids are dropped, broken UTF-8 becomes U+FFFD."""
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")

    def chat_prompt(self, messages: list[dict[str, str]]) -> str:
        """The chat template: one ``role: content`` line per message, then ``assistant:``."""
        lines = [f"{m['role']}: {m['content']}" for m in messages]
        return "\n".join([*lines, "assistant:"])


class HFTokenizer:
    """A ``transformers`` tokenizer behind the server's interface."""

    def __init__(self, tokenizer: Any) -> None:
        self._tokenizer = tokenizer
        self.eos_token_id = tokenizer.eos_token_id
        self.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (
            tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0)

    def encode(self, text: str) -> list[int]:
        return list(self._tokenizer(text)["input_ids"])

    def decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=True)

    def chat_prompt(self, messages: list[dict[str, str]]) -> str:
        if getattr(self._tokenizer, "chat_template", None):
            return self._tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return ByteTokenizer().chat_prompt(messages)
