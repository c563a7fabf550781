"""A request's stream (:mod:`hotswap_rt.engine.sequence`): text that is held back (partial
UTF-8, a possible stop string) and never shown if cut, stop rules, the finish event."""

from __future__ import annotations

import torch

from hotswap_rt.engine.sampling import RowSampling, SamplingParams
from hotswap_rt.engine.sequence import Detokenizer, FinishEvent, RequestHandle, Sequence, TokenEvent
from hotswap_rt.serve.tokenizers import EOS_ID, ByteTokenizer

TOKENIZER = ByteTokenizer()


def sequence(**params) -> tuple[Sequence, list]:
    events: list = []
    params = SamplingParams(**params)
    handle = RequestHandle("r", events.append, lambda: None)
    state = RowSampling(params, [1], 260, torch.device("cpu"), (EOS_ID,))
    return Sequence(handle, [1, 2], None, params, state, TOKENIZER, frozenset({EOS_ID}), 64), events


def feed(seq: Sequence, text: str | bytes) -> None:
    for byte in text.encode() if isinstance(text, str) else text:
        if seq.finished:
            return
        seq.accept(byte, None)


def shown(events: list) -> str:
    return "".join(e.text for e in events if isinstance(e, TokenEvent))


def test_a_stop_string_is_cut_and_its_start_never_shown() -> None:
    seq, events = sequence(max_tokens=40, stop=("lo!",))
    feed(seq, "Hello! more")
    assert shown(events) == "Hel" and events[-1] == FinishEvent("stop", 2, 6)
    # two characters (len("lo!") - 1) are held back; "lo" never goes out
    assert [e.text for e in events if isinstance(e, TokenEvent)] == ["", "", "H", "e", "l", ""]


def test_held_back_text_comes_out_when_no_stop_string_follows() -> None:
    seq, events = sequence(max_tokens=5, stop=("xyz",))
    feed(seq, "abxyw")
    assert shown(events) == "abxyw" and events[-1].reason == "length"


def test_partial_utf8_waits_for_its_character() -> None:
    seq, events = sequence(max_tokens=10)
    feed(seq, "é!".encode())  # 2 bytes then 1
    texts = [e.text for e in events if isinstance(e, TokenEvent)]
    assert texts == ["", "é", "!"]


def test_length_shows_an_incomplete_character_as_replacement() -> None:
    seq, events = sequence(max_tokens=2)
    feed(seq, "aé".encode())  # stops after the first byte of é
    assert shown(events) == "a\ufffd" and events[-1].reason == "length"


def test_end_of_sequence_stop_token_ids_ignore_eos_and_min_tokens() -> None:
    seq, events = sequence(max_tokens=10)
    feed(seq, "ab")
    seq.accept(EOS_ID, None)
    assert shown(events) == "ab" and events[-1] == FinishEvent("stop", 2, 3)
    seq, events = sequence(max_tokens=4, ignore_eos=True)
    for token in (97, EOS_ID, 98, 99):
        seq.accept(token, None)
    assert shown(events) == "abc" and events[-1].reason == "length"
    seq, events = sequence(max_tokens=10, stop_token_ids=(120,), min_tokens=3)
    feed(seq, "xaxbx")  # the first x comes before min_tokens
    assert shown(events) == "xa" and events[-1] == FinishEvent("stop", 2, 3)


def test_the_detokenizer_grows_like_a_full_decode() -> None:
    text = "Grüße, 世界! ok"
    detokenizer = Detokenizer(TOKENIZER)
    for byte in text.encode():
        detokenizer.push(byte)
        assert TOKENIZER.decode(list(text.encode())).startswith(detokenizer.text)
    detokenizer.flush()
    assert detokenizer.text == text
