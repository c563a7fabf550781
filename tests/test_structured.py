"""Structured output: outputs constrained to a JSON schema, any JSON object or a regex.

The grammar is checked on its own (random walks through the allowed tokens always end in text
the schema accepts, checked with ``json.loads`` and the schema's own rules), the tokenizers'
token bytes against their own encodings, and the server end to end (eager, the built-in model
and its demo adapters): every answer parses and matches the schema, bad requests are 400s.
"""

from __future__ import annotations

import json
import random

import httpx
import pytest

from hotswap_rt.engine import RequestError, SamplingParams
from hotswap_rt.engine.structured import Grammars, StructuredOutput
from hotswap_rt.serve import ServeConfig, build_app
from hotswap_rt.serve.background import BackgroundServer
from hotswap_rt.serve.tokenizers import EOS_ID, ByteTokenizer, HFTokenizer
from .conftest import word_vocabulary

SCHEMA = {"type": "object", "additionalProperties": False, "required": ["mood", "ok", "tags"],
          "properties": {"mood": {"enum": ["happy", "sad", "calm"]}, "ok": {"type": "boolean"},
                         "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 3}}}


def matches_schema(value) -> bool:
    return (isinstance(value, dict) and set(value) == {"mood", "ok", "tags"}
            and value["mood"] in ("happy", "sad", "calm") and isinstance(value["ok"], bool)
            and isinstance(value["tags"], list) and len(value["tags"]) <= 3
            and all(t in ("a", "b") for t in value["tags"]))


def random_walk(grammars: Grammars, spec: StructuredOutput, token_bytes, seed: int, limit: int = 400) -> bytes:
    """Tokens drawn at random among those the grammar allows, until it allows the end."""
    rng = random.Random(seed)
    row = grammars.row(spec)
    out = b""
    for _ in range(limit):
        allowed = row.allowed().nonzero().flatten().tolist()
        if EOS_ID in allowed and (row.finished or rng.random() < 0.5):
            return out
        token = rng.choice([t for t in allowed if t != EOS_ID])
        row.advance(token)
        out += token_bytes[token]
    raise AssertionError(f"no end after {limit} tokens: {out!r}")


def leaning_walk(grammars: Grammars, spec: StructuredOutput, token_bytes, seed: int, tag: bytes, lean: float,
                 start: bytes = b"", stop: float = 0.5, limit: int = 2000) -> bytes:
    """Tokens drawn at random among those the grammar allows (one-byte tokens), leaning toward
    spelling ``tag``: begun with probability ``lean`` at each step and kept while the grammar
    allows it; ``start`` is spelled first where allowed. Ends where only the end may come next,
    or with probability ``stop`` where it may."""
    rng, row, out, planned = random.Random(seed), grammars.row(spec), b"", list(start)
    for _ in range(limit):
        allowed = set(row.allowed().nonzero().flatten().tolist())
        if EOS_ID in allowed and (allowed == {EOS_ID} or rng.random() < stop):
            return out
        if not planned and rng.random() < lean:
            planned = list(tag)
        token = planned.pop(0) if planned and planned[0] in allowed else None
        if token is None:
            planned, token = [], rng.choice(sorted(allowed - {EOS_ID}))
        row.advance(token)
        out += token_bytes[token]
    raise AssertionError(f"no end after {limit} tokens: {out!r}")


def test_every_walk_through_a_schema_grammar_is_valid_json_of_that_schema() -> None:
    tokens = ByteTokenizer().token_bytes()
    grammars = Grammars(tokens, EOS_ID, vocab_size=len(tokens) + 5)  # logits wider than the vocab
    spec = StructuredOutput.json_schema(SCHEMA)
    row = grammars.row(spec)
    assert row.allowed().shape == (len(tokens) + 5,)
    assert row.allowed().nonzero().flatten().tolist() == [ord("{")]
    for seed in range(30):
        assert matches_schema(json.loads(random_walk(grammars, spec, tokens, seed))), seed
    narrow = Grammars(tokens, EOS_ID, vocab_size=200).row(spec).allowed()  # logits narrower than the vocab
    assert narrow.shape == (200,) and narrow.nonzero().flatten().tolist() == [ord("{")]
    same = StructuredOutput.json_schema(json.dumps(SCHEMA))
    assert grammars.index(spec) is grammars.index(same)  # compiled once
    digits = StructuredOutput.regex(r"[0-9]{2,4}-(x|y)")
    for seed in range(10):
        text = random_walk(grammars, digits, tokens, seed).decode()
        head, tail = text.split("-")
        assert head.isdigit() and 2 <= len(head) <= 4 and tail in ("x", "y")


def test_bad_specs_and_combinations_are_request_errors() -> None:
    grammars = Grammars(ByteTokenizer().token_bytes(), EOS_ID, vocab_size=259)
    for spec in (StructuredOutput.json_schema({"type": "nonsense"}), StructuredOutput.json_schema("{not json"),
                 StructuredOutput.regex("(unclosed")):
        with pytest.raises(RequestError, match="response_format"):
            grammars.index(spec)
    with pytest.raises(RequestError, match="response_format"):
        StructuredOutput.regex("")
    with pytest.raises(RequestError, match="response_format"):
        StructuredOutput("yaml", "x")
    for combination in (dict(ignore_eos=True), dict(min_tokens=2)):
        with pytest.raises(RequestError, match="ignore_eos or min_tokens"):
            SamplingParams(structured=StructuredOutput.json_object(), **combination)
    with pytest.raises(RequestError, match="StructuredOutput"):
        SamplingParams(structured={"type": "json_object"})


def trained_tokenizer(kind: str):
    """A real fast tokenizer with merged (multi-byte) tokens: byte-level BPE (GPT-2 / Llama 3
    style) or SentencePiece-style BPE (``\u2581`` for spaces)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    texts = ["the quick brown fox jumps over the lazy dog", '{"mood": "happy", "ok": true}',
             "naïve café — 東京 to the moon"] * 20
    backend = Tokenizer(models.BPE())
    if kind == "byte-level":
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        backend.decoder = decoders.ByteLevel()
        alphabet = pre_tokenizers.ByteLevel.alphabet()
    else:
        backend.pre_tokenizer = pre_tokenizers.Metaspace()
        backend.decoder = decoders.Metaspace()
        ascii_ = {chr(c) for c in range(33, 127)}  # as a real vocabulary has (or bytes to fall back on)
        alphabet = sorted({c for t in texts for c in t.replace(" ", "\u2581")} | {"\u2581"} | ascii_)
    backend.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=400, initial_alphabet=alphabet,
                                                           special_tokens=["<s>", "</s>"]))
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>")


@pytest.mark.parametrize("kind", ["byte-level", "sentencepiece"])
def test_hf_token_bytes_spell_what_the_tokenizer_encodes(kind) -> None:
    tokenizer = HFTokenizer(trained_tokenizer(kind))
    token_bytes = tokenizer.token_bytes()
    text = 'the lazy fox: {"mood": "calm", "ok": false} naïve 東京'
    ids = tokenizer.encode(text)
    assert any(len(token_bytes[i]) > 1 for i in ids)  # merged tokens, not single bytes
    spelled = b"".join(token_bytes[i] for i in ids)
    assert spelled.decode("utf-8").strip() == text
    assert token_bytes[tokenizer.eos_token_id] is None
    grammars = Grammars(token_bytes, tokenizer.eos_token_id, len(token_bytes))
    spec = StructuredOutput.json_schema(SCHEMA)
    for seed in range(10):
        walk = random_walk_ids(grammars, spec, tokenizer.eos_token_id, seed)
        assert matches_schema(json.loads(b"".join(token_bytes[t] for t in walk)))


def random_walk_ids(grammars: Grammars, spec: StructuredOutput, eos: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    row, ids = grammars.row(spec), []
    for _ in range(400):
        allowed = row.allowed().nonzero().flatten().tolist()
        if eos in allowed and (row.finished or rng.random() < 0.5):
            return ids
        ids.append(rng.choice([t for t in allowed if t != eos]))
        row.advance(ids[-1])
    raise AssertionError("no end")


def test_a_tokenizer_of_unknown_bytes_is_refused() -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordPiece({"[UNK]": 0, "a": 1, "##b": 2, "[SEP]": 3}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.decoder = decoders.WordPiece()
    tokenizer = HFTokenizer(PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="[SEP]"))
    with pytest.raises(RequestError, match="does not know this tokenizer"):
        tokenizer.token_bytes()


# ------------------------------------------------------------------------------- the server
@pytest.fixture(scope="module")
def client():
    with BackgroundServer(build_app(ServeConfig(compile=False, max_rank=8))) as url, \
            httpx.Client(base_url=url, timeout=60) as http:
        yield http


def json_schema_format(schema=SCHEMA) -> dict:
    return {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema, "strict": True}}


@pytest.mark.parametrize("model", ["pirate", "english", "hotswap-tiny-llama"])
def test_every_answer_matches_the_schema(client, model) -> None:
    from hotswap_rt.serve.default_model import MODEL_NAME

    model = MODEL_NAME if model == "hotswap-tiny-llama" else model
    for temperature, seed in ((0.0, None), (1.0, 1), (1.0, 2)):
        chat = client.post("/v1/chat/completions", json={
            "model": model, "messages": [{"role": "user", "content": "How are you?"}], "max_tokens": 80,
            "temperature": temperature, "seed": seed, "response_format": json_schema_format()}).json()
        assert chat["choices"][0]["finish_reason"] == "stop"
        assert matches_schema(json.loads(chat["choices"][0]["message"]["content"]))
        completion = client.post("/v1/completions", json={
            "model": model, "prompt": "Hello", "max_tokens": 80, "temperature": temperature, "seed": seed,
            "n": 2, "response_format": json_schema_format()}).json()
        for choice in completion["choices"]:
            assert choice["finish_reason"] == "stop" and matches_schema(json.loads(choice["text"]))


def test_a_streamed_answer_and_a_json_object_parse(client) -> None:
    text = ""
    with client.stream("POST", "/v1/chat/completions", json={
            "model": "french", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 80,
            "temperature": 0, "stream": True, "response_format": json_schema_format()}) as response:
        for line in response.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                for choice in json.loads(line[6:])["choices"]:
                    text += choice["delta"].get("content") or ""
    assert matches_schema(json.loads(text))
    body = client.post("/v1/chat/completions", json={
        "model": "english", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 80,
        "temperature": 0, "response_format": {"type": "json_object"}}).json()
    assert isinstance(json.loads(body["choices"][0]["message"]["content"]), dict)
    plain = client.post("/v1/completions", json={"model": "english", "prompt": "Hello", "max_tokens": 20,
                                                 "temperature": 0, "response_format": {"type": "text"}}).json()
    unconstrained = client.post("/v1/completions", json={"model": "english", "prompt": "Hello",
                                                         "max_tokens": 20, "temperature": 0}).json()
    assert plain["choices"][0]["text"] == unconstrained["choices"][0]["text"]


@pytest.mark.parametrize("response_format, extra, message", [
    (json_schema_format({"type": "nonsense"}), {}, "unsupported JSON schema"),
    ({"type": "json_schema"}, {}, "needs its json_schema"),
    ({"type": "yaml"}, {}, "response_format"),
    ({"type": "json_object"}, {"ignore_eos": True}, "ignore_eos"),
    ({"type": "json_object"}, {"min_tokens": 3}, "min_tokens"),
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {}, "extra": 1}}, {}, "extra"),
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {}, "description": "d"}}, {},
     "description"),
])
def test_bad_response_formats_are_400s_and_others_still_run(client, response_format, extra, message) -> None:
    response = client.post("/v1/completions", json={"model": "english", "prompt": "Hello", "max_tokens": 8,
                                                    "response_format": response_format, **extra})
    assert response.status_code == 400 and message in response.text
    ok = client.post("/v1/completions", json={"model": "english", "prompt": "Hello", "max_tokens": 4})
    assert ok.status_code == 200


@pytest.mark.parametrize("model", ["pirate", "french"])
def test_vllms_structured_outputs_choice_regex_and_json(client, model) -> None:
    choices = ["positive (+1)", "negative", "neutral-ish"]
    for temperature, seed in ((0.0, None), (1.0, 3), (1.0, 4)):
        out = client.post("/v1/chat/completions", json={
            "model": model, "messages": [{"role": "user", "content": "Classify: great!"}], "max_tokens": 30,
            "temperature": temperature, "seed": seed, "structured_outputs": {"choice": choices}}).json()
        assert out["choices"][0]["message"]["content"] in choices
        out = client.post("/v1/completions", json={
            "model": model, "prompt": "Code:", "max_tokens": 30, "temperature": temperature, "seed": seed,
            "structured_outputs": {"regex": "[A-Z]{3}-[0-9]{2,3}"}}).json()
        text = out["choices"][0]["text"]
        assert len(text) in (6, 7) and text[:3].isupper() and text[3] == "-" and text[4:].isdigit()
        out = client.post("/v1/completions", json={
            "model": model, "prompt": "JSON:", "max_tokens": 80, "temperature": temperature, "seed": seed,
            "structured_outputs": {"json": SCHEMA}}).json()
        assert matches_schema(json.loads(out["choices"][0]["text"]))


@pytest.mark.parametrize("extra, message", [
    ({"structured_outputs": {"choice": ["a"], "regex": "b"}}, "exactly one"),
    ({"structured_outputs": {}}, "exactly one"),
    ({"structured_outputs": {"choice": []}}, "non-empty"),
    ({"structured_outputs": {"grammar": "root ::= x"}}, "grammar"),
    ({"structured_outputs": {"regex": "(unclosed"}}, "cannot constrain"),
    ({"structured_outputs": {"choice": ["a"]}, "response_format": {"type": "json_object"}}, "not both"),
])
def test_bad_structured_outputs_are_400s_naming_the_field(client, extra, message) -> None:
    response = client.post("/v1/completions", json={"model": "english", "prompt": "Hi", "max_tokens": 4,
                                                    **extra})
    assert response.status_code == 400 and message in response.text
    assert response.json()["error"]["param"] in ("structured_outputs", "structured_outputs.grammar")


def test_the_batched_bias_allows_exactly_the_grammars_tokens() -> None:
    """``grammar_bias`` (packed masks unpacked by a byte table) against outlines-core's own
    list of allowed tokens, for rows at different places in different grammars; the sampler
    never picks a token outside it."""
    import outlines_core
    import torch

    from hotswap_rt.engine.sampling import RowSampling, Sampler
    from hotswap_rt.engine.structured import grammar_bias

    tokens = ByteTokenizer().token_bytes()
    vocab = len(tokens) + 3  # logits wider than the vocabulary
    grammars = Grammars(tokens, EOS_ID, vocab_size=vocab)
    specs = [StructuredOutput.json_schema(SCHEMA), StructuredOutput.regex(r"[0-9]{2,4}-(x|y)"),
             StructuredOutput.choice(["yes", "no"])]
    rows, references = [], []
    for n, spec in enumerate(specs * 2):
        row, reference = grammars.row(spec), outlines_core.Guide(grammars.index(spec))
        rng = random.Random(n)
        for _ in range(n * 3):  # the second copy of each spec is a few tokens further
            allowed = [t for t in reference.get_tokens() if t != EOS_ID]
            if not allowed:
                break
            token = rng.choice(allowed)
            row.advance(token)
            reference.advance(token)
        rows.append(row)
        references.append(set(reference.get_tokens()))
    bias = grammar_bias(rows, torch.device("cpu"))
    assert bias.shape == (len(rows), vocab) and bias.dtype == torch.float32
    for got, expected in zip(bias, references):
        assert set((got == 0).nonzero().flatten().tolist()) == expected
        assert bool(torch.isneginf(got[got != 0]).all())
    states = [RowSampling(SamplingParams(temperature=1.0, seed=i), [1], vocab, torch.device("cpu"), (), row)
              for i, row in enumerate(rows)]
    free = RowSampling(SamplingParams(temperature=0.0), [1], vocab, torch.device("cpu"), ())
    logits = torch.randn(len(rows) + 1, vocab)
    sampler = Sampler(torch.device("cpu"))
    for batch in (states, [*states[:2], free, *states[2:]]):  # every row structured, or not
        scores = sampler.process(logits[:len(batch)], batch)
        structured = [i for i, row in enumerate(batch) if row is not free]
        for i, expected in zip(structured, references):
            assert set(torch.isfinite(scores[i]).nonzero().flatten().tolist()) == expected
            assert torch.equal(scores[i][torch.isfinite(scores[i])], logits[i][torch.isfinite(scores[i])])
        if free in batch:  # a row without a grammar is left alone
            assert torch.equal(scores[2], logits[2])
    picked = sampler.sample(torch.randn(len(rows) + 2, vocab), states).tokens  # a padded batch
    assert all(token in expected for token, expected in zip(picked, references))


def test_kept_bans_and_kept_biases_mask_the_same_tokens_as_outlines_core() -> None:
    """A state that bans few tokens (inside a string, where nearly every word goes) is kept as
    their ids, others (after ``{``, where one goes) as a bias; rows of both, in any order and
    among rows without a grammar, get exactly outlines-core's tokens at every step of walks
    through a schema, and a row met in a kept state again masks as it did."""
    import outlines_core
    import torch

    from hotswap_rt.engine.structured import SPARSE_BELOW, mask_scores

    cpu = torch.device("cpu")
    tokens = word_vocabulary()
    vocab = len(tokens) + 5
    grammars = Grammars(tokens, EOS_ID, vocab_size=vocab)
    spec = StructuredOutput.json_schema({
        "type": "object", "required": ["note", "n"], "additionalProperties": False,
        "properties": {"note": {"type": "string", "maxLength": 12}, "n": {"type": "integer"}}})
    kinds = set()
    for seed in range(3):
        rng = random.Random(seed)
        rows = [grammars.row(spec) for _ in range(3)]
        index = grammars.index(spec)
        references = [outlines_core.Guide(index) for _ in rows]

        def expected_of(reference) -> set[int]:  # the end marker's token means end-of-sequence
            allowed = set(reference.get_tokens())
            ends = vocab in allowed and index.is_final_state(index.get_next_state(reference.get_state(), vocab))
            return {t for t in allowed if t < vocab} | ({EOS_ID} if ends else set())

        for _ in range(200):
            logits = torch.randn(len(rows) + 2, vocab)
            scores = logits.clone()
            order = rng.sample(range(len(rows) + 2), len(rows))  # rows of the scores, shuffled
            mask_scores(scores, rows, order)
            for row, at, reference in zip(rows, order, references):
                expected = expected_of(reference)
                assert set(torch.isfinite(scores[at]).nonzero().flatten().tolist()) == expected
                kept, _ = row.kept(cpu)
                banned = vocab - len(expected)
                kinds.add(kept.dtype)
                assert (kept.dtype == torch.int64) == (banned * SPARSE_BELOW < vocab)
            free = set(range(len(rows) + 2)) - set(order)
            assert all(torch.equal(scores[i], logits[i]) for i in free)  # rows without a grammar
            finite = torch.isfinite(scores)
            assert torch.equal(scores[finite], logits[finite])
            live = [i for i, r in enumerate(references) if expected_of(r) - {EOS_ID}]
            if not live:
                break
            for i in live:
                token = rng.choice(sorted(expected_of(references[i]) - {EOS_ID}))
                rows[i].advance(token)
                references[i].advance(token)
            rows = [rows[i] for i in live]
            references = [references[i] for i in live]
    assert kinds == {torch.int64, torch.float32}  # both were met


def test_cached_masks_are_what_the_grammar_writes_and_the_cache_keeps_its_budget() -> None:
    """Rows that pass through the same automaton states get their masks (and biases) from the
    cache, and every one equals what a row without the cache gets from outlines-core; the cache
    drops its least recently used masks past its byte budget."""
    import torch

    from hotswap_rt.engine.structured import MaskCache, grammar_bias

    tokens = ByteTokenizer().token_bytes()
    grammars = Grammars(tokens, EOS_ID, vocab_size=len(tokens))
    spec = StructuredOutput.json_schema(SCHEMA)
    steps = 0
    for seed in range(4):
        rng = random.Random(seed)
        cached, fresh = grammars.row(spec), grammars.row(spec, cache_masks=False)
        while True:
            masks = [torch.zeros(cached.words, dtype=torch.int32) for _ in range(2)]
            cached.write_mask(masks[0])
            fresh.write_mask(masks[1])
            assert torch.equal(masks[0], masks[1])
            both = grammar_bias([cached, fresh, cached], torch.device("cpu"))
            assert torch.equal(both[0], both[1]) and torch.equal(both[2], both[1])
            steps += 1
            allowed = [t for t in fresh.allowed().nonzero().flatten().tolist() if t != EOS_ID]
            if fresh.finished or not allowed:
                break
            token = rng.choice(allowed)
            cached.advance(token)
            fresh.advance(token)
    assert 0 < len(grammars.masks) < steps  # states met again were not written again
    assert len(grammars.biases) == len(grammars.masks)  # each one unpacked once
    cache = MaskCache(budget_bytes=3 * 16)
    for key in range(4):
        cache.put((spec, key), torch.full((4,), key, dtype=torch.int32))  # 16 bytes each
    assert cache.get((spec, 0)) is None and len(cache) == 3
    assert torch.equal(cache.get((spec, 3)), torch.full((4,), 3, dtype=torch.int32))
    cache.put((spec, 9), torch.zeros(16, dtype=torch.int32))  # larger than the whole budget
    assert cache.get((spec, 9)) is None


def test_properties_are_generated_in_the_schemas_order() -> None:
    """As OpenAI and vLLM do: a schema's properties in its own order, not sorted (a named tool
    call's arguments, a response format)."""
    tokens = ByteTokenizer().token_bytes()
    grammars = Grammars(tokens, EOS_ID, vocab_size=len(tokens))
    properties = {"zone": {"const": 1}, "area": {"const": 2}}
    spec = StructuredOutput.json_schema({"type": "object", "properties": properties,
                                         "required": ["zone", "area"], "additionalProperties": False})
    text = random_walk(grammars, spec, tokens, 0).decode()
    assert list(json.loads(text)) == ["zone", "area"] and text.index("zone") < text.index("area")


def test_an_output_that_may_end_may_also_go_on() -> None:
    """Where the output may end, end-of-sequence is allowed and so is every token that goes on
    (outlines-core alone drops those: ``a(bc)?`` gave no ``b`` after ``a``); a choice of a
    string and a longer one that begins with it reaches both."""
    tokens = ByteTokenizer().token_bytes()
    grammars = Grammars(tokens, EOS_ID, vocab_size=len(tokens))
    row = grammars.row(StructuredOutput.regex("a(?:bc)?"))
    row.advance(ord("a"))
    assert row.allowed().nonzero().flatten().tolist() == [ord("b"), EOS_ID] and not row.finished
    row.advance(ord("b"))
    assert row.allowed().nonzero().flatten().tolist() == [ord("c")]
    row.advance(ord("c"))
    assert row.allowed().nonzero().flatten().tolist() == [EOS_ID] and row.finished
    answers = {random_walk(grammars, StructuredOutput.choice(["yes", "yes please"]), tokens, seed)
               for seed in range(12)}
    assert answers == {b"yes", b"yes please"}
    plane16 = [*tokens[:-3], "\U0010fffd".encode(), b"\xf4\x8f", None, None, None]  # never allowed
    wide = Grammars(plane16, len(plane16) - 1, vocab_size=len(plane16))
    allowed = wide.row(StructuredOutput.regex(".{1,3}")).allowed().nonzero().flatten().tolist()
    assert 256 not in allowed and 257 not in allowed and ord("x") in allowed
