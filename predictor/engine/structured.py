"""Structured outputs by constrained decoding: compile a grammar once, keep a matcher per sequence, mask logits.

The grammar engine is `llguidance <https://github.com/guidance-ai/llguidance>`_ (Microsoft's guidance
project, Rust with Python bindings; vLLM and SGLang ship it as a backend). Chosen over ``xgrammar`` and
``outlines-core`` because it compiles JSON schemas, regular expressions and Lark/GBNF grammars without a
per-schema precomputation over the vocabulary (a schema is ready in ~4 ms, so a new schema never stalls
the engine), computes each mask lazily in ~0.1 ms per token on SmolLM2's 49k-token vocabulary (measured:
mean 0.07–0.14 ms, first mask 1.4–2.3 ms; xgrammar's was 0.007 ms but it pulls ``triton`` and
``apache-tvm-ffi`` in with it), ships as one small wheel with no further dependencies and names what is wrong with a
grammar it cannot compile.

The flow, one place each:

- ``GrammarCompiler.compile_async(spec)`` (awaited by ``Generation.request`` before a request is queued; ``compile``
  is the same, synchronous): a ``GrammarSpec`` (JSON schema, regex, choice, grammar) becomes a validated ``Grammar``
  in a dedicated compile thread (llguidance drops the GIL while it builds), within ``COMPILE_TIMEOUT``. An LRU cache
  keyed by the spec's text holds the outcome, a compiled template or the reason it was refused, so a schema is
  compiled once per server and a bad one costs nothing the second time. A spec the engine cannot compile raises
  ``InvalidRequest`` naming the request's parameter (a 400).
- ``Grammar.matcher(max_tokens)``: a copy of the template for one sequence (``Sequence.matcher``, created at its
  first admission; preemption keeps the ``Sequence``, so the matcher stays in step with ``output_ids``).
- ``token_masks(matchers, vocab)``: the allowed tokens of each constrained row of a batch, as a bool
  tensor; the sampler applies it to those rows' logits (free rows are untouched), and the engine then
  ``advance``s each matcher with the token it accepted. End-of-sequence is allowed only where the grammar
  accepts; a grammar that can take no further token ends the sequence (``finish_reason`` ``stop``).

JSON is compiled with fixed whitespace, the separators ``json.dumps`` writes (``{"a": 1, "b": 2}``): flexible
whitespace lets random or small models loop on spaces and newlines until ``max_tokens``, and fully compact JSON
(``{"a":1}``) is tokenized unlike the JSON models saw in training (measured on SmolLM2-135M-Instruct, Paris's
facts under a schema: ``"country":"CHIP"`` compact, ``"country": "France"`` with the separators).

A grammar alone still lets a small model write an answer that never ends (a number's digits, or a string, run on
until ``max_tokens`` cuts the JSON). The ``Matcher`` keeps answers complete with ``bounded_output.py``: numbers
bounded like a double's (JSON), and within ``CLOSING_SLACK`` tokens of its budget only what keeps a short way to
complete the grammar in reach. A JSON schema is checked first by ``schema_checks.py`` (depth, ``$schema``'s type,
the metaschema, ``multipleOf``, ``$ref`` loops), the grammar's size here (``MAX_GRAMMAR_CHARS``).
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from functools import cache

import numpy as np
import torch

from ..errors import InvalidRequest, PredictorError
from ..sampling import GrammarSpec
from .bounded_output import CLOSING_MARGIN, CLOSING_SLACK, OUT, TokenTable, closing_path, json_lex
from .schema_checks import MAX_SCHEMA_DEPTH, check_schema, ref_cycle

# JSON compile options: json.dumps separators and no other whitespace; unknown schema keywords refused.
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
CACHE_SIZE = 256  # compiled grammars and refusals kept (least recently used dropped first)

# Characters of a grammar's source (a schema as compact JSON). The costliest shape measured at this size, 1,984
# optional integer properties (llguidance's object grammar grows with the square of its optional properties), takes
# 0.86–0.97 s here to check and compile with SmolLM2's tokenizer (jsonschema ~0.35 s, llguidance ~0.3 s; AMD EPYC,
# 2 cores); 1,393 required properties or 423 nested arrays of objects take 0.3–0.5 s. At 128 KiB it took 1.8 s.
MAX_GRAMMAR_CHARS = 65_536
COMPILE_TIMEOUT = 10.0  # seconds; a grammar that takes longer is refused (and remembered as refused)

class Matcher:
    """One sequence's position in its grammar, with the number bound (JSON) and the closing strategy (``max_tokens``)."""

    def __init__(
        self, matcher, table: TokenTable | None = None, json_text: bool = False, max_tokens: int | None = None, closing_length: int | None = None
    ) -> None:
        self._m = matcher
        self._table = table
        self._lex: tuple[int, int] | None = (OUT, 0) if json_text and table is not None else None
        self._max_tokens = max_tokens if table is not None else None
        self._consumed = 0
        self._closing_length = closing_length  # the closing path's length when last computed; None: closing is off
        self._path: list[int] | None = None  # the closing path from the current state, while it is known

    def advance(self, token: int) -> bool:
        """Consume the sampled token; False if the grammar did not allow it (a bug: the mask forbids that)."""
        ok = bool(self._m.consume_token(token))
        self._consumed += 1
        if self._lex is not None:
            self._lex = json_lex(self._table.texts[token], *self._lex)[:2]
        if self._path:  # still the closing path if the token followed it
            self._path = self._path[1:] if self._path[0] == token else None
        return ok

    @property
    def finished(self) -> bool:
        """The grammar is complete and allows no further token: the sequence ends here."""
        return bool(self._m.is_stopped())

    @property
    def error(self) -> str | None:
        """What went wrong (its first line), or None."""
        return _first_line(self._m.get_error()) if self._m.is_error() else None

    def fill(self, bitmask: torch.Tensor) -> None:
        """Write the allowed-token bitmask (int32 words, bit i of word w = token 32w+i) into ``bitmask`` (CPU)."""
        self._m.unsafe_compute_mask_ptr(bitmask.data_ptr(), bitmask.numel() * bitmask.element_size())
        if self._m.is_error():
            return
        words = bitmask.numpy()
        if self._lex is not None:
            self._bound_numbers(words)
        if self._max_tokens is not None and self._closing_length is not None:
            self._close(words)

    def _bound_numbers(self, words: np.ndarray) -> None:
        allowed = self._table.number_bound(*self._lex)
        if allowed is None:
            return
        bounded = words & allowed
        if bounded.any():  # else the grammar itself needs more digits (a long const, a minimum of 1e20): it wins
            words[:] = bounded

    def _close(self, words: np.ndarray) -> None:
        left = self._max_tokens - self._consumed
        if left > self._closing_length + CLOSING_SLACK + CLOSING_MARGIN:
            return
        if self._path is None:
            self._path = closing_path(self._m, self._table, self._lex)
            if self._path is None:  # longer than the search cap: closing is off for this sequence
                self._closing_length = None
                return
        self._closing_length = len(self._path)
        if left < len(self._path):  # it cannot close in time: as without the strategy (finish_reason length)
            self._closing_length = None
            return
        if left > len(self._path) + CLOSING_SLACK:
            return
        first = self._path[0]
        continuing = self._table.continuing(self._lex[0]) if self._lex is not None and left > len(self._path) else None
        if continuing is None:
            words[:] = 0
        else:
            words &= continuing
        words.view(np.uint32)[first >> 5] |= np.uint32(1 << (first & 31))


class Grammar:
    """A compiled grammar; ``matcher()`` gives each sequence its own state."""

    def __init__(self, template, spec: GrammarSpec, table: TokenTable | None = None, closing_length: int | None = None) -> None:
        self._template = template
        self._table = table
        self._closing_length = closing_length  # tokens the closing path needs from the start; None: no closing
        self.spec = spec

    def matcher(self, max_tokens: int | None = None) -> Matcher:
        """A fresh matcher; with ``max_tokens`` (the sequence's budget) it closes the answer before the budget ends."""
        closing = self._closing_length if max_tokens is not None else None
        return Matcher(self._template.deep_copy(), self._table, self.spec.kind == "json_schema", max_tokens, closing)


@dataclass(frozen=True)
class Refusal:
    """Why a spec cannot be compiled, without the request parameter it came in (cached: each request names its own)."""

    subject: str  # "invalid json_schema", "the regex"
    problem: str  # ": ...", " cannot be compiled: ..."

    def error(self, param: str) -> InvalidRequest:
        return InvalidRequest(f"{self.subject} in '{param}'{self.problem}", param=param)


class _Refused(Exception):
    def __init__(self, refusal: Refusal):
        super().__init__(refusal.subject + refusal.problem)
        self.refusal = refusal


@cache
def _parser_limits():
    """llguidance's default resource limits, with errors that never include parser state (they reach clients)."""
    from llguidance import LLParserLimits

    return LLParserLimits(verbose_errors=False)


class GrammarCompiler:
    """Compiles ``GrammarSpec``s for one tokenizer, with an LRU cache of outcomes keyed by the spec's text.

    ``bound_outputs=False`` compiles as before the number bound and the closing strategy existed (kept to measure
    them: ``benchmarks/structured_outputs.py``)."""

    def __init__(self, tokenizer, vocab_size: int, eos_token_id: int | None, compile_timeout: float = COMPILE_TIMEOUT, bound_outputs: bool = True):
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.eos_token_id = eos_token_id
        self.compile_timeout = compile_timeout
        self.bound_outputs = bound_outputs
        self._lltokenizer = None
        self._table: TokenTable | None = None
        self._cache: OrderedDict[GrammarSpec, Grammar | Refusal] = OrderedDict()
        self._pending: dict[GrammarSpec, Future] = {}  # compiles in flight, shared by requests with the same spec
        self._lock = threading.Lock()
        self._tokenizer_lock = threading.Lock()
        self._executor: ThreadPoolExecutor | None = None

    def _ll_tokenizer(self, param: str):
        """llguidance's view of the tokenizer and the token table (built once, ~1 s for a 49k vocabulary)."""
        with self._tokenizer_lock:  # not the cache's lock: lookups never wait for this
            if self._lltokenizer is None:
                import llguidance.hf

                try:
                    lltokenizer = llguidance.hf.from_tokenizer(self.tokenizer, n_vocab=self.vocab_size, eos_token=self.eos_token_id)
                except Exception as exc:  # a slow (Python) tokenizer, or one llguidance cannot read
                    raise InvalidRequest(f"structured outputs are not available for this model's tokenizer: {exc}", param=param) from None
                self._table = TokenTable(lltokenizer, self.vocab_size, self.eos_token_id) if self.bound_outputs else None
                self._lltokenizer = lltokenizer
            return self._lltokenizer

    def prepare(self) -> str | None:
        """Build the tokenizer view at start-up (not on the first request); the reason if it cannot be built."""
        try:
            self._ll_tokenizer("response_format")
        except InvalidRequest as exc:
            return exc.message
        return None

    def compile(self, spec: GrammarSpec, param: str) -> Grammar:
        """The compiled grammar for ``spec``; ``InvalidRequest`` naming ``param`` if it cannot be compiled. Blocks
        for the compile (up to ~1 s): on the event loop, await ``compile_async`` instead."""
        _check_size(spec, param)
        self._ll_tokenizer(param)
        return _grammar_or_raise(self._outcome(spec), param)

    async def compile_async(self, spec: GrammarSpec, param: str) -> Grammar:
        """``compile`` off the event loop: in the compile thread, at most ``compile_timeout`` seconds. A grammar
        whose compile runs longer is refused with a 400 and remembered as refused; its compile thread cannot be
        interrupted, so later compiles get a new one. A compile that waited that long behind another is a 503."""
        _check_size(spec, param)
        with self._lock:
            outcome = self._cached(spec)
        if outcome is not None:
            return _grammar_or_raise(outcome, param)
        future = self._submit(spec, param)
        done, _ = await asyncio.wait({asyncio.wrap_future(future)}, timeout=self.compile_timeout)
        if done:
            return _grammar_or_raise(done.pop().result(), param)
        if not future.running():
            message = f"the {spec.kind} in '{param}' was not compiled within {self.compile_timeout:g} s: the server is busy; retry"
            raise PredictorError(message, param=param, status=503, code="busy")
        refusal = Refusal(f"the {spec.kind}", f" took longer than {self.compile_timeout:g} s to compile; simplify it")
        with self._lock:
            if not isinstance(self._cache.get(spec), Refusal):  # the first of its requests to give up on it
                self._store(spec, refusal)
                if self._executor is not None:
                    self._executor.shutdown(wait=False)
                    self._executor = None
        raise refusal.error(param)

    def _submit(self, spec: GrammarSpec, param: str) -> Future:
        with self._lock:
            future = self._pending.get(spec)
            if future is None:
                if self._executor is None:
                    self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="grammar-compile")
                future = self._executor.submit(self._compile_job, spec, param)
                self._pending[spec] = future
                future.add_done_callback(lambda _: self._forget(spec, future))
            return future

    def _forget(self, spec: GrammarSpec, future: Future) -> None:
        with self._lock:
            if self._pending.get(spec) is future:
                del self._pending[spec]

    def _compile_job(self, spec: GrammarSpec, param: str) -> Grammar | Refusal:
        self._ll_tokenizer(param)  # built at start-up (prepare); if it cannot be, every request is told so (not cached)
        return self._outcome(spec)

    def _cached(self, spec: GrammarSpec) -> Grammar | Refusal | None:
        outcome = self._cache.get(spec)
        if outcome is not None:
            self._cache.move_to_end(spec)
        return outcome

    def _store(self, spec: GrammarSpec, outcome: Grammar | Refusal) -> None:
        self._cache[spec] = outcome
        self._cache.move_to_end(spec)
        if len(self._cache) > CACHE_SIZE:
            self._cache.popitem(last=False)

    def _outcome(self, spec: GrammarSpec) -> Grammar | Refusal:
        """The cached outcome for ``spec``, or its compile (outside the lock: a long compile blocks no lookup)."""
        with self._lock:
            outcome = self._cached(spec)
        if outcome is not None:
            return outcome
        try:
            outcome = self._compile(spec)
        except _Refused as refused:
            outcome = refused.refusal
        with self._lock:
            if spec not in self._cache:  # a compile that timed out stays refused
                self._store(spec, outcome)
            return self._cache[spec]

    def _compile(self, spec: GrammarSpec) -> Grammar:
        from llguidance import LLMatcher

        try:
            text = _grammar_text(spec)
        except ValueError as exc:
            raise _Refused(Refusal(f"invalid {spec.kind}", f": {exc}")) from None
        matcher = LLMatcher(self._lltokenizer, text, log_level=0, limits=_parser_limits())
        if not matcher.is_error():  # some grammars fail only when a mask is computed (a $ref loop, a lexer too large)
            probe = matcher.deep_copy()
            scratch = np.zeros(-(-self.vocab_size // 32), dtype=np.int32)
            probe.unsafe_compute_mask_ptr(scratch.ctypes.data, scratch.nbytes)
            if not probe.is_error():
                lex = (OUT, 0) if spec.kind == "json_schema" else None
                path = closing_path(matcher, self._table, lex) if self._table is not None else None
                return Grammar(matcher, spec, self._table, len(path) if path is not None else None)
            matcher = probe
        problem = _first_line(matcher.get_error())
        if spec.kind == "json_schema":
            cycle = ref_cycle(json.loads(spec.source))
            if cycle:
                problem = f"it refers to itself without writing anything in between ($ref cycle {' → '.join(cycle)})"
        raise _Refused(Refusal(f"the {spec.kind}", f" cannot be compiled: {problem}"))


def _grammar_or_raise(outcome: Grammar | Refusal, param: str) -> Grammar:
    if isinstance(outcome, Refusal):
        raise outcome.error(param)
    return outcome


def _check_size(spec: GrammarSpec, param: str) -> None:
    if len(spec.source) > MAX_GRAMMAR_CHARS:
        what = " as compact JSON" if spec.kind == "json_schema" else ""
        raise InvalidRequest(f"the {spec.kind} in '{param}' is too large: {len(spec.source):,} characters{what}, at most {MAX_GRAMMAR_CHARS:,}", param=param)


def _first_line(message: str) -> str:
    """llguidance's errors may go on with details; the first line says what is wrong."""
    return message.strip().splitlines()[0] if message.strip() else "unknown error"


def _grammar_text(spec: GrammarSpec) -> str:
    """llguidance's grammar for a spec (``ValueError`` for a malformed one)."""
    from llguidance import LLMatcher

    if spec.kind == "json_schema":
        try:
            schema = json.loads(spec.source)
        except RecursionError:
            raise ValueError(f"the schema is nested more than {MAX_SCHEMA_DEPTH} levels deep") from None
        check_schema(schema)
        cycle = ref_cycle(schema, through=("allOf",))  # every member must hold: a loop is an endless regress, never a value
        if cycle:
            raise ValueError(f"it refers to itself without writing anything in between ($ref cycle {' → '.join(cycle)})")
        return LLMatcher.grammar_from_json_schema(schema, defaults=JSON_OPTIONS)
    if spec.kind == "regex":
        return LLMatcher.grammar_from_regex(spec.source)
    if spec.kind == "choice":
        choices = json.loads(spec.source)
        return LLMatcher.grammar_from_lark("start: " + " | ".join(json.dumps(c) for c in choices))
    if spec.kind == "grammar":
        from llguidance.gbnf_to_lark import GbnfToLarkError, any_to_lark

        try:
            return LLMatcher.grammar_from_lark(any_to_lark(spec.source))
        except GbnfToLarkError as exc:  # a GBNF grammar llguidance cannot translate: the request's fault
            raise ValueError(str(exc)) from None
        except RecursionError:  # the GBNF translator recurses per nesting level
            raise ValueError("the grammar is nested too deeply") from None
    raise ValueError(f"unknown grammar kind {spec.kind!r}")


def token_masks(matchers: list[Matcher], vocab_size: int, width: int) -> torch.Tensor:
    """Allowed tokens of each matcher's next position: bool (len(matchers), width); ``vocab_size`` is the
    compiler's (the bitmask's) size, ``width`` the logits' (positions beyond the vocabulary are never allowed)."""
    words = -(-vocab_size // 32)
    bitmask = torch.empty((len(matchers), words), dtype=torch.int32)
    for row, matcher in enumerate(matchers):
        matcher.fill(bitmask[row])
    bits = np.unpackbits(bitmask.numpy().view(np.uint8), axis=1, bitorder="little")[:, : min(vocab_size, width)]
    if width > bits.shape[1]:
        bits = np.pad(bits, ((0, 0), (0, width - bits.shape[1])))
    return torch.from_numpy(bits).bool()
