"""Differential fuzzing of proxy.http1 against aiohttp's client, on the same answer bytes.

A seeded mutator turns a corpus of answers (valid and not) into cases: bytes flipped, inserted
and deleted, headers duplicated, lengths and chunk sizes changed, Content-Length with
Transfer-Encoding, obs-folds, bare LFs, NULs, huge lines. A raw server on 127.0.0.1 sends each
case to both clients and closes; each client's verdict is an answer (status, reason, headers,
body) or an error class (`malformed`, `cut`). Wherever the verdicts differ, the difference must
be one of DELIBERATE, each of which docs/forwarding.md lists.

`make test` runs FUZZ_CASES (default 300) cases of seed FUZZ_SEED (default 18); `make fuzz`
runs many more. A failure prints the seed, the case number and its bytes.
"""

from __future__ import annotations

import asyncio
import os
import random
import re
from dataclasses import dataclass
from typing import Callable

import aiohttp
import pytest
from yarl import URL

from proxy.upstream import http1

SEED = int(os.environ.get("FUZZ_SEED", "18"))
CASES = int(os.environ.get("FUZZ_CASES", "300"))

CORPUS = [
    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 13\r\n\r\n{\"rate\": 1.5}",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTrailer: X-Sum\r\n\r\n"
    b"5\r\nhello\r\n6;ext=1\r\n world\r\n0\r\nX-Sum: 11\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nConnection: close\r\n\r\nuntil the close",
    b"HTTP/1.1 204 No Content\r\nServer: vendor\r\n\r\n",
    b"HTTP/1.1 304 Not Modified\r\nETag: \"v1\"\r\nCache-Control: max-age=60\r\n\r\n",
    b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 201 Created\r\nLocation: /x/1\r\nContent-Length: 2\r\n\r\n{}",
    b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>; rel=preload\r\n\r\n"
    b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nabc",
    b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\nhttp/1.0 body",
    b"HTTP/1.1 200 OK\r\nContent-Encoding: gzip\r\nContent-Length: 10\r\n\r\n\x1f\x8b\x08\x00\x00\r\n\x00\xff\x00\n",
    b"HTTP/1.1 503 Service Unavailable\r\nRetry-After: 5\r\nSet-Cookie: a=1\r\nSet-Cookie: b=2\r\n"
    b"Content-Length: 4\r\n\r\nbusy",
    b"HTTP/1.1 200\r\nContent-Length: 0\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
    b"HTTP/1.1 404 Not Found\r\nContent-Length: 9\r\nConnection: close\r\n\r\nnot found",
]

INTERESTING = b"\r\n \t:\x00\x7f,;0123456789aZ\xff-"


def _head_end(data: bytes) -> int:
    end = data.find(b"\r\n\r\n")
    return end if end >= 0 else len(data)


def _header_lines(data: bytes) -> list[tuple[int, int]]:
    """(start, end) of each header line of the first head, CRLF excluded."""
    lines = []
    start = data.find(b"\r\n") + 2
    end = _head_end(data)
    while 1 < start < end:
        stop = data.find(b"\r\n", start)
        if stop < 0 or stop > end:
            break
        lines.append((start, stop))
        start = stop + 2
    return lines


def flip(rng, data):
    at = rng.randrange(len(data))
    return data[:at] + bytes([rng.choice(INTERESTING)]) + data[at + 1:]


def insert(rng, data):
    at = rng.randrange(len(data) + 1)
    return data[:at] + bytes([rng.choice(INTERESTING)]) + data[at:]


def delete(rng, data):
    at = rng.randrange(len(data))
    return data[:at] + data[at + 1:]


def duplicate_header(rng, data):
    lines = _header_lines(data)
    if not lines:
        return data
    start, stop = rng.choice(lines)
    return data[:stop + 2] + data[start:stop + 2] + data[stop + 2:]


def change_length(rng, data):
    value = rng.choice([b"0", b"1", b"2", b"12", b"14", b"999999", b"-1", b"+3", b"1 2", b"0x10", b"", b"3,3",
                        b"18446744073709551616"])
    replaced = re.sub(rb"(?i)(content-length:[ \t]*)[^\r\n]*", lambda m: m.group(1) + value, data, count=1)
    return replaced if replaced != data else data.replace(b"\r\n", b"\r\nContent-Length: " + value + b"\r\n", 1)


def framing_headers(rng, data):
    header = rng.choice([b"Transfer-Encoding: chunked", b"Transfer-Encoding: chunked, gzip", b"Content-Length: 5",
                         b"Transfer-Encoding: gzip , chunked", b"Transfer-Encoding: chunked\t",
                         b"Transfer-Encoding: gzip", b"Transfer-Encoding: ",
                         b"Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked", b"Connection: close"])
    return data.replace(b"\r\n", b"\r\n" + header + b"\r\n", 1)


def chunk_size(rng, data):
    size = rng.choice([b"0", b"1", b"4", b"ff", b"-1", b"5 ", b"5\t", b"5 ;x", b"fffffffffffffffff", b"5;" + b"e" * 100])
    replaced = re.sub(rb"\r\n[0-9a-fA-F]+(?=[;\r])", b"\r\n" + size, data[_head_end(data):], count=1)
    return data[:_head_end(data)] + replaced


def obs_fold(rng, data):
    lines = _header_lines(data)
    if not lines:
        return data
    start, stop = rng.choice(lines)
    at = rng.randrange(start, stop + 1)
    return data[:at] + rng.choice([b"\r\n ", b"\r\n\t", b" \r\n  ", b"\r\n \r\n x"]) + data[at:]


def bare_lf(rng, data):
    end = _head_end(data) + 4
    if rng.random() < 0.5:
        return data[:end].replace(b"\r\n", b"\n") + data[end:]
    at = data.find(b"\r\n", rng.randrange(len(data)))
    return data if at < 0 else data[:at] + b"\n" + data[at + 2:]


def huge_line(rng, data):
    size = rng.choice([100, 8200, 9000, 40_000, 70_000])
    if rng.random() < 0.5:
        return data.replace(b"\r\n", b"\r\nX-Big: " + b"b" * size + b"\r\n", 1)
    return data.replace(b"\r\n", b" " + b"r" * size + b"\r\n", 1)  # a long reason phrase


def space_before_colon(rng, data):
    lines = _header_lines(data)
    if not lines:
        return data
    start, stop = rng.choice(lines)
    colon = data.find(b":", start, stop)
    return data if colon < 0 else data[:colon] + rng.choice([b" ", b"\t"]) + data[colon:]


def truncate(rng, data):
    return data[:rng.randrange(len(data))]


MUTATIONS = [flip, insert, delete, duplicate_header, change_length, framing_headers, chunk_size, obs_fold,
             bare_lf, huge_line, space_before_colon, truncate]


def case(seed: int, number: int) -> bytes:
    """Case `number` of `seed`: a corpus answer with one to three mutations (none for the first few)."""
    rng = random.Random(f"{seed}:{number}")
    data = CORPUS[number % len(CORPUS)]
    if number >= len(CORPUS):
        for _ in range(rng.randint(1, 3)):
            if data:  # a truncation may have left nothing to mutate
                data = rng.choice(MUTATIONS)(rng, data)
    return data


@dataclass(frozen=True)
class Verdict:
    """What one client made of a case: an answer, or the class of its failure."""

    kind: str                  # answer | malformed | cut | timeout
    status: int = 0
    reason: str = ""
    headers: tuple[tuple[str, str], ...] = ()
    body: bytes = b""
    detail: str = ""           # the error's text (not compared)
    phase: str = ""            # head | body: where our client failed

    def same(self, other: "Verdict") -> bool:
        return (self.kind, self.status, self.reason, self.headers, self.body) == \
            (other.kind, other.status, other.reason, other.headers, other.body)


async def ours(url: URL) -> Verdict:
    pool = http1.Pool(url)
    phase = "head"
    try:
        async with asyncio.timeout(2):
            response = await pool.request("GET", url.raw_path, {}, None, 2.0)
            phase = "body"
            try:
                body, _ = await response.read_all(1 << 24)
            finally:
                response.release()
        return Verdict("answer", response.status, response.reason, tuple(response.headers), body)
    except http1.BadAnswer as exc:
        return Verdict("malformed", detail=str(exc), phase=phase)
    except http1.Disconnected as exc:
        return Verdict("cut", detail=str(exc), phase=phase)
    except TimeoutError:
        return Verdict("timeout", phase=phase)
    finally:
        pool.close()


async def theirs(session: aiohttp.ClientSession, url: URL) -> Verdict:
    try:
        async with asyncio.timeout(2):
            async with session.get(url, allow_redirects=False) as response:
                body = await response.read()
        headers = tuple((n.decode("utf-8", "surrogateescape"), v.decode("utf-8", "surrogateescape"))
                        for n, v in response.raw_headers)
        return Verdict("answer", response.status, response.reason or "", headers, body)
    except aiohttp.ClientResponseError as exc:  # the head did not parse
        return Verdict("malformed", detail=str(exc))
    except aiohttp.ClientPayloadError as exc:   # the body did not: short of its length, or bad framing
        return Verdict("cut" if "Not enough data" in str(exc) else "malformed", detail=str(exc))
    except (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError) as exc:
        return Verdict("cut", detail=str(exc))
    except TimeoutError:
        return Verdict("timeout")


# --- the deliberate differences: each a name, why, and a test on the case's bytes and the two verdicts ---

Rule = Callable[[bytes, Verdict, Verdict], bool]


def refused(reason: str, phase: str = "") -> Rule:
    """We refuse the answer for `reason` (a pattern of our error's text); aiohttp takes it, or fails later."""
    return lambda data, we, they: (we.kind == "malformed" and re.search(reason, we.detail) is not None
                                   and (not phase or we.phase == phase))


def _codings(verdict: Verdict) -> list[str]:
    return [coding.strip().lower() for name, value in verdict.headers if name.lower() == "transfer-encoding"
            for coding in value.split(",")]


def _squeezed(verdict: Verdict) -> tuple:
    return tuple((name, re.sub(r"[ \t]+", " ", value)) for name, value in verdict.headers)


DELIBERATE: list[tuple[str, str, Rule]] = [
    ("control character in a header value",
     "refused: parsers behind the proxy differ on them (NUL truncation, header injection); aiohttp lets all but NUL in",
     refused("Invalid header value char")),
    ("whitespace before a header's colon",
     "refused (RFC 9112 §5.1, a known smuggling vector); aiohttp's llhttp takes it on Content-Length, "
     "Transfer-Encoding and Connection, and frames by it",
     refused("Invalid header field char")),
    ("whitespace before the first header",
     "refused (RFC 9112 §2.2): a header to some parsers, ignored by others; aiohttp takes it for a header",
     refused("before the first header")),
    ("obs-fold in Content-Length, Transfer-Encoding or Connection",
     "refused: framing and persistence must read one way only; aiohttp unfolds them (its llhttp then reads "
     "the Connection tokens before the fold)",
     refused("folded over two lines")),
    ("bare CR",
     "refused: llhttp's lenient mode ends a line at a CR after an empty value, other parsers do not",
     refused("Expected LF after CR")),
    ("a head lenient parsers end early",
     "refused: a space line right after the status line, or a bare CR, ends aiohttp's head before the blank line",
     refused("lenient parsers end early")),
    ("empty Transfer-Encoding or Content-Length",
     "refused: a framing header without a value; aiohttp lets it pass and frames without it",
     refused("^Empty (Transfer-Encoding|Content-Length)")),
    ("Transfer-Encoding ending in chunked that llhttp does not read as chunked",
     "refused (a tab after chunked, say): llhttp would read until the close where RFC 9112 §6.3 says chunks; "
     "aiohttp passes the raw chunks on as the body (when none come, we see a chunked answer cut short)",
     lambda data, we, they: refused("not read as chunked")(data, we, they)
     or (we.kind == "cut" and we.phase == "body" and they.kind == "answer" and _codings(they)[-1:] == ["chunked"])),
    ("bare LF or obs-fold in chunk framing or trailers",
     "refused: the body's framing stays strict; aiohttp takes a bare LF after chunk data and in trailers",
     refused("expected CR|Expected LF|Unexpected whitespace|Invalid header field char", phase="body")),
    ("head over 64 KiB",
     "refused as it arrives, whatever its lines; aiohttp bounds lines and headers, not the whole",
     refused("larger than")),
    ("status below 100",
     "refused: no such status, and whether a body follows it is read two ways (aiohttp reads none)",
     refused("^status 0")),
    ("interim answer announcing a body",
     "refused: llhttp reads a body after a 1xx other than 100-103, aiohttp with it; we would read a head",
     refused("interim answer .* announcing a body")),
    ("upgrade",
     "a 101 nobody asked for is refused; aiohttp hands it back",
     refused("upgrade nobody asked for")),
    ("line over 8190 bytes or over 128 headers",
     "accepted within a 64 KiB head; aiohttp refuses longer lines and more headers",
     lambda data, we, they: we.kind != "malformed" and they.kind == "malformed"
     and re.search("Got more than|Too many headers", they.detail) is not None),
    ("a head cut short by the close",
     "reset (`cut`): a head is judged strictly once whole, and only leniently before; aiohttp may refuse "
     "part of it first",
     lambda data, we, they: we.kind == "cut" and we.phase == "head" and they.kind == "malformed"),
    ("obs-fold whitespace",
     "an obs-fold becomes one space (RFC 9112 §5.2); aiohttp keeps the whitespace around the fold",
     lambda data, we, they: we.kind == they.kind == "answer" and _squeezed(we) == _squeezed(they)
     and (we.status, we.reason, we.body) == (they.status, they.reason, they.body)),
]


TRAILING_BYTES = (
    "bytes after a complete answer",
    "the answer is kept and its connection closed (RFC 9112 §6.3 lets a client discard them); aiohttp fails "
    "the answer when they arrive in the same read")


def deliberate(data: bytes, we: Verdict, they: Verdict) -> str | None:
    """The name of the deliberate difference between the two verdicts, None when they agree,
    or UNEXPECTED (unless `TRAILING_BYTES` explains it: see `verdicts`)."""
    if we.same(they):
        return None
    return next((name for name, _, rule in DELIBERATE if rule(data, we, they)), "UNEXPECTED")


class CaseServer:
    """Sends case `n` to whoever asks for `/n`, then closes the connection."""

    def __init__(self) -> None:
        self.cases: dict[int, bytes] = {}
        self.server: asyncio.Server | None = None

    async def start(self) -> str:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            writer.write(self.cases[int(head.split(b" ", 2)[1].strip(b"/"))])
            await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()


async def verdicts(server: CaseServer, base: str, session: aiohttp.ClientSession, number: int,
                   data: bytes) -> tuple[Verdict, Verdict, str | None]:
    """Both clients' verdicts on `data`, and the name of their deliberate difference (None: the same)."""
    server.cases[number] = data
    url = URL(f"{base}/{number}")
    we, they = await ours(url), await theirs(session, url)
    difference = deliberate(data, we, they)
    if difference == "UNEXPECTED" and we.kind == "answer" and they.kind == "malformed" and data:
        # Our answer, unchanged without the case's last byte, did not use it: bytes followed the answer.
        server.cases[-number - 1] = data[:-1]
        if (await ours(URL(f"{base}/{-number - 1}"))).same(we):
            difference = TRAILING_BYTES[0]
    return we, they, difference


async def run(seed: int, count: int) -> dict[str, int]:
    """Every case of `seed` up to `count`; fails on the first difference no deliberate rule explains."""
    server = CaseServer()
    base = await server.start()
    seen: dict[str, int] = {}
    connector = aiohttp.TCPConnector(force_close=True)
    async with aiohttp.ClientSession(connector=connector, auto_decompress=False) as session:
        try:
            for number in range(count):
                data = case(seed, number)
                we, they, difference = await verdicts(server, base, session, number, data)
                if difference == "UNEXPECTED":
                    pytest.fail(f"FUZZ_SEED={seed} case {number} (rerun: FUZZ_SEED={seed} FUZZ_CASES={number + 1}): "
                                f"a difference nobody decided\n  input:   {data[:2000]!r}\n"
                                f"  ours:    {we}\n  aiohttp: {they}")
                if difference is not None:
                    seen[difference] = seen.get(difference, 0) + 1
                del server.cases[number]
        finally:
            assert server.server is not None
            server.server.close()
    return seen


async def test_http1_and_aiohttp_differ_only_where_we_decided_to():
    print(f"FUZZ_SEED={SEED} FUZZ_CASES={CASES}")
    differences = await run(SEED, CASES)
    print("deliberate differences seen:", differences)


async def test_the_mutator_is_deterministic():
    assert [case(SEED, n) for n in range(50)] == [case(SEED, n) for n in range(50)]
    assert case(SEED, 40) != case(SEED + 1, 40)


def test_the_comparison_names_each_difference_and_catches_undecided_ones():
    answer = Verdict("answer", 200, "OK", (("Content-Length", "2"),), b"ok")
    assert deliberate(b"", answer, answer) is None
    assert deliberate(b"", answer, Verdict("answer", 200, "", answer.headers, b"ok")) == "UNEXPECTED"
    assert deliberate(b"", answer, Verdict("cut")) == "UNEXPECTED"
    refusal = Verdict("malformed", detail="Invalid header field char", phase="head")
    assert deliberate(b"", refusal, answer) == "whitespace before a header's colon"
