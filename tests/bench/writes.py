#!/usr/bin/env python3
"""Benchmark 2, durable writes: task updates (PUT /api/tasks/{id}) and task creates (POST /api/tasks) with
8 and 64 connections (keep-alive), on three bridges started side by side with 1k, 10k and 100k tasks
already present. Every answer counted is a 200/201, which the bridge sends only once the change is fsynced
in its journal (group commit).

The preloaded state: 10 agents on 3 instances at their maxConcurrentTasks (3), so a created task is
queued; of the other tasks 10% are queued, 5% cancelled, the rest done. An update renames a task or changes
its priority (alternately); the tasks updated are the same number (WORKING_SET, 1,000 chosen at random) in
every size, because an update appends to the task's history (up to 50 entries, all of which the journal
record and the reply carry): spread over 100k tasks the same updates would leave short histories and make
the large state look cheaper. A create posts a 200-character description. Updates run before creates
(creates add tasks: a run at ~2k/s adds a few thousand).

Each bridge in turn takes the four loads back to back, 3 s each (updates c=8, updates c=64, creates c=8,
creates c=64: about 25k writes, so the snapshots the bridge writes every 10,000 journal records, or a
quarter as many as the entities it holds when that is more, fall inside as they do in steady use), 1k, 10k,
100k and then again in reverse order (against drift). Between two bridges the one just measured is let go
idle, so that its snapshot cannot slow the next one down. A snapshot of 100k tasks costs about half a second
of CPU, so it decides whether a single 3-second window is slow: the slowdown per load is reported, and the
target applies to all four loads together (the 1k-task writes/s over the 100k-task writes/s, all windows
added up).

Run through tests/bench/run.py (--only writes); this file does nothing on its own."""
import random
import tempfile

import benchlib as B

SIZES = (1_000, 10_000, 100_000)
AGENTS, INSTANCES = 10, 3
KINDS = ("update", "create")
CONNS = (8, 64)
WORKING_SET = 1000          # tasks the updates go to, in every size
MIN_RATE_C64 = 2000
MAX_SLOWDOWN = 1.2


def update_requests(task_ids, count, seed):
    rng = random.Random(seed)
    priorities = ("P0", "P1", "P2", "P3")
    reqs = []
    for n in range(count):
        change = {"title": f"renamed {n}"} if n % 2 else {"priority": rng.choice(priorities)}
        reqs.append(B.build_request("PUT", f"/api/tasks/{rng.choice(task_ids)}", change))
    return reqs


def create_requests(count):
    text = ("A task created by the write benchmark. " * 6)[:200]
    return [B.build_request("POST", "/api/tasks", {"title": f"created task {n}", "description": text,
                                                   "roles": ["dev"], "priority": "P2"}) for n in range(count)]


def run(workdir=None, quick=False):
    seconds, warmup = (1.0, 0.3) if quick else (3.0, 0.5)
    orders = [SIZES] if quick else [SIZES, tuple(reversed(SIZES))]
    rows = []
    with tempfile.TemporaryDirectory(prefix="writes-", dir=workdir) as tmp:
        bridges, ids = {}, {}
        try:
            for size in SIZES:
                fleet = B.make_fleet(AGENTS, INSTANCES, size)
                B.write_fleet(f"{tmp}/data-{size}", fleet)
                ids[size] = random.Random(size).sample([t.id for t in fleet.tasks], WORKING_SET)
                bridges[size] = B.start_bridge(f"{tmp}/data-{size}", tmp, name=f"bridge-{size}")
                B.say(f"writes: bridge with {size:,} tasks started in {bridges[size].startup:.2f}s")
            results, cpu_us = {}, {}
            for order in orders:
                for size in order:
                    bridge = bridges[size]
                    for kind in KINDS:
                        for conns in CONNS:
                            if kind == "update":
                                reqs = [update_requests(ids[size], 3000, seed) for seed in (1, 2)]
                            else:
                                reqs = create_requests(3000)
                            cpu = bridge.cpu()
                            result = B.load(bridge.port, reqs, conns, seconds, warmup)
                            cores = (bridge.cpu() - cpu) / (seconds + warmup)
                            if result.errors:
                                raise RuntimeError(f"{kind} c={conns} {size}: {result.errors} errors "
                                                   f"{result.statuses}\n{bridge.output()[-2000:]}")
                            results.setdefault((kind, conns, size), []).append(result)
                            cpu_us.setdefault((kind, conns, size), []).append(cores * 1e6 / max(result.rps, 1))
                            B.say(f"writes: {kind} c={conns} {size:,} tasks: {result.rps:,.0f} req/s "
                                  f"p50 {result.p50:.1f} ms p99 {result.p99:.1f} ms (bridge {cores:.2f} cores)")
                    if not bridge.settle():
                        B.say(f"writes: bridge {size:,} did not go idle")
                    status, health = bridge.call("GET", "/health")
                    storage = (health or {}).get("storage") or {}
                    B.say(f"writes: bridge {size:,}: journal record {storage.get('journalSeq')}, last snapshot at "
                          f"record {storage.get('snapshotSeq')}")
            for kind in KINDS:
                for conns in CONNS:
                    merged = {size: B.merge(results[(kind, conns, size)]) for size in SIZES}
                    for size in SIZES:
                        r = merged[size]
                        target = f">= {MIN_RATE_C64:,}/s" if conns == 64 else "(reported)"
                        verdict = B.check(r.rps >= MIN_RATE_C64) if conns == 64 else "INFO"
                        rows.append(B.Row(f"2 durable {kind}s c={conns}, {size // 1000}k tasks",
                                          f"{r.rps:,.0f}/s p50 {B.fmt_ms(r.p50)} p99 {B.fmt_ms(r.p99)}; "
                                          f"server CPU/write {B.median(cpu_us[(kind, conns, size)]):.0f} µs", target,
                                          verdict))
                    small, large = merged[SIZES[0]], merged[SIZES[-1]]
                    rows.append(B.Row(f"2 durable {kind}s c={conns}, 100k vs 1k tasks",
                                      f"{small.rps / large.rps:.2f}x slower (p99 {large.p99 / small.p99:.2f}x)",
                                      "(reported; target on all writes)", "INFO"))
            total = {size: B.merge([r for key, runs in results.items() if key[2] == size for r in runs])
                     for size in SIZES}
            small, large = total[SIZES[0]], total[SIZES[-1]]
            slowdown = small.rps / large.rps
            rows.append(B.Row("2 durable writes, all four loads, 100k vs 1k tasks",
                              f"{slowdown:.2f}x slower ({large.rps:,.0f} vs {small.rps:,.0f} writes/s; "
                              f"p99 {large.p99 / small.p99:.2f}x)",
                              f"<= {MAX_SLOWDOWN}x", B.check(slowdown <= MAX_SLOWDOWN)))
            for size, bridge in bridges.items():
                if "Traceback" in bridge.output():
                    raise RuntimeError(f"bridge {size} logged a traceback:\n" + bridge.output()[-2000:])
        finally:
            for bridge in bridges.values():
                bridge.kill()
    return rows


if __name__ == "__main__":
    print("writes.py is one of the benchmarks; run: python3 tests/bench/run.py --only writes")
