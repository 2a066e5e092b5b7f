"""Incremental detokenization with stop strings: token ids in, text deltas out.

Byte-level BPE tokens may end in the middle of a UTF-8 character; a delta is emitted only once the
decoded text no longer ends in U+FFFD, so a character is never split or duplicated across deltas.
Text that could still turn into a stop string is held back; when a stop string appears, the text
before it is released and the sequence ends (the stop string itself is never returned). Stop strings are
matched incrementally (``stop_strings.py``): each character is scanned once.
"""

from __future__ import annotations

from transformers import PreTrainedTokenizerBase

from .stop_strings import StopAutomaton, StopScanner, stop_automaton

# How many tokens before the new ones are re-decoded, so that merges across the boundary decode right.
_CONTEXT_TOKENS = 6


class Detokenizer:
    """Turns one sequence's generated tokens into text deltas."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, prompt_ids: list[int], stop: list[str] | StopAutomaton):
        self.tokenizer = tokenizer
        self.ids: list[int] = list(prompt_ids[-_CONTEXT_TOKENS:])
        self.prefix_offset = 0
        self.read_offset = len(self.ids)
        if isinstance(stop, list):
            stop = stop_automaton(tuple(stop)) if stop else None
        self.scanner = StopScanner(stop) if stop is not None else None
        self.scanned = 0  # characters of ``text`` the scanner has consumed
        self.text = ""  # all text decoded so far (stop strings included)
        self.emitted = 0  # characters of ``text`` already returned
        self.stopped = False

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def add(self, token_id: int) -> str:
        """Add one token; return the text that is now safe to emit (may be empty)."""
        self.ids.append(token_id)
        prefix = self._decode(self.ids[self.prefix_offset : self.read_offset])
        full = self._decode(self.ids[self.prefix_offset :])
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            self.text += full[len(prefix) :]
            self.prefix_offset = self.read_offset
            self.read_offset = len(self.ids)
        return self._release()

    def _release(self) -> str:
        end = len(self.text)
        if self.scanner is not None:
            found = self.scanner.feed(self.text[self.scanned :])
            if found is not None:
                start = self.scanned + found - self.scanner.matched  # never before ``emitted``: that text was held back
                self.stopped = True
                delta, self.emitted = self.text[self.emitted : start], start
                return delta
            self.scanned = len(self.text)
            end -= self.scanner.held
        delta, self.emitted = self.text[self.emitted : end], max(self.emitted, end)
        return delta

    def flush(self) -> str:
        """At the end of the sequence: whatever was held back as a possible stop-string prefix."""
        if self.stopped:
            return ""
        if self.read_offset < len(self.ids):  # an incomplete character at the very end: emit it as decoded
            prefix = self._decode(self.ids[self.prefix_offset : self.read_offset])
            self.text += self._decode(self.ids[self.prefix_offset :])[len(prefix) :]
            self.read_offset = len(self.ids)
            released = self._release()
            if self.stopped:
                return released
            return released + self.flush()
        delta, self.emitted = self.text[self.emitted :], len(self.text)
        return delta

