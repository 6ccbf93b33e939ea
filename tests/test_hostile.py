"""Hostile and careless clients against the real BridgeServer on 127.0.0.1: request limits (414, 431, 413, 411,
400), ambiguous body framing, field checks, a seeded fuzz over raw sockets, slowloris and request deadlines,
saturation (503 busy), concurrent mixed traffic, token scopes (admin, read, agent, strict mode), the failed-auth
lockout, the audit trail, and a scan of a debug-level log for tokens.

The bridge's clock moves only through the fake clock. Real-time waits are for socket deadlines only, and are
kept short by lowering the server's request_deadline."""
import concurrent.futures
import contextlib
import json
import random
import re
import select
import socket
import string
import threading
import time
import urllib.parse
from pathlib import Path
from typing import NamedTuple

import http.client
import pytest

import clawbridge
from conftest import LiveBridge

MIB = 1024 * 1024
URL_LIMIT = 8192                # request target bytes
HEADER_BYTES_LIMIT = 32 * 1024
HEADER_LINES_LIMIT = 100
LOCKOUT_FAILURES = 10           # failed auths from one address within LOCKOUT_WINDOW lock it out
LOCKOUT_WINDOW = 60
EVICT_AFTER = 1.0               # a waiting connection this old may be evicted for a new one
SHORT_DEADLINE = 0.5            # request_deadline the deadline tests give the server

ADMIN = "adm-7c1e9b24d05f4a83b6e2915c3d8f0a47"
READ = "rd-52f0c7a9e13b4d68a4c7e0b9f61d2a35"
WRONG = "wrg-0b9d3e6f2a1c4857b9e4d2c0a7f31e68"
ACTIVE_LANES = frozenset(("assigned", "in_progress", "blocked", "review"))
HUGE = "__huge_number__"        # stands for 1e400 in bodies built by to_json (json.dumps cannot write it)


# ===== Helpers =====


def to_json(value):
    """JSON text for a body; the HUGE marker becomes 1e400 (and "-" + HUGE -1e400), numbers Python reads as
    infinity."""
    text = json.dumps(value).replace(json.dumps("-" + HUGE), "-1e400")
    return text.replace(json.dumps(HUGE), "1e400").encode()


def bearer(token):
    return {"Authorization": f"Bearer {token}"} if token else {}


def call(port, method, path, body=None, token=None, headers=None, raw=None, source="127.0.0.1", timeout=10):
    """One request on a new connection from the given loopback address: (status, headers, parsed JSON)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout, source_address=(source, 0))
    try:
        data = raw if raw is not None else (None if body is None else to_json(body))
        hdrs = {"Content-Type": "application/json"} if data is not None else {}
        hdrs.update(bearer(token))
        hdrs.update(headers or {})
        conn.request(method, path, body=data, headers=hdrs)
        resp = conn.getresponse()
        payload = resp.read()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, json.loads(payload) if payload else None
    finally:
        conn.close()


def ok(port, method, path, body=None, status=200, **kw):
    """A request that must answer status; returns the parsed body."""
    got, _, data = call(port, method, path, body, **kw)
    assert got == status, (method, path, got, data)
    return data


def error_of(headers, data):
    """The one error shape, as JSON: {"error": {"code", "message", "field"?}, ...}. Returns the inner error."""
    assert headers.get("content-type", "").startswith("application/json"), headers
    assert isinstance(data, dict) and isinstance(data.get("error"), dict), data
    error = data["error"]
    assert re.fullmatch(r"[a-z][a-z0-9_]*", str(error.get("code"))), error
    assert isinstance(error.get("message"), str) and error["message"].strip(), error
    return error


def expect_error(result, status, code=None):
    got, headers, data = result
    assert got == status, (got, data)
    error = error_of(headers, data)
    if code is not None:
        assert error["code"] == code, error
    return headers, error


def b(value):
    return value if isinstance(value, bytes) else str(value).encode("utf-8", "surrogatepass")


def raw_request(method, target, headers=(), body=None, version="HTTP/1.1", length="auto", host=True):
    """Request bytes written by hand. headers: (name, value) pairs, value None for a line with no colon;
    length "auto" sends the true Content-Length when there is a body, None sends none, anything else is sent."""
    lines = [b" ".join(b(part) for part in (method, target, version) if part != "")]
    pairs = ([("Host", "127.0.0.1")] if host else []) + list(headers)
    if length == "auto":
        if body is not None:
            pairs.append(("Content-Length", len(body)))
    elif length is not None:
        pairs.append(("Content-Length", length))
    lines += [b(name) if value is None else b(name) + b": " + b(value) for name, value in pairs]
    return b"\r\n".join(lines) + b"\r\n\r\n" + (body or b"")


def exchange(port, data, source="127.0.0.1", timeout=5.0):
    """Send raw bytes, half-close, and read until the bridge closes. Returns (bytes received, how it ended:
    eof, reset or timeout). A bridge that refuses early may reset before reading everything we sent."""
    received, ended = [], "eof"
    with socket.create_connection(("127.0.0.1", port), timeout=timeout, source_address=(source, 0)) as sock:
        try:
            sock.sendall(data)
            sock.shutdown(socket.SHUT_WR)
        except OSError:     # reset or already shut by the bridge: read what it answered
            pass
        deadline = time.monotonic() + timeout
        while True:
            try:
                chunk = sock.recv(65536)
            except ConnectionResetError:
                ended = "reset"
                break
            except socket.timeout:
                ended = "timeout"
                break
            if not chunk:
                break
            received.append(chunk)
            if time.monotonic() > deadline:
                ended = "timeout"
                break
    return b"".join(received), ended


class Answer(NamedTuple):
    status: int
    headers: dict
    body: bytes

    def json(self):
        return json.loads(self.body) if self.body else None


STATUS_LINE = re.compile(rb"HTTP/1\.[01] (\d{3})(?: [^\r\n]*)?")


def parse_answers(data, head_first=False):
    """Split what the bridge sent into responses (1xx skipped). head_first: the first one answers a HEAD and
    may have no body (tried both ways). ValueError when the bytes are not HTTP responses."""
    if head_first:
        try:
            return parse_answers_from(data, skip_first_body=True)
        except ValueError:
            pass
    return parse_answers_from(data, skip_first_body=False)


def parse_answers_from(data, skip_first_body):
    answers = []
    while data:
        head, sep, rest = data.partition(b"\r\n\r\n")
        first, *lines = head.split(b"\r\n")
        match = STATUS_LINE.fullmatch(first)
        if not sep or not match:
            raise ValueError(f"not an HTTP response: {data[:80]!r}")
        headers = {}
        for line in lines:
            name, _, value = line.decode("latin-1").partition(":")
            headers[name.strip().lower()] = value.strip()
        status = int(match.group(1))
        if status < 200:
            data = rest
            continue
        size = 0 if (skip_first_body and not answers) else int(headers.get("content-length", "0"))
        if len(rest) < size:
            raise ValueError(f"a {status} response was cut short")
        answers.append(Answer(status, headers, rest[:size]))
        data = rest[size:]
    return answers


def first_answer(port, data):
    received, ended = exchange(port, data)
    answers = parse_answers(received)
    assert answers, f"the bridge closed the connection ({ended}) without an answer"
    return answers[0]


def answer_problems(answer, forbidden, field_named=False):
    """What is wrong with one answer to a hostile request: a 5xx other than the protocol answers 501/505 or a
    503 busy, a body that is not JSON or not the error shape, or a body that shows a secret or a path."""
    problems = []
    text = answer.body.decode("utf-8", "replace") + json.dumps(answer.headers)
    try:
        data = answer.json()
    except ValueError:
        return [f"{answer.status} with a body that is not JSON: {answer.body[:120]!r}"]
    error = data.get("error") if isinstance(data, dict) else None
    code = error.get("code") if isinstance(error, dict) else None
    if answer.status >= 500 and answer.status not in (501, 505) and not (answer.status == 503 and code == "busy"):
        problems.append(f"{answer.status} {answer.body[:200]!r}")
    if answer.body and not answer.headers.get("content-type", "").startswith("application/json"):
        problems.append(f"{answer.status} without a JSON content type: {answer.headers}")
    if answer.status >= 400 and answer.body:      # a HEAD is answered with the head only
        if code is None or not re.fullmatch(r"[a-z][a-z0-9_]*", code) \
                or not isinstance(data["error"].get("message"), str):
            problems.append(f"{answer.status} not in the error shape: {answer.body[:200]!r}")
        elif field_named and answer.status == 400 and code != "invalid_json" and not data["error"].get("field"):
            problems.append(f"400 {code} on a JSON object body names no field: {answer.body[:200]!r}")
    problems += [f"{answer.status} shows {secret[:24]!r}" for secret in forbidden if secret in text]
    return problems


def assert_indexes_agree(bridge):
    """The in-memory indexes say what the data says: each agent's active set, the queues, the instance
    members and the unread inboxes. Returns (agents, tasks) as they stood."""
    with bridge.lock:
        state = bridge.state
        agents, tasks, notes = dict(state.agents), dict(state.tasks), dict(state.notifications)
        active = {a: set(state.active.get(a, ())) for a in agents}
        stray = {a: set(ids) for a, ids in state.active.items() if a not in agents and ids}
        queued = {p: list(ids) for p, ids in state.queued.items()}
        members = {i: set(ids) for i, ids in state.members.items()}
        unread = {a: set(state.unread.get(a, ())) for a in agents}
    want = {a: {t.id for t in tasks.values() if t.assignedTo == a and t.lane in ACTIVE_LANES} for a in agents}
    assert active == want
    assert stray == {}
    orphans = [t.id for t in tasks.values() if t.lane in ACTIVE_LANES and t.assignedTo not in agents]
    assert orphans == [], "active tasks held by agents that no longer exist"
    for priority, ids in queued.items():
        assert all(tasks[t].lane == "queued" and tasks[t].priority == priority for t in ids), priority
    assert sorted(t for ids in queued.values() for t in ids) == sorted(t.id for t in tasks.values()
                                                                        if t.lane == "queued")
    for agent in agents.values():
        assert agent.id in members.get(agent.instanceId, set()), agent.id
    assert all(agents[a].instanceId == i for i, ids in members.items() for a in ids if a in agents)
    assert all(a in agents for ids in members.values() for a in ids), "members lists a deleted agent"
    assert unread == {a: {n.id for n in notes.values() if n.agentId == a and not n.read} for a in agents}
    return agents, tasks


def assert_survives_restart(live):
    """Close the bridge and open its data dir again: the same agents, tasks, notifications and instances."""
    with live.bridge.lock:
        before = {s: dict(getattr(live.bridge.state, s)) for s in ("agents", "tasks", "notifications",
                                                                   "instances")}
    close_bridge(live)
    again = clawbridge.Bridge.open(live.config, clock=live.bridge.clock)
    try:
        after = {s: dict(getattr(again.state, s)) for s in before}
    finally:
        again.close()
    for section in before:
        assert after[section] == before[section], section


def close_bridge(live):
    if not getattr(live, "closed", False):
        live.closed = True
        live.close()


@pytest.fixture
def make_bridge(tmp_path, clock):
    """LiveBridge factory (Config fields as keyword arguments); every bridge made is closed at teardown."""
    made = []

    def make(data_dir=None, **settings):
        bridge = LiveBridge(data_dir or tmp_path / f"data{len(made)}", clock=clock, **settings)
        made.append(bridge)
        return bridge

    yield make
    for bridge in made:
        close_bridge(bridge)


def set_request_deadline(live, seconds):
    assert hasattr(live.server, "request_deadline"), "BridgeServer has no request_deadline attribute"
    live.server.request_deadline = seconds


class Crowd:
    """count threads each running fn(n), optionally released together by a barrier."""

    def __init__(self, count, fn, together=False):
        self.results, self.errors = [None] * count, []
        barrier = threading.Barrier(count, timeout=20) if together else None

        def run(n):
            try:
                if barrier:
                    barrier.wait()
                self.results[n] = fn(n)
            except Exception as exc:  # every failure is reported by the test
                self.errors.append(f"{n}: {exc!r}")

        self.threads = [threading.Thread(target=run, args=(n,), daemon=True) for n in range(count)]

    def start(self):
        for thread in self.threads:
            thread.start()
        return self

    def finish(self, timeout):
        deadline = time.monotonic() + timeout
        for thread in self.threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        stuck = sum(thread.is_alive() for thread in self.threads)
        assert stuck == 0, f"{stuck} clients never got an answer"
        assert self.errors == [], self.errors[:5]
        return self.results


SLOW_HEAD = b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: "


@contextlib.contextmanager
def slow_clients(port, count, every=0.003):
    """count connections that never finish a request: half send nothing, half send an endless header one byte
    at a time, round robin. The bridge may close them; that is not an error here."""
    socks = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(count)]
    stop = threading.Event()

    def drip():
        trickling, sent, turn = list(socks[::2]), {}, 0
        while trickling and not stop.wait(every):
            sock = trickling[turn % len(trickling)]
            n = sent.get(sock, 0)
            try:
                sock.send(SLOW_HEAD[n:n + 1] or b"a")
                sent[sock] = n + 1
                turn += 1
            except OSError:
                trickling.remove(sock)

    dripper = threading.Thread(target=drip, daemon=True)
    dripper.start()
    try:
        yield socks
    finally:
        stop.set()
        dripper.join(5)
        for sock in socks:
            sock.close()


def drip_until_closed(sock, drip, limit, every=0.02):
    """Send drip one byte every `every` seconds (nothing when empty) until the bridge closes the connection.
    Returns (seconds until closed or None if still open after limit, bytes received)."""
    started, received, sent, next_send = time.monotonic(), b"", 0, 0.0
    while time.monotonic() - started < limit:
        if sent < len(drip) and time.monotonic() >= next_send:
            try:
                sock.send(drip[sent:sent + 1])
            except (BrokenPipeError, ConnectionResetError):
                return time.monotonic() - started, received
            sent, next_send = sent + 1, time.monotonic() + every
        readable, _, _ = select.select([sock], [], [], 0.01)
        if readable:
            try:
                chunk = sock.recv(65536)
            except ConnectionResetError:
                return time.monotonic() - started, received
            if not chunk:
                return time.monotonic() - started, received
            received += chunk
    return None, received


# ===== Limits and framing =====


def headers_of(count, size):
    return [(f"X-Pad-{n}", "h" * size) for n in range(count)]


def padded_json(body, total):
    """body as JSON padded with spaces to exactly total bytes."""
    raw = json.dumps(body).encode()
    return raw + b" " * (total - len(raw))


LIMIT_CASES = {
    # request target: 8192 bytes is the most a request may have
    "target-8192-ok": (raw_request("GET", "/health?" + "p" * (URL_LIMIT - 8)), 200),
    "target-8193-path": (raw_request("GET", "/" + "a" * URL_LIMIT), 414),
    "target-8193-query": (raw_request("GET", "/health?" + "p" * (URL_LIMIT - 7)), 414),
    "target-60k": (raw_request("GET", "/api/tasks/" + "a" * 60000), 414),
    # header bytes and header lines
    "headers-28k-ok": (raw_request("GET", "/health", headers_of(7, 4000)), 200),
    "headers-34k": (raw_request("GET", "/health", headers_of(9, 3800)), 431),
    "one-header-40k": (raw_request("GET", "/health", [("X-Big", "b" * 40000)]), 431),
    "50-header-lines-ok": (raw_request("GET", "/health", headers_of(49, 8)), 200),
    "101-header-lines": (raw_request("GET", "/health", headers_of(HEADER_LINES_LIMIT, 8)), 431),
    # body size
    "body-1mib-ok": (raw_request("POST", "/api/tasks", [("Content-Type", "application/json")],
                                 padded_json({"title": "big"}, MIB)), 201),
    "body-over-1mib": (raw_request("POST", "/api/tasks", length=MIB + 1), 413),
    # Content-Length
    "post-without-length": (raw_request("POST", "/api/tasks"), 411),
    "put-without-length": (raw_request("PUT", "/api/tasks/t1"), 411),
    "sync-needs-no-body": (raw_request("POST", "/api/sync"), 200),
    **{f"length-{name}": (raw_request("POST", "/api/tasks", body=b'{"title": "x"}', length=value), 400)
       for name, value in (("letters", "abc"), ("negative", "-1"), ("fraction", "14.0"), ("hex", "0xe"),
                           ("two-numbers", "14 14"), ("empty", ""))},
    # nesting
    "json-depth-65": (raw_request("POST", "/api/tasks", body=b'{"title": "x", "d": ' + b'{"a": ' * 64 + b"1"
                                  + b"}" * 64 + b"}"), 400),
    "json-depth-200k": (raw_request("POST", "/api/tasks", body=b"[" * 200000 + b"]" * 200000), 400),
}


@pytest.mark.parametrize("data, status", list(LIMIT_CASES.values()), ids=list(LIMIT_CASES))
def test_every_request_is_bounded_and_refused_as_json(make_bridge, data, status):
    live = make_bridge()
    answer = first_answer(live.port, data)
    assert answer.status == status, (answer.status, answer.body[:300])
    assert answer_problems(answer, [str(Path(live.config.data_dir).parent)]) == []
    if status >= 400:
        error_of(answer.headers, answer.json())
        assert ok(live.port, "GET", "/api/tasks") == [], "a refused request changed something"


HEAD_CASES = {
    # the request line
    "http-1.0": (raw_request("GET", "/health", version="HTTP/1.0"), 200),
    "http-2.0": (raw_request("GET", "/health", version="HTTP/2.0"), 505),
    "version-1.1.1": (raw_request("GET", "/health", version="HTTP/1.1.1"), 400),
    "version-lower-case": (raw_request("GET", "/health", version="http/1.1"), 400),
    "four-words": (b"GET /health extra HTTP/1.1\r\nHost: x\r\n\r\n", 400),
    "http-0.9-post": (b"POST /api/tasks\r\n\r\n", 400),
    # header lines: RFC 9112 asks a server to refuse folded lines and a space before the colon
    "folded-line": (raw_request("GET", "/health", [("X-Fold", "a\r\n  folded")]), 400),
    "space-before-colon": (raw_request("GET", "/health", [("X-Space ", "v")]), 400),
    "no-colon": (raw_request("GET", "/health", [("X-No-Colon", None)]), 400),
    "empty-name": (raw_request("GET", "/health", [("", "v")]), 400),
    "name-with-slash": (raw_request("GET", "/health", [("X/Y", "v")]), 400),
    "tabs-around-value-ok": (raw_request("GET", "/health", [("X-Tab", "\tv\t")]), 200),
    "bare-lf-lines-ok": (b"GET /health HTTP/1.1\nHost: x\nX-A: 1\n\n", 200),
    "latin-1-value-ok": (raw_request("GET", "/health", [("X-Name", b"caf\xe9")]), 200),
    "empty-value-ok": (raw_request("GET", "/health", [("X-Empty", "")]), 200),
}


@pytest.mark.parametrize("data, status", list(HEAD_CASES.values()), ids=list(HEAD_CASES))
def test_request_line_and_header_lines_are_parsed_strictly(make_bridge, data, status):
    """The bridge parses request heads itself: what is valid is served, what is not gets a JSON error and the
    connection is closed (the bytes after a broken head cannot be trusted to start a request)."""
    live = make_bridge()
    received, ended = exchange(live.port, data + raw_request("GET", "/health"))
    answers = parse_answers(received)
    assert answers and answers[0].status == status, (answers[:1], ended)
    if status >= 400:
        error_of(answers[0].headers, answers[0].json())
        assert answers[0].headers.get("connection") == "close"
        assert len(answers) == 1, "a request after a refused head was served"
    else:
        assert answers[0].json()["status"] == "ok"


SMUGGLED = raw_request("POST", "/api/agents/register", body=b'{"id": "smuggled"}')
FRAMING_CASES = {
    "chunked-without-length": [("Transfer-Encoding", "chunked")],
    "chunked-with-length-0": [("Transfer-Encoding", "chunked"), ("Content-Length", "0")],
    "chunked-with-length": [("Transfer-Encoding", "chunked"), ("Content-Length", str(len(SMUGGLED)))],
    "two-lengths-0-first": [("Content-Length", "0"), ("Content-Length", str(len(SMUGGLED)))],
    "two-lengths-0-last": [("Content-Length", str(len(SMUGGLED))), ("Content-Length", "0")],
}


@pytest.mark.parametrize("headers", list(FRAMING_CASES.values()), ids=list(FRAMING_CASES))
@pytest.mark.parametrize("path", ["/api/tasks", "/api/sync"])
def test_ambiguous_framing_is_refused_and_what_follows_never_runs(make_bridge, headers, path):
    """A request whose body length is ambiguous (Transfer-Encoding, two Content-Lengths) is refused and the
    connection closed: the bytes after it must never run as a second request (request smuggling through a
    proxy that frames the body differently)."""
    live = make_bridge()
    received, ended = exchange(live.port, raw_request("POST", path, headers, length=None) + SMUGGLED)
    answers = parse_answers(received)
    assert answers, f"no answer ({ended})"
    assert 400 <= answers[0].status < 500, answers[0]
    error_of(answers[0].headers, answers[0].json())
    assert [a.status for a in answers[1:]] == [], "the bytes after the refused request were served as a request"
    expect_error(call(live.port, "GET", "/api/agents/smuggled"), 404)


def build_field_board(port):
    ok(port, "POST", "/api/agents/register", {"id": "f0", "maxConcurrentTasks": 2}, status=201)
    return ok(port, "POST", "/api/tasks", {"title": "t", "assignedTo": "f0"}, status=201)


FIELD_CASES = [
    ("POST", "/api/agents/register", {"id": "f1", "maxConcurrentTasks": HUGE}, "maxConcurrentTasks"),
    ("POST", "/api/agents/register", {"id": "f1", "heartbeatInterval": "-" + HUGE}, "heartbeatInterval"),
    ("POST", "/api/agents/register", {"id": "f1", "maxConcurrentTasks": 2 ** 70}, "maxConcurrentTasks"),
    ("POST", "/api/agents/register", {"id": "f1", "name": "n" * 201}, "name"),
    ("POST", "/api/agents/register", {"id": "f1", "roles": [1, 2]}, "roles"),
    ("POST", "/api/agents/register", {"id": "f1", "metadata": "flat"}, "metadata"),
    ("POST", "/api/agents/register", {"id": "x" * 65}, "id"),
    ("POST", "/api/agents/register", {"id": ".hidden"}, "id"),
    ("POST", "/api/tasks", {"title": "t" * 201}, "title"),
    ("POST", "/api/tasks", {"title": ["t"]}, "title"),
    ("POST", "/api/tasks", {"title": "t", "description": "d" * (64 * 1024 + 1)}, "description"),
    ("POST", "/api/tasks", {"title": "t", "priority": HUGE}, "priority"),
    ("POST", "/api/tasks", {"title": "t", "tags": "x" * 65}, "tags"),
    ("POST", "/api/agents/f0/heartbeat", {"heartbeatInterval": HUGE}, "heartbeatInterval"),
    ("POST", "/api/agents/f0/heartbeat", {"status": 7}, "status"),
    ("POST", "/api/agents/f0/heartbeat", {"tasks": [{"id": "x", "epoch": HUGE}]}, ("tasks", "tasks[].epoch",
                                                                                  "epoch")),
    ("POST", "/api/tasks/{task}/start", {"agentId": "f0", "epoch": HUGE}, "epoch"),
    ("POST", "/api/tasks/{task}/start", {"agentId": "f0", "epoch": "1"}, "epoch"),
    ("POST", "/api/tasks/{task}/start", {"agentId": ["f0"], "epoch": 1}, "agentId"),
]


@pytest.mark.parametrize("method, path, body, field", FIELD_CASES,
                         ids=[f"{p.rsplit('/', 1)[-1]}-{f if isinstance(f, str) else f[0]}-{n}"
                              for n, (_, p, _, f) in enumerate(FIELD_CASES)])
def test_every_field_is_checked_with_a_400_that_names_it(make_bridge, method, path, body, field):
    live = make_bridge()
    task = build_field_board(live.port)
    before = ok(live.port, "GET", "/api/agents"), ok(live.port, "GET", "/api/tasks")
    _, error = expect_error(call(live.port, method, path.format(task=task["id"]), body), 400)
    assert error.get("field") in ((field,) if isinstance(field, str) else field), error
    assert (ok(live.port, "GET", "/api/agents"), ok(live.port, "GET", "/api/tasks")) == before


@pytest.mark.parametrize("method, path, body", [
    ("POST", "/api/agents/register", {"id": "s1", "name": "bad \ud800 name"}),
    ("POST", "/api/tasks", {"title": "bad \udfff title"}),
    ("POST", "/api/notifications", {"agentId": "f0", "message": "\ud83d alone"}),
], ids=["agent-name", "task-title", "notification-message"])
def test_lone_surrogates_are_refused_or_kept_but_never_break_the_api(make_bridge, method, path, body):
    """A JSON string may spell a lone UTF-16 surrogate (\\ud800), which is no Unicode text. The bridge either
    refuses it naming the field, or stores it and can still answer every read that shows it."""
    live = make_bridge()
    build_field_board(live.port)
    status, headers, data = call(live.port, method, path, body)
    if status == 400:
        assert error_of(headers, data).get("field") in ("name", "title", "message")
    else:
        assert status == 201, (status, data)
    for read in ("/api/agents", "/api/agents/f0", "/api/tasks", "/api/notifications", "/api/agents/f0/notifications"):
        ok(live.port, "GET", read)


def test_unknown_fields_are_ignored(make_bridge):
    live = make_bridge()
    made = ok(live.port, "POST", "/api/agents/register",
              {"id": "u1", "favouriteColour": "green", "nested": {"deep": [1, {"x": None}]}}, status=201)
    task = ok(live.port, "POST", "/api/tasks", {"title": "t", "colour": 1, "assignedTo": "u1"}, status=201)
    reply = ok(live.port, "POST", "/api/agents/u1/heartbeat", {"mood": "happy", "tasks": []})
    assert "favouriteColour" not in made and "nested" not in made and "colour" not in task
    assert [t["id"] for t in reply["tasks"]] == [task["id"]]


# ===== Fuzz =====


class Probe(NamedTuple):
    kind: str
    data: bytes
    source: str
    head: bool = False          # the first request is a HEAD: its answer may have no body
    answer: bool = True         # the bridge must answer (it is some kind of HTTP request)
    json_object: bool = False   # the body is a well-formed JSON object: a 400 must name its field


FUZZ_IDS = ["fz-1", "fz-2", "fz-3", "fz-4"]     # the only ids a fuzz request may change; never the seeded ones
ROLE_WORDS = ["dev", "qa", "ops", "fz"]
FIELDS = ["id", "agentId", "name", "emoji", "roles", "model", "workspace", "instanceId", "hostname", "tailscaleIP",
          "heartbeatInterval", "maxConcurrentTasks", "metadata", "title", "description", "priority", "lane",
          "assignedTo", "tags", "preferredInstance", "force", "epoch", "status", "currentTask", "tasks",
          "readNotifications", "message", "type", "taskId", "reason", "note", "rotateToken", "unknownField"]
SEGMENTS = ["api", "api", "agents", "tasks", "instances", "notifications", "register", "heartbeat", "read",
            "sync", "audit", "capacities", "drain", "undrain", "claim", "start", "complete", "block", "release",
            "health", "ghost", *FUZZ_IDS, "..", ".", "%2e%2e", "%2F", "%00", "%ff", "%", "%zz", "", "é", "\u202e",
            "\udcff", "a" * 70, "x;y", "~", "*", "%20", "\t"]
QUERY_BITS = ["limit=-1", "limit=0", "limit=99999999999", "offset=-3", "lane=%ff", "lane=proposed", "priority=P9",
              "unread=maybe", "unread=true", "assignedTo=none", "assignedTo=%00", "status=zombie", "instanceId=..",
              "role=", "token=junk", "=", "&&", "a=%zz", "limit=1&limit=2", "x=" + "q" * 3000]
ODD_TARGETS = ["*", "http://127.0.0.1/health", "//api//tasks", "/api/tasks/../../etc/passwd", "/%2e%2e/%2e%2e/",
               "/api/agents/%2e%2e/agents", "/..", "/./health", "health", "/api/tasks#frag", "/api/agents/fz-1%2f..",
               "/api/agents/fz-1/heartbeat/", "/API/TASKS", "/api/tasks;x=1", "/health/", "/api/"]
METHODS = ["GET"] * 4 + ["POST"] * 3 + ["PUT", "DELETE", "HEAD", "PATCH", "OPTIONS", "TRACE", "CONNECT", "BREW",
                                        "get", "GeT", "M-SEARCH", "G\tET", "X" * 300, ""]
VERSIONS = ["HTTP/1.1"] * 10 + ["HTTP/1.0", "HTTP/2.0", "HTTP/1.1.1", "HTTP/x", "http/1.1", "HTTP/01.1", "HTTP/1",
                                ""]
BAD_UTF8 = [b"\xff", b"\xc3\x28", b"\xed\xa0\x80", b"\xf8\x88\x80\x80\x80", b"\x80\x80", b"\xe2\x82", b"\xc0\xaf"]
ALPHABET = string.ascii_letters + string.digits + " ._-,\"\\/\x00\x1f\u00e9\u202e\U0001f980"
VERBS = ["claim", "start", "complete", "block", "release"]


class Fuzzer:
    """Hostile requests from one seeded random generator. None of them can validly change a seeded entity:
    paths and bodies name only FUZZ_IDS, the fuzz's own tasks or 'ghost', and the seeded agents are full."""

    def __init__(self, rng, secrets, task_ids):
        self.rng = rng
        self.kinds = [name[4:] for name in dir(self) if name.startswith("gen_")]
        self.tokens = secrets
        self.task_ids = task_ids + ["ghost"]

    def probe(self):
        kind = self.rng.choice(self.kinds)
        fields = getattr(self, "gen_" + kind)()
        source = f"127.{self.rng.randrange(1, 255)}.{self.rng.randrange(256)}.{self.rng.randrange(1, 255)}"
        return Probe(kind, source=source, **fields)

    # --- pieces ---

    def auth(self):
        r = self.rng.random()
        if r < 0.8:
            return [("Authorization", f"Bearer {self.tokens[0]}")]
        return self.rng.choice([[], [("Authorization", f"Bearer {self.tokens[1]}")],
                                [("Authorization", f"Bearer {WRONG}")], [("Authorization", "Basic Zm9vOmJhcg==")],
                                [("Authorization", "Bearer " + "z" * 9000)], [("Authorization", "Bearer")],
                                [("Authorization", f"bearer  {self.tokens[0]}")]])

    def junk(self, depth=0):
        r = self.rng
        kind = r.randrange(15)
        if kind == 0:
            return None
        if kind == 1:
            return r.choice([True, False])
        if kind == 2:
            return r.choice([0, -1, 1, 3, 100, 2 ** 31, 2 ** 53, 2 ** 64, -2 ** 63, 10 ** 30])
        if kind == 3:
            return r.choice([0.5, -0.0, 1e-300, 1e300, 3.0])
        if kind == 4:
            return r.choice([HUGE, "-" + HUGE])
        if kind == 5:
            return "".join(r.choice(ALPHABET) for _ in range(r.choice([0, 1, 10, 64, 65, 200, 201, 1000])))
        if kind == 6:
            return "x" * r.choice([16, 17, 64 * 1024, 64 * 1024 + 1])
        if kind == 7:
            return r.choice(FUZZ_IDS + ["ghost", ".hidden", "a b", "", "x" * 65, "register", "capacities"])
        if kind == 8:
            return r.choice(["queued", "assigned", "in_progress", "blocked", "review", "done", "cancelled",
                             "proposed", "development", "P0", "P3", "P9", "online", "offline", "idle"])
        if kind == 9:
            return ",".join(r.choice(ROLE_WORDS) for _ in range(r.randint(0, 3)))
        if kind == 10 and depth < 3:
            return [self.junk(depth + 1) for _ in range(r.randint(0, 4))]
        if kind == 11 and depth < 3:
            return {r.choice(FIELDS): self.junk(depth + 1) for _ in range(r.randint(0, 4))}
        if kind == 12:
            return r.choice(["100.64.0.1", "::1", "999.1.1.1", "not-an-ip", "fe80::1%eth0"])
        if kind == 13:
            return [{"id": r.choice(FUZZ_IDS + ["ghost"]), "epoch": r.choice([0, 1, -1, HUGE, "1", None])}]
        return r.choice(["\ud800", "a\udfffb", "a\x00b", "\u202e", "é", "\U0001f980"])

    def body_target(self):
        """(method, path, a valid body) of an endpoint that takes JSON; only fuzz-owned entities."""
        r = self.rng
        fz, task = r.choice(FUZZ_IDS), r.choice(self.task_ids)
        return r.choice([
            ("POST", "/api/agents/register", {"id": fz, "instanceId": r.choice(FUZZ_IDS), "roles": ["fz"]}),
            ("POST", "/api/tasks", {"title": "fuzz", "roles": [r.choice(ROLE_WORDS)]}),
            ("POST", "/api/notifications", {"agentId": fz, "message": "m"}),
            ("POST", f"/api/agents/{fz}/heartbeat", {"status": "idle", "tasks": [{"id": task, "epoch": 1}]}),
            ("POST", f"/api/instances/{fz}/heartbeat", {"status": "idle"}),
            ("PUT", f"/api/tasks/{task}", {"priority": "P1"}),
            ("POST", f"/api/tasks/{task}/{r.choice(VERBS)}", {"agentId": fz, "epoch": r.randint(0, 3)}),
            ("PUT", "/api/notifications/ghost/read", {}),
            ("GET", "/api/tasks", {}),
            ("POST", "/api/sync", {}),
            ("DELETE", "/api/tasks/ghost", {}),
        ])

    def payload(self, base):
        """A valid body with one to three fields replaced by junk, so that the deep checks are reached."""
        body = dict(base)
        for field in self.rng.sample(FIELDS, self.rng.choice([0, 1, 1, 1, 2, 3])):
            body[field] = self.junk()
        for field in ("assignedTo", "instanceId", "preferredInstance"):
            if isinstance(body.get(field), str) and body[field].startswith("seed"):
                body[field] = "ghost"
        return body

    def json_parts(self):
        method, target, base = self.body_target()
        return method, target, to_json(self.payload(base))

    def target(self):
        r = self.rng
        shape = r.randrange(8)
        if shape == 0:
            return r.choice(ODD_TARGETS)
        if shape == 1:
            return "/" + "a" * r.choice([5000, URL_LIMIT, URL_LIMIT + 1, 20000, 70000])
        path = "/" + "/".join(r.choice(SEGMENTS) for _ in range(r.randint(0, 6)))
        if r.random() < 0.2:
            path = "/" + path
        if r.random() < 0.3:
            path += "?" + "&".join(r.choice(QUERY_BITS) for _ in range(r.randint(1, 4)))
        return path

    def json_request(self, body=None, **kw):
        method, target, valid = self.json_parts()
        body = valid if body is None else body
        headers = [("Content-Type", "application/json")] + self.auth()
        return raw_request(method, target, headers, body, **kw)

    # --- generators: each returns the fields of a Probe ---

    def gen_random_bytes(self):
        r = self.rng
        data = r.randbytes(r.choice([0, 1, 5, 50, 500, 3000]))
        if r.random() < 0.4:
            data = r.choice([b"GET / HTTP/1.1\r\n", b"POST /api/tasks HTTP/1.1\r\nContent-Length: 40\r\n\r\n",
                             b"GET /health HTTP/1.1\r\nHost: "]) + data
        return dict(data=data, answer=False)

    def gen_valid_json_junk_fields(self):
        return dict(data=self.json_request(), json_object=True)

    def gen_truncated_json(self):
        body = self.json_parts()[2]
        return dict(data=self.json_request(body[:self.rng.randrange(1, len(body))]))

    def gen_lying_length(self):
        r = self.rng
        body = self.json_parts()[2]
        length = r.choice([len(body) - r.randint(1, len(body)), len(body) + r.randint(1, 100), MIB, 10 ** 12])
        return dict(data=self.json_request(body, length=max(length, 0)))

    def gen_deep_nesting(self):
        r = self.rng
        depth = r.choice([63, 64, 65, 100, 1000, 50000, 200000])
        shape = r.randrange(3)
        if shape == 0:
            body = b"[" * depth + b"]" * depth
        elif shape == 1:
            body = (b'{"id": "' + r.choice(FUZZ_IDS).encode() + b'", "metadata": ' + b'{"a": ' * depth + b"1"
                    + b"}" * depth + b"}")
        else:
            body = r.choice([b"[", b'{"a": ']) * depth
        return dict(data=self.json_request(body))

    def gen_invalid_utf8(self):
        r = self.rng
        bad = r.choice(BAD_UTF8)
        where = r.randrange(4)
        if where == 0:
            return dict(data=self.json_request(b'{"title": "x' + bad + b'", "id": "fz-1", "agentId": "fz-2"}'))
        if where == 1:
            return dict(data=raw_request("GET", b"/api/agents/" + bad, self.auth()))
        if where == 2:
            return dict(data=raw_request("GET", "/api/tasks", [("X-Name", bad)] + self.auth()))
        return dict(data=raw_request("GET", "/api/tasks", [("Authorization", b"Bearer " + bad)]))

    def gen_odd_method_and_path(self):
        r = self.rng
        method, version = r.choice(METHODS), r.choice(VERSIONS)
        body = r.choice([None, None, b"", b"{}", self.json_parts()[2][:200]])
        data = raw_request(method, self.target(), self.auth(), body, version=version)
        return dict(data=data, head=method == "HEAD")

    def gen_header_flood(self):
        r = self.rng
        style = r.randrange(6)
        if style == 0:
            headers = [(f"X-F{n}", "v" * r.randint(1, 50)) for n in range(r.choice([98, 99, 100, 150, 400]))]
        elif style == 1:
            headers = [("X-Big", "b" * r.choice([8000, 32000, 33000, 70000]))]
        elif style == 2:
            headers = [("X-Dup", "1")] * r.randint(50, 200)
        elif style == 3:
            headers = [("NoColonHere", None), ("  leading-space", "x"), (":", "empty-name")]
        elif style == 4:
            headers = [("X-Fold", "a\r\n  folded"), ("X-Fold2", "b\r\n\tfolded")]
        else:
            headers = headers_of(30, 1200)
        method, target = r.choice([("GET", "/health"), ("GET", "/api/tasks"), ("POST", "/api/tasks")])
        body = b'{"title": "flood"' if method == "POST" else None
        return dict(data=raw_request(method, target, headers + self.auth(), body))

    def gen_duplicate_length(self):
        r = self.rng
        method, target, body = self.json_parts()
        pair = r.choice([(len(body), len(body)), (len(body), 0), (0, len(body)), (len(body), len(body) + 5),
                         (len(body), f"{len(body)}, {len(body)}")])
        headers = [("Content-Length", pair[0]), ("Content-Length", pair[1])] + self.auth()
        return dict(data=raw_request(method, target, headers, body, length=None))

    def gen_nul_bytes(self):
        r = self.rng
        data = bytearray(self.json_request())
        for _ in range(r.randint(1, 3)):
            data.insert(r.randrange(len(data)), 0)
        return dict(data=bytes(data))

    def gen_smuggling(self):
        r = self.rng
        second = raw_request(r.choice(["GET", "POST"]), r.choice(["/api/agents/ghost", "/api/tasks/ghost/start"]),
                             self.auth())
        encoding = r.choice(["chunked", " chunked", "chunked, identity", "identity", "xchunked", "Chunked"])
        body = r.choice([second, b"0\r\n\r\n" + second, b"5\r\n{\"a\":\r\n0\r\n\r\n", b"zz\r\n"])
        length = r.choice([None, 0, len(body), len(body) + 3])
        method, target, _ = self.body_target()
        headers = [("Transfer-Encoding", encoding)] + self.auth()
        return dict(data=raw_request(method, target, headers, body, length=length))

    def gen_expect_continue(self):
        r = self.rng
        method, target, body = self.json_parts()
        length = r.choice([len(body), 2 * MIB, 0])
        headers = [("Expect", r.choice(["100-continue", "100-Continue", "200-ok"]))] + self.auth()
        return dict(data=raw_request(method, target, headers, body if length else None, length=length))


FUZZ_SEEDS = [20240601, 31337]
PROBES_PER_SEED = 1500


def seed_fleet(port):
    """Entities the fuzz must not touch: two full agents (one task in progress, one blocked), a task queued
    for a role nobody has, a finished task and a notification. Returns the agent tokens handed out."""
    tokens = []
    for agent_id in ("seed-a", "seed-b"):
        made = ok(port, "POST", "/api/agents/register",
                  {"id": agent_id, "instanceId": "seed-inst", "roles": ["seed"], "maxConcurrentTasks": 1},
                  status=201, token=ADMIN)
        tokens.append(made.get("agentToken") or "")
    for verb in ("start", "block"):
        task = ok(port, "POST", "/api/tasks", {"title": f"seed {verb}", "roles": ["seed"]}, status=201, token=ADMIN)
        ok(port, "POST", f"/api/tasks/{task['id']}/{verb}", {"agentId": task["assignedTo"], "epoch": task["epoch"]},
           token=ADMIN)
    ok(port, "POST", "/api/tasks", {"title": "seed waits", "roles": ["seed-only"]}, status=201, token=ADMIN)
    ok(port, "POST", "/api/tasks", {"title": "seed done", "lane": "done"}, status=201, token=ADMIN)
    ok(port, "POST", "/api/notifications", {"agentId": "seed-a", "message": "seed note"}, status=201, token=ADMIN)
    return [t for t in tokens if t]


def fuzz_playground(port):
    """The agents and tasks the fuzz may change, so that its valid-looking requests reach the deep checks."""
    for n, agent_id in enumerate(FUZZ_IDS):
        ok(port, "POST", "/api/agents/register", {"id": agent_id, "instanceId": FUZZ_IDS[n % 2], "roles": ["fz"]},
           status=201, token=ADMIN)
    return [ok(port, "POST", "/api/tasks", {"title": "fuzz", "roles": ["fz"]}, status=201, token=ADMIN)["id"]
            for _ in range(6)]


def seeded_views(port):
    """Everything a client can read about the seeded entities."""
    views = {path: ok(port, "GET", path, token=ADMIN) for path in (
        "/api/agents/seed-a", "/api/agents/seed-b", "/api/agents/seed-a/tasks", "/api/agents/seed-b/tasks",
        "/api/agents/seed-a/notifications", "/api/instances/seed-inst")}
    views["tasks"] = [t for t in ok(port, "GET", "/api/tasks", token=ADMIN) if t["title"].startswith("seed")]
    return views


def run_probe(port, probe):
    data, ended = exchange(port, probe.data, source=probe.source)
    return probe, data, ended


@pytest.mark.parametrize("seed", FUZZ_SEEDS)
def test_seeded_fuzz_never_5xx_leaks_nothing_and_leaves_state_intact(make_bridge, tmp_path, seed):
    live = make_bridge(token=ADMIN, read_token=READ)
    port = live.port
    agent_tokens = seed_fleet(port)
    before = seeded_views(port)
    fuzzer = Fuzzer(random.Random(seed), (ADMIN, READ), fuzz_playground(port))
    probes = [fuzzer.probe() for _ in range(PROBES_PER_SEED)]
    forbidden = [ADMIN, READ, *agent_tokens, str(tmp_path), "Traceback", 'File "/']

    with concurrent.futures.ThreadPoolExecutor(max_workers=8) as pool:
        outcomes = list(pool.map(lambda p: run_probe(port, p), probes))

    problems, answered = [], 0
    for probe, data, ended in outcomes:
        line, body = probe.data.partition(b"\r\n")[0], probe.data.partition(b"\r\n\r\n")[2]
        where = f"[{probe.kind}] {line[:100]!r} body {body[:160]!r}"
        try:
            answers = parse_answers(data, head_first=probe.head)
        except ValueError as exc:
            problems.append(f"{where}: {exc}")
            continue
        answered += bool(answers)
        if ended == "timeout":
            problems.append(f"{where}: neither answered nor closed within 5 s")
        elif probe.answer and not answers:
            problems.append(f"{where}: connection closed ({ended}) without an answer")
        for answer in answers:
            problems += [f"{where}: {p}" for p in answer_problems(answer, forbidden, probe.json_object)]
    assert problems == [], f"{len(problems)} problems, first ones:\n" + "\n".join(problems[:15])
    assert answered > 0.9 * len(probes)

    # the bridge serves normally, and what existed before is untouched
    assert ok(port, "GET", "/health")["status"] == "ok"
    for path in ("/api/agents", "/api/tasks", "/api/notifications", "/api/instances", "/api/instances/capacities",
                 "/api/audit"):
        ok(port, "GET", path, token=ADMIN)
    assert seeded_views(port) == before
    ok(port, "POST", "/api/agents/register", {"id": "after-fuzz", "roles": ["after"]}, status=201, token=ADMIN)
    task = ok(port, "POST", "/api/tasks", {"title": "after", "roles": ["after"]}, status=201, token=ADMIN)
    assert task["assignedTo"] == "after-fuzz"
    reply = ok(port, "POST", "/api/agents/after-fuzz/heartbeat", {}, token=ADMIN)
    assert task["id"] in [t["id"] for t in reply["tasks"]]
    assert_indexes_agree(live.bridge)
    assert_survives_restart(live)


# ===== Slow clients, deadlines, saturation =====


def test_slowloris_does_not_stop_health(make_bridge):
    live = make_bridge()
    with slow_clients(live.port, 300):
        time.sleep(EVICT_AFTER + 0.2)    # real time: the slow clients are old enough to give way
        for _ in range(3):
            started = time.monotonic()
            status, _, data = call(live.port, "GET", "/health", timeout=5)
            elapsed = time.monotonic() - started
            assert status == 200 and data["status"] == "ok"
            assert elapsed < 2.0, f"/health took {elapsed:.2f}s behind 300 slow clients"


HEAD_ONLY = raw_request("POST", "/api/tasks", [("Content-Type", "application/json")], length=1000)
DRIP_CASES = {
    "silent": (b"", b"", 0),
    "head-a-byte-at-a-time": (b"", SLOW_HEAD + b"a" * 10000, 0),
    "body-a-byte-at-a-time": (HEAD_ONLY, b'{"title": "' + b"a" * 10000, 0),
    "idle-after-a-request": (b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n", b"", 1),
}


@pytest.mark.parametrize("sent, drip, served", list(DRIP_CASES.values()), ids=list(DRIP_CASES))
def test_a_connection_without_a_complete_request_is_closed_after_the_deadline(make_bridge, sent, drip, served):
    live = make_bridge()
    set_request_deadline(live, SHORT_DEADLINE)
    with socket.create_connection(("127.0.0.1", live.port), timeout=5) as sock:
        sock.sendall(sent)
        elapsed, received = drip_until_closed(sock, drip, limit=SHORT_DEADLINE + 3.5)
    assert elapsed is not None, f"still open after {SHORT_DEADLINE + 3.5}s"
    assert elapsed <= SHORT_DEADLINE + 1.5, f"closed only after {elapsed:.2f}s"
    answers = parse_answers(received)
    assert [a.status for a in answers[:served]] == [200] * served
    for answer in answers[served:]:         # a goodbye (408) is welcome, a 5xx is not
        assert 400 <= answer.status < 500 and answer_problems(answer, []) == [], answer


def test_a_slow_request_that_completes_within_the_deadline_is_served(make_bridge):
    live = make_bridge()
    set_request_deadline(live, SHORT_DEADLINE)
    request = b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    with socket.create_connection(("127.0.0.1", live.port), timeout=5) as sock:
        for n in range(0, len(request), 10):
            sock.sendall(request[n:n + 10])
            time.sleep(0.02)
        _, received = drip_until_closed(sock, b"", limit=3)
    assert [a.status for a in parse_answers(received)] == [200]


def test_the_kernel_keeps_a_connection_timeout_without_a_python_one():
    """kernel_timeout leaves the socket blocking (no poll before each recv and send) and a recv that waits
    past the timeout raises the TimeoutError of a Python socket timeout, through KernelTimedIO."""
    left, right = socket.socketpair()
    with left, right:
        assert clawbridge.kernel_timeout(left, 0.3)
        assert left.gettimeout() is None
        reader = clawbridge.KernelTimedIO(left, "rb")
        right.sendall(b"ping")
        assert reader.readinto(bytearray(16)) == 4
        started = time.monotonic()
        with pytest.raises(socket.timeout):
            reader.readinto(bytearray(16))
        assert 0.2 <= time.monotonic() - started < 3.0
        writer = clawbridge.KernelTimedIO(left, "wb")
        with pytest.raises(socket.timeout):     # nobody reads the other end: the send buffer fills, then waits
            for _ in range(1000):               # far more than any socket buffer holds
                writer.write(b"x" * 65536)


@pytest.mark.parametrize("kept_by", ["kernel", "python"])
@pytest.mark.parametrize("sent", [b"", HEAD_ONLY + b'{"title": "half'], ids=["silent", "stalled-body"])
def test_a_client_silent_past_the_socket_timeout_is_dropped(make_bridge, monkeypatch, sent, kept_by):
    """The socket timeout (30 s in service) is the backstop behind the request deadline: with the deadline
    far away, a connection silent for longer than the timeout is closed, a body cut short answered with 408,
    nothing saved; the same where the kernel does not keep the timeout and Python's is used."""
    if kept_by == "python":
        monkeypatch.setattr(clawbridge, "kernel_timeout", lambda sock, seconds: False)
    live = make_bridge()
    set_request_deadline(live, 60.0)
    live.server.RequestHandlerClass = type("ShortTimeout", (clawbridge.Handler,), {"timeout": 0.5})
    with socket.create_connection(("127.0.0.1", live.port), timeout=5) as sock:
        sock.sendall(sent)
        elapsed, received = drip_until_closed(sock, b"", limit=5)
    assert elapsed is not None and 0.4 <= elapsed <= 3.0, elapsed
    answers = parse_answers(received)
    assert [a.status for a in answers] == ([408] if sent else []), received[:300]
    assert all(answer_problems(a, []) == [] for a in answers), answers
    assert ok(live.port, "GET", "/health")["status"] == "ok"
    assert ok(live.port, "GET", "/api/tasks", token=ADMIN) == []


@pytest.mark.parametrize("idle_first", [0, 200], ids=["alone", "beside-200-slow-clients"])
def test_300_concurrent_fast_requests_on_new_connections_all_succeed(make_bridge, idle_first):
    """More connections than MAX_CONNECTIONS: room is made from slow clients, never from fast ones."""
    live = make_bridge()
    port = live.port

    def one(n):
        if n % 2:
            return call(port, "GET", "/health", timeout=20)[0]
        return call(port, "POST", "/api/agents/register", {"id": f"fast-{n}"}, timeout=20)[0]

    with slow_clients(port, idle_first):
        if idle_first:
            time.sleep(EVICT_AFTER + 0.2)
        results = Crowd(300, one, together=True).start().finish(40)
    assert results == [201 if n % 2 == 0 else 200 for n in range(300)]
    assert len(ok(port, "GET", "/api/agents")) == 150


def test_a_bridge_full_of_busy_requests_answers_503_busy_instead_of_queueing(make_bridge, monkeypatch):
    live = make_bridge()
    limit = getattr(clawbridge, "MAX_CONNECTIONS", 256)
    gate, inside, cond = threading.Event(), [0], threading.Condition()
    real_health = live.bridge.health

    def held_health(*args, **kwargs):
        with cond:
            inside[0] += 1
            cond.notify_all()
        gate.wait(30)
        return real_health(*args, **kwargs)

    monkeypatch.setattr(live.bridge, "health", held_health)
    crowd = Crowd(limit, lambda n: call(live.port, "GET", "/health", timeout=40)[0]).start()
    try:
        with cond:
            full = cond.wait_for(lambda: inside[0] >= limit, 20)
        assert full, f"only {inside[0]} of {limit} requests reached the bridge"
        started = time.monotonic()
        result = call(live.port, "GET", "/api/tasks", timeout=10)
        elapsed = time.monotonic() - started
    finally:
        gate.set()
    headers, _ = expect_error(result, 503, "busy")
    assert headers.get("retry-after", "").isdigit(), headers
    assert elapsed < 3.0, f"the 503 took {elapsed:.2f}s"
    assert crowd.finish(30) == [200] * limit, "a request being processed was dropped"
    assert ok(live.port, "GET", "/health")["status"] == "ok"


# ===== Concurrency =====


MIX_INSTANCES = ["mix-inst-0", "mix-inst-1", "mix-inst-2"]


class Mix:
    """One thread's share of mixed traffic; statuses and stale-epoch answers are collected for the checks."""

    def __init__(self, port, rng, agents, tasks, lock):
        self.port, self.rng, self.agents, self.tasks, self.lock = port, rng, agents, tasks, lock
        self.statuses, self.stale, self.verbs_done = [], [], 0

    def send(self, method, path, body=None):
        status, _, data = call(self.port, method, path, body, timeout=20)
        self.statuses.append((method, path, status))
        return status, data

    def some_task(self):
        with self.lock:
            return self.rng.choice(self.tasks) if self.tasks else None

    def current(self):
        task_id = self.some_task()
        if task_id is None:
            return None
        status, data = self.send("GET", f"/api/tasks/{task_id}")
        return data if status == 200 else None

    def op_register(self):
        agent_id = self.rng.choice(self.agents + ["mix-new-1", "mix-new-2"])
        self.send("POST", "/api/agents/register", {"id": agent_id, "instanceId": self.rng.choice(MIX_INSTANCES),
                                                   "roles": [self.rng.choice(["dev", "qa"])], "maxConcurrentTasks": 2})

    def op_beat(self):
        held = [{"id": t, "epoch": self.rng.randint(0, 3)} for t in [self.some_task()] if t]
        self.send("POST", f"/api/agents/{self.rng.choice(self.agents)}/heartbeat", {"tasks": held})

    def op_instance_beat(self):
        self.send("POST", f"/api/instances/{self.rng.choice(MIX_INSTANCES)}/heartbeat", {})

    def op_create(self):
        body = {"title": "mix", "priority": self.rng.choice(["P0", "P1", "P2", "P3"]),
                "roles": self.rng.choice([[], ["dev"], ["qa"]])}
        if self.rng.random() < 0.3:
            body["assignedTo"] = self.rng.choice(self.agents)
        status, data = self.send("POST", "/api/tasks", body)
        if status == 201:
            with self.lock:
                self.tasks.append(data["id"])

    def op_reassign(self):
        task_id = self.some_task()
        if task_id:
            self.send("PUT", f"/api/tasks/{task_id}", {"assignedTo": self.rng.choice(self.agents)})

    def op_verb(self):
        task = self.current()
        if task is None:
            return
        verb = "claim" if task["lane"] == "queued" else self.rng.choice(VERBS)
        agent_id = task["assignedTo"] or self.rng.choice(self.agents)
        status, _ = self.send("POST", f"/api/tasks/{task['id']}/{verb}", {"agentId": agent_id, "epoch": task["epoch"]})
        self.verbs_done += status == 200

    def op_stale_verb(self):
        task = self.current()
        if task and task["epoch"] >= 1 and task["assignedTo"]:
            status, data = self.send("POST", f"/api/tasks/{task['id']}/{self.rng.choice(VERBS)}",
                                     {"agentId": task["assignedTo"], "epoch": task["epoch"] - 1})
            self.stale.append((task["id"], status, data))

    def op_delete_task(self):
        task_id = self.some_task()
        if task_id:
            self.send("DELETE", f"/api/tasks/{task_id}")

    def op_read(self):
        self.send("GET", self.rng.choice(["/api/agents", "/api/tasks", "/api/instances/capacities",
                                          "/api/notifications"]))

    def op_sync(self):
        self.send("POST", "/api/sync")

    WEIGHTS = {"register": 2, "beat": 4, "instance_beat": 1, "create": 4, "reassign": 3, "verb": 5,
               "stale_verb": 3, "delete_task": 1, "read": 2, "sync": 1}

    def run(self, count):
        names = [name for name, weight in self.WEIGHTS.items() for _ in range(weight)]
        for _ in range(count):
            getattr(self, "op_" + self.rng.choice(names))()
        return self


def test_concurrent_mixed_traffic_never_5xx_and_indexes_agree(make_bridge):
    live = make_bridge()
    agents = [f"mix-{n}" for n in range(10)]
    for n, agent_id in enumerate(agents):
        ok(live.port, "POST", "/api/agents/register", {"id": agent_id, "instanceId": MIX_INSTANCES[n % 3],
                                                       "roles": [["dev", "qa"][n % 2]], "maxConcurrentTasks": 2},
           status=201)
    tasks, lock = [], threading.Lock()
    mixes = Crowd(16, lambda n: Mix(live.port, random.Random(7000 + n), agents, tasks, lock).run(30),
                  together=True).start().finish(60)

    statuses = [s for mix in mixes for s in mix.statuses]
    assert [s for s in statuses if not 200 <= s[2] < 500] == []
    # an old epoch is refused for good (or the task was deleted meanwhile)
    stale = [s for mix in mixes for s in mix.stale]
    refused = [data for _, status, data in stale if status == 409]
    assert [s for s in stale if s[1] != 409 and s[2]["error"]["code"] != "task_not_found"] == []
    assert refused and all(data["currentEpoch"] > 0 for data in refused)
    assert sum(mix.verbs_done for mix in mixes) > 0 and len(tasks) > 20
    found_agents, _ = assert_indexes_agree(live.bridge)
    with live.bridge.lock:
        over = {a.id: len(live.bridge.state.active.get(a.id, ())) for a in found_agents.values()
                if len(live.bridge.state.active.get(a.id, ())) > a.maxConcurrentTasks}
    assert over == {}, "agents above their maxConcurrentTasks"
    assert_survives_restart(live)


# ===== Tokens and scopes =====


class Fleet(NamedTuple):
    live: object
    tokens: dict
    ctx: dict


def build_fleet(make_bridge, strict=False):
    """A secured bridge with agents alpha (inst-a) and beta (inst-b), a task and a notification each."""
    live = make_bridge(token=ADMIN, read_token=READ, require_agent_tokens=strict)
    tokens = {"admin": ADMIN, "read": READ, "wrong": WRONG, "none": None}
    ctx = {}
    for key, agent_id in (("a", "alpha"), ("b", "beta")):
        made = ok(live.port, "POST", "/api/agents/register",
                  {"id": agent_id, "instanceId": f"inst-{key}", "maxConcurrentTasks": 5}, status=201, token=ADMIN)
        assert isinstance(made.get("agentToken"), str) and made["agentToken"], made
        tokens[agent_id] = made["agentToken"]
        task = ok(live.port, "POST", "/api/tasks", {"title": f"for {agent_id}", "assignedTo": agent_id}, status=201,
                  token=ADMIN)
        note = ok(live.port, "POST", "/api/notifications", {"agentId": agent_id, "message": "hi"}, status=201,
                  token=ADMIN)
        ctx.update({f"t{key}": task["id"], f"e{key}": task["epoch"], f"n{key}": note["id"]})
    return Fleet(live, tokens, ctx)


def fill(value, ctx):
    """Put the fleet's ids into a path or body: "@ea" is ctx["ea"] itself, "{ta}" is formatted."""
    if isinstance(value, str):
        return ctx[value[1:]] if value.startswith("@") else value.format(**ctx)
    if isinstance(value, dict):
        return {k: fill(v, ctx) for k, v in value.items()}
    return value


def everything(live):
    """The whole state as the admin reads it."""
    return [ok(live.port, "GET", path, token=ADMIN) for path in ("/api/agents", "/api/tasks", "/api/notifications",
                                                                 "/api/instances")]


AS_ALPHA = {"agentId": "alpha", "epoch": "@ea"}
AS_BETA = {"agentId": "beta", "epoch": "@eb"}
# (strict, principal, method, path, body, expected status)
SCOPES = [
    # the admin token does everything
    *[(False, "admin", m, p, body, s) for m, p, body, s in [
        ("GET", "/api/agents", None, 200), ("GET", "/api/audit", None, 200),
        ("POST", "/api/tasks", {"title": "x"}, 201),
        ("PUT", "/api/tasks/{ta}", {"priority": "P1"}, 200), ("DELETE", "/api/tasks/{ta}", None, 200),
        ("DELETE", "/api/agents/beta", None, 200), ("POST", "/api/instances/inst-a/drain", None, 200),
        ("POST", "/api/sync", None, 200), ("POST", "/api/agents/alpha/heartbeat", {}, 200),
        ("POST", "/api/instances/inst-a/heartbeat", {}, 200), ("POST", "/api/tasks/{ta}/start", AS_ALPHA, 200),
        ("PUT", "/api/notifications/{na}/read", None, 200)]],
    # the read token reads /api/* and nothing else
    *[(False, "read", m, p, body, s) for m, p, body, s in [
        ("GET", "/api/agents", None, 200), ("GET", "/api/agents/alpha", None, 200), ("GET", "/api/tasks", None, 200),
        ("GET", "/api/tasks/{ta}", None, 200), ("GET", "/api/instances/capacities", None, 200),
        ("GET", "/api/notifications", None, 200), ("HEAD", "/api/tasks", None, 200), ("GET", "/health", None, 200),
        ("GET", "/api/audit", None, 403), ("POST", "/api/agents/register", {"id": "gamma"}, 403),
        ("POST", "/api/agents/alpha/heartbeat", {}, 403), ("POST", "/api/instances/inst-a/heartbeat", {}, 403),
        ("POST", "/api/tasks", {"title": "x"}, 403), ("PUT", "/api/tasks/{ta}", {"priority": "P1"}, 403),
        ("DELETE", "/api/tasks/{ta}", None, 403), ("DELETE", "/api/agents/alpha", None, 403),
        ("POST", "/api/instances/inst-a/drain", None, 403), ("POST", "/api/sync", None, 403),
        ("POST", "/api/tasks/{ta}/start", AS_ALPHA, 403), ("PUT", "/api/notifications/{na}/read", None, 403),
        ("POST", "/api/notifications", {"agentId": "alpha", "message": "x"}, 403)]],
    # an agent token: its own agent, its own instance, the task list, verbs as itself, its own notifications
    *[(False, "alpha", m, p, body, s) for m, p, body, s in [
        ("GET", "/api/agents/alpha", None, 200), ("GET", "/api/agents/alpha/tasks", None, 200),
        ("GET", "/api/agents/alpha/notifications", None, 200), ("POST", "/api/agents/alpha/heartbeat", {}, 200),
        ("POST", "/api/agents/register", {"id": "alpha", "name": "Alpha"}, 200),
        ("POST", "/api/instances/inst-a/heartbeat", {}, 200), ("GET", "/api/tasks", None, 200),
        ("GET", "/api/tasks/{ta}", None, 200), ("GET", "/api/tasks/{tb}", None, 200), ("GET", "/health", None, 200),
        *[("POST", f"/api/tasks/{{ta}}/{verb}", AS_ALPHA, 200) for verb in VERBS],
        ("PUT", "/api/notifications/{na}/read", None, 200),
        ("POST", "/api/tasks/{tb}/complete", {"agentId": "alpha", "epoch": "@eb"}, 409),
        ("GET", "/api/agents", None, 403), ("GET", "/api/agents/beta", None, 403),
        ("GET", "/api/agents/beta/tasks", None, 403), ("GET", "/api/agents/beta/notifications", None, 403),
        ("POST", "/api/agents/beta/heartbeat", {}, 403), ("POST", "/api/agents/register", {"id": "beta"}, 403),
        ("POST", "/api/agents/register", {"id": "gamma"}, 403), ("POST", "/api/instances/inst-b/heartbeat", {}, 403),
        ("POST", "/api/tasks/{tb}/start", AS_BETA, 403),
        ("POST", "/api/tasks/{ta}/start", {"agentId": "beta", "epoch": "@ea"}, 403),
        ("POST", "/api/tasks", {"title": "x"}, 403), ("PUT", "/api/tasks/{ta}", {"priority": "P1"}, 403),
        ("DELETE", "/api/tasks/{ta}", None, 403), ("DELETE", "/api/agents/alpha", None, 403),
        ("POST", "/api/instances/inst-a/drain", None, 403), ("POST", "/api/sync", None, 403),
        ("GET", "/api/audit", None, 403), ("PUT", "/api/notifications/{nb}/read", None, 403),
        ("POST", "/api/notifications", {"agentId": "beta", "message": "x"}, 403),
        ("GET", "/api/notifications", None, 403), ("GET", "/api/instances", None, 403)]],
    # no token, a wrong one
    *[(False, who, m, p, body, s) for who in ("none", "wrong") for m, p, body, s in [
        ("GET", "/api/tasks", None, 401), ("POST", "/api/agents/register", {"id": "gamma"}, 401),
        ("POST", "/api/agents/alpha/heartbeat", {}, 401), ("GET", "/health", None, 200)]],
    # BRIDGE_REQUIRE_AGENT_TOKENS=1: the admin token no longer acts as an agent, but still administers
    *[(True, "admin", m, p, body, s) for m, p, body, s in [
        ("POST", "/api/agents/alpha/heartbeat", {}, 403), ("POST", "/api/instances/inst-a/heartbeat", {}, 403),
        ("POST", "/api/tasks/{ta}/start", AS_ALPHA, 403), ("POST", "/api/tasks/{ta}/release", AS_ALPHA, 403),
        ("PUT", "/api/notifications/{na}/read", None, 403),
        ("POST", "/api/agents/register", {"id": "gamma"}, 201), ("POST", "/api/tasks", {"title": "x"}, 201),
        ("PUT", "/api/tasks/{ta}", {"priority": "P1"}, 200), ("DELETE", "/api/agents/beta", None, 200),
        ("POST", "/api/instances/inst-a/drain", None, 200), ("GET", "/api/audit", None, 200),
        ("GET", "/api/agents", None, 200)]],
    *[(True, "alpha", m, p, body, s) for m, p, body, s in [
        ("POST", "/api/agents/alpha/heartbeat", {}, 200), ("POST", "/api/instances/inst-a/heartbeat", {}, 200),
        ("POST", "/api/tasks/{ta}/start", AS_ALPHA, 200), ("PUT", "/api/notifications/{na}/read", None, 200),
        ("POST", "/api/agents/beta/heartbeat", {}, 403)]],
]


@pytest.mark.parametrize("strict, who, method, path, body, status", SCOPES,
                         ids=[f"{'strict-' if s[0] else ''}{s[1]}-{s[2]}-{s[3]}-{s[5]}" for s in SCOPES])
def test_each_token_kind_reaches_exactly_its_scope(make_bridge, strict, who, method, path, body, status):
    fleet = build_fleet(make_bridge, strict)
    before = everything(fleet.live)
    result = call(fleet.live.port, method, fill(path, fleet.ctx), fill(body, fleet.ctx), token=fleet.tokens[who])
    if status in (401, 403):
        expect_error(result, status, {401: "unauthorized", 403: "forbidden"}[status])
        assert everything(fleet.live) == before, "a refused request changed something"
    else:
        assert result[0] == status, result
    if status < 300 and method == "POST" and path == "/api/agents/register":
        assert ("agentToken" in result[2]) == (body["id"] not in ("alpha", "beta"))


def test_register_hands_out_the_agent_token_once_and_rotate_replaces_it(make_bridge):
    live = make_bridge(token=ADMIN)
    port = live.port
    first = ok(port, "POST", "/api/agents/register", {"id": "alpha"}, status=201, token=ADMIN)["agentToken"]
    again = ok(port, "POST", "/api/agents/register", {"id": "alpha", "name": "A"}, token=ADMIN)
    assert "agentToken" not in again
    assert ok(port, "GET", "/api/agents/alpha", token=first)["name"] == "A"
    by_itself = ok(port, "POST", "/api/agents/register", {"id": "alpha", "name": "B"}, token=first)
    assert "agentToken" not in by_itself
    second = ok(port, "POST", "/api/agents/register", {"id": "alpha", "rotateToken": True}, token=ADMIN)["agentToken"]
    assert isinstance(second, str) and second and second != first
    expect_error(call(port, "GET", "/api/agents/alpha", token=first), 401, "unauthorized")
    assert ok(port, "POST", "/api/agents/alpha/heartbeat", {}, token=second)["success"] is True


def test_agent_tokens_are_never_shown_again_nor_stored_raw(make_bridge):
    live = make_bridge(token=ADMIN)
    port = live.port
    first = ok(port, "POST", "/api/agents/register", {"id": "alpha"}, status=201, token=ADMIN)["agentToken"]
    second = ok(port, "POST", "/api/agents/register", {"id": "alpha", "rotateToken": True}, token=ADMIN)["agentToken"]
    ok(port, "POST", "/api/tasks", {"title": "t", "assignedTo": "alpha"}, status=201, token=ADMIN)
    views = [ok(port, "GET", "/api/agents/alpha", token=ADMIN), ok(port, "GET", "/api/agents", token=ADMIN)[0],
             ok(port, "GET", "/api/agents/alpha", token=second),
             ok(port, "POST", "/api/agents/alpha/heartbeat", {}, token=second)["agent"],
             ok(port, "GET", "/api/agents/alpha/tasks", token=second)["agent"]]
    for view in views:
        assert [k for k in view if "token" in k.lower() or "hash" in k.lower()] == [], view
        assert first not in json.dumps(view) and second not in json.dumps(view)
    ok(port, "POST", "/api/sync", token=ADMIN)      # flushes a snapshot as well as the journal
    close_bridge(live)
    files = [p for p in Path(live.config.data_dir).rglob("*") if p.is_file()]
    assert files
    for path in files:
        content = path.read_bytes()
        assert first.encode() not in content and second.encode() not in content, path.name


def test_repeated_failed_auth_is_slowed_for_that_address_only(make_bridge, clock):
    live = make_bridge(token=ADMIN)
    port = live.port
    for _ in range(LOCKOUT_FAILURES):
        expect_error(call(port, "GET", "/api/tasks", token=WRONG), 401, "unauthorized")
    for token in (ADMIN, WRONG):
        headers, _ = expect_error(call(port, "GET", "/api/tasks", token=token), 429, "too_many_requests")
        assert 0 < int(headers["retry-after"]) <= LOCKOUT_WINDOW, headers
    # other addresses are not hurt, and the locked one can still be health-checked without a token
    assert ok(port, "GET", "/api/tasks", token=ADMIN, source="127.0.0.2") == []
    expect_error(call(port, "GET", "/api/tasks", token=WRONG, source="127.0.0.3"), 401, "unauthorized")
    assert ok(port, "GET", "/health")["status"] == "ok"
    clock.advance(LOCKOUT_WINDOW + 1)
    assert ok(port, "GET", "/api/tasks", token=ADMIN) == []


def test_failed_auth_spread_over_more_than_the_window_does_not_lock_out(make_bridge, clock):
    live = make_bridge(token=ADMIN)
    for _ in range(2):
        for _ in range(LOCKOUT_FAILURES - 1):
            expect_error(call(live.port, "GET", "/api/tasks", token=WRONG), 401, "unauthorized")
        clock.advance(LOCKOUT_WINDOW + 1)
    assert ok(live.port, "GET", "/api/tasks", token=ADMIN) == []


# ===== Audit =====


AUDIT_FIELDS = {"id", "at", "actor", "address", "action", "target", "detail"}
ADMIN_ACTIONS = {"task.update", "task.delete", "agent.delete", "instance.drain", "instance.undrain"}


def test_admin_actions_are_in_the_audit_trail_newest_first(make_bridge, clock):
    live = make_bridge(token=ADMIN)
    port = live.port
    for agent_id, instance_id in (("alpha", "inst-a"), ("beta", "inst-b")):
        ok(port, "POST", "/api/agents/register", {"id": agent_id, "instanceId": instance_id, "maxConcurrentTasks": 5},
           status=201, token=ADMIN)
    t1, t2 = (ok(port, "POST", "/api/tasks", {"title": t, "assignedTo": "alpha"}, status=201, token=ADMIN)["id"]
              for t in ("one", "two"))
    steps = [("PUT", f"/api/tasks/{t1}", {"assignedTo": "beta"}, "task.update", t1),
             ("DELETE", f"/api/tasks/{t2}", None, "task.delete", t2),
             ("DELETE", "/api/agents/alpha", None, "agent.delete", "alpha"),
             ("POST", "/api/instances/inst-b/drain", None, "instance.drain", "inst-b"),
             ("POST", "/api/instances/inst-b/undrain", None, "instance.undrain", "inst-b")]
    expected = []
    for method, path, body, action, target in steps:
        clock.advance(5)
        ok(port, method, path, body, token=ADMIN)
        expected.insert(0, (action, target, clock.ms, "admin", "127.0.0.1"))
    trail = ok(port, "GET", "/api/audit", token=ADMIN)
    assert isinstance(trail, list) and all(set(entry) == AUDIT_FIELDS for entry in trail), trail
    assert [(e["action"], e["target"], e["at"], e["actor"], e["address"]) for e in trail
            if e["action"] in ADMIN_ACTIONS] == expected
    assert len({e["id"] for e in trail}) == len(trail)
    assert ADMIN not in json.dumps(trail)
    close_bridge(live)
    again = make_bridge(data_dir=live.config.data_dir, token=ADMIN)
    assert ok(again.port, "GET", "/api/audit", token=ADMIN) == trail


# ===== Logs =====


def test_no_token_reaches_the_log_even_at_debug_level(start_bridge):
    bridge = start_bridge(env={"BRIDGE_TOKEN": ADMIN, "BRIDGE_READ_TOKEN": READ, "DEBUG": "bridge:*"})
    port = bridge.port
    agent_token = ok(port, "POST", "/api/agents/register", {"id": "logger"}, status=201, token=ADMIN)["agentToken"]
    secrets = [ADMIN, READ, agent_token, WRONG]
    for n, secret in enumerate(secrets):
        source = f"127.0.0.{n + 10}"
        quoted = urllib.parse.quote(secret, safe="")
        # any token in the Authorization header or a ?token= query
        for method, path, token, headers in [
                ("GET", "/api/agents", secret, None), ("POST", "/api/agents/logger/heartbeat", secret, None),
                ("GET", "/health", secret, None), ("GET", "/api/tasks", None, {"Authorization": f"Token {secret}"}),
                ("GET", f"/api/agents?token={quoted}", None, None), ("GET", f"/health?token={quoted}", None, None),
                ("GET", f"/api/tasks?limit=5&token={quoted}", secret, None)]:
            call(port, method, path, {} if method == "POST" else None, token=token, headers=headers, source=source)
        exchange(port, f"BREW /api/agents?token={quoted} HTTP/1.1\r\nAuthorization: Bearer {secret}\r\n\r\n".encode(),
                 source=source)
    for secret in secrets[:3]:      # a real token pasted into the path, where only the bridge can know it
        quoted = urllib.parse.quote(secret, safe="")
        for path, token in ((f"/api/agents/{quoted}", ADMIN), (f"/api/{quoted}/tasks", secret), (f"/{quoted}", None)):
            call(port, "GET", path, token=token, source="127.0.0.20")
        for line in (f"GET /api/{quoted} HTTP/9.9", f"GET /{quoted} {quoted} x"):
            exchange(port, line.encode() + b"\r\n\r\n", source="127.0.0.20")
    assert bridge.stop() == 0
    output = bridge.output()
    assert "DEBUG" in output and "/health" in output, "debug logging was not on"
    assert re.search(r"GET /api/agents 200", output), "requests were not logged"
    for secret in secrets:
        assert secret not in output and secret[-16:] not in output, f"{secret[:6]}... is in the log"
