"""Operating the bridge: /metrics read back by a Prometheus text-format parser, JSON logs, webhook alerts to a
receiver on 127.0.0.1, backup/restore/check run as an operator runs them, monthly task archives on a fake
clock, --healthcheck and sd_notify. The bridge's clock is the FakeClock; real time is only waited for
background threads and processes, with deadlines."""
import calendar
import errno
import hashlib
import http.client
import json
import os
import queue
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

import clawbridge
from conftest import BRIDGE, BridgeProcess, FakeClock, LiveBridge, http_call

READ_TOKEN, ADMIN_TOKEN = "read-secret", "admin-secret"


# ===== Helpers =====


def wait_until(predicate, timeout=10.0, what="the condition"):
    """Poll predicate until it is true (returned) or the deadline passes (an assertion error)."""
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def run_cli(cwd, *args, env=None):
    """clawbridge.py with arguments, as an operator runs it in cwd (no .env there, no inherited settings)."""
    full_env = {k: v for k, v in os.environ.items()
                if not k.startswith(("BRIDGE_", "CLAW", "LOG_", "NOTIFY_SOCKET", "WATCHDOG_"))}
    full_env.update(env or {})
    return subprocess.run([sys.executable, BRIDGE, *args], cwd=cwd, env=full_env, capture_output=True, text=True,
                          timeout=30)


class Api:
    """Requests to a bridge that must get the expected status. They are counted, so that a test can wait
    until the bridge has recorded them in its request metrics (a reply is sent just before it is counted)."""

    def __init__(self, target):
        self.target, self.sent, self.headers = target, 0, {}

    def __call__(self, method, path, body=None, expect=200, **kw):
        self.sent += 1
        status, self.headers, data = self.target.call(method, path, body, **kw)
        assert status == expect, (method, path, status, data)
        return data


class Served(LiveBridge):
    """LiveBridge with a counting Api and an idempotent close (tests restart bridges by hand)."""

    closed = False

    def __init__(self, data_dir, clock, **settings):
        super().__init__(data_dir, clock=clock, **settings)
        self.api = Api(self)
        self.clock = clock
        self.data_dir = Path(data_dir)

    def close(self):
        if not self.closed:
            self.closed = True
            super().close()


@pytest.fixture
def open_bridge(tmp_path, clock):
    """Open in-thread bridges (default data dir tmp_path/d, the test's fake clock); closed at teardown."""
    opened = []

    def open_(data_dir=None, clock=clock, **settings):
        live = Served(data_dir or tmp_path / "d", clock, **settings)
        opened.append(live)
        return live

    yield open_
    for live in opened:
        live.close()


def register(api, agent_id, instance, **fields):
    return api("POST", "/api/agents/register", {"id": agent_id, "instanceId": instance, **fields}, expect=201)


def beat(api, agent_id):
    return api("POST", f"/api/agents/{agent_id}/heartbeat", {})


def verb(api, task, name):
    """An agent verb (start, complete, ...) by the task's assignee at its current epoch."""
    return api("POST", f"/api/tasks/{task['id']}/{name}", {"agentId": task["assignedTo"], "epoch": task["epoch"]})


def run_for(live, seconds, beating=()):
    """Move the fake clock a second at a time as the watchdog sees it: the named agents beat over HTTP, then
    the sweep runs. Returns the sweep reports."""
    reports = []
    for _ in range(int(seconds)):
        live.clock.advance(1.0)
        for agent_id in beating:
            beat(live.api, agent_id)
        reports.append(live.bridge.run(clawbridge.sweep))
    return reports


def lose_an_instance(live):
    """Register a1 on mac and let it fall silent past the threshold (offline_after=10): instance.offline."""
    register(live.api, "a1", "mac")
    reports = run_for(live, 11)
    assert reports[-1]["offline"] == ["mac"]


def fail_fsync(fd):
    raise OSError(errno.EIO, "Input/output error (injected)")


def break_storage(live):
    """The journal's fsync starts failing (EIO); the next write is refused with 503 and storage is degraded."""
    live.bridge.store.journal.fsync = fail_fsync
    live.api("POST", "/api/agents/register", {"id": "never-saved"}, expect=503)


def repair_storage(live):
    """The disk works again; a full snapshot makes the bridge writable again."""
    live.bridge.store.journal.fsync = os.fsync
    live.bridge.snapshot()


def data_files(directory):
    """{name: sha256} of the bridge's data files (snapshots, journal segments, archives) in a directory."""
    names = [n for n in os.listdir(directory)
             if re.fullmatch(r"(snapshot-\d+\.json|journal-\d+\.jsonl|archive-\d{4}-\d{2}\.jsonl)", n)]
    return {n: hashlib.sha256((directory / n).read_bytes()).hexdigest() for n in names}


def utc_ms(*fields):
    return calendar.timegm(fields + (0,) * (6 - len(fields))) * 1000


# ===== A Prometheus text-format parser (version 0.0.4) =====

METRIC_NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")
LABEL_NAME = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")
LABEL_ESCAPES = {"\\": "\\", '"': '"', "n": "\n"}
KINDS = {"counter", "gauge", "histogram", "summary", "untyped"}


def parse_sample(line):
    """`name{label="value",...} value [timestamp]` -> (name, {label: value}, float)."""
    name = METRIC_NAME.match(line)
    assert name, f"bad sample line: {line!r}"
    i, labels = name.end(), {}
    if line[i:i + 1] == "{":
        i += 1
        while line[i] != "}":
            key = LABEL_NAME.match(line, i)
            assert key and line[key.end():key.end() + 2] == '="', f"bad label in {line!r}"
            i, chars = key.end() + 2, []
            while line[i] != '"':
                if line[i] == "\\":
                    assert line[i + 1] in LABEL_ESCAPES, f"bad escape in {line!r}"
                    chars.append(LABEL_ESCAPES[line[i + 1]])
                    i += 2
                else:
                    chars.append(line[i])
                    i += 1
            assert key.group() not in labels, f"label {key.group()} twice in {line!r}"
            labels[key.group()] = "".join(chars)
            i += 1
            assert line[i] in ",}", f"bad label separator in {line!r}"
            i += line[i] == ","
        i += 1
    fields = line[i:].split()
    assert line[i:i + 1] == " " and len(fields) in (1, 2), f"bad value in {line!r}"
    return name.group(), labels, float(fields[0])


def family_of(families, name):
    """The family a sample belongs to: its own name, or a histogram/summary base for _bucket/_sum/_count."""
    if name in families:
        return families[name]
    for suffix in ("_bucket", "_sum", "_count"):
        base = families.get(name[:-len(suffix)]) if name.endswith(suffix) else None
        if base is not None and base.get("type") in ("histogram", "summary"):
            return base
    raise AssertionError(f"sample {name} belongs to no declared family")


def parse_metrics(text):
    """{family: {"help", "type", "samples": [(name, labels, value)]}}. Asserts the format's rules: every
    sample in a family with HELP and TYPE given before its samples, each once."""
    assert text.endswith("\n"), "the exposition ends with a newline"
    families = {}
    for line in text.splitlines():
        if not line.strip():
            continue
        if line.startswith("#"):
            parts = line.split(" ", 3)
            if len(parts) >= 3 and parts[1] in ("HELP", "TYPE"):
                family = families.setdefault(parts[2], {"samples": []})
                key = parts[1].lower()
                assert key not in family and not family["samples"], f"misplaced {parts[1]} for {parts[2]}"
                value = parts[3] if len(parts) > 3 else ""
                family[key] = re.sub(r"\\(.)", lambda m: "\n" if m.group(1) == "n" else m.group(1), value) \
                    if key == "help" else value
            continue
        name, labels, value = parse_sample(line)
        family = family_of(families, name)
        assert family.get("help") and family.get("type") in KINDS, f"{name} has no HELP or TYPE"
        family["samples"].append((name, labels, value))
    return families


def value(families, name, **labels):
    """The one sample called name whose labels include the given ones."""
    found = [v for family in families.values() for n, ls, v in family["samples"]
             if n == name and labels.items() <= ls.items()]
    assert len(found) == 1, f"{name}{labels}: {len(found)} samples"
    return found[0]


def get_text(port, path, headers=None):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", path, headers=headers or {})
        reply = conn.getresponse()
        return reply.status, reply.getheader("Content-Type"), reply.read().decode()
    finally:
        conn.close()


def scrape(live):
    """GET /metrics, once every request the test sent has been counted; checks the type and parses it."""
    wait_until(lambda: sum(live.bridge.requests.copy()[0].values()) >= live.api.sent, 5, "requests to be counted")
    status, content_type, text = get_text(live.port, "/metrics")
    assert status == 200, text
    assert content_type.startswith("text/plain; version=0.0.4"), content_type
    return parse_metrics(text)


# ===== /metrics =====


def test_the_parser_reads_escaped_labels_and_refuses_undeclared_samples():
    lines = []
    clawbridge.metric(lines, "demo_total", "counter", "A demo.", [("", {"path": 'a "q" \\ b\nc', "x": "}"}, 3)])
    families = parse_metrics("\n".join(lines) + "\n")
    assert families["demo_total"]["samples"] == [("demo_total", {"path": 'a "q" \\ b\nc', "x": "}"}, 3.0)]
    with pytest.raises(AssertionError):
        parse_metrics("# HELP lonely_total No TYPE.\nlonely_total 1\n")


def test_metrics_reflect_the_fleet_and_the_bridges_own_work(open_bridge):
    live = open_bridge(offline_after=10)
    api = live.api
    for agent_id, instance in (("a1", "mac"), ("a2", "mac"), ("b1", "srv")):
        register(api, agent_id, instance, maxConcurrentTasks=10)
    tasks = [api("POST", "/api/tasks", {"title": f"t{i}", "assignedTo": owner}, expect=201)
             for i, owner in enumerate(("b1", "a1", "a2", "a1"))]
    verb(api, tasks[0], "start")
    verb(api, tasks[1], "complete")
    reports = run_for(live, 12, beating=["b1"])     # mac (a1, a2) falls silent past its 10 s threshold
    assert [r["offline"] for r in reports if r["offline"]] == [["mac"]]
    api("GET", "/no/such/endpoint", expect=404)
    families = scrape(live)

    assert value(families, "clawbridge_build_info", version=clawbridge.__version__) == 1
    assert value(families, "clawbridge_uptime_seconds") == 12.0        # the fake clock's 12 s
    assert [value(families, "clawbridge_agents", status=s) for s in ("online", "offline")] == [1, 2]
    assert [value(families, "clawbridge_instances", status=s) for s in ("online", "offline")] == [1, 1]
    lanes = {lane: value(families, "clawbridge_tasks", lane=lane) for lane in clawbridge.LANES}
    assert lanes == {"queued": 0, "assigned": 2, "in_progress": 1, "blocked": 0, "review": 0, "done": 1,
                     "cancelled": 0}
    assert value(families, "clawbridge_disruption") == 0
    assert value(families, "clawbridge_heartbeats_total") == 12
    assert value(families, "clawbridge_reassignments_total") == 2     # t2 and t3 moved from mac to b1
    assert value(families, "clawbridge_requeued_total") == 0
    assert value(families, "clawbridge_instances_offline_total") == 1
    assert families["clawbridge_heartbeats_total"]["type"] == "counter"

    requests = {(ls["method"], ls["route"], ls["status"]): v
                for _, ls, v in families["clawbridge_http_requests_total"]["samples"]}
    assert requests == {("POST", "/api/agents/register", "201"): 3, ("POST", "/api/tasks", "201"): 4,
                        ("POST", "/api/tasks/{id}/start", "200"): 1, ("POST", "/api/tasks/{id}/complete", "200"): 1,
                        ("POST", "/api/agents/{id}/heartbeat", "200"): 12, ("GET", "unmatched", "404"): 1}

    histogram = families["clawbridge_http_request_duration_seconds"]
    assert histogram["type"] == "histogram"
    routes = {route for _, route, _ in requests}
    assert {ls["route"] for _, ls, _ in histogram["samples"]} == routes
    for route in routes:
        buckets = [(float(ls["le"]), v) for n, ls, v in histogram["samples"]
                   if n.endswith("_bucket") and ls["route"] == route]
        assert [le for le, _ in buckets] == sorted(le for le, _ in buckets) and buckets[-1][0] == float("inf")
        counts = [v for _, v in buckets]
        assert counts == sorted(counts), f"buckets of {route} are cumulative"
        count = value(families, "clawbridge_http_request_duration_seconds_count", route=route)
        assert counts[-1] == count == sum(v for (_, r, _), v in requests.items() if r == route)
        assert value(families, "clawbridge_http_request_duration_seconds_sum", route=route) >= 0

    journal_size = sum(path.stat().st_size for path in live.data_dir.glob("journal-*.jsonl"))
    assert value(families, "clawbridge_journal_bytes") == journal_size > 0
    assert value(families, "clawbridge_journal_seq") > 0
    assert value(families, "clawbridge_journal_fsyncs_total") > 0
    assert value(families, "clawbridge_journal_fsync_seconds_total") > 0
    assert value(families, "clawbridge_storage_writable") == 1

    live.close()        # counters count since the start; the fleet is state and stays
    again = open_bridge(offline_after=10)
    families = scrape(again)
    for counter in ("heartbeats", "reassignments", "instances_offline"):
        assert value(families, f"clawbridge_{counter}_total") == 0
    assert families["clawbridge_http_requests_total"]["samples"] == []
    assert value(families, "clawbridge_agents", status="offline") == 2
    assert value(families, "clawbridge_tasks", lane="done") == 1


@pytest.mark.parametrize("who,status", [(None, 401), ("wrong", 401), ("agent", 403), (READ_TOKEN, 200),
                                        (ADMIN_TOKEN, 200)])
def test_metrics_with_a_token_need_the_admin_or_the_read_token(open_bridge, who, status):
    live = open_bridge(token=ADMIN_TOKEN, read_token=READ_TOKEN)
    if who == "agent":
        who = Api(live)("POST", "/api/agents/register", {"id": "a1"}, expect=201,
                        headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})["agentToken"]
    got, content_type, text = get_text(live.port, "/metrics", {"Authorization": f"Bearer {who}"} if who else {})
    assert got == status, text
    if status == 200:
        assert value(parse_metrics(text), "clawbridge_build_info", version=clawbridge.__version__) == 1
    else:
        assert "clawbridge_" not in text


# ===== Logs =====


def test_json_logs_are_one_object_a_line_with_the_request_fields(start_bridge):
    bridge = start_bridge(env={"LOG_FORMAT": "json"})
    made = [("GET", "/api/agents", None, 200), ("POST", "/api/agents/register", {"id": "a1"}, 201),
            ("GET", "/no/such/endpoint", None, 404)]
    for method, path, body, status in made:
        assert bridge.call(method, path, body)[0] == status
    assert bridge.stop() == 0
    entries = []
    for line in bridge.output().splitlines():
        try:
            entries.append(json.loads(line))
        except ValueError:
            pytest.fail(f"a log line is not JSON: {line!r}")
    for entry in entries:
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", entry["ts"]), entry
        assert entry["level"] in ("debug", "info", "warning", "error") and entry["msg"], entry
    logged = sorted((e["http"]["method"], e["http"]["route"], e["http"]["status"]) for e in entries if "http" in e)
    assert logged == sorted([("GET", "/api/agents", 200), ("POST", "/api/agents/register", 201),
                             ("GET", "unmatched", 404)])
    assert any("Bridge running on" in e["msg"] for e in entries)
    assert entries[-1]["msg"] == "stopped cleanly"


def test_request_lines_are_held_until_the_next_flush_and_other_lines_keep_the_order():
    """Request lines are written in batches (by the Flusher every second, or LOG_HELD at a time); a start-up,
    warning or error line goes out at once and takes the waiting request lines with it, in order."""
    import io
    import logging
    stream = io.StringIO()
    handler = clawbridge.LogHandler(stream)
    handler.setFormatter(clawbridge.TextLogFormatter())
    logger = logging.getLogger("clawbridge")
    logger.addHandler(handler)
    level = logger.level
    logger.setLevel(logging.INFO)
    try:
        for n in range(3):
            clawbridge.access_log(logging.INFO, "GET", f"/api/tasks/t{n}", 200, 10, 0.001, "/api/tasks/{id}")
        assert stream.getvalue() == "", "a request line was written before the next flush"
        logger.warning("storage is degraded")
        lines = stream.getvalue().splitlines()
        assert [line.split(" ", 3)[3] for line in lines] == [
            "GET /api/tasks/t0 200 10 1.0ms", "GET /api/tasks/t1 200 10 1.0ms", "GET /api/tasks/t2 200 10 1.0ms",
            "storage is degraded"]
        assert all(line.split(" ")[2] in ("INFO", "WARNING") for line in lines)
        clawbridge.access_log(logging.INFO, "POST", "/api/sync", 200, 5, 0.002, "/api/sync")
        clawbridge.flush_logs()     # what the Flusher does every FLUSHER_PERIOD (and logging.shutdown at exit)
        assert stream.getvalue().splitlines()[-1].endswith("POST /api/sync 200 5 2.0ms")
        for n in range(clawbridge.LOG_HELD):
            clawbridge.access_log(logging.INFO, "GET", "/health", 200, 1, 0.0, "/health")
        assert stream.getvalue().count("GET /health") == clawbridge.LOG_HELD, "a full batch must not wait"
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def test_an_unknown_log_format_exits_2_naming_the_key(tmp_path):
    result = run_cli(tmp_path, "--port", "0", env={"LOG_FORMAT": "bogus"})
    assert result.returncode == 2
    assert "LOG_FORMAT" in result.stderr and "bogus" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / ".clawhub").exists()


# ===== Alerts =====


class Receiver:
    """A webhook endpoint on 127.0.0.1:0. Records every POST; answers the first `fail` of them with a 500 (or,
    with fail_with="garbage", with a line that is not HTTP); while `hang` is set, holds each request until
    released, or for 3 s (long enough for a test, short enough not to stall one whose bridge waits)."""

    def __init__(self):
        self.attempts, self.received = [], []   # every POST (body, content type); the bodies answered 200
        self.fail, self.fail_with, self.hang = 0, "500", False
        self.released = threading.Event()
        self.lock = threading.Lock()
        receiver = self

        class Hook(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with receiver.lock:
                    receiver.attempts.append((body, self.headers["Content-Type"]))
                    failing = len(receiver.attempts) <= receiver.fail
                if receiver.hang:
                    receiver.released.wait(3)
                if failing and receiver.fail_with == "garbage":
                    self.close_connection = True
                    self.wfile.write(b"this is not HTTP\r\n")
                    return
                if not failing:
                    with receiver.lock:
                        receiver.received.append(body)
                self.send_response(500 if failing else 200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Hook)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hooks/clawbridge"
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.01}, daemon=True).start()

    def events(self):
        with self.lock:
            return [body["event"] for body in self.received]

    def close(self):
        self.released.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver():
    hook = Receiver()
    yield hook
    hook.close()


def test_instance_and_disruption_alerts_reach_the_webhook_as_slack_text(open_bridge, receiver):
    live = open_bridge(offline_after=10, webhook_url=receiver.url)
    for i in range(4):
        register(live.api, f"a{i}", f"x{i}")
    reports = run_for(live, 12, beating=["a0"])         # three of four silent at once: the bridge's fault
    assert reports[-1]["disruption"] and not any(r["offline"] for r in reports)
    assert value(scrape(live), "clawbridge_disruption") == 1
    assert not run_for(live, 1, beating=["a0", "a1", "a2", "a3"])[0]["disruption"]
    reports = run_for(live, 11, beating=["a0", "a1", "a2"])   # now only x3 is silent: really offline
    assert reports[-1]["offline"] == ["x3"]
    beat(live.api, "a3")
    expected = ["disruption.start", "disruption.end", "instance.offline", "instance.online"]
    wait_until(lambda: len(receiver.events()) >= len(expected), what="four alerts")
    assert receiver.events() == expected
    assert {content_type for _, content_type in receiver.attempts} == {"application/json"}
    for body in receiver.received:
        assert body["bridge"] == "test" and body["message"]
        assert body["text"] == f"clawbridge test: {body['message']}"    # what Slack shows
    assert "x3" in receiver.received[2]["text"] and "x3" in receiver.received[3]["text"]


def test_storage_alerts_when_writes_fail_and_when_a_snapshot_recovers(open_bridge, receiver):
    live = open_bridge(webhook_url=receiver.url)
    break_storage(live)
    assert value(scrape(live), "clawbridge_storage_writable") == 0
    repair_storage(live)
    register(live.api, "a1", "mac")
    assert value(scrape(live), "clawbridge_storage_writable") == 1
    wait_until(lambda: len(receiver.events()) >= 2, what="two alerts")
    assert receiver.events() == ["storage.degraded", "storage.recovered"]


@pytest.mark.parametrize("fail_with,failures,outcome", [("500", 2, "sent"), ("garbage", 1, "sent"),
                                                         ("500", 100, "failed")])
def test_alerts_are_retried_with_backoff(open_bridge, receiver, fail_with, failures, outcome):
    receiver.fail, receiver.fail_with = failures, fail_with
    live = open_bridge(offline_after=10, webhook_url=receiver.url)
    alerts = live.bridge.alerts
    alerts.backoff = 0.01
    lose_an_instance(live)
    wait_until(lambda: alerts.counts[outcome], 5, f"the alert to be {outcome}")
    tries = failures + 1 if outcome == "sent" else clawbridge.WEBHOOK_TRIES
    assert len(receiver.attempts) == tries
    assert all(body == receiver.attempts[0][0] for body, _ in receiver.attempts), "the same alert, retried"
    assert receiver.events() == (["instance.offline"] if outcome == "sent" else [])
    assert value(scrape(live), "clawbridge_webhooks_total", result=outcome) == 1
    receiver.fail = 0           # the receiver works again: the sender is still there for the next alert
    beat(live.api, "a1")
    wait_until(lambda: "instance.online" in receiver.events(), 5, "the next alert")


def test_a_hanging_receiver_never_slows_a_request_and_the_queue_stays_bounded(open_bridge, receiver):
    receiver.hang = True
    live = open_bridge(offline_after=10, webhook_url=receiver.url)
    alerts = live.bridge.alerts
    try:
        lose_an_instance(live)
        wait_until(lambda: receiver.attempts, what="the sender to be stuck on the receiver")
        started = time.monotonic()
        beat(live.api, "a1")        # mac is back: an alert, queued behind the stuck one
        assert time.monotonic() - started < 1.0, "a request never waits for the webhook"
        assert [alert["event"] for alert in alerts.queue] == ["instance.online"]
        for i in range(clawbridge.WEBHOOK_QUEUE):
            alerts.send("test.flood", f"flood {i}")
        assert len(alerts.queue) == clawbridge.WEBHOOK_QUEUE and alerts.counts["dropped"] == 1
        assert alerts.queue[0]["message"] == "flood 0", "the oldest alert is the one dropped"
        assert value(scrape(live), "clawbridge_webhooks_total", result="dropped") == 1
    finally:
        with alerts.cond:
            alerts.queue.clear()    # nothing left to send once the receiver lets go


# ===== Backup, restore, check =====


def test_restore_refuses_a_running_bridge_then_replaces_the_state(start_bridge, tmp_path):
    data = tmp_path / ".clawhub"
    bridge = start_bridge()
    api = Api(bridge)
    register(api, "a1", "mac")
    kept = api("POST", "/api/tasks", {"title": "in the backup", "assignedTo": "a1"}, expect=201)
    backup = run_cli(tmp_path, "backup", "copy")
    assert backup.returncode == 0, backup.stderr
    later = api("POST", "/api/tasks", {"title": "after the backup"}, expect=201)

    refused = run_cli(tmp_path, "restore", "copy")
    assert refused.returncode == 1 and "stop it first" in refused.stderr, refused.stderr
    assert not list(data.glob("before-restore-*"))
    assert api("GET", f"/api/tasks/{later['id']}")["title"] == "after the backup"
    assert bridge.stop() == 0

    replaced = data_files(data)
    restored = run_cli(tmp_path, "restore", "copy")
    assert restored.returncode == 0, restored.stderr
    assert "restored 1 agents and 1 tasks" in restored.stdout and "before-restore-" in restored.stdout
    [aside] = data.glob("before-restore-*")
    assert data_files(aside) == replaced, "every replaced file is kept, unchanged"
    checked = run_cli(tmp_path, "check", "--data-dir", str(aside))
    assert checked.returncode == 0 and re.search(r"^tasks\s+2 in memory", checked.stdout, re.M), checked.stdout

    after = Api(start_bridge())
    tasks = {t["id"]: t for t in after("GET", "/api/tasks")}
    assert set(tasks) == {kept["id"]}
    assert tasks[kept["id"]]["epoch"] == kept["epoch"] + clawbridge.RESTORE_EPOCH_GAP


@pytest.fixture(scope="module")
def crashed_data(tmp_path_factory):
    """A data dir as a crashed bridge leaves it: a snapshot from a clean stop, then journal records from a
    second run killed with SIGKILL. Two agents and three tasks."""
    workdir = tmp_path_factory.mktemp("crashed")
    for agent_id, instance, titles, end in (("a1", "mac", ["one"], "stop"), ("a2", "srv", ["two", "three"], "kill")):
        proc = BridgeProcess(workdir)
        try:
            api = Api(proc)
            register(api, agent_id, instance)
            for title in titles:
                api("POST", "/api/tasks", {"title": title}, expect=201)
        finally:
            code = proc.stop() if end == "stop" else proc.kill()
        assert end == "kill" or code == 0
    return workdir / ".clawhub"


def corrupt_the_newest_snapshot(data):
    path = max(data.glob("snapshot-*.json"))
    path.write_text('{"format": "clawbridge-state", "seq": 3, "agents": [')
    return path.name


def damage_a_journal_line(data):
    path = max(data.glob("journal-*.jsonl"))
    lines = path.read_bytes().splitlines(keepends=True)
    assert len(lines) >= 2
    path.write_bytes(b'{"seq": oops}\n' + b"".join(lines[1:]))
    return path.name


def remove_the_data_dir(data):
    shutil.rmtree(data)
    return "no data directory"


@pytest.mark.parametrize("damage", [None, corrupt_the_newest_snapshot, damage_a_journal_line, remove_the_data_dir],
                         ids=["sound", "snapshot", "journal", "missing"])
def test_check_counts_a_sound_data_dir_and_names_each_problem(crashed_data, tmp_path, damage):
    data = tmp_path / "data"
    shutil.copytree(crashed_data, data)
    named = damage(data) if damage else None
    before = data_files(data) if data.exists() else None
    result = run_cli(tmp_path, "check", "--data-dir", str(data))
    problems = [line for line in result.stdout.splitlines() if line.startswith("problem:")]
    if damage is None:
        assert result.returncode == 0 and not problems, result.stdout
        assert re.search(r"^agents\s+2 ", result.stdout, re.M) and re.search(r"^tasks\s+3 in memory", result.stdout,
                                                                              re.M), result.stdout
        assert result.stdout.rstrip().endswith("sound")
    else:
        assert result.returncode == 1, result.stdout
        assert any(named in problem for problem in problems), result.stdout
    assert "Traceback" not in result.stderr
    assert (data_files(data) if data.exists() else None) == before, "check never changes the data dir"


# ===== Archive =====


def test_finished_tasks_move_to_monthly_archives_and_stay_readable(open_bridge, tmp_path):
    clock = FakeClock(ms=utc_ms(2024, 1, 31, 23))
    data = tmp_path / "d"
    live = open_bridge(clock=clock)
    api = live.api
    register(api, "a1", "mac", maxConcurrentTasks=20)

    def new(title):
        return api("POST", "/api/tasks", {"title": title, "assignedTo": "a1"}, expect=201)

    january = verb(api, new("done in January"), "complete")
    cancelled = api("PUT", f"/api/tasks/{new('cancelled in January')['id']}", {"lane": "cancelled"})
    still_open = new("still open")
    note = api("POST", "/api/notifications", {"agentId": "a1", "message": "read me"}, expect=201)
    api("PUT", f"/api/notifications/{note['id']}/read")
    clock.advance(2 * 3600)     # February 1st, 01:00 UTC
    february = verb(api, new("done in February"), "complete")
    reopened = verb(api, new("reopened while being archived"), "complete")
    clock.advance(2 * 86400)
    recent = verb(api, new("done 29 days before the archive runs"), "complete")
    clock.advance(29 * 86400)
    unread = len(api("GET", "/api/notifications?unread=true"))

    real_write = live.bridge.store.write_archive

    def write_then_reopen(tasks):   # the task is reopened after the archive read it, before the drop
        real_write(tasks)
        api("PUT", f"/api/tasks/{reopened['id']}", {"lane": "in_progress"})

    live.bridge.store.write_archive = write_then_reopen
    assert live.bridge.archive() == (3, 1)
    del live.bridge.store.write_archive

    in_memory = {still_open["id"], reopened["id"], recent["id"]}
    archived = {january["id"], cancelled["id"], february["id"]}

    def check_listings(target):
        listed = target.api("GET", "/api/tasks")
        assert {t["id"] for t in listed} == in_memory
        assert {t["id"]: t["lane"] for t in listed}[reopened["id"]] == "in_progress", "the reopened task is kept"
        old = target.api("GET", "/api/tasks?archived=true")
        assert {t["id"] for t in old} == archived and target.api.headers["x-total-count"] == "3"
        assert [t["id"] for t in target.api("GET", "/api/tasks?archived=true&lane=cancelled")] == [cancelled["id"]]
        assert target.api.headers["x-total-count"] == "1"
        assert len(target.api("GET", "/api/tasks?archived=true&limit=1")) == 1
        assert target.api.headers["x-total-count"] == "3"

    check_listings(live)
    assert set(live.bridge.state.tasks) == in_memory, "memory holds open and recent work only"
    months = {path.name: {json.loads(line)["id"] for line in path.read_text().splitlines()}
              for path in data.glob("archive-*.jsonl")}
    assert months == {"archive-2024-01.jsonl": {january["id"], cancelled["id"]},
                      "archive-2024-02.jsonl": {february["id"], reopened["id"]}}
    notes = api("GET", "/api/notifications")
    assert note["id"] not in {n["id"] for n in notes}, "read notifications older than 7 days are pruned"
    assert len(notes) == unread and not any(n["read"] for n in notes)

    live.close()
    live = open_bridge(clock=clock)     # a restart keeps both sides
    check_listings(live)
    assert run_cli(tmp_path, "backup", "--data-dir", str(data), "copy").returncode == 0
    live.close()
    assert set(data_files(tmp_path / "copy")) >= set(months), "the backup carries the archives"
    restored = run_cli(tmp_path, "restore", "--data-dir", str(data), "copy")
    assert restored.returncode == 0, restored.stderr
    live = open_bridge(clock=clock)
    check_listings(live)

    finished = verb(live.api, live.api("GET", f"/api/tasks/{reopened['id']}"), "complete")
    clock.advance(31 * 86400)
    assert live.bridge.archive() == (2, 0)      # the reopened task, now done, and the recent one
    final = {t["id"]: t for t in live.api("GET", "/api/tasks?archived=true")}
    assert set(final) == archived | {reopened["id"], recent["id"]}
    assert (final[reopened["id"]]["lane"], final[reopened["id"]]["version"]) == ("done", finished["version"]), \
        "the latest archived copy wins"
    assert [t["id"] for t in live.api("GET", "/api/tasks")] == [still_open["id"]]


# ===== --healthcheck and systemd =====


def closed_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.parametrize("target,code", [("healthy", 0), ("degraded", 1), ("closed", 1)])
def test_healthcheck_exits_0_only_for_a_healthy_bridge(open_bridge, tmp_path, target, code):
    if target == "closed":
        port = closed_port()
    else:
        live = open_bridge()
        port = live.port
        if target == "degraded":
            break_storage(live)
    result = run_cli(tmp_path, "--healthcheck", "--port", str(port))
    assert result.returncode == code, result.stderr
    assert result.stderr.startswith("clawbridge: unhealthy" if code else "clawbridge: healthy"), result.stderr


def receive(sock, messages, until, timeout=10.0, listen_only=False):
    """Collect datagrams into messages until until(messages) holds, failing at the deadline; with
    listen_only, just collect what arrives until the deadline."""
    deadline = time.monotonic() + timeout
    while not until(messages):
        left = deadline - time.monotonic()
        if left <= 0 and listen_only:
            return messages
        assert left > 0, f"timed out; got {messages}"
        sock.settimeout(left)
        try:
            messages.append(sock.recv(4096).decode())
        except socket.timeout:
            pass
    return messages


@pytest.mark.parametrize("abstract", [False, True], ids=["path", "abstract"])
def test_systemd_hears_ready_then_watchdog_then_stopping(start_bridge, tmp_path, abstract):
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        if abstract:
            name = f"clawbridge-test-{os.getpid()}-{time.monotonic_ns()}"
            sock.bind("\0" + name)
            address = "@" + name
        else:
            address = str(tmp_path / "notify.sock")
            sock.bind(address)
        bridge = start_bridge(env={"NOTIFY_SOCKET": address, "WATCHDOG_USEC": "1000000"})
        messages = receive(sock, [], lambda got: sum(m == "WATCHDOG=1" for m in got) >= 2)
        assert messages[0].startswith("READY=1\n") and f":{bridge.port}" in messages[0]
        assert set(messages[1:]) == {"WATCHDOG=1"}
        bridge.proc.send_signal(signal.SIGTERM)
        receive(sock, messages, lambda got: "STOPPING=1" in got)
        assert bridge.stop() == 0
        sock.setblocking(False)
        with pytest.raises(BlockingIOError):
            messages.append(sock.recv(4096).decode())
        assert messages[-1] == "STOPPING=1", "nothing after STOPPING=1, the watchdog least of all"


def test_the_watchdog_is_fed_only_while_storage_is_writable(monkeypatch, tmp_path):
    """serve() in a thread (its SIGTERM handler captured), so that its disk can fail: systemd must stop
    hearing WATCHDOG=1 while writes are refused, and hear it again once the bridge has recovered by itself."""
    handlers, started, outcome = {}, queue.Queue(), []
    monkeypatch.setattr(clawbridge.signal, "signal", lambda sig, handler: handlers.__setitem__(sig, handler))
    monkeypatch.setenv("WATCHDOG_USEC", "1000000")
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(tmp_path / "notify.sock"))
        monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "notify.sock"))
        config = clawbridge.Config(data_dir=str(tmp_path / "d"), port=0, instance_id="test")
        thread = threading.Thread(target=lambda: outcome.append(clawbridge.serve(config, ready=started.put)),
                                  daemon=True)
        thread.start()
        server = started.get(timeout=10)
        try:
            receive(sock, [], lambda got: "WATCHDOG=1" in got)
            store = server.bridge.store
            store.fsync = store.journal.fsync = fail_fsync     # journal and snapshots: the disk is gone
            assert http_call(server.server_address[1], "POST", "/api/agents/register", {"id": "a1"})[0] == 503
            receive(sock, [], lambda got: False, timeout=0.1, listen_only=True)    # a feed decided just before
            silent = receive(sock, [], lambda got: False, timeout=1.6, listen_only=True)   # 3 feeding intervals
            assert "WATCHDOG=1" not in silent, "systemd is not told all is well while writes are refused"
            store.fsync = store.journal.fsync = os.fsync      # the flusher's next snapshot recovers on its own
            receive(sock, [], lambda got: "WATCHDOG=1" in got)
            assert server.bridge.store.healthy
        finally:
            handlers[signal.SIGTERM](signal.SIGTERM, None)
            thread.join(15)
        assert "STOPPING=1" in receive(sock, [], lambda got: "STOPPING=1" in got, timeout=1)
        assert outcome == [0]
