"""Three real ``tokenrelay serve`` replicas sharing one real Redis, behind Debian's nginx
running the shipped ``deploy/nginx.conf`` (the harness only points it at the replicas'
ports and keeps its files in a temp dir): frames are not held back, every replica serves,
per-key limits hold exactly across the replicas (and a SIGKILLed replica's slots come
back), and a rolling restart under load loses nothing.

One nginx and three replicas for the whole module (the SIGKILL, the SIGTERMs and the
rolling restart replace replicas' processes, on the same ports; the rolling restart runs
last). The replicas serve the in-process mock; their drain (``drain_timeout_s``) is 1 s,
shorter than the paced answers here, so a SIGTERMed replica hands its running streams
off at the deadline (``producing.py``): its clients' connections break, they resume
through nginx on another replica, which takes the stream over (``takeover.py``) and
finishes it; a background response nobody reads is taken over by the other replicas'
sweepers (``handoff.py``).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import re
import signal
import sqlite3
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest
from _harness import Proc, Processes, free_port, poll, sse_payloads
from _redis import RedisServer, redis_prefix

import tokenrelay
from tokenrelay.providers.openai_compat import OpenAIProvider
from tokenrelay.request import RetryPolicy
from tokenrelay.server.config import hash_key

#: Every replica's drain: the paced answers outlive it (hand-offs).
DRAIN = 1.0
HI = [{"role": "user", "content": "hi"}]
#: ~4 s each: longer than the drain.
PACED = "mock:tokens=20,tps=5"
#: Streams in flight through nginx during the rolling restart, and at most in all.
IN_FLIGHT = 100
MAX_STREAMS = 1000
REPLICAS = 3
#: API keys: one without limits (most tests), one limited to 5 streams at once, one to
#: 60 requests a minute; the limits are shared by the replicas through Redis.
KEYS = {"open": {}, "conc5": {"max_concurrent": 5}, "rpm60": {"requests_per_minute": 60}}
RAW = {name: f"sk-replicas-{name}-{os.urandom(8).hex()}" for name in KEYS}
_ENV_DROP = ("OPENAI_API_KEY", "OPENAI_BASE_URL", "TOKENRELAY_MODEL", "TOKENRELAY_GGUF",
             "TOKENRELAY_LOG", "TOKENRELAY_HOME", "PROMETHEUS_MULTIPROC_DIR")


@dataclass
class Cluster:
    processes: Processes
    workdir: Path
    ports: list[int]
    replicas: list[Proc]
    nginx: Proc
    redis_url: str
    prefix: str

    @property
    def url(self) -> str:
        return self.nginx.url

    def env(self, index: int) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k not in _ENV_DROP}
        env["TOKENRELAY_HOME"] = str(self.workdir / "home")
        env["TOKENRELAY_REPLICA"] = f"r{index + 1}"
        return env

    def start(self, index: int) -> Proc:
        config = {"drain_timeout_s": DRAIN, "metrics_public": True,
                  "log": {"path": str(self.workdir / f"requests-r{index + 1}.db")},
                  "redis": {"url": self.redis_url, "prefix": self.prefix},
                  "keys": [{"id": name, "sha256": hash_key(RAW[name]), **limits}
                           for name, limits in KEYS.items()]}
        proc = self.processes.serve(config, "--port", str(self.ports[index]), "--quiet",
                                    name=f"r{index + 1}", env=self.env(index))
        if index < len(self.replicas):
            self.replicas[index] = proc
        else:
            self.replicas.append(proc)
        return proc


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory,
            redis_server: RedisServer) -> Iterator[Cluster]:
    workdir = tmp_path_factory.mktemp("replicas")
    with Processes(workdir / "processes") as group:
        made = Cluster(group, workdir, [free_port() for _ in range(REPLICAS)], [],
                       None, redis_server.url, redis_prefix())  # type: ignore[arg-type]
        for index in range(REPLICAS):
            made.start(index)
        made.nginx = group.nginx(made.ports)
        yield made


def metrics(url: str) -> str:
    with urllib.request.urlopen(url + "/metrics", timeout=5) as response:
        return str(response.read().decode())


def served(url: str) -> float:
    """Chat completions a replica answered (its ``/metrics``)."""
    text = metrics(url)
    return sum(float(v) for v in re.findall(
        r'^tokenrelay_requests_total\{endpoint="chat.completions"[^}]*\} (\S+)$', text, re.MULTILINE))


#: A frame carrying text (the first frame, the role's, has an empty content).
_TOKEN = re.compile(rb'"content":"[^"]')


@dataclass
class Answer:
    status: int
    text: str
    done: bool
    error: str | None = None
    first_frame_at: float | None = None
    ended_at: float | None = None


async def stream(session: aiohttp.ClientSession, url: str, model: str) -> Answer:
    """One streamed chat completion; its text, whether it ended with [DONE], and when the
    first content frame and the end arrived (monotonic)."""
    body = {"model": model, "messages": HI, "stream": True}
    try:
        async with session.post(url + "/v1/chat/completions", json=body) as response:
            if response.status != 200:
                return Answer(response.status, "", False, (await response.text())[:300])
            raw = b""
            first = None
            async for data in response.content.iter_any():
                raw += data
                if first is None and _TOKEN.search(raw):
                    first = time.monotonic()
            ended = time.monotonic()
    except (aiohttp.ClientError, TimeoutError) as exc:
        return Answer(0, "", False, repr(exc))
    payloads = sse_payloads(raw)
    text = "".join(json.loads(p)["choices"][0]["delta"].get("content") or ""
                   for p in payloads if p != "[DONE]" and json.loads(p).get("choices"))
    errors = [p for p in payloads if p != "[DONE]" and "error" in json.loads(p)]
    return Answer(200, text, bool(payloads) and payloads[-1] == "[DONE]",
                  errors[0] if errors else None, first, ended)


def session(key: str = "open") -> aiohttp.ClientSession:
    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0),
                                 timeout=aiohttp.ClientTimeout(total=60),
                                 headers={"authorization": f"Bearer {RAW[key]}"})


def test_the_deployment_files_hold_together() -> None:
    """What deploy/compose.yaml mounts exists, and the replicas' config loads."""
    from tokenrelay.server.config import load_config

    deploy = Path(__file__).resolve().parents[1] / "deploy"
    compose = (deploy / "compose.yaml").read_text()
    for mounted in re.findall(r"- \./([\w.]+):", compose):
        assert (deploy / mounted).is_file(), mounted
    assert "dockerfile: deploy/Dockerfile" in compose and (deploy / "Dockerfile").is_file()
    config = load_config(deploy / "gateway.toml")
    assert config.redis.url and config.drain_timeout_s < float(
        re.search(r"stop_grace_period: (\d+)s", compose).group(1))  # type: ignore[union-attr]


async def test_the_first_frame_reaches_the_client_before_the_second_is_made(
        cluster: Cluster) -> None:
    # The second token comes 3 s after the first: a proxy that buffers holds the first.
    async with session() as client:
        started = time.monotonic()
        answer = await stream(client, cluster.url, "mock:tokens=2,tps=0.333")
    assert answer.done and answer.error is None, answer
    assert answer.first_frame_at is not None and answer.ended_at is not None
    assert answer.first_frame_at - started < 1.5, answer.first_frame_at - started
    assert answer.ended_at - answer.first_frame_at > 2.0, \
        "the first frame arrived only with the rest: something on the path buffers"


async def test_three_replicas_behind_nginx_all_serve(cluster: Cluster) -> None:
    before = [served(r.url) for r in cluster.replicas]
    n = 30
    async with session() as client:
        answers = await asyncio.gather(*(stream(client, cluster.url, "mock:tokens=10,tps=5")
                                         for _ in range(n)))
    assert all(a.done and a.error is None for a in answers), \
        [a for a in answers if not a.done][:3]
    share = [served(r.url) - b for r, b in zip(cluster.replicas, before, strict=True)]
    assert sum(share) == n, share
    # least_conn: 30 streams at once are spread, not piled on one replica.
    assert min(share) >= n / REPLICAS / 2, share
    names = {re.search(r'tokenrelay_info\{replica="([^"]+)"', metrics(r.url)).group(1)  # type: ignore[union-attr]
             for r in cluster.replicas}
    assert names == {"r1", "r2", "r3"}


async def attempt(client: aiohttp.ClientSession, url: str,
                  model: str) -> aiohttp.ClientResponse | int:
    """Open a stream: the open response (the caller reads or closes it), or the status
    it was refused with."""
    response = await client.post(url + "/v1/chat/completions",
                                 json={"model": model, "messages": HI, "stream": True})
    if response.status == 200:
        return response
    status = response.status
    body = await response.text()
    response.release()
    assert status == 429, (status, body[:300])
    return status


def active(url: str) -> float:
    return sum(float(v) for v in re.findall(r"^tokenrelay_active_streams\{[^}]*\} (\S+)$",
                                            metrics(url), re.MULTILINE))


async def test_a_rate_limit_is_exact_over_three_replicas(cluster: Cluster) -> None:
    """200 requests at once, spread by nginx over three processes: exactly the key's 60
    per minute are admitted, as one process would."""
    async with session("rpm60") as client:
        outcomes = await asyncio.gather(*(attempt(client, cluster.url, "mock:tokens=1")
                                          for _ in range(200)))
        admitted = [o for o in outcomes if not isinstance(o, int)]
        for response in admitted:
            assert (await response.read()).endswith(b"data: [DONE]\n\n")
            response.release()
    assert len(admitted) == 60, len(admitted)


async def test_a_concurrency_limit_is_exact_and_a_killed_replicas_slots_come_back(
        cluster: Cluster) -> None:
    """200 attempts at once on a key with 5 streams at most: exactly 5 run, spread over
    the replicas. SIGKILL a replica holding some: within 5 s as many new streams are
    admitted (its slots' leases lapsed), and no more."""
    long = "mock:tokens=40,tps=2"  # 20 s: none ends during the test
    async with session("conc5") as client:
        outcomes = await asyncio.gather(*(attempt(client, cluster.url, long)
                                          for _ in range(200)))
        held = [o for o in outcomes if not isinstance(o, int)]
        try:
            assert len(held) == 5, len(held)
            per_replica = [active(r.url) for r in cluster.replicas]
            assert sum(per_replica) == 5, per_replica
            victim = max(range(REPLICAS), key=lambda i: per_replica[i])
            lost = int(per_replica[victim])
            killed = cluster.replicas[victim]
            killed.signal(signal.SIGKILL)
            killed.popen.wait(5)
            started = time.monotonic()
            while len(held) < 5 + lost and time.monotonic() - started < 8:
                outcome = await attempt(client, cluster.url, long)
                if isinstance(outcome, int):
                    await asyncio.sleep(0.1)
                else:
                    held.append(outcome)
            took = time.monotonic() - started
            assert len(held) == 5 + lost, f"{lost} slot(s) still held after {took:.1f}s"
            assert took < 5, f"the dead replica's {lost} slot(s) came back after {took:.1f}s"
            # Exactly those: the key is full again.
            assert await attempt(client, cluster.url, long) == 429
        finally:
            for response in held:
                response.close()
    await asyncio.to_thread(cluster.start, victim)
    # The closed streams give their slots back (the next tests' key is another).
    assert await asyncio.to_thread(
        poll, lambda: sum(active(r.url) for r in cluster.replicas) == 0, 10)


# -- hand-off at shutdown: streams longer than the drain ---------------------------------

#: The text of PACED, as the mock makes it (the replicas run the same mock).
REFERENCE = tokenrelay.complete("hi", model="mock:tokens=20").text
#: The library's retries and reconnects: its defaults, as users get them.
RESUMING = RetryPolicy()
#: How long nginx keeps a replica out after a failed connect (deploy/nginx.conf's
#: ``fail_timeout``): a rolling restart waits that long after a replica is back before
#: stopping the next, else nginx may see none alive for a moment (502 "no live upstreams").
FAIL_TIMEOUT = float(re.search(r"fail_timeout=(\d+)s", (
    Path(__file__).resolve().parents[1] / "deploy" / "nginx.conf").read_text()).group(1))  # type: ignore[union-attr]


def library(cluster: Cluster) -> OpenAIProvider:
    """The library, talking to the replicas through nginx as any client would."""
    return OpenAIProvider(base_url=cluster.url + "/v1", api_key=RAW["open"])


async def library_answer(provider: OpenAIProvider, model: str = PACED,
                         first: asyncio.Event | None = None,
                         times: list[float] | None = None) -> tokenrelay.Result:
    async with tokenrelay.astream("hi", model=model, provider=provider,
                                  retry=RESUMING) as s:
        async for _ in s.text_stream():
            if first is not None:
                first.set()
            if times is not None:
                times.append(time.monotonic())
    return s.result


def rows(cluster: Cluster, stream_id: str) -> list[tuple[str, str, str]]:
    """(replica, status, answer) of the request-log rows of one stream, all replicas."""
    out = []
    for index in range(REPLICAS):
        path = cluster.workdir / f"requests-r{index + 1}.db"
        if path.exists():
            with contextlib.closing(sqlite3.connect(path)) as db:
                out += [(f"r{index + 1}", status, answer) for status, answer in db.execute(
                    "SELECT status, answer FROM requests WHERE stream_id = ?", (stream_id,))]
    return sorted(out)


async def sigterm_the_one_serving(cluster: Cluster) -> int:
    """SIGTERM the replica running the (one) stream in flight and wait for its exit
    (its drain, then the hand-off); start it again. Its index."""
    assert await asyncio.to_thread(
        poll, lambda: sum(active(r.url) for r in cluster.replicas) == 1, 5)
    index = next(i for i, r in enumerate(cluster.replicas) if active(r.url) == 1)
    old = cluster.replicas[index]
    code = await asyncio.to_thread(cluster.processes.stop, old, signal.SIGTERM, DRAIN + 10)
    assert code == 0, old.output()[-2000:]
    await asyncio.to_thread(cluster.start, index)
    return index


async def test_sigterm_mid_stream_hands_the_stream_off_and_the_library_resumes(
        cluster: Cluster) -> None:
    """A 4 s answer, its replica SIGTERMed after the first tokens with a 1 s drain: the
    library (through nginx) gets the whole answer, as an uninterrupted run gives it,
    resumed once; the old replica's request-log row says handed_over, the one that
    finished writes the whole answer."""
    first = asyncio.Event()
    times: list[float] = []
    answer = asyncio.ensure_future(library_answer(library(cluster), first=first,
                                                  times=times))
    await asyncio.wait_for(first.wait(), 5)
    started = time.monotonic()
    await sigterm_the_one_serving(cluster)
    result = await answer
    took = time.monotonic() - started
    assert result.error is None and result.finish_reason == "stop", result.error
    assert result.text == REFERENCE, (result.text, REFERENCE)
    assert result.resumes >= 1, "the stream was never broken: it was not handed off"
    gap = max(b - a for a, b in itertools.pairwise(times))
    print(f"handed off and finished elsewhere: {result.resumes} resume(s), the answer"
          f" complete {took:.1f}s after the SIGTERM; the longest pause between two tokens"
          f" {gap:.2f}s (0.2 s apart when paced)")


async def test_a_raw_client_resuming_by_last_event_id_gets_every_frame_once(
        cluster: Cluster) -> None:
    """A plain SSE client: its connection breaks at the hand-off (no [DONE], no error
    frame: an incomplete body); it reconnects through nginx with Last-Event-ID and gets
    the rest, every frame exactly once, the whole answer."""
    headers = {"authorization": f"Bearer {RAW['open']}"}
    body = {"model": PACED, "messages": HI, "stream": True}
    raw = b""
    async with aiohttp.ClientSession(headers=headers) as client:
        async with client.post(cluster.url + "/v1/chat/completions", json=body) as response:
            assert response.status == 200
            stream_id = response.headers["x-tokenrelay-stream-id"]
            killer: asyncio.Future[int] | None = None
            with contextlib.suppress(aiohttp.ClientPayloadError):
                async for data in response.content.iter_any():
                    raw += data
                    if killer is None and _TOKEN.search(raw):
                        killer = asyncio.ensure_future(sigterm_the_one_serving(cluster))
        assert killer is not None
        first = frames_of(raw)
        assert first and first[-1][1] != "[DONE]", "the stream ended: it was not handed off"
        assert all("error" not in json.loads(data) for _, data in first)
        async with client.get(f"{cluster.url}/v1/chat/completions/{stream_id}/stream",
                              headers={"last-event-id": str(first[-1][0])}) as response:
            assert response.status == 200
            rest = frames_of(await response.read())
        await killer
    ids = [seq for seq, _ in first + rest]
    assert ids == list(range(len(ids))), ids  # each frame once, none missing
    assert rest[-1][1] == "[DONE]"
    text = "".join(json.loads(data)["choices"][0]["delta"].get("content") or ""
                   for _, data in first + rest if data != "[DONE]")
    assert text == REFERENCE
    # One row per process: the old one's says it handed the stream over, the one that
    # took it over has the whole answer.
    assert await asyncio.to_thread(poll, lambda: len(rows(cluster, stream_id)) == 2, 5), \
        rows(cluster, stream_id)
    statuses = {status: answer for _, status, answer in rows(cluster, stream_id)}
    assert set(statuses) == {"handed_over", "ok"}, statuses
    assert statuses["ok"] == REFERENCE and REFERENCE.startswith(statuses["handed_over"])
    assert statuses["handed_over"], statuses


def frames_of(raw: bytes) -> list[tuple[int, str]]:
    """(SSE id, data) of each frame in ``raw`` (comments skipped)."""
    out = []
    for block in raw.decode().split("\n\n"):
        fields = dict(line.split(": ", 1) for line in block.split("\n")
                      if line and not line.startswith(":"))
        if "data" in fields:
            out.append((int(fields["id"]), fields["data"]))
    return out


async def test_a_background_response_nobody_reads_is_finished_by_another_replica(
        cluster: Cluster) -> None:
    """``background: true``, its replica SIGTERMed mid-answer, and nobody asks for it
    meanwhile: another replica's sweeper takes it over, so when it is retrieved (after
    the answer's time) it is completed already, with the whole text."""
    headers = {"authorization": f"Bearer {RAW['open']}"}
    async with aiohttp.ClientSession(headers=headers) as client:
        async with client.post(cluster.url + "/v1/responses", json={
                "model": "mock:tokens=15,tps=5", "input": "hi", "background": True}) as r:
            assert r.status == 200, await r.text()
            response_id = (await r.json())["id"]
        started = time.monotonic()
        await asyncio.sleep(0.5)  # a few tokens in
        await sigterm_the_one_serving(cluster)
        await asyncio.sleep(max(0.0, started + 4.5 - time.monotonic()))  # 3 s answer
        async with client.get(f"{cluster.url}/v1/responses/{response_id}") as r:
            obj = await r.json()
    assert obj["status"] == "completed", obj
    text = "".join(part["text"] for item in obj["output"] for part in item["content"])
    assert text == tokenrelay.complete("hi", model="mock:tokens=15").text


@pytest.mark.timeout(180)
async def test_a_rolling_restart_under_load_loses_no_stream(cluster: Cluster) -> None:
    """Every replica SIGTERMed and started again, one after the other, while 100 paced
    streams (~4 s each, the drain 1 s) run through nginx all along, each replaced by a new
    one when it ends, read by the library: 0 failures, every answer complete and equal to
    what the model produced. The streams running at each SIGTERM outlive the drain: they
    are handed off, and their clients resume on the other replicas."""
    provider = library(cluster)
    restarted = threading.Event()
    errors: list[BaseException] = []
    stopped: list[Proc] = []

    def rolling_restart() -> None:
        try:
            time.sleep(1.5)  # streams in flight on every replica first
            for index in range(REPLICAS):
                old = cluster.replicas[index]
                stopped.append(old)
                assert cluster.processes.stop(old, signal.SIGTERM, timeout=DRAIN + 10) == 0, \
                    old.output()[-2000:]
                cluster.start(index)
                time.sleep(FAIL_TIMEOUT + 0.5)  # back in nginx's rotation
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            errors.append(exc)
        finally:
            restarted.set()

    answers: list[tokenrelay.Result | BaseException] = []

    async def one_after_another(delay: float) -> None:
        # A new stream as soon as the last one ended, until the restart is over:
        # IN_FLIGHT of these keep that many streams running, on whichever replica
        # nginx picks for each.
        await asyncio.sleep(delay)
        while not restarted.is_set() and len(answers) < MAX_STREAMS:
            try:
                answers.append(await library_answer(provider))
            except Exception as exc:  # noqa: BLE001 - counted as a failure
                answers.append(exc)

    thread = threading.Thread(target=rolling_restart, name="rolling-restart")
    thread.start()
    started = time.monotonic()
    await asyncio.gather(*(one_after_another(i * 0.015) for i in range(IN_FLIGHT)))
    took = time.monotonic() - started
    thread.join(5)
    assert not errors, errors
    assert restarted.is_set() and len(answers) >= 2 * IN_FLIGHT, len(answers)
    failed = [a for a in answers if not (isinstance(a, tokenrelay.Result)
                                         and a.error is None and a.finish_reason == "stop")]
    assert not failed, f"{len(failed)} of {len(answers)} failed: {failed[:3]}"
    wrong = [a.text for a in answers if isinstance(a, tokenrelay.Result)
             and a.text != REFERENCE]
    assert not wrong, (len(wrong), wrong[:2], REFERENCE)
    resumed = [a.resumes for a in answers if isinstance(a, tokenrelay.Result) and a.resumes]
    # Each replica was SIGTERMed with streams in flight, which outlived its drain: handed
    # off at the deadline (their clients resumed elsewhere).
    handed = [sum(int(n) for n in re.findall(r"(\d+) answer\(s\) still in progress",
                                              p.output())) for p in stopped]
    assert sum(bool(n) for n in handed) >= 2, handed
    assert sum(resumed) >= REPLICAS, resumed
    assert poll(lambda: all(r.alive() for r in cluster.replicas), 5)
    print(f"{len(answers)} streams through nginx in {took:.1f}s, {len(resumed)} resumed"
          f" ({sum(resumed)} resumes), hand-off warnings per SIGTERM: {handed}")
