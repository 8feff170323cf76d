"""Incremental detokenization of one generation turn, with stop sequences.

:class:`OutputProcessor` turns the turn's tokens, one at a time, into text deltas to stream. It decodes only a
small window of recent tokens (the prefix/read offsets of vLLM's incremental detokenizer): ``decode(ids[prefix:])``
minus ``decode(ids[prefix:read])`` is the text the tokens after ``read`` add, the tokens in ``[prefix, read)``
giving the context a tokenizer needs to place spaces (SentencePiece's leading ``▁``, WordPiece's ``##``). The
offsets advance once the window's text grows and does not end in U+FFFD (an incomplete UTF-8 character, as
byte-level BPE and byte-fallback tokens leave it). So the decode work per token does not grow with the turn.

Invariants, for a turn that ends with ``push(..., last=True)`` or :meth:`OutputProcessor.finish`:

- without a stop sequence, the deltas' concatenation is ``tokenizer.decode(tokens)``, for a tokenizer whose
  decoding of a completed character does not change as tokens follow it (byte-level BPE, SentencePiece, WordPiece
  without clean-up of tokenization spaces). A byte-fallback decoder that shows every byte of an invalid run as
  U+FFFD (``tokenizers``' ByteFallback) decodes such a run of more than ``_MAX_PENDING`` tokens piecewise, so
  characters in it may stream where the whole decode has U+FFFD;
- with one, it is the text decoded when a stop sequence first appears, cut right before the earliest-starting
  stop sequence in it; released text never contains a stop sequence, and nothing after it is released;
- before the end, a delta never ends in U+FFFD that a later token may complete, nor in a proper prefix of a stop
  sequence: that text is held back until it resolves.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

_FFFD = "\ufffd"
# A window whose text has not grown past a trailing U+FFFD for this many tokens is cut: bytes that no token can
# complete any more (a UTF-8 character has at most 4 bytes, a token at least one) must not grow the window.
_MAX_PENDING = 6
_LOOKAHEAD = 4  # tokens kept after such a cut, enough to settle any character that spans it


class Decoder(Protocol):
    def decode(self, ids: list[int]) -> str: ...


@dataclass(frozen=True)
class Delta:
    """What one token (or the end of the turn) adds to the stream."""

    text: str  # new text to stream now ('' when everything new is held back)
    hit_stop: bool  # a stop sequence appeared: the turn ends; ``text`` ends right before the stop sequence


class TurnEnded(RuntimeError):
    """A token was pushed after the turn ended (a stop sequence, ``last=True`` or :meth:`OutputProcessor.finish`)."""


class OutputProcessor:
    """Turns one turn's tokens into text deltas. Decodes only the new tokens (vLLM-style prefix/read offsets),
    holds back text that may be an incomplete UTF-8 character (U+FFFD at the end) or may begin a stop sequence.

    The turn ends at a stop sequence, at ``push(..., last=True)`` or at :meth:`finish`; pushing after that raises
    :class:`TurnEnded`, and :meth:`finish` returns an empty delta (``hit_stop`` as the end was)."""

    def __init__(self, tokenizer: Decoder, stop: Sequence[str] = ()) -> None:
        if any(not s for s in stop):
            raise ValueError("a stop sequence must not be empty")
        self._tok = tokenizer
        self._stops = tuple(stop)
        self._ids: list[int] = []
        self._prefix = 0  # the window's context starts here ...
        self._read = 0  # ... and its new tokens here
        self._prefix_text = ""  # decode(ids[prefix:read])
        self._taken = 0  # characters of the window's new text already passed on (those before a trailing U+FFFD)
        self._held = ""  # text passed on but not released: a proper prefix of a stop sequence (< longest stop)
        self._parts: list[str] = []
        self._text: str | None = ""
        self._ended = False
        self._hit_stop = False

    @property
    def text(self) -> str:
        """All text released so far (the concatenation of every :attr:`Delta.text`)."""
        if self._text is None:
            self._text = "".join(self._parts)
            self._parts = [self._text]
        return self._text

    @property
    def tokens(self) -> list[int]:
        """Every token pushed (a copy)."""
        return list(self._ids)

    def push(self, token: int, *, last: bool = False) -> Delta:
        """The text ``token`` releases. ``last``: no token follows (the length limit): all decoded text is
        released, cut at a stop sequence if one appeared."""
        if self._ended:
            raise TurnEnded("the turn has ended; no token may follow")
        self._ids.append(token)
        return self._release(self._advance(final=last), final=last)

    def finish(self) -> Delta:
        """End the turn without a further token (e.g. the end-of-sequence token came and is not text): release
        the held-back text, cut at a stop sequence if one appeared."""
        if self._ended:
            return Delta("", self._hit_stop)
        return self._release(self._advance(final=True), final=True)

    def _decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids)

    def _advance(self, final: bool) -> str:
        """The text the window's new tokens add beyond what was already passed on; advances the offsets."""
        ids, n, taken = self._ids, len(self._prefix_text), self._taken
        new_text = self._decode(ids[self._prefix:])
        if final or (len(new_text) > n and not new_text.endswith(_FFFD)):
            self._move(len(ids), 0)
            return new_text[n + taken:]
        if len(ids) - self._read > _MAX_PENDING:
            for cut in range(len(ids) - _LOOKAHEAD, self._read, -1):
                left = self._decode(ids[self._prefix:cut])
                if len(left) > n and new_text.startswith(left):  # nothing after the cut changes the text before it
                    self._move(cut, max(0, n + taken - len(left)))
                    return left[n + taken:]
            self._move(len(ids), 0)  # no such cut: release the window as it decodes
            return new_text[n + taken:]
        provisional = new_text[n:].rstrip(_FFFD)  # its complete characters go on; the trailing U+FFFD waits
        self._taken = max(taken, len(provisional))
        return provisional[taken:]

    def _move(self, read: int, taken: int) -> None:
        self._prefix, self._read, self._taken = self._read, read, taken
        self._prefix_text = self._decode(self._ids[self._prefix:self._read])

    def _release(self, new: str, final: bool) -> Delta:
        """Release ``new`` after the held-back text, up to a stop sequence, or up to the longest end that begins
        one. Only the held-back text (shorter than the longest stop sequence) and ``new`` are scanned: released
        text never ends in a proper prefix of a stop sequence, so none can begin in it."""
        text = self._held + new
        hit = _find_stop(text, self._stops)
        if hit is not None:
            out, self._held, self._ended, self._hit_stop = text[:hit], "", True, True
        elif final:
            out, self._held, self._ended = text, "", True
        else:
            keep = _stop_prefix(text, self._stops)
            out, self._held = text[:len(text) - keep], text[len(text) - keep:]
        if out:
            self._parts.append(out)
            self._text = None
        return Delta(out, self._hit_stop)


def _find_stop(text: str, stops: Sequence[str]) -> int | None:
    """Where the earliest-starting stop sequence in ``text`` starts, or None."""
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(hits) if hits else None


def _stop_prefix(text: str, stops: Sequence[str]) -> int:
    """The length of the longest end of ``text`` that is a proper prefix of a stop sequence."""
    best = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:k]):
                best = k
                break
    return best
