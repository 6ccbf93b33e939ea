#!/usr/bin/env python3
"""Benchmark 3, start-up and memory: a bridge restarting on 10k agents (100 instances) and 100k tasks.

The data dir holds a snapshot (10k agents at 3 tasks each, 30k active tasks, 10% of the rest queued, 5%
cancelled, the rest done; one unread notification per agent) plus a long journal after it: JOURNAL records
that each update one task (the task with its one new history entry, as the bridge journals it). A bridge
of this size snapshots every 30,000 records (snapshot_every: a quarter of its 120k entities), so 10,000
records is a journal a restart meets in steady use, and 50,000 what a bridge leaves when its snapshots have
failed or it was killed while writing several.

Start-up is the wall time from starting `python3 clawbridge.py --port 0 --data-dir DIR` to its "Bridge
running" log line, and to GET /health answering 200 (the median of RESTARTS starts, each on a fresh copy of
the data dir and stopped with SIGKILL so that it leaves the files as they were). Peak RSS is VmHWM after
start-up. RSS while serving is the largest VmRSS sampled, on the last bridge started on each journal, while 8
connections send heartbeats of random agents, task updates, task reads and agent task lists, then a POST
/api/sync (a full snapshot) and more of the same.

Run through tests/bench/run.py (--only startup); this file does nothing on its own."""
import random
import shutil
import subprocess
import sys
import tempfile
import threading
import time

import benchlib as B

AGENTS, INSTANCES, TASKS = 10_000, 100, 100_000
JOURNAL = 50_000
SHORT_JOURNAL = 10_000
STARTUP_TARGET = 1.5        # seconds
RSS_TARGET = 150            # MB while serving


def journal_records(fleet, count, seed=7):
    """count records, each an update of one random task (new title and version, one more history entry), as
    the bridge journals such an update (the task with only its new history entry)."""
    cb = B.clawbridge()
    rng = random.Random(seed)
    state = cb.State()
    for task in fleet.tasks:
        state.put_task(task, record=False)
    ids = list(state.tasks)
    last_id = fleet.meta["lastId"]
    records = []
    for n in range(count):
        task = state.tasks[rng.choice(ids)]
        at = last_id + n
        state.put_task(task._replace(title=f"{task.title} (edited {n})", version=task.version + 1, updatedAt=at,
                                     history=cb.add_history(task, cb.Now(0.0, at), "updated", "api", "title")))
        records.append({"ops": state.take_changes().ops, "meta": {"lastId": at}})
    return records


def start_once(data_dir, tmp, name):
    """Start a bridge on a copy of data_dir. Returns (bridge, seconds to the log line, seconds to /health)."""
    copy = f"{tmp}/{name}"
    shutil.copytree(data_dir, copy)
    bridge = B.start_bridge(copy, tmp, name=name)
    health = bridge.startup + B.wait_healthy(bridge.port)
    return bridge, bridge.startup, health


def serving_load(bridge, fleet, seconds):
    rng = random.Random(3)
    requests = []
    for n in range(2000):
        agent = fleet.agents[rng.randrange(len(fleet.agents))]
        task = fleet.tasks[rng.randrange(len(fleet.tasks))]
        kind = n % 8
        if kind < 5:
            body = {"heartbeatInterval": agent.heartbeatInterval, "hostname": agent.hostname,
                    "instanceId": agent.instanceId, "tasks": []}
            requests.append(B.build_request("POST", f"/api/agents/{agent.id}/heartbeat", body))
        elif kind == 5:
            requests.append(B.build_request("PUT", f"/api/tasks/{task.id}", {"title": f"serving {n}"}))
        elif kind == 6:
            requests.append(B.build_request("GET", f"/api/tasks/{task.id}"))
        else:
            requests.append(B.build_request("GET", f"/api/agents/{agent.id}/tasks"))
    return B.load(bridge.port, requests, 8, seconds, warmup=0.2)


def serving_rss(bridge, fleet, quick):
    """(largest VmRSS in MB, load result, seconds of POST /api/sync) while serving a mixed load, a full snapshot
    in the middle."""
    samples = []
    stop = threading.Event()

    def sample():
        while not stop.wait(0.05):
            samples.append(bridge.memory().get("VmRSS", 0) / 1024)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        first = serving_load(bridge, fleet, 1.0 if quick else 2.0)
        sync_started = time.perf_counter()
        status, reply = bridge.call("POST", "/api/sync", {})
        sync_seconds = time.perf_counter() - sync_started
        if status != 200:
            raise RuntimeError(f"POST /api/sync answered {status}: {reply}")
        second = serving_load(bridge, fleet, 1.0 if quick else 2.0)
    finally:
        stop.set()
        sampler.join()
    served = B.merge([first, second])
    if served.errors:
        raise RuntimeError(f"serving: {served.errors} errors {served.statuses}")
    return max(samples), served, sync_seconds


def bare_interpreter_rss():
    """VmRSS in MB of `python3 -c` that only reads it, with and without the site module: what this machine's
    interpreter costs before the bridge holds anything."""
    probe = "print([l.split()[1] for l in open('/proc/self/status') if l.startswith('VmRSS')][0])"
    return [int(subprocess.run([sys.executable, *flags, "-c", probe], capture_output=True, text=True,
                               check=True).stdout) / 1024 for flags in ((), ("-S",))]


def run(workdir=None, quick=False):
    restarts = 1 if quick else 3
    rows = []
    with tempfile.TemporaryDirectory(prefix="startup-", dir=workdir) as tmp:
        t0 = time.monotonic()
        fleet = B.make_fleet(AGENTS, INSTANCES, TASKS, notes_per_agent=1)
        records = journal_records(fleet, JOURNAL)
        sizes = B.write_fleet(f"{tmp}/long", fleet, seq=500_000, journal=records)
        B.write_fleet(f"{tmp}/short", fleet, seq=500_000, journal=records[:SHORT_JOURNAL])
        B.say(f"startup: data written in {time.monotonic() - t0:.1f}s (snapshot {sizes[0] / 1e6:.0f} MB, "
              f"journal {sizes[1] / 1e6:.0f} MB)")
        del records

        def starts(source, label):
            """Restart on a copy of source RESTARTS times; the last bridge is left running."""
            lines, healths, peaks = [], [], []
            for n in range(restarts):
                bridge, line, health = start_once(f"{tmp}/{source}", tmp, f"{source}-{n}")
                peaks.append(bridge.memory().get("VmHWM", 0) / 1024)
                B.say(f"startup: {label}: running after {line:.2f}s, /health after {health:.2f}s, "
                      f"peak RSS {peaks[-1]:.0f} MB")
                lines.append(line)
                healths.append(health)
                if n + 1 < restarts:
                    bridge.kill()
                    shutil.rmtree(f"{tmp}/{source}-{n}")
            return bridge, B.median(lines), B.median(healths), max(peaks)

        for source, records in (("short", SHORT_JOURNAL), ("long", JOURNAL)):
            label = f"{records // 1000}k-record journal"
            bridge, line, health, peak = starts(source, label)
            try:
                rows.append(B.Row(f"3 start-up, 10k agents / 100k tasks + {label}",
                                  f"{health:.2f} s to /health ({line:.2f} s to 'Bridge running'); "
                                  f"peak RSS {peak:.0f} MB (VmHWM)", f"< {STARTUP_TARGET} s",
                                  B.check(health < STARTUP_TARGET)))
                rss, served, sync_seconds = serving_rss(bridge, fleet, quick)
                B.say(f"startup: {label}: serving {served.rps:,.0f} req/s, p99 {served.p99:.1f} ms; POST /api/sync "
                      f"(snapshot) took {sync_seconds:.2f}s; RSS max {rss:.0f} MB")
                rows.append(B.Row(f"3 RSS while serving them, after the start on a {label}",
                                  f"{rss:.0f} MB max VmRSS ({served.rps:,.0f} req/s mixed, a snapshot included)",
                                  f"< {RSS_TARGET} MB", B.check(rss < RSS_TARGET)))
                if "Traceback" in bridge.output():
                    raise RuntimeError("the bridge logged a traceback:\n" + bridge.output()[-2000:])
            finally:
                bridge.kill()
    plain, no_site = bare_interpreter_rss()
    rows.append(B.Row("3 a bare python3 on this machine, for scale", f"{plain:.0f} MB VmRSS ({no_site:.0f} MB with -S, "
                      "without the site packages' start-up hooks)", "(reported)", "INFO"))
    return rows


if __name__ == "__main__":
    print("startup.py is one of the benchmarks; run: python3 tests/bench/run.py --only startup")
