"""Incremental detokenization with stop strings: token ids in, text deltas out.

Byte-level BPE tokens may end in the middle of a UTF-8 character; a delta is emitted only once the
decoded text no longer ends in U+FFFD, so a character is never split or duplicated across deltas.
Text that could still turn into a stop string is held back; when a stop string appears, the text
before it is released and the sequence ends (the stop string itself is never returned).
"""

from __future__ import annotations

from transformers import PreTrainedTokenizerBase

# How many tokens before the new ones are re-decoded, so that merges across the boundary decode right.
_CONTEXT_TOKENS = 6


class Detokenizer:
    """Turns one sequence's generated tokens into text deltas."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, prompt_ids: list[int], stop: list[str]):
        self.tokenizer = tokenizer
        self.ids: list[int] = list(prompt_ids[-_CONTEXT_TOKENS:])
        self.prefix_offset = 0
        self.read_offset = len(self.ids)
        self.stop = stop
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
        if self.stop:
            start = max(0, self.emitted - max(len(s) for s in self.stop))
            hits = [i for i in (self.text.find(s, start) for s in self.stop) if i != -1]
            if hits:
                end = min(hits)
                self.stopped = True
                delta, self.emitted = self.text[self.emitted : end], end
                return delta
            hold = max((_partial_suffix(self.text, s) for s in self.stop), default=0)
            end = len(self.text) - hold
        else:
            end = len(self.text)
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


def _partial_suffix(text: str, stop: str) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of ``stop``."""
    for n in range(min(len(stop) - 1, len(text)), 0, -1):
        if text.endswith(stop[:n]):
            return n
    return 0
