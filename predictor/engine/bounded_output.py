"""What keeps a constrained answer complete: numbers bounded like a double's, and a way to close before ``max_tokens``.

A grammar alone lets a small model write valid JSON that never ends: a number's digits run on
(``"lon": 0.0134567898878423154129649988888888…``) or a string does, until ``max_tokens`` cuts it. ``structured.Matcher``
uses two things from here:

- ``json_lex``, a small lexer of the JSON text a matcher consumed (outside, in a string, in a number's mantissa or
  exponent), and ``TokenTable``, per tokenizer: what each token writes, and precomputed bitmasks of the tokens that
  would put a number over ``MAX_NUMBER_DIGITS`` / ``MAX_EXPONENT_DIGITS`` from each lexer state (one ``AND`` per step).
  llguidance 1.9 has no option for it (its number regex is unbounded).
- ``closing_path``: a short token sequence that completes the grammar from a matcher's state (llguidance's forced
  tokens, else a one-character closer, else the lowest allowed token), searched only near the end of the budget.
"""

from __future__ import annotations

import numpy as np

MAX_NUMBER_DIGITS = 17  # mantissa digits of a JSON number (integer + fraction): a double holds 17 significant digits
MAX_EXPONENT_DIGITS = 3  # a double's exponent is at most 308

CLOSING_SLACK = 16  # tokens before max_tokens from which only tokens that keep the closing path in reach are allowed
CLOSING_MARGIN = 8  # the closing path is recomputed each step once the tokens left are within slack + margin of it
CLOSING_SEARCH_CAP = 128  # longest closing path searched for; a grammar that needs more is left to run to max_tokens

# JSON lexer modes (``json_lex``): outside strings and numbers, in a string, after a backslash in a string, in a
# number's mantissa (digits counted), in its exponent (digits counted).
OUT, STR, ESC, MANTISSA, EXPONENT = range(5)
_DIGITS = frozenset(b"0123456789")
_QUOTE, _BACKSLASH, _MINUS = ord('"'), ord("\\"), ord("-")
# Closing-path characters by preference: in a string, the quote that ends it; elsewhere, closers before a separator,
# and the shortest value (0) before a string.
_STRING_CLOSERS = b'"'
_VALUE_CLOSERS = b'])},0"'


def json_lex(data: bytes, mode: int, count: int) -> tuple[int, int, bool]:
    """The JSON lexer state (``mode``, ``count``: digits of the current mantissa or exponent) after ``data``, and
    whether a number in it went over ``MAX_NUMBER_DIGITS`` / ``MAX_EXPONENT_DIGITS`` (or wrote a ``.`` with no digit
    left for its fraction). Reads text the grammar allowed, so it needs no error states: a byte that cannot continue
    a number ends it and is read outside."""
    over = False
    for byte in data:
        if mode == STR:
            mode = ESC if byte == _BACKSLASH else OUT if byte == _QUOTE else STR
            continue
        if mode == ESC:
            mode = STR
            continue
        if mode == MANTISSA:
            if byte in _DIGITS:
                count += 1
                over |= count > MAX_NUMBER_DIGITS
                continue
            if byte == ord("."):  # a fraction needs a digit: none may be left
                over |= count >= MAX_NUMBER_DIGITS
                continue
            if byte in b"eE":
                mode, count = EXPONENT, 0
                continue
            mode = OUT
        elif mode == EXPONENT:
            if byte in _DIGITS:
                count += 1
                over |= count > MAX_EXPONENT_DIGITS
                continue
            if byte in b"+-":
                continue
            mode = OUT
        if byte == _QUOTE:
            mode = STR
        elif byte in _DIGITS:
            mode, count = MANTISSA, 1
        elif byte == _MINUS:
            mode, count = MANTISSA, 0
    return mode, count, over


def _packed(allowed: np.ndarray, words: int) -> np.ndarray:
    """A bool vector as llguidance's bitmask layout: int32 words, bit i of word w = token 32w+i."""
    bits = np.packbits(allowed, bitorder="little")
    return np.pad(bits, (0, words * 4 - bits.size)).view(np.int32)


class TokenTable:
    """What each token writes, read once per tokenizer: its bytes, the bitmasks of the number bound and of the
    tokens that continue a string or number (closing), and the one-character tokens closing paths prefer."""

    def __init__(self, lltokenizer, vocab_size: int, eos_token_id: int | None):
        self.lltokenizer = lltokenizer
        self.eos_token_id = eos_token_id
        self.words = -(-vocab_size // 32)
        self.texts = [b"" if lltokenizer.is_special_token(i) else lltokenizer.decode_bytes([i]) for i in range(vocab_size)]
        digits = np.array([len(t) - len(t.translate(None, b"0123456789")) for t in self.texts])
        first = np.array([t[0] if t else 0 for t in self.texts])

        def over(mode: int, count: int, candidates: np.ndarray) -> np.ndarray:
            """Tokens (among ``candidates``) that would put a number over its bound from lexer state (mode, count)."""
            out = np.zeros(vocab_size, dtype=bool)
            for i in np.flatnonzero(candidates):
                out[i] = json_lex(self.texts[i], mode, count)[2]
            return out

        # From outside a number, a token needs 4+ digits to overflow one; in a number, one more digit may do.
        fresh = over(OUT, 0, digits >= 4)
        self._bounds: dict[tuple[int, int], np.ndarray | None] = {
            (STR, 0): self._allowed(over(STR, 0, digits >= 4)),
            (ESC, 0): self._allowed(over(ESC, 0, digits >= 4)),
            (OUT, 0): self._allowed(fresh),
        }
        continues_mantissa = np.isin(first, list(b"0123456789.eE"))
        for used in range(MAX_NUMBER_DIGITS + 1):
            self._bounds[MANTISSA, used] = self._allowed(fresh | over(MANTISSA, used, continues_mantissa))
        continues_exponent = np.isin(first, list(b"0123456789+-"))
        for used in range(MAX_EXPONENT_DIGITS + 1):
            self._bounds[EXPONENT, used] = self._allowed(fresh | over(EXPONENT, used, continues_exponent))

        string_content = np.array([bool(t) and b'"' not in t and b"\\" not in t and min(t) >= 0x20 and _whole_utf8(t) for t in self.texts])
        only_digits = np.array([bool(t) and t.isdigit() for t in self.texts])
        self._continuing = {STR: _packed(string_content, self.words), MANTISSA: _packed(only_digits, self.words), EXPONENT: _packed(only_digits, self.words)}
        single = {t: i for i, t in reversed(list(enumerate(self.texts))) if len(t) == 1}
        self.string_closers = [single[bytes([c])] for c in _STRING_CLOSERS if bytes([c]) in single]
        self.value_closers = [single[bytes([c])] for c in _VALUE_CLOSERS if bytes([c]) in single]

    def _allowed(self, forbidden: np.ndarray) -> np.ndarray | None:
        """The bitmask of tokens not ``forbidden``; None when nothing is (no work for that state)."""
        return _packed(~forbidden, self.words) if forbidden.any() else None

    def number_bound(self, mode: int, count: int) -> np.ndarray | None:
        """Tokens that keep every number within its bound from lexer state (mode, count); None: all of them."""
        if mode == MANTISSA:
            return self._bounds[MANTISSA, min(count, MAX_NUMBER_DIGITS)]
        if mode == EXPONENT:
            return self._bounds[EXPONENT, min(count, MAX_EXPONENT_DIGITS)]
        return self._bounds[mode, 0]

    def continuing(self, mode: int) -> np.ndarray | None:
        """Tokens that only continue the string or number being written (they leave the closing path as it is)."""
        return self._continuing.get(mode)


def _whole_utf8(data: bytes) -> bool:
    """Whole characters: a token that ends inside one leaves the string needing its other bytes first."""
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def closing_path(matcher, table: TokenTable, lex: tuple[int, int] | None, cap: int = CLOSING_SEARCH_CAP) -> list[int] | None:
    """A short token sequence that completes the grammar from ``matcher``'s state (an llguidance ``LLMatcher``, left
    untouched): llguidance's forced tokens where it has them, else the first allowed of the one-character closers (in
    a string its quote; elsewhere ``]``, ``}``, ``)``, ``,``, ``0``, ``"``; ``lex`` is the JSON lexer state, None for
    other grammars), else the lowest allowed token id; end-of-sequence once the grammar accepts. None if it would
    take more than ``cap`` tokens. Greedy, not the shortest: a bound on what closing needs."""
    m = matcher.deep_copy()
    path: list[int] = []
    scratch: np.ndarray | None = None
    while not m.is_stopped():
        if len(path) >= cap or m.is_error():
            return None
        if m.is_accepting():
            return path + [table.eos_token_id] if table.eos_token_id is not None else None
        tokens = m.compute_ff_tokens()
        if not tokens:
            forced = m.compute_ff_bytes()  # forced text whose tokenization llguidance leaves open (a space, say)
            candidates = table.lltokenizer.tokenize_bytes(forced)[:1] if forced else []
            candidates += table.string_closers if lex is not None and lex[0] in (STR, ESC) else table.value_closers
            token = next((t for t in candidates if m.validate_tokens([t]) == 1), None)
            if token is None:
                if scratch is None:
                    scratch = np.zeros(table.words, dtype=np.int32)
                token = _lowest_allowed(m, scratch, table.eos_token_id)
                if token is None:
                    return None
            tokens = [token]
        if not m.consume_tokens(tokens):
            return None
        path += tokens
        if lex is not None:
            for token in tokens:
                lex = json_lex(table.texts[token], *lex)[:2]
    return path


def _lowest_allowed(matcher, scratch: np.ndarray, eos_token_id: int | None) -> int | None:
    """The lowest token id the matcher allows other than end-of-sequence (single bytes, in byte-level vocabularies)."""
    matcher.unsafe_compute_mask_ptr(scratch.ctypes.data, scratch.nbytes)
    words = scratch.view(np.uint32)
    if eos_token_id is not None:
        words[eos_token_id >> 5] &= ~np.uint32(1 << (eos_token_id & 31))
    nonzero = np.flatnonzero(words)
    if not nonzero.size:
        return None
    word = int(words[nonzero[0]])
    return int(nonzero[0]) * 32 + (word & -word).bit_length() - 1
