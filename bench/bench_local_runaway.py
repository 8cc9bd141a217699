"""How long the embedded model runs on, by repetition penalty: the figures behind the
local provider's default output cap and penalty (issue 11: 3,410 tokens for a one-line
translation, 4,062 of ``"Z: "Z:`` for the README's joke, a nested schema looping).

    .venv/bin/python bench/bench_local_runaway.py [--cap 512] [--seeds 3]
        [--penalties 1.0,1.1,1.2,1.3] [--json FILE] [--smoke]

``--smoke`` (the test suite's): one seed, penalties 1.0 and 1.1, cap 8 — seconds, and
proof the script runs; its figures mean nothing. The defaults took ~20 minutes on the
loaded 2-core machine of 2026-12-03 (bench/README.md has that run).

Each prompt runs with the provider's default sampling (temperature 0.2, top-p 0.9) and
several seeds, with the output cap raised to ``--cap`` so that a runaway shows as such.
Printed per prompt and penalty: completion tokens (median, max), how many runs ended
by themselves (``stop``) rather than at the cap, the share of repeated 4-grams (0 =
none, near 1 = a loop), whether the schema's JSON validated, and seconds per run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Any

from pydantic import BaseModel

import tokenrelay
from tokenrelay.providers.local import LocalProvider


class Address(BaseModel):
    street: str
    city: str


class Person(BaseModel):
    name: str
    age: int
    addresses: list[Address]
    tags: list[str]


PROMPTS: list[tuple[str, str, Any]] = [
    ("joke", "Tell me a joke", None),
    ("translation", "Translate into French: The cat is sleeping on the warm windowsill.",
     None),
    ("nested schema", "Invent a person", Person),
]


def repeated_4grams(text: str) -> float:
    words = text.split()
    grams = [tuple(words[i:i + 4]) for i in range(len(words) - 3)]
    return 0.0 if not grams else 1 - len(set(grams)) / len(grams)


def run(provider: LocalProvider, prompt: str, schema: Any, penalty: float, seed: int,
        cap: int) -> tuple[int, str, float, bool | None, float]:
    extra = {"repeat_penalty": penalty}
    started = time.perf_counter()
    with tokenrelay.stream(prompt, provider=provider, max_tokens=cap, seed=seed, extra=extra,
                           response_format=schema, raise_errors=False) as s:
        for _ in s:
            pass
    seconds = time.perf_counter() - started
    result = s.result
    valid = None if schema is None else result.error is None and result.parsed is not None
    return (result.usage.completion_tokens, result.finish_reason,
            repeated_4grams(result.text), valid, seconds)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--cap", type=int, default=512)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--penalties", default="1.0,1.1,1.2,1.3")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", metavar="FILE", help="Also write the rows as JSON.")
    parser.add_argument("--smoke", action="store_true", help="A seconds-long run.")
    args = parser.parse_args()
    if args.smoke:
        args.cap, args.seeds, args.penalties = 8, 1, "1.0,1.1"
    provider = LocalProvider(n_threads=args.threads)
    tokenrelay.complete("Hi", provider=provider, max_tokens=4)  # load the model
    penalties = [float(p) for p in args.penalties.split(",")]
    print(f"cap {args.cap}, seeds 0..{args.seeds - 1}, temperature 0.2 / top-p 0.9")
    print(f"{'prompt':<14} {'penalty':>7} {'tokens med/max':>15} {'stopped':>8}"
          f" {'rep 4-grams':>11} {'valid JSON':>10} {'s/run':>6}")
    out = []
    for name, prompt, schema in PROMPTS:
        for penalty in penalties:
            rows = [run(provider, prompt, schema, penalty, seed, args.cap)
                    for seed in range(args.seeds)]
            tokens = [r[0] for r in rows]
            stopped = sum(r[1] == "stop" for r in rows)
            valid = "-" if schema is None else f"{sum(bool(r[3]) for r in rows)}/{len(rows)}"
            print(f"{name:<14} {penalty:>7.2f} {statistics.median(tokens):>7.0f}/{max(tokens):<7}"
                  f" {stopped:>4}/{len(rows):<3} {max(r[2] for r in rows):>11.2f}"
                  f" {valid:>10} {statistics.median(r[4] for r in rows):>6.1f}", flush=True)
            out.append({"prompt": name, "penalty": penalty, "tokens": tokens,
                        "stopped": stopped, "runs": len(rows),
                        "repeated_4grams": max(r[2] for r in rows),
                        "valid_json": None if schema is None else sum(bool(r[3]) for r in rows),
                        "seconds": [r[4] for r in rows]})
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"cap": args.cap, "seeds": args.seeds, "rows": out}, f, indent=1)


if __name__ == "__main__":
    main()
