#!/usr/bin/env python3
"""Benchmark 1, heartbeat throughput: POST /api/agents/{id}/heartbeat on the real bridge (clawbridge.py as
a subprocess, log level info, a fresh data dir) against the limit server (limit_server.py: a bare
ThreadingHTTPServer that parses the same JSON body and updates a dict under a lock), both on loopback at
the same time, driven by the same load generator in the same run.

64 agents on 8 instances each hold one task; every beat sends what `clawagent.py heartbeat` sends (its
interval, host name, instance and the task it holds with its epoch), so the bridge answers with the agent,
its task and its unread notification, and changes nothing durable (a plain beat is not fsynced).

Modes: keep-alive with 1, 8 and 64 connections, and a new connection per request (Connection: close, how
curl and cron clients connect) with 8 at a time. Each mode alternates 1-second windows in pairs, limit then
bridge, then bridge then limit, and so on (ABBA, against drift on a noisy, shared machine); the figure is
the median over the pairs of bridge req/s over limit req/s, with req/s and latency over all windows.

Run through tests/bench/run.py (--only heartbeats); this file does nothing on its own."""
import tempfile

import benchlib as B

AGENTS = 64
INSTANCES = 8
INTERVAL_MS = 900_000
HOSTNAME = "bench-host"
MODES = (   # name, keep-alive, connections, target ratio or None
    ("keep-alive c=1", True, 1, None),
    ("keep-alive c=8", True, 8, 0.80),
    ("keep-alive c=64", True, 64, None),
    ("new connection per request c=8", False, 8, 0.90),
)


def setup_fleet(server):
    """Register the agents and give each one task. Returns {agent id: [{id, epoch}]}."""
    for n in range(AGENTS):
        status, reply = server.call("POST", "/api/agents/register", {
            "id": f"agent-{n:02d}", "instanceId": f"host-{n % INSTANCES}", "hostname": HOSTNAME,
            "heartbeatInterval": INTERVAL_MS, "maxConcurrentTasks": 3, "roles": ["dev"]})
        if status not in (200, 201):
            raise RuntimeError(f"register answered {status}: {reply}")
    held = {f"agent-{n:02d}": [] for n in range(AGENTS)}
    for n in range(AGENTS):
        status, task = server.call("POST", "/api/tasks", {"title": f"heartbeat bench task {n}",
                                                          "description": "x" * 200, "roles": ["dev"]})
        if status != 201 or not task.get("assignedTo"):
            raise RuntimeError(f"task create answered {status}: {task}")
        held[task["assignedTo"]].append({"id": task["id"], "epoch": task["epoch"]})
    return held


def beat_requests(held, close):
    """One request per agent, as clawagent.py heartbeat builds it."""
    requests = []
    for n in range(AGENTS):
        agent_id = f"agent-{n:02d}"
        body = {"heartbeatInterval": INTERVAL_MS, "hostname": HOSTNAME, "instanceId": f"host-{n % INSTANCES}",
                "tasks": held[agent_id]}
        requests.append(B.build_request("POST", f"/api/agents/{agent_id}/heartbeat", body, close=close))
    return requests


def measure(server, requests, keepalive, conns, seconds, warmup):
    cpu = server.cpu()
    result = B.load(server.port, requests, conns, seconds, warmup, keepalive=keepalive)
    cores = (server.cpu() - cpu) / (seconds + warmup)
    if result.errors:
        raise RuntimeError(f"{result.errors} errors: {result.statuses}")
    return result, cores


def run(workdir=None, quick=False):
    seconds, warmup, pairs = (1.0, 0.3, 1) if quick else (1.0, 0.3, 5)
    rows = []
    with tempfile.TemporaryDirectory(prefix="hb-", dir=workdir) as tmp:
        with B.start_limit_server(tmp) as limit, B.start_bridge(f"{tmp}/data", tmp) as bridge:
            held = setup_fleet(bridge)
            for name, keepalive, conns, target in MODES:
                requests = beat_requests(held, close=not keepalive)
                runs = {"limit": [], "bridge": []}
                cpu = {"limit": [], "bridge": []}     # server CPU µs per request
                ratios = []
                for pair in range(pairs):
                    order = ("limit", "bridge") if pair % 2 == 0 else ("bridge", "limit")     # ABBA...
                    for which in order:
                        server = limit if which == "limit" else bridge
                        result, used = measure(server, requests, keepalive, conns, seconds, warmup)
                        runs[which].append(result)
                        cpu[which].append(used * 1e6 / max(result.rps, 1))
                        B.say(f"heartbeats {name}: {which} {result.rps:,.0f} req/s p50 {result.p50:.2f} ms "
                              f"p99 {result.p99:.2f} ms (server {used:.2f} cores, load generator "
                              f"{result.client_cpu / result.seconds:.2f})")
                    ratios.append(runs["bridge"][-1].rps / runs["limit"][-1].rps)
                lim, br = B.merge(runs["limit"]), B.merge(runs["bridge"])
                ratio = B.median(ratios)
                figure = (f"{ratio:.2f} of limit: bridge {br.rps:,.0f}/s p50 {B.fmt_ms(br.p50)} p99 {B.fmt_ms(br.p99)}"
                          f"; limit {lim.rps:,.0f}/s p50 {B.fmt_ms(lim.p50)} p99 {B.fmt_ms(lim.p99)}"
                          f"; server CPU/request {B.median(cpu['bridge']):.0f} vs {B.median(cpu['limit']):.0f} µs")
                rows.append(B.Row(f"1 heartbeat {name}", figure,
                                  f">= {target:.2f} of limit" if target else "(reported)",
                                  B.check(ratio >= target) if target else "INFO"))
            if "Traceback" in bridge.output():
                raise RuntimeError("the bridge logged a traceback:\n" + bridge.output()[-2000:])
    return rows


if __name__ == "__main__":
    print("heartbeats.py is one of the benchmarks; run: python3 tests/bench/run.py --only heartbeats")
