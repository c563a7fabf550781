"""Tokenizers behind the one small interface the server uses: :class:`ByteTokenizer` (the
built-in model's) and :class:`HFTokenizer` (any ``transformers`` tokenizer)."""

from __future__ import annotations

import json
from functools import lru_cache
from typing import Any, Protocol

PAD_ID, BOS_ID, EOS_ID = 256, 257, 258
# tags .tools / .tool_parsers / .reasoning read
KEPT_SPECIAL = ("<tool_call>", "</tool_call>", "<think>", "</think>", "[TOOL_CALLS]", "[ARGS]", "[CALL_ID]")


class Tokenizer(Protocol):
    """What the server needs: ids <-> text, a chat template, the special ids."""

    pad_token_id: int
    eos_token_id: int | None

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]: ...

    def encode_chat(self, text: str) -> list[int]:
        """The ids of a :meth:`chat_prompt`: special tokens added only where its text has none."""
        ...

    def decode(self, ids: list[int]) -> str: ...

    def chat_prompt(self, messages: list[dict[str, Any]], tools: list[dict] | None = None,
                    variables: dict[str, Any] | None = None, generation_prompt: bool = True,
                    continue_final: bool = False) -> str:
        """The prompt for ``messages``; ``tools`` (OpenAI's ``{"type": "function", ...}``) go
        to the template as ``tools``, ``variables`` as more of its variables (vLLM's
        ``chat_template_kwargs``: ``enable_thinking`` ...); ``generation_prompt`` opens the
        assistant's turn at the end, ``continue_final`` leaves the last message open.

        Raises:
            RequestError: ``variables`` for a chat format that has none.
        """
        ...


class ByteTokenizer:
    """UTF-8 bytes as token ids; ``<pad>``=256, ``<bos>``=257, ``<eos>``=258."""

    pad_token_id, bos_token_id, eos_token_id = PAD_ID, BOS_ID, EOS_ID

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """``text`` -> ``[bos, byte, byte, ...]`` (without ``<bos>``: ``add_special_tokens=False``)."""
        return [BOS_ID, *text.encode("utf-8")] if add_special_tokens else list(text.encode("utf-8"))

    def encode_chat(self, text: str) -> list[int]:
        """A chat prompt's ids: its format writes no ``<bos>``, so it is added as for any text."""
        return self.encode(text)

    def decode(self, ids: list[int]) -> str:
        """Token ids -> text; special ids are dropped, broken UTF-8 becomes U+FFFD."""
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")

    def token_bytes(self) -> list[bytes | None]:
        """Each token id's bytes (None for the special ids): what structured output constrains."""
        return [bytes([i]) for i in range(256)] + [None, None, None]

    def chat_prompt(self, messages: list[dict[str, Any]], tools: list[dict] | None = None,
                    variables: dict[str, Any] | None = None, generation_prompt: bool = True,
                    continue_final: bool = False) -> str:
        """The chat template: one ``role: content`` line per message, then ``assistant:``
        (``generation_prompt``; with ``continue_final`` the last line is the last message). With
        tools, a first line names them and their parameters (``tools: get_weather(city) add(a,
        b)``: the tiny model's context is short); an assistant's calls follow its content as
        Hermes blocks, ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``."""
        if variables:
            from ..engine.sampling import RequestError

            raise RequestError("chat_template_kwargs", "this chat format (the built-in model's, or a "
                                                       "tokenizer without a chat template) has no variables")
        lines = ["tools: " + " ".join(_signature(t["function"]) for t in tools)] if tools else []
        for m in messages:
            calls = "".join("<tool_call>" + json.dumps({"name": c["function"]["name"],
                                                        "arguments": c["function"]["arguments"]},
                                                       ensure_ascii=False) + "</tool_call>"
                            for c in m.get("tool_calls") or [])
            lines.append(f"{m['role']}: {m['content']}{calls}")
        return "\n".join([*lines, "assistant:"] if generation_prompt and not continue_final else lines)


class HFTokenizer:
    """A ``transformers`` tokenizer behind the server's interface."""

    def __init__(self, tokenizer: Any) -> None:
        self._tokenizer = tokenizer
        self.eos_token_id = tokenizer.eos_token_id
        self.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (
            tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0)
        # tool-call tags a vocabulary made special tokens: kept in the text (the parser reads them)
        added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
        self._kept = {token: added[token].content for token in added
                      if added[token].special and added[token].content in KEPT_SPECIAL}

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """``text``'s ids, with the special tokens the tokenizer adds (``<bos>`` ...) unless
        ``add_special_tokens`` is False."""
        return list(self._tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])

    def encode_chat(self, text: str) -> list[int]:
        """A chat prompt's ids: a chat template writes its own special tokens (``<s>``,
        ``<|begin_of_text|>``), so none are added (as vLLM does; adding them gave Llama-style
        prompts two ``<bos>``); without a template, as :meth:`encode`."""
        return self.encode(text, add_special_tokens=not getattr(self._tokenizer, "chat_template", None))

    def decode(self, ids: list[int]) -> str:
        """Token ids -> text without special tokens, but with the tool-call tags
        (``<tool_call>``, ``</tool_call>``) where a vocabulary has them as special tokens."""
        if not self._kept or not any(token in self._kept for token in ids):
            return self._tokenizer.decode(ids, skip_special_tokens=True)
        text, start = "", 0
        for end, token in enumerate(ids):
            if token in self._kept:
                text += self._tokenizer.decode(ids[start:end], skip_special_tokens=True) + self._kept[token]
                start = end + 1
        return text + self._tokenizer.decode(ids[start:], skip_special_tokens=True)

    def token_bytes(self) -> list[bytes | None]:
        """Each token id's bytes, as :meth:`decode` writes it, for byte-level BPE vocabularies
        (GPT-2, Llama 3, Qwen: each character of a token stands for one byte) and SentencePiece
        ones (``▁`` for a space, ``<0xAB>`` for a byte). An added token's bytes are its text
        (Qwen3's ``<think>`` / ``</think>``); a special token has none (None: never generated
        under a grammar), but for the tags :meth:`decode` keeps.

        Raises:
            RequestError: another kind of vocabulary (its tokens' bytes are not known).
        """
        from ..engine.sampling import RequestError

        tokenizer = self._tokenizer
        decoder = json.loads(tokenizer.backend_tokenizer.to_str()).get("decoder") or {}
        kinds = {decoder.get("type")} | {d.get("type") for d in decoder.get("decoders") or []}
        added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
        special = set(tokenizer.all_special_ids) | {t for t, entry in added.items() if entry.special}
        written = {t: entry.content.encode("utf-8") for t, entry in added.items()
                   if t not in special or t in self._kept}
        pieces = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
        if "ByteLevel" in kinds:
            table = {char: byte for byte, char in _bytes_to_unicode().items()}

            def to_bytes(piece: str) -> bytes | None:  # a character outside the table: not a byte
                return bytes(table[c] for c in piece) if all(c in table for c in piece) else None
        elif "ByteFallback" in kinds or "Metaspace" in kinds or "Replace" in kinds:
            def to_bytes(piece: str) -> bytes | None:
                if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
                    return bytes([int(piece[3:5], 16)])
                return piece.replace("▁", " ").encode("utf-8")
        else:
            raise RequestError("response_format", f"structured output does not know this tokenizer's "
                                                  f"token bytes (decoder {sorted(k for k in kinds if k)})")
        return [written[token] if token in written else None if token in special or piece is None
                else to_bytes(piece) for token, piece in enumerate(pieces)]

    def chat_prompt(self, messages: list[dict[str, Any]], tools: list[dict] | None = None,
                    variables: dict[str, Any] | None = None, generation_prompt: bool = True,
                    continue_final: bool = False) -> str:
        """The tokenizer's chat template (``tools`` and ``variables`` passed to it); without
        one, the built-in model's format (:meth:`ByteTokenizer.chat_prompt`)."""
        if getattr(self._tokenizer, "chat_template", None):
            return self._tokenizer.apply_chat_template(
                messages, tools=tools or None, tokenize=False, add_generation_prompt=generation_prompt,
                continue_final_message=continue_final, **(variables or {}))
        return ByteTokenizer().chat_prompt(messages, tools, variables, generation_prompt, continue_final)


def _signature(function: dict[str, Any]) -> str:
    """``name(param, ...)`` of an OpenAI function definition."""
    properties = (function.get("parameters") or {}).get("properties") or {}
    return f"{function['name']}({', '.join(properties)})"


@lru_cache(maxsize=1)
def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table of byte-level BPE vocabularies."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("\xa1"), ord("\xac") + 1),
                 *range(ord("\xae"), ord("\xff") + 1)]
    table, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            table[byte] = chr(byte)
        else:
            table[byte] = chr(256 + extra)
            extra += 1
    return table
