#!/usr/bin/env python3
"""Benchmark 5, `clawagent.py heartbeat` as cron runs it: the wall time of the whole process (interpreter
start, the beat against a real bridge on loopback, the agent's files) against `python3 -c pass` on the same
interpreter, measured alternately RUNS times each after a few warm-up runs of both. The agent is registered
first with `clawagent.py register` under a temporary HOME, so the heartbeat reads its saved config as on a
real machine.

The issue's target, "under 60 ms where python3 -c pass takes about 35 ms", is checked as a difference: the
median heartbeat minus the median `python3 -c pass` under 25 ms (the absolute medians are shown too; on a
machine where the interpreter alone starts faster or slower than 35 ms the difference is what carries over).

Cron and the systemd timers run the beat the way `setup-heartbeats` and `make install` set it up: as a module
from the program's directory (`cd DIR && python3 -m clawagent heartbeat ...`) with its bytecode compiled, so
the file is not compiled again at every beat. That is the figure with the target; running the file as a
script (`python3 clawagent.py heartbeat ...`, which compiles all of it each time) is reported beside it.

Run through tests/bench/run.py (--only agentcli); this file does nothing on its own."""
import py_compile
import shutil
import os
import subprocess
import sys
import tempfile
import time

import benchlib as B

RUNS = 25
WARMUP = 3
OVERHEAD_TARGET = 25.0      # ms over python3 -c pass (60 ms where it takes 35 ms)


def timed(argv, env, cwd):
    started = time.perf_counter()
    done = subprocess.run(argv, env=env, cwd=cwd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE)
    elapsed = (time.perf_counter() - started) * 1000
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv[1:])} exited {done.returncode}: {done.stderr.decode()[-1000:]}")
    return elapsed


def run(workdir=None, quick=False):
    runs = 10 if quick else RUNS
    with tempfile.TemporaryDirectory(prefix="agentcli-", dir=workdir) as tmp:
        home = os.path.join(tmp, "home")
        os.makedirs(home)
        with B.start_bridge(f"{tmp}/data", tmp) as bridge:
            env = B.clean_env({"HOME": home})
            env.pop("OPENCLAW_HOME", None)
            url = f"http://{B.HOST}:{bridge.port}"
            subprocess.run([sys.executable, B.AGENT, "register", "--agent", "bench-agent", "--bridge", url,
                            "--instance", "bench-host", "--roles", "dev", "--tailscale-ip", ""],
                           env=env, cwd=tmp, check=True, stdout=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
            installed = os.path.join(tmp, "bin")       # as make install leaves it: the file and its bytecode
            os.makedirs(installed)
            shutil.copy(B.AGENT, installed)
            py_compile.compile(os.path.join(installed, "clawagent.py"), doraise=True,
                               invalidation_mode=py_compile.PycInvalidationMode.TIMESTAMP)
            args = ["heartbeat", "--agent", "bench-agent", "--quiet"]
            commands = {"scheduled": ([sys.executable, "-m", "clawagent", *args], installed),
                        "script": ([sys.executable, B.AGENT, *args], tmp),
                        "bare": ([sys.executable, "-c", "pass"], tmp)}
            for _ in range(WARMUP):
                for argv, cwd in commands.values():
                    timed(argv, env, cwd)
            times = {name: [] for name in commands}
            for _ in range(runs):
                for name, (argv, cwd) in commands.items():
                    times[name].append(timed(argv, env, cwd))
            beats, scripts, bares = times["scheduled"], times["script"], times["bare"]
            log = os.path.join(home, ".openclaw", "agents", "bench-agent", "heartbeat.log")
            with open(log) as f:
                if sum(1 for line in f if " ok " in line) < 2 * runs:
                    raise RuntimeError(f"{log} does not show {runs} good beats")
    beat_ms, script_ms, bare_ms = B.median(beats), B.median(scripts), B.median(bares)
    overhead = beat_ms - bare_ms
    B.say(f"agentcli: scheduled heartbeat median {beat_ms:.1f} ms (min {min(beats):.1f}), as a script "
          f"{script_ms:.1f} ms, python3 -c pass median {bare_ms:.1f} ms (min {min(bares):.1f}); {runs} runs each")
    return [B.Row("5 clawagent.py heartbeat as scheduled (process wall time)",
                  f"{beat_ms:.1f} ms median vs python3 -c pass {bare_ms:.1f} ms: +{overhead:.1f} ms",
                  f"< +{OVERHEAD_TARGET:.0f} ms (60 ms at 35 ms)", B.check(overhead < OVERHEAD_TARGET)),
            B.Row("5 clawagent.py heartbeat run as a script", f"{script_ms:.1f} ms median: "
                  f"+{script_ms - bare_ms:.1f} ms (compiles the whole file each time)", "(reported)", "INFO")]


if __name__ == "__main__":
    print("agentcli.py is one of the benchmarks; run: python3 tests/bench/run.py --only agentcli")
