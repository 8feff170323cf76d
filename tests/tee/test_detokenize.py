"""The incremental output processor (bifrost/tee/detokenize.py) against real tokenizers: GPT-2 byte ids (the
repo's loader for ``gpt2``), a byte-level BPE and a SentencePiece-style BPE with byte fallback trained here,
SmolLM2's and MiniLM's tokenizers when their packages are installed."""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence

import pytest

from bifrost.errors import BifrostError
from bifrost.tee import detokenize
from bifrost.tee.detokenize import Decoder, Delta, OutputProcessor, TurnEnded

FFFD = "\ufffd"
MULTILINGUAL = [
    "naïve café 🙂 — 你好, мир! 👩‍👩‍👧 ñandú Ωμέγα 😀😃 𝔘𝔫𝔦𝔠𝔬𝔡𝔢",
    "Grüße aus Straße ⌘ ☃ 日本語のテキスト and 한국어 텍스트 🇫🇷 élève",
    "emoji only: 🎉🎊🧪🦀🐍 then ascii",
    "مرحبا بالعالم — Привет, как дела? ¿Qué tal? 中文字符测试",
]
_WORDS = ("the cat sat on a mat while naïve café élève garçon Straße Grüße niño año καλημέρα κόσμε привет "
          "мир как дела 你好 世界 中文 こんにちは 日本 안녕하세요 한국 مرحبا بالعالم").split()


# --- tokenizers ---------------------------------------------------------------------------------------------------

class _Tokenizers:
    """A ``tokenizers.Tokenizer`` with the ``.decode(list[int]) -> str`` the processor needs."""

    def __init__(self, tok) -> None:
        self._tok = tok

    def encode(self, text: str) -> list[int]:
        return list(self._tok.encode(text, add_special_tokens=False).ids)

    def decode(self, ids: list[int]) -> str:
        return str(self._tok.decode(ids, skip_special_tokens=False))

    def piece(self, i: int) -> str:
        return str(self._tok.id_to_token(i))

    def __len__(self) -> int:
        return int(self._tok.get_vocab_size())


class _Counting:
    """Counts the token ids each ``decode`` call is given."""

    def __init__(self, inner: Decoder) -> None:
        self.inner, self.ids = inner, 0

    def decode(self, ids: list[int]) -> str:
        self.ids += len(ids)
        return self.inner.decode(ids)


class _Words:
    """Each id is a fixed string: full control over what one token adds (for the stop-sequence cases)."""

    def __init__(self, vocab: Sequence[str]) -> None:
        self.vocab = list(vocab)

    def ids(self, *pieces: str) -> list[int]:
        return [self.vocab.index(p) for p in pieces]

    def decode(self, ids: list[int]) -> str:
        return "".join(self.vocab[i] for i in ids)


class _Bytes:
    """Byte-level decoding (GPT-2's: the tokens' bytes, decoded with replacement) of chosen byte strings."""

    def __init__(self, vocab: Sequence[bytes]) -> None:
        self.vocab = list(vocab)

    def decode(self, ids: list[int]) -> str:
        return b"".join(self.vocab[i] for i in ids).decode("utf-8", errors="replace")


def _corpus(n: int = 300) -> list[str]:
    rng = random.Random(0)
    return [" ".join(rng.choice(_WORDS) for _ in range(rng.randrange(4, 12))) for _ in range(n)]


@pytest.fixture(scope="module")
def gpt2_bytes():
    from bifrost.model.catalog import resolve
    from bifrost.model.tokenizer import ByteTokenizer, load_tokenizer

    tok = load_tokenizer(resolve("gpt2").path)
    assert isinstance(tok, ByteTokenizer)  # the catalogue's gpt2 has no checkpoint: GPT-2's byte ids
    return tok


@pytest.fixture(scope="module")
def byte_bpe() -> _Tokenizers:
    """A GPT-2-style byte-level BPE (merges learned here; emoji are absent, so they stay split into bytes)."""
    from tokenizers import ByteLevelBPETokenizer

    tok = ByteLevelBPETokenizer()
    tok.train_from_iterator(_corpus(), vocab_size=600, min_frequency=2, show_progress=False)
    return _Tokenizers(tok)


@pytest.fixture(scope="module")
def sentencepiece() -> _Tokenizers:
    """A SentencePiece-style BPE (Metaspace ``▁``, Llama's decoder) with byte fallback: characters outside its
    vocabulary become ``<0xNN>`` byte tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    trainer = trainers.BpeTrainer(vocab_size=500, limit_alphabet=60, show_progress=False,
                                  special_tokens=["<unk>"] + [f"<0x{b:02X}>" for b in range(256)])
    tok.train_from_iterator(_corpus(), trainer)
    return _Tokenizers(tok)


def _catalogue_tokenizer(name: str):
    from bifrost.model.catalog import resolve
    from bifrost.model.tokenizer import HFTokenizer, load_tokenizer

    try:
        path = resolve(name).path
    except BifrostError as exc:  # its package is not installed
        pytest.skip(str(exc))
    tok = load_tokenizer(path)
    assert isinstance(tok, HFTokenizer)
    return tok


@pytest.fixture(scope="module")
def smollm2():
    return _catalogue_tokenizer("smollm2-135m-instruct")


@pytest.fixture(scope="module")
def minilm():
    return _catalogue_tokenizer("minilm")


def _vocab_size(tok) -> int:
    if isinstance(tok, _Tokenizers):
        return len(tok)
    inner = getattr(tok, "_tok", None)  # an HFTokenizer's transformers tokenizer
    return 300 if inner is None else len(inner)  # byte ids: 256 bytes, and ids above them decode as "<id>"


# --- helpers ------------------------------------------------------------------------------------------------------

def _stream(tok: Decoder, ids: list[int], stop: Sequence[str] = (), end: str = "finish") -> tuple[list[Delta], OutputProcessor]:
    """Push ``ids`` and end the turn (``finish()``, or ``last=True`` on the last token), checking at every step
    that the released text is the concatenation of the deltas and, without stops, a prefix of the whole decode
    (released text is never retracted: held-back text was held, not guessed)."""
    whole = tok.decode(ids)
    p = OutputProcessor(tok, stop)
    deltas = []
    for k, t in enumerate(ids):
        d = p.push(t, last=end == "last" and k == len(ids) - 1)
        deltas.append(d)
        assert p.text == "".join(x.text for x in deltas)
        if d.hit_stop:
            return deltas, p
        if not stop:
            assert whole.startswith(p.text), (k, p.text[-20:], whole)
    if end == "finish":
        deltas.append(p.finish())
    return deltas, p


def _assert_streams_whole(tok: Decoder, ids: list[int]) -> None:
    whole = tok.decode(ids)
    for end in ("finish", "last"):
        deltas, p = _stream(tok, ids, end=end)
        assert "".join(d.text for d in deltas) == whole == p.text
        assert not any(d.hit_stop for d in deltas)
        assert p.tokens == ids
        for k, d in enumerate(deltas[:len(ids) - 1]):  # before the end no delta ends in an incomplete character
            if FFFD in d.text:
                assert FFFD in tok.decode(ids[:k + 1])


def _random_ids(rng: random.Random, vocab: int, n: int) -> list[int]:
    return [rng.randrange(vocab) for _ in range(n)]


def _character_ids(tok: _Tokenizers, rng: random.Random, n: int) -> list[int]:
    """Random ids for a byte-fallback tokenizer: any piece but the bytes, and the byte runs of whole characters,
    some after a stray byte that no character completes (each run, valid or not, as one model might emit)."""
    pieces = [i for i in range(len(tok)) if not tok.piece(i).startswith("<")]  # not <unk>, not a <0xNN> byte
    chars = "".join(MULTILINGUAL)
    ids: list[int] = []
    while len(ids) < n:
        if rng.random() < 0.5:
            ids.append(rng.choice(pieces))
        else:
            run = [i for i in tok.encode(rng.choice(chars)) if tok.piece(i).startswith("<0x")]
            if run and rng.random() < 0.2:
                run = [rng.choice(run)] + run
            ids += run + [rng.choice(pieces)]
    return ids


def _random_stream(name: str, tok, rng: random.Random, n: int) -> list[int]:
    """``n`` random ids; for the byte-fallback tokenizer, :func:`_character_ids` (see the module docstring of
    bifrost/tee/detokenize.py: how its whole decode shows an invalid byte run depends on the whole run)."""
    return _character_ids(tok, rng, n)[:n] if name == "sentencepiece" else _random_ids(rng, _vocab_size(tok), n)


def _incomplete_id(tok) -> int:
    """A token that decodes alone to an incomplete character."""
    return next(i for c in "🙂€你" for i in tok.encode(c) if tok.decode([i]).endswith(FFFD))


def _split_chars(tok, text: str) -> bool:
    """Whether some token of ``text`` decodes alone to an incomplete character (its bytes span tokens)."""
    return any(FFFD in tok.decode([i]) for i in tok.encode(text))


# --- whole-decode equality ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["gpt2_bytes", "byte_bpe", "sentencepiece", "smollm2", "minilm"])
def test_random_ids_stream_the_whole_decode(name, request):
    tok = request.getfixturevalue(name)
    rng = random.Random(len(name))
    for _ in range(40):
        _assert_streams_whole(tok, _random_stream(name, tok, rng, rng.randrange(1, 80)))


@pytest.mark.parametrize("name", ["gpt2_bytes", "byte_bpe", "sentencepiece", "smollm2"])
def test_split_multibyte_characters_stream_whole(name, request):
    tok = request.getfixturevalue(name)
    assert all(_split_chars(tok, t) for t in MULTILINGUAL)  # the case under test does occur
    for text in MULTILINGUAL:
        ids = tok.encode(text)
        assert tok.decode(ids) == text
        deltas, _ = _stream(tok, ids)
        assert not any(FFFD in d.text for d in deltas)
        assert "".join(d.text for d in deltas) == text


def test_wordpiece_text_streams_whole(minilm):
    text = "the quick brown fox, naïve café; unbelievably tokenized words (##parts) and 你好!"
    ids = minilm.encode(text)
    assert any(minilm._tok.convert_ids_to_tokens(i).startswith("##") for i in ids)  # continuation pieces occur
    _assert_streams_whole(minilm, ids)
    assert minilm.decode(ids).startswith("the quick brown fox")


def test_sentencepiece_leading_space_and_byte_fallback(sentencepiece):
    text = "привет мир 🙂 café ⌘ 你好"
    ids = sentencepiece.encode(text)
    pieces = [sentencepiece._tok.id_to_token(i) for i in ids]
    assert "<0xF0>" in pieces and any(p.startswith("▁") and len(p) > 1 for p in pieces)
    deltas, _ = _stream(sentencepiece, ids)
    assert "".join(d.text for d in deltas) == text  # spaces between words kept, none before the first
    emoji = pieces.index("<0xF0>")
    assert [d.text for d in deltas[emoji:emoji + 3]] == ["", "", ""]  # 🙂's first three bytes: held back
    assert deltas[emoji + 3].text.startswith("🙂")


def test_byte_ids_hold_back_only_the_incomplete_character(gpt2_bytes):
    ids = gpt2_bytes.encode("ab€")  # € is 3 bytes
    deltas, _ = _stream(gpt2_bytes, ids)
    assert [d.text for d in deltas] == ["a", "b", "", "", "€", ""]


def test_complete_characters_before_an_incomplete_one_are_not_held():
    tok = _Bytes(["café".encode()[:-1], "é €".encode()[1:-2], "€".encode()[1:], b"x"])  # "caf\xc3" "\xa9 \xe2" "\x82\xac"
    deltas, p = _stream(tok, [0, 1, 2, 3])
    assert [d.text for d in deltas] == ["caf", "é ", "€", "x", ""]


def test_finish_releases_an_incomplete_character(gpt2_bytes):
    ids = gpt2_bytes.encode("A€")[:-1]  # the turn ends inside €
    for end in ("finish", "last"):
        deltas, p = _stream(gpt2_bytes, ids, end=end)
        assert p.text == "A" + FFFD == gpt2_bytes.decode(ids)


def test_bytes_no_token_completes_are_released(gpt2_bytes):
    """Lead bytes and stray continuation bytes that never form a character: the window is cut and the U+FFFD
    released (as the whole decode has them), while a character completed later still decodes whole."""
    rng = random.Random(7)
    junk = gpt2_bytes.encode("é€🙂")  # lead and continuation bytes
    for _ in range(30):
        ids = [rng.choice(junk) for _ in range(rng.randrange(1, 60))] + gpt2_bytes.encode("ok €")
        _assert_streams_whole(gpt2_bytes, ids)
    lead = _incomplete_id(gpt2_bytes)
    deltas, _ = _stream(gpt2_bytes, [lead] * 40 + gpt2_bytes.encode("€"))
    assert FFFD in "".join(d.text for d in deltas[:30])  # released before the end


# --- bounded work -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["gpt2_bytes", "sentencepiece", "smollm2"])
def test_decode_work_per_token_is_bounded(name, request):
    tok = request.getfixturevalue(name)
    rng = random.Random(3)
    lead = _incomplete_id(tok)
    streams = {"random": _random_stream(name, tok, rng, 500),
               "text": (tok.encode(" ".join(MULTILINGUAL)) * 20)[:500],
               "incomplete": [lead] * 500}  # never a complete character: the window must not grow
    for kind, ids in streams.items():
        counting = _Counting(tok)
        p = OutputProcessor(counting, stop=["STOP", "</s>"])
        per_push = []
        for t in ids:
            before = counting.ids
            p.push(t)
            per_push.append(counting.ids - before)
        p.finish()
        assert max(per_push) <= 64, kind
        assert sum(per_push) <= 16 * len(ids), kind  # a few ids per token on average, however long the turn
        assert sum(per_push[-100:]) <= 2 * sum(per_push[:100]) + 100, kind  # no growth along the turn
        assert p.text == tok.decode(ids), kind


def test_stop_scan_is_bounded(gpt2_bytes, monkeypatch):
    scanned: list[int] = []
    real: Callable[[str, Sequence[str]], int | None] = detokenize._find_stop

    def spy(text: str, stops: Sequence[str]) -> int | None:
        scanned.append(len(text))
        return real(text, stops)

    monkeypatch.setattr(detokenize, "_find_stop", spy)
    stops = ["STOPPING", "ab"]
    text = ("STOPPIN aSTOP é🙂 " * 40)[:600]
    deltas, p = _stream(gpt2_bytes, gpt2_bytes.encode(text), stop=stops)
    assert p.text == text and len(scanned) > 500
    assert max(scanned) <= len("STOPPING") - 1 + 4  # the held-back text, then one token's (up to 4 bytes')


# --- stop sequences -----------------------------------------------------------------------------------------------

def _reference(tok: Decoder, ids: list[int], stops: Sequence[str]) -> tuple[str, bool]:
    """Today's semantics, by whole decodes: the text up to the earliest stop in the first decode that has one."""
    for k in range(1, len(ids) + 1):
        text = tok.decode(ids[:k])
        hits = [i for i in (text.find(s) for s in stops) if i >= 0]
        if hits:
            return text[:min(hits)], True
    return tok.decode(ids), False


@pytest.mark.parametrize("name", ["gpt2_bytes", "byte_bpe", "sentencepiece", "smollm2"])
def test_stops_match_whole_decode_semantics(name, request):
    tok = request.getfixturevalue(name)
    rng = random.Random(11)
    stopped_some = 0
    for text in MULTILINGUAL * 6:
        ids = tok.encode(text)
        whole = tok.decode(ids)
        stops = []
        for _ in range(rng.randrange(1, 4)):  # substrings of the text (some spanning tokens), and one absent
            i = rng.randrange(len(whole) - 1)
            stops.append(whole[i:i + rng.randrange(1, 6)])
        stops.append("never-there")
        want, want_stop = _reference(tok, ids, stops)
        for end in ("finish", "last"):
            deltas, p = _stream(tok, ids, stop=stops, end=end)
            assert (p.text, any(d.hit_stop for d in deltas)) == (want, want_stop)
            assert not any(s in p.text for s in stops)
            if want_stop:
                assert deltas[-1].hit_stop and not any(d.hit_stop for d in deltas[:-1])
                with pytest.raises(TurnEnded):
                    p.push(ids[0])
                assert p.finish() == Delta("", True) and p.text == want
        stopped_some += want_stop
    assert stopped_some > 10


def test_stop_spanning_tokens(gpt2_bytes):
    ids = gpt2_bytes.encode("hello STOP world")
    deltas, p = _stream(gpt2_bytes, ids, stop=["STOP"])
    assert p.text == "hello " and deltas[-1] == Delta("", True)
    assert len(deltas) == len("hello STOP")  # ended on the stop's last byte; " world" never decoded into text
    assert [d.text for d in deltas[6:9]] == ["", "", ""]  # "STO" held back
    assert p.tokens == ids[:len(deltas)]


def test_held_back_stop_prefix_released_when_it_resolves(gpt2_bytes):
    deltas, p = _stream(gpt2_bytes, gpt2_bytes.encode("a STOx STOP"), stop=["STOP"])
    assert [d.text for d in deltas] == ["a", " ", "", "", "", "STOx", " ", "", "", "", ""]
    assert p.text == "a STOx " and deltas[-1].hit_stop


def test_stop_beginning_in_text_held_back_for_an_incomplete_character(gpt2_bytes):
    ids = gpt2_bytes.encode("café! more")
    deltas, p = _stream(gpt2_bytes, ids, stop=["é!"])
    assert [d.text for d in deltas] == ["c", "a", "f", "", "", ""]  # é's first byte held (U+FFFD), then é (stop prefix)
    assert p.text == "caf" and deltas[-1].hit_stop


def test_later_starting_stop_completing_first_wins():
    tok = _Words(["x", "a", "b", "c", "d", "bcd", "xabcd"])
    deltas, p = _stream(tok, tok.ids("x", "a", "b", "c", "d"), stop=["abcd", "bc"])
    assert [d.text for d in deltas] == ["x", "", "", "a"] and p.text == "xa" and deltas[-1].hit_stop
    # both complete in one token: the text ends before the earlier-starting one
    deltas, p = _stream(tok, tok.ids("x", "a", "bcd"), stop=["bcd", "abcd"])
    assert p.text == "x" and deltas[-1] == Delta("", True)
    deltas, p = _stream(tok, tok.ids("xabcd"), stop=["cd", "bc"])
    assert p.text == "xa" and deltas == [Delta("xa", True)]


def test_stop_at_the_first_token():
    tok = _Words(["Hello", "Hello world", " more"])
    for first in ("Hello", "Hello world"):
        p = OutputProcessor(tok, stop=["Hello"])
        assert p.push(tok.ids(first)[0]) == Delta("", True)
        assert p.text == "" and p.tokens == tok.ids(first)
        with pytest.raises(TurnEnded):
            p.push(tok.ids(" more")[0])


def test_last_token_releases_held_text_but_still_cuts_at_a_stop():
    tok = _Words(["ab", "S", "T", "STOP", "x"])
    p = OutputProcessor(tok, stop=["STOP"])
    assert p.push(tok.ids("ab")[0]) == Delta("ab", False)
    assert p.push(tok.ids("S")[0]) == Delta("", False)
    assert p.push(tok.ids("T")[0], last=True) == Delta("ST", False)
    assert p.text == "abST" and p.finish() == Delta("", False)
    with pytest.raises(TurnEnded):
        p.push(0)
    p = OutputProcessor(tok, stop=["STOP"])
    p.push(tok.ids("ab")[0])
    assert p.push(tok.ids("STOP")[0], last=True) == Delta("", True) and p.text == "ab"
    p = OutputProcessor(tok, stop=["STOP"])
    p.push(tok.ids("S")[0])
    assert p.finish() == Delta("S", False)


def test_empty_turn_and_bad_stop(gpt2_bytes):
    p = OutputProcessor(gpt2_bytes, stop=["x"])
    assert p.finish() == Delta("", False) and p.text == "" and p.tokens == []
    with pytest.raises(ValueError):
        OutputProcessor(gpt2_bytes, stop=["ok", ""])
