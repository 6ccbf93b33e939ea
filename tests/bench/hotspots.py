#!/usr/bin/env python3
"""Where the time goes: cProfile of the bridge under the benchmarks' loads, to find what to change when a
figure misses its target. The bridge runs in this process (Bridge.open + BridgeServer with its flusher and
watchdog, logging at info to a file as in production), every thread it starts is profiled, and the load
comes from benchlib's load processes, so the client is not in the profile. cProfile slows Python calls
down, so read the shares, not the absolute times.

    python3 tests/bench/hotspots.py heartbeat      keep-alive beats, 8 connections
    python3 tests/bench/hotspots.py newconn        a new connection per beat, 8 at a time
    python3 tests/bench/hotspots.py costs          µs of each piece of one heartbeat, timed without a profiler
    python3 tests/bench/hotspots.py writes         task updates at 64 connections on 100k tasks
    python3 tests/bench/hotspots.py snapshot       one periodic snapshot of those 100k tasks
    python3 tests/bench/hotspots.py startup        Bridge.open on 10k agents / 100k tasks + 50k journal
    python3 tests/bench/hotspots.py failover       the sweep that moves 10k tasks
    python3 tests/bench/hotspots.py agentcli       clawagent.py heartbeat: imports, compile, run
    options: --top N (default 25), --seconds S (default 4), --wall (server threads in wall time, waits
    included, instead of CPU time)

Without a command it does nothing (make bench runs every file in tests/bench/)."""
import argparse
import cProfile
import io
import logging
import os
import pstats
import subprocess
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import benchlib as B  # noqa: E402


def show(stats, top, title):
    print(f"\n==== {title}: top {top} by own time (tottime)")
    if not isinstance(stats, pstats.Stats):
        stats = pstats.Stats(stats)
    stats.strip_dirs()
    for key in ("tottime", "cumulative"):
        if key == "cumulative":
            print(f"==== {title}: top {top} by cumulative time")
        stats.stream = io.StringIO()
        stats.sort_stats(key).print_stats(top)
        print(_trim(stats.stream.getvalue()))


def _trim(text):
    lines = text.splitlines()
    start = next((i for i, line in enumerate(lines) if "ncalls" in line), 0)
    return "\n".join(lines[start:])


class ThreadProfiles:
    """A cProfile.Profile for every thread started while active (threading.setprofile)."""

    def __init__(self, wall=False):
        self.profiles = []
        self.lock = threading.Lock()
        self.timer = time.perf_counter if wall else time.thread_time

    def _start(self, frame, event, arg):
        sys.setprofile(None)
        prof = cProfile.Profile(self.timer)
        with self.lock:
            self.profiles.append(prof)
        prof.enable()

    def __enter__(self):
        threading.setprofile(self._start)
        return self

    def __exit__(self, *exc):
        threading.setprofile(None)

    def stats(self):
        with self.lock:
            profiles = list(self.profiles)
        merged = None
        for prof in profiles:
            try:
                prof.create_stats()
            except Exception:
                continue
            if not prof.stats:
                continue
            if merged is None:
                merged = pstats.Stats(prof)
            else:
                merged.add(prof)
        return merged


def in_process_bridge(data_dir, log_path, profiles):
    """The bridge as serve() runs it, in this process: returns (port, stop function)."""
    cb = B.clawbridge()
    cb.configure_logging("info", stream=open(log_path, "a", encoding="utf-8"))
    config = cb.Config(data_dir=str(data_dir), port=0, instance_id="bench")
    bridge = cb.Bridge.open(config)
    server = cb.BridgeServer((B.HOST, 0), bridge)
    stop = threading.Event()
    with profiles:
        threads = [threading.Thread(target=server.serve_forever, name="http", daemon=True),
                   cb.Flusher(bridge, stop), cb.Watchdog(bridge, stop)]
        for thread in threads:
            thread.start()
    port = server.server_address[1]

    def close():
        stop.set()
        server.shutdown()
        for thread in threads:
            thread.join(10)
        server.server_close()
        bridge.close()
    return port, close


def profile_load(data_dir, tmp, make_requests, conns, keepalive, seconds, top, title, wall=False):
    profiles = ThreadProfiles(wall)
    port, close = in_process_bridge(data_dir, f"{tmp}/bridge.log", profiles)
    try:
        requests = make_requests(port)
        with profiles:
            result = B.load(port, requests, conns, seconds, warmup=0.3, keepalive=keepalive)
        time.sleep(0.3)
    finally:
        close()
    print(f"{title}: {result.rps:,.0f} req/s under the profiler (p99 {result.p99:.1f} ms), "
          f"{len(profiles.profiles)} threads profiled")
    show(profiles.stats(), top, title + (" (wall time)" if wall else " (CPU time of the bridge's threads)"))


def heartbeat(args, keepalive):
    import heartbeats as H
    with tempfile.TemporaryDirectory(prefix="hot-") as tmp:
        def make(port):
            class Caller:
                def call(self, method, path, body=None):
                    return B.call(port, method, path, body)
            return H.beat_requests(H.setup_fleet(Caller()), close=not keepalive)
        profile_load(f"{tmp}/data", tmp, make, 8, keepalive, args.seconds, args.top,
                     "heartbeats " + ("keep-alive c=8" if keepalive else "new connection per request c=8"), args.wall)


def writes(args):
    import writes as W
    with tempfile.TemporaryDirectory(prefix="hot-") as tmp:
        fleet = B.make_fleet(W.AGENTS, W.INSTANCES, 100_000)
        B.write_fleet(f"{tmp}/data", fleet)
        ids = [t.id for t in fleet.tasks]
        profile_load(f"{tmp}/data", tmp, lambda port: [W.update_requests(ids, 3000, s) for s in (1, 2)], 64, True,
                     args.seconds, args.top, "durable updates c=64, 100k tasks", args.wall)


def startup(args):
    import startup as S
    cb = B.clawbridge()
    with tempfile.TemporaryDirectory(prefix="hot-") as tmp:
        fleet = B.make_fleet(S.AGENTS, S.INSTANCES, S.TASKS, notes_per_agent=1)
        B.write_fleet(f"{tmp}/data", fleet, seq=500_000, journal=S.journal_records(fleet, S.JOURNAL))
        del fleet
        config = cb.Config(data_dir=f"{tmp}/data", port=0, instance_id="bench")
        prof = cProfile.Profile()
        started = time.perf_counter()
        prof.enable()
        bridge = cb.Bridge.open(config)
        prof.disable()
        print(f"Bridge.open under the profiler: {time.perf_counter() - started:.2f}s; "
              f"RSS now {B.proc_status(os.getpid()).get('VmRSS', 0) / 1024:.0f} MB, "
              f"peak {B.proc_status(os.getpid()).get('VmHWM', 0) / 1024:.0f} MB")
        bridge.store.close()
        show(prof, args.top, "start-up (Bridge.open)")


def snapshot(args):
    """One periodic snapshot (Bridge.snapshot) of the write benchmark's 100k-task state."""
    import writes as W
    cb = B.clawbridge()
    with tempfile.TemporaryDirectory(prefix="hot-") as tmp:
        fleet = B.make_fleet(W.AGENTS, W.INSTANCES, 100_000)
        B.write_fleet(f"{tmp}/data", fleet)
        bridge = cb.Bridge.open(cb.Config(data_dir=f"{tmp}/data", port=0, instance_id="bench"))
        cpu, wall = time.process_time(), time.perf_counter()
        bridge.snapshot()
        print(f"Bridge.snapshot of 100k tasks: {time.perf_counter() - wall:.2f}s wall, "
              f"{time.process_time() - cpu:.2f}s CPU (all of it holding the GIL but for the writes and fsync)")
        prof = cProfile.Profile()
        prof.enable()
        bridge.snapshot()
        prof.disable()
        bridge.close()
        show(prof, args.top, "snapshot of 100k tasks")


def failover(args):
    import failover as F
    cb = B.clawbridge()
    agents, instances, tasks, meta = F.make_state()
    prof = cProfile.Profile()
    real_sweep = cb.sweep

    def profiled(state, now, force=False):
        prof.enable()
        try:
            return real_sweep(state, now, force)
        finally:
            prof.disable()
    cb.sweep = profiled
    try:
        swept, encoded, mb, report = F.domain(agents, instances, tasks, meta)
    finally:
        cb.sweep = real_sweep
    print(f"sweep under the profiler: {swept:.2f}s, {len(report['reassigned'])} tasks reassigned; journal record "
          f"{mb:.1f} MB encoded in {encoded:.2f}s")
    show(prof, args.top, "failover sweep")


def agentcli(args):
    import agentcli as A
    with tempfile.TemporaryDirectory(prefix="hot-") as tmp:
        home = os.path.join(tmp, "home")
        os.makedirs(home)
        with B.start_bridge(f"{tmp}/data", tmp) as bridge:
            env = B.clean_env({"HOME": home})
            subprocess.run([sys.executable, B.AGENT, "register", "--agent", "bench-agent", "--bridge",
                            f"http://{B.HOST}:{bridge.port}", "--instance", "bench-host", "--tailscale-ip", ""],
                           env=env, cwd=tmp, check=True, stdout=subprocess.DEVNULL)
            beat = ["heartbeat", "--agent", "bench-agent", "--quiet"]
            source = open(B.AGENT).read()
            started = time.perf_counter()
            for _ in range(10):
                compile(source, B.AGENT, "exec")
            print(f"compiling clawagent.py (done on every run: a script is never cached): "
                  f"{(time.perf_counter() - started) * 100:.1f} ms")
            for label, argv in (("python3 -c pass", [sys.executable, "-c", "pass"]),
                                ("python3 -S -c pass (no site)", [sys.executable, "-S", "-c", "pass"]),
                                ("python3 -c 'import <clawagent imports>'",
                                 [sys.executable, "-c", "import argparse, json, os, sys, time, socket, shlex"]),
                                ("clawagent.py heartbeat", [sys.executable, B.AGENT, *beat]),
                                ("clawagent.py heartbeat, module cached",
                                 [sys.executable, "-c", "import sys; sys.path.insert(0, %r); import clawagent; "
                                  "sys.argv[0] = 'clawagent.py'; sys.exit(clawagent.main(%r))"
                                  % (os.path.dirname(B.AGENT), beat)])):
                times = [A.timed(argv, env, tmp) for _ in range(12)]
                print(f"  {label:45s} median {B.median(times):6.1f} ms  min {min(times):6.1f} ms")
            out = subprocess.run([sys.executable, "-X", "importtime", B.AGENT, *beat], env=env, cwd=tmp,
                                 stderr=subprocess.PIPE, stdout=subprocess.DEVNULL).stderr.decode()
            rows = []
            for line in out.splitlines():
                if line.startswith("import time:") and "|" in line and "self" not in line:
                    parts = line[len("import time:"):].split("|")
                    rows.append((int(parts[1]), int(parts[0]), parts[2].rstrip()))
            print("\nimports of clawagent.py heartbeat, top 15 by cumulative µs (python -X importtime):")
            for cumulative, own, name in sorted(rows, reverse=True)[:15]:
                print(f"  {cumulative:8d} {own:8d} {name}")
            prof_out = f"{tmp}/agent.prof"
            subprocess.run([sys.executable, "-m", "cProfile", "-o", prof_out, B.AGENT, *beat], env=env, cwd=tmp,
                           check=True, stdout=subprocess.DEVNULL)
            show(pstats.Stats(prof_out), args.top, "clawagent.py heartbeat (cProfile of the script)")


def costs(args):
    """µs per call of the pieces of one heartbeat request, timed one by one without a profiler."""
    import email.utils
    import http.client
    import json
    import timeit
    import heartbeats as H
    cb = B.clawbridge()
    with tempfile.TemporaryDirectory(prefix="hot-") as tmp:
        handler = cb.LogHandler(open(f"{tmp}/bridge.log", "w"))
        handler.setFormatter(cb.TextLogFormatter())
        logging.getLogger().addHandler(handler)
        logging.getLogger().setLevel(logging.INFO)
        bridge = cb.Bridge.open(cb.Config(data_dir=f"{tmp}/data", port=0, instance_id="bench"))

        class Caller:
            def call(self, method, path, body=None):
                fn = cb.register_agent if path.endswith("register") else cb.create_task
                result = bridge.run(fn, body)
                return (201, result[0] if isinstance(result, tuple) else result)
        held = H.setup_fleet(Caller())
        request = H.beat_requests(held, close=False)[1]
        head, _, raw = request.partition(b"\r\n\r\n")
        header_block = head.split(b"\r\n", 1)[1] + b"\r\n\r\n"
        body = json.loads(raw)
        reply = bridge.run(cb.record_heartbeat, "agent-01", body)
        message = cb.read_headers(io.BytesIO(header_block))
        lock = threading.Lock()
        beats = {}

        def limit_handler():
            parsed = json.loads(raw.decode())
            with lock:
                beats["agent-01"] = (0, parsed)
            payload = json.dumps({"success": True, "agent": "agent-01", "serverTime": 0}, separators=(",", ":"))
            return ("HTTP/1.1 200 OK\r\nDate: " + email.utils.formatdate(usegmt=True) + "\r\n\r\n" + payload).encode()

        pieces = [
            ("stdlib header parsing (http.client.parse_headers; both servers)",
             lambda: http.client.parse_headers(io.BytesIO(header_block))),
            ("the limit server's whole handler body", limit_handler),
            ("resolve(method, path)", lambda: cb.resolve("POST", "/api/agents/agent-01/heartbeat")),
            ("read_headers (the bridge's own header parser)", lambda: cb.read_headers(io.BytesIO(header_block))),
            ("one headers.get() on the parsed headers", lambda: message.get("Content-Length")),
            ("parse_json_body(raw)", lambda: cb.parse_json_body(raw)),
            ("bridge.run(record_heartbeat): lock, domain, reply dict",
             lambda: bridge.run(cb.record_heartbeat, "agent-01", body)),
            ("response_bytes(200, reply): JSON and head",
             lambda: cb.response_bytes(200, reply, {}, False, False)),
            ("the access log line (access_log at info, LogHandler to a file)",
             lambda: cb.access_log(logging.INFO, "POST", "/api/agents/agent-01/heartbeat", 200, 1448, 0.0004,
                                   "/api/agents/{id}/heartbeat")),
        ]
        print("µs per call, best of 5 rounds of 2000 calls, no profiler:")
        for label, fn in pieces:
            try:
                best = min(timeit.repeat(fn, number=2000, repeat=5)) / 2000 * 1e6
                print(f"  {best:8.1f}  {label}")
            except Exception as exc:
                print(f"       n/a  {label} ({type(exc).__name__}: {exc})")
        bridge.close()
        logging.getLogger().removeHandler(handler)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", nargs="?", choices=("heartbeat", "newconn", "costs", "writes", "snapshot",
                                                    "startup", "failover", "agentcli"))
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--wall", action="store_true", help="profile the server threads in wall time (with "
                        "lock and GIL waits) instead of CPU time")
    args = parser.parse_args(argv)
    if args.what is None:
        print("hotspots.py profiles the bridge under a benchmark's load; e.g. python3 tests/bench/hotspots.py "
              "heartbeat (see --help). Nothing to do without a command.")
        return 0
    if args.what in ("heartbeat", "newconn"):
        heartbeat(args, keepalive=args.what == "heartbeat")
    else:
        {"costs": costs, "writes": writes, "snapshot": snapshot, "startup": startup, "failover": failover,
         "agentcli": agentcli}[args.what](args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
