#!/usr/bin/env python3
"""What one task update costs as the state grows: p50 and p99 latency of PUT /api/tasks/{id} (a new title or
priority) with 1,000 and with 100,000 tasks, over sequential requests on one keep-alive connection to a real
clawbridge.py process. An update touches one task, so the two should cost about the same.

Run: python3 tests/bench/update_cost.py [--sizes 1000,100000] [--requests 2000]

The tasks are preloaded by writing a snapshot into a fresh data dir with clawbridge's own snapshot writer, as
a bridge would have left it: ten agents at their maxConcurrentTasks, the other tasks queued, done or
cancelled. Not collected by pytest (tests/pytest.ini skips bench/)."""
import argparse
import http.client
import json
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import clawbridge  # noqa: E402

AGENTS = 10
WARMUP = 100
LANES = ("queued", "done", "cancelled")     # for the tasks beyond what the agents hold


def preload(data_dir, count):
    """A data dir holding one snapshot with `count` tasks. Returns the task ids."""
    now = int(time.time() * 1000)
    agents = [clawbridge.Agent(id=f"agent-{n}", instanceId=f"host-{n % 3}", roles=("dev",), maxConcurrentTasks=3,
                               createdAt=now, updatedAt=now, lastHeartbeat=now) for n in range(AGENTS)]
    instances = [clawbridge.Instance(instanceId=f"host-{n}", createdAt=now, updatedAt=now) for n in range(3)]
    tasks = []
    for n in range(count):
        task = clawbridge.Task(id=f"task-{now + n}", title=f"preloaded task {n}", description="x" * 200,
                               roles=("dev",), priority=clawbridge.PRIORITIES[n % 4], createdAt=now, updatedAt=now,
                               history=clawbridge.COMPACT([[now, "created", None, None]]))
        holder = agents[n // 3] if n < 3 * AGENTS else None
        if holder:
            task = task._replace(lane="assigned", assignedTo=holder.id, epoch=1, version=2)
        else:
            task = task._replace(lane=LANES[n % len(LANES)])
        tasks.append(task)
    doc = clawbridge.empty_doc()
    doc.update(meta={"lastId": now + count}, agents=[a._asdict() for a in agents],
               instances=[i._asdict() for i in instances], tasks=[clawbridge.entity_doc(t) for t in tasks])
    os.makedirs(data_dir, mode=0o700)
    clawbridge.atomic_write(os.path.join(data_dir, "snapshot-000000000000.json"), clawbridge.snapshot_chunks(doc))
    return [t.id for t in tasks]


def start_bridge(data_dir, log_path):
    """clawbridge.py on a free port; returns (process, port, seconds to start)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("BRIDGE_", "CLAW"))}
    started = time.monotonic()
    log = open(log_path, "w")
    proc = subprocess.Popen([sys.executable, str(ROOT / "clawbridge.py"), "--port", "0", "--data-dir", data_dir],
                            cwd=os.path.dirname(data_dir), env=env, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        match = re.search(r"Bridge running on http://[^:]+:(\d+)", Path(log_path).read_text())
        if match:
            return proc, int(match.group(1)), time.monotonic() - started
        if proc.poll() is not None:
            break
        time.sleep(0.05)
    proc.kill()
    raise SystemExit("the bridge did not start:\n" + Path(log_path).read_text())


def measure(port, task_ids, requests):
    """Latencies in ms of `requests` sequential updates of random tasks on one keep-alive connection."""
    rng = random.Random(1)
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    latencies = []
    for n in range(WARMUP + requests):
        task_id = rng.choice(task_ids)
        change = {"title": f"renamed {n}"} if n % 2 else {"priority": rng.choice(clawbridge.PRIORITIES)}
        body = json.dumps(change).encode()
        started = time.perf_counter()
        conn.request("PUT", f"/api/tasks/{task_id}", body=body, headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        resp.read()
        elapsed = (time.perf_counter() - started) * 1000
        if resp.status != 200:
            raise SystemExit(f"PUT /api/tasks/{task_id} answered {resp.status}")
        if n >= WARMUP:
            latencies.append(elapsed)
    conn.close()
    return sorted(latencies)


def percentile(sorted_values, fraction):
    return sorted_values[min(len(sorted_values) - 1, int(fraction * len(sorted_values)))]


def run(size, requests, workdir):
    data_dir = os.path.join(workdir, f"data-{size}")
    task_ids = preload(data_dir, size)
    proc, port, startup = start_bridge(data_dir, os.path.join(workdir, f"bridge-{size}.log"))
    try:
        latencies = measure(port, task_ids, requests)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    return {"tasks": size, "p50": percentile(latencies, 0.50), "p99": percentile(latencies, 0.99),
            "max": latencies[-1], "startup": startup,
            "snapshot_mb": os.path.getsize(os.path.join(data_dir, "snapshot-000000000000.json")) / 1e6}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="1000,100000", help="comma-separated task counts (default 1000,100000)")
    parser.add_argument("--requests", type=int, default=2000, help="measured updates per size (default 2000)")
    args = parser.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",")]
    with tempfile.TemporaryDirectory(prefix="clawbridge-bench-") as workdir:
        rows = [run(size, args.requests, workdir) for size in sizes]
    print(f"PUT /api/tasks/{{id}}: {args.requests} sequential updates on one keep-alive connection "
          f"(after {WARMUP} warm-up)")
    print(f"{'tasks':>8} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8} {'start s':>8} {'snapshot MB':>12}")
    for row in rows:
        print(f"{row['tasks']:>8} {row['p50']:>8.2f} {row['p99']:>8.2f} {row['max']:>8.2f} {row['startup']:>8.2f} "
              f"{row['snapshot_mb']:>12.1f}")
    if len(rows) >= 2:
        print(f"p50({rows[-1]['tasks']}) / p50({rows[0]['tasks']}) = {rows[-1]['p50'] / rows[0]['p50']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
