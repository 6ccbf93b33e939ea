#!/usr/bin/env python3
"""Shared code of the clawbridge benchmarks (tests/bench/): processes, the load generator, state files, and
the result table. Run the benchmarks with `python3 tests/bench/run.py` (or `make bench`); this file does
nothing when run on its own.

The load generator runs in separate processes (multiprocessing, spawn), one epoll loop each over raw
sockets with pre-built requests, so that neither the GIL nor an HTTP client library of the benchmark
process limits what it measures; the same generator drives the bridge and the limit server. It is a closed
loop: every connection has one request in flight and sends the next as soon as the answer is complete.
Requests completed within the measured window count; latency is from the first byte sent (from the
connect, for a new connection per request) to the last byte of the answer."""
import errno
import http.client
import json
import multiprocessing
import os
import re
import selectors
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import NamedTuple

BENCH_DIR = Path(__file__).resolve().parent
ROOT = BENCH_DIR.parents[1]
BRIDGE = str(ROOT / "clawbridge.py")
AGENT = str(ROOT / "clawagent.py")
LIMIT_SERVER = str(BENCH_DIR / "limit_server.py")
HOST = "127.0.0.1"
BRIDGE_RUNNING = re.compile(r"Bridge running on http://[^\s:]+:(\d+)")
LIMIT_RUNNING = re.compile(r"Limit server running on http://[^\s:]+:(\d+)")

_T0 = time.monotonic()


def clawbridge():
    """The clawbridge module (imported on first use, so that load workers never load it)."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    import clawbridge as module
    return module


def say(message):
    """A progress line on stderr, with the seconds since the start."""
    print(f"[{time.monotonic() - _T0:6.1f}s] {message}", file=sys.stderr, flush=True)


# ===== Results =====


class Row(NamedTuple):
    name: str
    figure: str
    target: str
    verdict: str        # PASS, FAIL, INFO (reported, no target) or ERROR


def check(ok):
    return "PASS" if ok else "FAIL"


def print_table(rows, out=sys.stdout):
    """The final table: name | figure | target | PASS/FAIL."""
    headers = ("benchmark", "figure", "target", "result")
    widths = [max(len(h), *(len(str(r[i])) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    line = "+-" + "-+-".join("-" * w for w in widths) + "-+"
    print(line, file=out)
    print("| " + " | ".join(h.ljust(w) for h, w in zip(headers, widths)) + " |", file=out)
    print(line, file=out)
    for row in rows:
        print("| " + " | ".join(str(v).ljust(w) for v, w in zip(row, widths)) + " |", file=out)
    print(line, file=out)


def percentile(sorted_values, fraction):
    if not sorted_values:
        return float("nan")
    return sorted_values[min(len(sorted_values) - 1, int(fraction * len(sorted_values)))]


def median(values):
    return statistics.median(values) if values else float("nan")


# ===== Processes =====


def clean_env(extra=None):
    """The environment without any bridge or agent setting of the caller."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("BRIDGE_", "CLAW", "OPENCLAW", "INSTANCE_ID", "OFFLINE_AFTER", "LOG_LEVEL",
                                "HEARTBEAT_INTERVAL", "MAX_CONCURRENT", "DEBUG"))}
    env.update(extra or {})
    return env


def proc_status(pid):
    """{field: kB} of VmRSS, VmHWM (peak RSS) and VmSize from /proc/<pid>/status."""
    found = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key in ("VmRSS", "VmHWM", "VmSize"):
                    found[key] = int(value.split()[0])
    except OSError:
        pass
    return found


def cpu_seconds(pid):
    """User plus system CPU seconds of a process so far."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rpartition(")")[2].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return 0.0


def free_port():
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


class Server:
    """A server subprocess whose port comes from a line of its log (stdout and stderr go to a file), or,
    when pattern is a port number, that answers GET /health on it."""

    def __init__(self, argv, log_path, pattern, cwd, env=None, timeout=120.0, poll=0.005):
        self.log_path = Path(log_path)
        self.log = open(self.log_path, "w")
        self.started = time.perf_counter()
        self.proc = subprocess.Popen(argv, cwd=cwd, env=clean_env(env), stdout=self.log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL)
        self.pid = self.proc.pid
        deadline = time.monotonic() + timeout
        while True:
            match = pattern.search(self.output()) if not isinstance(pattern, int) else None
            if match or (isinstance(pattern, int) and _answers(pattern)):
                self.port = int(match.group(1)) if match else pattern
                self.startup = time.perf_counter() - self.started      # seconds until the line was written
                break
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(f"{argv[1]} did not start (exit {self.proc.returncode}):\n{self.output()[-3000:]}")
            time.sleep(poll)

    def output(self):
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def memory(self):
        return proc_status(self.pid)

    def cpu(self):
        return cpu_seconds(self.pid)

    def call(self, method, path, body=None, timeout=60):
        return call(self.port, method, path, body, timeout)

    def settle(self, quiet=0.05, window=0.25, limit=30.0):
        """Wait until the process is nearly idle (under `quiet` of a core over `window` seconds): a background
        snapshot of the previous measurement must not run into the next one."""
        deadline = time.monotonic() + limit
        while time.monotonic() < deadline:
            before = self.cpu()
            time.sleep(window)
            if self.cpu() - before <= quiet * window + 0.011:     # one clock tick of slack
                return True
        return False

    def stop(self, timeout=30):
        """SIGTERM and wait; SIGKILL when it does not stop in time."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.log.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.kill()


def _answers(port):
    try:
        return call(port, "GET", "/health", timeout=2)[0] == 200
    except OSError:
        return False


def start_bridge(data_dir, workdir, name="bridge", args=(), env=None, timeout=300.0, log_level=None):
    """clawbridge.py on a free loopback port over data_dir, as an operator runs it (log level info: its port
    comes from its "Bridge running" line). With another log level, the port is chosen here."""
    port = free_port() if log_level and log_level != "info" else 0
    argv = [sys.executable, BRIDGE, "--port", str(port), "--host", HOST, "--data-dir", str(data_dir),
            "--instance-id", "bench", *(("--log-level", log_level) if log_level else ()), *args]
    return Server(argv, Path(workdir) / f"{name}.log", port or BRIDGE_RUNNING, cwd=str(workdir), env=env,
                  timeout=timeout)


def start_limit_server(workdir, name="limit"):
    """The bare ThreadingHTTPServer of limit_server.py: the limit of this stack."""
    argv = [sys.executable, LIMIT_SERVER, "--serve", "--host", HOST, "--port", "0"]
    return Server(argv, Path(workdir) / f"{name}.log", LIMIT_RUNNING, cwd=str(workdir), timeout=30.0)


def wait_healthy(port, timeout=60.0, poll=0.005):
    """Seconds until GET /health answers 200."""
    started = time.perf_counter()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            status, _ = call(port, "GET", "/health", timeout=5)
            if status == 200:
                return time.perf_counter() - started
        except OSError:
            pass
        time.sleep(poll)
    raise RuntimeError(f"/health on port {port} did not answer 200 within {timeout}s")


# ===== HTTP =====


def call(port, method, path, body=None, timeout=60, headers=None):
    """One request on a new connection. Returns (status, parsed JSON or None)."""
    conn = http.client.HTTPConnection(HOST, port, timeout=timeout)
    try:
        data = None if body is None else json.dumps(body).encode()
        hdrs = {"Content-Type": "application/json"} if data is not None else {}
        hdrs.update(headers or {})
        conn.request(method, path, body=data, headers=hdrs)
        resp = conn.getresponse()
        payload = resp.read()
        return resp.status, (json.loads(payload) if payload else None)
    finally:
        conn.close()


def build_request(method, path, body=None, close=False):
    """A whole HTTP/1.1 request as bytes, headers as a small client (clawagent.py, curl) sends them."""
    data = b"" if body is None else json.dumps(body, separators=(",", ":")).encode()
    lines = [f"{method} {path} HTTP/1.1", f"Host: {HOST}", "User-Agent: clawbench/1", "Accept: */*"]
    if body is not None:
        lines += ["Content-Type: application/json", f"Content-Length: {len(data)}"]
    if close:
        lines.append("Connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + data


# ===== Load generator =====


class Load(NamedTuple):
    requests: int           # answers completed within the window
    seconds: float          # the window
    p50: float              # ms
    p99: float              # ms
    errors: int             # broken connections and unexpected status codes
    statuses: dict          # status -> count
    client_cpu: float       # CPU seconds the load processes used within their run, over the window
    latencies: list         # ms, sorted

    @property
    def rps(self):
        return self.requests / self.seconds if self.seconds else 0.0


def _answer(buf):
    """(status, length) of the complete HTTP response at the start of buf, or None while incomplete."""
    end = buf.find(b"\r\n\r\n")
    if end < 0:
        return None
    head = bytes(buf[:end]).lower()
    at = head.find(b"\r\ncontent-length:")
    length = 0
    if at >= 0:
        stop = head.find(b"\r\n", at + 2)
        length = int(head[at + 17:stop if stop >= 0 else len(head)])
    total = end + 4 + length
    if len(buf) < total:
        return None
    return int(buf[9:12]), total


def _worker(port, requests, conns, keepalive, warmup, duration, ok, pipe):
    """One load process: `conns` connections in one epoll loop. Sends (count, latencies, statuses, errors,
    cpu seconds) back through pipe."""
    address = (HOST, port)
    sel = selectors.DefaultSelector()
    perf = time.perf_counter
    latencies, statuses = [], {}
    count = errors = 0
    socks = [None] * conns          # per slot: its socket
    bufs = [bytearray() for _ in range(conns)]
    sent = [0.0] * conns            # when its request in flight began
    next_index = list(range(conns))

    def request_for(slot):
        data = requests[next_index[slot] % len(requests)]
        next_index[slot] += conns
        return data

    def open_socket(slot, blocking_connect):
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if blocking_connect:
            sock.connect(address)
            sock.setblocking(False)
        else:
            sock.setblocking(False)
            code = sock.connect_ex(address)
            if code not in (0, errno.EINPROGRESS):
                sock.close()
                raise OSError(code, os.strerror(code))
        socks[slot] = sock
        return sock

    def drop(slot):
        sock = socks[slot]
        socks[slot] = None
        if sock is not None:
            try:
                sel.unregister(sock)
            except (KeyError, ValueError):
                pass
            sock.close()

    def send(slot):
        """Start the next request of a slot (on a new connection when not keep-alive)."""
        nonlocal errors
        for attempt in range(100):
            bufs[slot].clear()
            sent[slot] = perf()
            try:
                if keepalive:
                    if socks[slot] is None:
                        sel.register(open_socket(slot, True), selectors.EVENT_READ, slot)
                    socks[slot].send(request_for(slot))
                else:
                    sel.register(open_socket(slot, False), selectors.EVENT_WRITE, slot)
                return
            except OSError:
                errors += 1
                drop(slot)
                time.sleep(0.001 * attempt)
        raise RuntimeError("cannot reach the server")

    if keepalive:
        for slot in range(conns):
            sel.register(open_socket(slot, True), selectors.EVENT_READ, slot)
    pipe.send("ready")
    pipe.recv()     # go
    cpu_start = time.process_time()
    start = perf()
    win_start, win_end = start + warmup, start + warmup + duration
    for slot in range(conns):
        send(slot)
    while True:
        now = perf()
        if now >= win_end:
            break
        for key, mask in sel.select(min(0.05, win_end - now)):
            slot = key.data
            sock = socks[slot]
            try:
                if mask & selectors.EVENT_WRITE:        # a new connection is up (or failed)
                    code = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                    if code:
                        raise OSError(code, os.strerror(code))
                    sock.send(request_for(slot))
                    sel.modify(sock, selectors.EVENT_READ, slot)
                    continue
                data = sock.recv(65536)
                if not data:
                    raise ConnectionResetError("closed by the server")
            except OSError:
                errors += 1
                drop(slot)
                send(slot)
                continue
            buf = bufs[slot]
            buf += data
            answer = _answer(buf)
            if answer is None:
                continue
            done = perf()
            status = answer[0]
            if not keepalive:
                drop(slot)
            if win_start <= done <= win_end:
                count += 1
                latencies.append((done - sent[slot]) * 1000.0)
                statuses[status] = statuses.get(status, 0) + 1
                if status not in ok:
                    errors += 1
            send(slot)
    cpu = time.process_time() - cpu_start
    for slot in range(conns):
        drop(slot)
    pipe.send((count, latencies, statuses, errors, cpu))
    pipe.close()


def load(port, requests, conns, duration, warmup=0.5, keepalive=True, procs=None, ok=(200, 201)):
    """Drive a server with `conns` closed-loop connections for warmup + duration seconds.

    requests: a list of request bytes (build_request), used in turn; or a list of such lists, one per load
    process. Returns a Load. procs defaults to 1 for up to 8 connections and 2 above (the machines have two
    cores, one of which the server takes)."""
    procs = procs or (1 if conns <= 8 else 2)
    procs = min(procs, conns)
    ctx = multiprocessing.get_context("spawn")
    per_proc = [conns // procs + (1 if i < conns % procs else 0) for i in range(procs)]
    workers = []
    for i, n in enumerate(per_proc):
        reqs = requests[i % len(requests)] if isinstance(requests[0], list) else requests
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=_worker, args=(port, reqs, n, keepalive, warmup, duration, tuple(ok), child),
                           daemon=True)
        proc.start()
        child.close()
        workers.append((proc, parent))
    try:
        for proc, pipe in workers:
            if not pipe.poll(60) or pipe.recv() != "ready":
                raise RuntimeError("a load process did not get ready")
        for proc, pipe in workers:
            pipe.send("go")
        results = []
        for proc, pipe in workers:
            if not pipe.poll(warmup + duration + 60):
                raise RuntimeError("a load process did not report")
            results.append(pipe.recv())
    finally:
        for proc, pipe in workers:
            proc.join(10)
            if proc.is_alive():
                proc.kill()
            pipe.close()
    latencies = sorted(x for r in results for x in r[1])
    statuses = {}
    for r in results:
        for k, v in r[2].items():
            statuses[k] = statuses.get(k, 0) + v
    return Load(sum(r[0] for r in results), duration, percentile(latencies, 0.50), percentile(latencies, 0.99),
                sum(r[3] for r in results), statuses, sum(r[4] for r in results), latencies)


def merge(loads):
    """Several runs of the same measurement as one (their windows added up)."""
    latencies = sorted(x for run in loads for x in run.latencies)
    statuses = {}
    for run in loads:
        for k, v in run.statuses.items():
            statuses[k] = statuses.get(k, 0) + v
    return Load(sum(r.requests for r in loads), sum(r.seconds for r in loads), percentile(latencies, 0.50),
                percentile(latencies, 0.99), sum(r.errors for r in loads), statuses,
                sum(r.client_cpu for r in loads), latencies)


# ===== State files =====


def write_data_dir(data_dir, agents=(), instances=(), tasks=(), notifications=(), meta=None, seq=0, journal=()):
    """A data dir as a bridge leaves it: one snapshot (at record `seq`) holding the given entity tuples,
    written with clawbridge's own snapshot writer, and optionally a journal segment after it holding
    `journal`, a sequence of records {"ops": [...], "meta": {...}} (seq numbers are added). Returns the sizes
    in bytes of (snapshot, journal)."""
    cb = clawbridge()
    os.makedirs(data_dir, mode=0o700, exist_ok=True)
    doc = cb.empty_doc()
    doc.update(seq=seq, meta=dict(meta or {}), agents=list(agents), instances=list(instances), tasks=list(tasks),
               notifications=list(notifications))
    snapshot = os.path.join(data_dir, f"snapshot-{seq:012d}.json")
    cb.atomic_write(snapshot, cb.snapshot_chunks(doc))
    journal_size = 0
    if journal:
        path = os.path.join(data_dir, f"journal-{seq + 1:012d}.jsonl")
        with open(path, "w", encoding="utf-8") as out:
            for n, record in enumerate(journal, start=seq + 1):
                out.write(json.dumps({"seq": n, **record}, separators=(",", ":")) + "\n")
            out.flush()
            os.fsync(out.fileno())
        journal_size = os.path.getsize(path)
    return os.path.getsize(snapshot), journal_size


class Fleet(NamedTuple):
    agents: list
    instances: list
    tasks: list
    notifications: list
    meta: dict


def make_fleet(agents, instances, tasks, max_tasks=3, queued=0.10, cancelled=0.05, notes_per_agent=1,
               interval_ms=900_000, hostname="bench-host", description=200):
    """A state as a busy bridge holds it, as clawbridge entity tuples: `agents` agents spread over
    `instances` instances, each holding max_tasks tasks (assigned or in progress) while tasks last; of the
    other tasks `queued` are queued, `cancelled` cancelled and the rest done, each with a short history;
    notes_per_agent unread notifications per agent."""
    cb = clawbridge()
    now = int(time.time() * 1000)
    base = now - 10 * tasks - 1_000_000
    fleet_agents = [cb.Agent(id=f"agent-{n:05d}", name=f"agent {n}", roles=("dev",), instanceId=f"host-{n % instances:04d}",
                             hostname=hostname, heartbeatInterval=interval_ms, maxConcurrentTasks=max_tasks,
                             createdAt=base, updatedAt=base, lastHeartbeat=now) for n in range(agents)]
    fleet_instances = [cb.Instance(instanceId=f"host-{n:04d}", hostname=hostname, createdAt=base, updatedAt=base)
                       for n in range(instances)]
    active = min(tasks, agents * max_tasks)
    rest = tasks - active
    n_queued, n_cancelled = int(rest * queued), int(rest * cancelled)
    text = ("Benchmark task: " + "lorem ipsum dolor sit amet " * 20)[:description]
    fleet_tasks = []
    for n in range(tasks):
        at = base + 10 * n
        created = (at, "created", None, None)
        task = cb.Task(id=f"task-{at}", title=f"bench task {n}", description=text, roles=("dev",),
                       priority=cb.PRIORITIES[n % 4], createdAt=at, updatedAt=at + 5, queuedAt=at,
                       history=(created,))
        if n < active:
            owner = fleet_agents[n // max_tasks].id
            task = task._replace(lane="assigned" if n % 2 else "in_progress", assignedTo=owner, epoch=1, version=3,
                                 history=(created, (at + 1, "task-assigned", "bridge", owner),
                                          (at + 2, "start", owner, None)))
        elif n < active + n_queued:
            pass
        elif n < active + n_queued + n_cancelled:
            task = task._replace(lane="cancelled", version=2, history=(created, (at + 3, "cancelled", "api", None)))
        else:
            owner = fleet_agents[n % agents].id
            task = task._replace(lane="done", assignedTo=owner, epoch=1, version=4,
                                 history=(created, (at + 1, "task-assigned", "bridge", owner),
                                          (at + 2, "start", owner, None), (at + 3, "complete", owner, None)))
        fleet_tasks.append(task._replace(history=cb.COMPACT(task.history)))     # history is JSON text
    notes = []
    for n, agent in enumerate(fleet_agents):
        for k in range(notes_per_agent):
            at = base + 10 * tasks + n * notes_per_agent + k
            notes.append(cb.Notification(id=f"ntf-{at}", agentId=agent.id, type="message", title="hello",
                                         message="A message for the agent from the benchmark.", createdAt=at))
    return Fleet(fleet_agents, fleet_instances, fleet_tasks, notes, {"lastId": base + 10 * tasks + 10 * agents})


def write_fleet(data_dir, fleet, seq=0, journal=()):
    return write_data_dir(data_dir, fleet.agents, fleet.instances, fleet.tasks, fleet.notifications, fleet.meta,
                          seq, journal)


def fmt_rate(value):
    return f"{value:,.0f}/s"


def fmt_ms(value):
    return f"{value:.1f} ms" if value >= 10 else f"{value:.2f} ms"


if __name__ == "__main__":
    print("benchlib.py holds the code the benchmarks share; run them with: python3 tests/bench/run.py")
