"""Local decoding speed: tokenrelay's LocalProvider vs raw llama-cpp-python streaming.

    .venv/bin/python bench/bench_local.py [--reps 3] [--lengths 256,1024] [--threads 2]

Both sides run the embedded SmolLM2-135M-Instruct with the same n_threads, n_ctx, prompt,
seed and greedy sampling, and generate exactly N tokens:

* ours: ``tokenrelay.astream(..., provider=LocalProvider(...))`` — the public API, so
  the stream engine (accumulation, events, metrics) is included — with
  ``extra={"ignore_eos": True, "repeat_penalty": 1.0}`` (raw applies no penalty);
* raw: ``Llama.create_chat_completion(messages, stream=True, ...)`` with every
  end-of-generation token banned by ``logit_bias`` (-inf).

Each side loads its model once and warms up; runs alternate and the median is printed.
The context is reset before every raw run, as LocalProvider does, so both evaluate the
whole prompt each time. Both decode in a fresh thread per request (ours in its worker
thread, raw in one started for the run): on a busy machine, llama.cpp's OpenMP teams
ran several times slower or faster depending on the thread that drove them, and the
comparison must not hinge on that.
tokens/s is end to end (N over the wall time of the request); "decode" excludes the
time to the first token.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from tokenrelay.providers.local import LocalProvider, embedded_model_path

PROMPT = "Write a long story about a robot who learns to paint."
SEED = 1
T = TypeVar("T")


@dataclass
class Run:
    tokens: int
    seconds: float
    first_token: float
    text: str

    @property
    def tps(self) -> float:
        return self.tokens / self.seconds

    @property
    def decode_tps(self) -> float:
        return (self.tokens - 1) / (self.seconds - self.first_token)


@dataclass
class Side:
    name: str
    runs: dict[int, list[Run]] = field(default_factory=dict)

    def median(self, n: int, attr: str = "tps") -> float:
        return statistics.median(getattr(r, attr) for r in self.runs[n])


async def run_ours(provider: LocalProvider, n: int) -> Run:
    import tokenrelay

    started = time.perf_counter()
    first = None
    async with tokenrelay.astream(
        PROMPT, provider=provider, temperature=0, seed=SEED, max_tokens=n,
        # repeat_penalty 1.0: raw applies none, and the embedded default (1.1, issue 11)
        # would make the two sides sample differently and do different work.
        extra={"ignore_eos": True, "repeat_penalty": 1.0},
    ) as stream:
        async for _ in stream.text_stream():
            if first is None:
                first = time.perf_counter() - started
    seconds = time.perf_counter() - started
    result = stream.result
    assert result.finish_reason == "length", result.finish_reason
    return Run(result.usage.completion_tokens, seconds, first or 0.0, result.text)


def run_raw(llm: object, eog: list[int], n: int, prompt_tokens: int) -> Run:
    llm.reset()  # type: ignore[attr-defined]  # as ours: evaluate the whole prompt
    started = time.perf_counter()
    first = None
    parts = []
    for chunk in llm.create_chat_completion(  # type: ignore[attr-defined]
        [{"role": "user", "content": PROMPT}], stream=True, temperature=0.0, seed=SEED,
        max_tokens=n, logit_bias={str(t): float("-inf") for t in eog},
    ):
        content = chunk["choices"][0]["delta"].get("content")
        if content:
            if first is None:
                first = time.perf_counter() - started
            parts.append(content)
    seconds = time.perf_counter() - started
    # The last sampled token is never evaluated: generated = evaluated - prompt + 1.
    generated = llm.n_tokens - prompt_tokens + 1  # type: ignore[attr-defined]
    return Run(generated, seconds, first or 0.0, "".join(parts))


async def in_fresh_thread(fn: Callable[..., T], *args: object) -> T:
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()

    def target() -> None:
        try:
            result = fn(*args)
        except BaseException as exc:  # noqa: BLE001 -- handed to the awaiting coroutine
            loop.call_soon_threadsafe(future.set_exception, exc)
        else:
            loop.call_soon_threadsafe(future.set_result, result)

    threading.Thread(target=target, daemon=True).start()
    return await future


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--lengths", default="256,1024")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--smoke", action="store_true",
                        help="seconds: one run of 16 tokens, to check the script still runs")
    parser.add_argument("--json", metavar="PATH", help="also write the figures as JSON")
    args = parser.parse_args()
    if args.smoke:
        args.reps, args.lengths, args.threads = 1, "16", 1
    lengths = [int(x) for x in args.lengths.split(",")]
    n_ctx = max(lengths) + 256  # the prompt is ~40 tokens

    import llama_cpp

    path = embedded_model_path()
    ours = LocalProvider(n_threads=args.threads, n_ctx=n_ctx)
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, n_threads=args.threads,
                          n_threads_batch=args.threads, verbose=False)
    vocab = llama_cpp.llama_model_get_vocab(llm.model)
    eog = [t for t in range(llm.n_vocab()) if llama_cpp.llama_vocab_is_eog(vocab, t)]
    from tokenrelay.request import build_request

    prompt_tokens = ours.count_prompt_tokens(build_request(PROMPT))

    load = os.getloadavg()[0]
    print(f"load average {load:.2f} on {os.cpu_count()} cores"
          + (" (busy machine: expect noisy figures)" if load > 1.5 else ""), file=sys.stderr)
    print(f"model {path.name}, n_threads={args.threads}, n_ctx={n_ctx}, prompt "
          f"{prompt_tokens} tokens, greedy, seed {SEED}, {args.reps} runs each, "
          f"llama-cpp-python {llama_cpp.__version__}", file=sys.stderr)
    await run_ours(ours, 16)  # warm-up: load, first decode
    await in_fresh_thread(run_raw, llm, eog, 16, prompt_tokens)

    a = Side("tokenrelay (astream)")
    b = Side("llama-cpp-python raw")
    for rep in range(args.reps):
        for n in lengths:
            for side in ((a, b) if rep % 2 == 0 else (b, a)):
                if side is a:
                    run = await run_ours(ours, n)
                else:
                    run = await in_fresh_thread(run_raw, llm, eog, n, prompt_tokens)
                side.runs.setdefault(n, []).append(run)
                print(f"  rep {rep + 1} N={n:<5} {side.name:<22} {run.tokens:>5} tokens"
                      f" {run.seconds:6.2f}s {run.tps:6.1f} tok/s", file=sys.stderr)

    goals = {256: 0.95, 1024: 1.1}
    print()
    print(f"{'N':>5}  {'side':<22} {'tokens':>14} {'tok/s':>7} {'decode tok/s':>13}")
    ok = True
    for n in lengths:
        for side in (a, b):
            counts = sorted({r.tokens for r in side.runs[n]})
            print(f"{n:>5}  {side.name:<22} {','.join(map(str, counts)):>14}"
                  f" {side.median(n):7.1f} {side.median(n, 'decode_tps'):13.1f}")
        exact = all(r.tokens == n for s in (a, b) for r in s.runs[n])
        same = {r.text for r in a.runs[n]} == {r.text for r in b.runs[n]}
        ratio = a.median(n) / b.median(n)
        decode_ratio = a.median(n, "decode_tps") / b.median(n, "decode_tps")
        goal = goals.get(n)
        verdict = "" if goal is None else (
            f" (goal >= {goal}x: {'met' if ratio >= goal else 'NOT met'})")
        ok = ok and exact and (goal is None or ratio >= goal)
        print(f"       ratio ours/raw {ratio:.3f}x end to end, {decode_ratio:.3f}x decode{verdict};"
              f" exact {n} tokens both sides: {'yes' if exact else 'NO'};"
              f" identical text: {'yes' if same else 'no'}")
    await ours.aclose()
    llm.close()
    if args.json:
        import json

        Path(args.json).write_text(json.dumps({
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "reps": args.reps,
            "tok_s": {n: {"tokenrelay": a.median(n), "raw": b.median(n)} for n in lengths},
            "runs": {n: {"tokenrelay": [r.tps for r in a.runs[n]],
                         "raw": [r.tps for r in b.runs[n]]} for n in lengths}}, indent=2))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
