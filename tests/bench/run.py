#!/usr/bin/env python3
"""Run the clawbridge benchmarks and print one table: every figure with its target and PASS/FAIL.

    python3 tests/bench/run.py             the whole suite (about 5 minutes on two cores)
    python3 tests/bench/run.py --quick     shorter windows, one pass (about 2 minutes; noisier)
    python3 tests/bench/run.py --only heartbeats,failover

Every figure is measured in this run, and where the issue asks for a ratio it is one between two things
measured side by side in this run: these machines are noisy. Benchmarks (in this order):

    heartbeats  1  heartbeat req/s, p50, p99 against a bare ThreadingHTTPServer   heartbeats.py
    writes      2  durable task creates and updates with 1k, 10k, 100k tasks      writes.py
    startup     3  start-up time and RSS on 10k agents / 100k tasks              startup.py
    failover    4  reassigning 10k tasks of an instance gone offline              failover.py
    agentcli    5  clawagent.py heartbeat as a process against python3 -c pass     agentcli.py

Exit status: 0 once the table is printed (with --strict: 1 when a figure FAILs), 1 when a benchmark could not
run (its row says ERROR). Progress goes to stderr, the table to stdout. Not collected by pytest."""
import argparse
import os
import platform
import subprocess
import sys
import tempfile
import time
import traceback

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import benchlib as B  # noqa: E402

BENCHMARKS = ("heartbeats", "writes", "startup", "failover", "agentcli")


def machine():
    cores = os.cpu_count()
    model = ""
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    except OSError:
        pass
    return f"{cores} cores ({model or platform.machine()}), Python {platform.python_version()}, {platform.system()}"


def host_speed():
    """The median wall time of `python3 -c pass` (ms) on this host, the same interpreter as the benchmarks.
    The absolute targets assume a machine where it takes about 35 ms; on a slower host every absolute
    figure grows with it, the ratios much less."""
    times = []
    for _ in range(7):
        started = time.perf_counter()
        subprocess.run([sys.executable, "-c", "pass"], env=B.clean_env(), stdin=subprocess.DEVNULL, check=True)
        times.append((time.perf_counter() - started) * 1000)
    return B.median(times)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    parser.add_argument("--quick", action="store_true", help="shorter measurements, one pass each")
    parser.add_argument("--only", default="", help=f"comma-separated subset of: {', '.join(BENCHMARKS)}")
    parser.add_argument("--strict", action="store_true", help="exit 1 when a figure misses its target")
    parser.add_argument("--workdir", default=None, help="where the temporary data dirs go (default: $TMPDIR)")
    args = parser.parse_args(argv)
    chosen = [name.strip() for name in args.only.split(",") if name.strip()] or list(BENCHMARKS)
    unknown = [name for name in chosen if name not in BENCHMARKS]
    if unknown:
        parser.error(f"unknown benchmark {', '.join(unknown)}; choose from {', '.join(BENCHMARKS)}")
    started = time.monotonic()
    load_before = os.getloadavg()[0]
    if load_before > 0.5 * (os.cpu_count() or 1):
        B.say(f"the load average is {load_before:.1f} on {os.cpu_count()} cores: other work is running, the figures "
              "will be noisy (the ratios less so, as each is measured side by side)")
    bare = host_speed()
    B.say(f"this host: python3 -c pass takes {bare:.0f} ms (the absolute targets assume about 35 ms)")
    rows = [B.Row("0 this host: python3 -c pass", f"{bare:.1f} ms median of 7 ({bare / 35:.1f}x the 35 ms "
                  "the absolute targets assume)", "(reported)", "INFO")]
    failed_to_run = False
    with tempfile.TemporaryDirectory(prefix="clawbridge-bench-", dir=args.workdir) as workdir:
        for name in BENCHMARKS:
            if name not in chosen:
                continue
            B.say(f"== {name}")
            t0 = time.monotonic()
            try:
                module = __import__(name)
                rows.extend(module.run(workdir, quick=args.quick))
            except Exception as exc:       # one broken benchmark must not hide the others' figures
                traceback.print_exc()
                rows.append(B.Row(name, f"could not run: {type(exc).__name__}: {str(exc).splitlines()[0][:120]}",
                                  "-", "ERROR"))
                failed_to_run = True
            B.say(f"== {name} took {time.monotonic() - t0:.0f}s")
    print()
    print(f"clawbridge benchmarks{' (--quick)' if args.quick else ''}: {machine()}; "
          f"{time.monotonic() - started:.0f}s; load average {load_before:.1f} before, {os.getloadavg()[0]:.1f} after")
    B.print_table(rows)
    verdicts = [row.verdict for row in rows]
    print(f"{verdicts.count('PASS')} PASS, {verdicts.count('FAIL')} FAIL, {verdicts.count('INFO')} reported without "
          f"a target" + (f", {verdicts.count('ERROR')} ERROR" if failed_to_run else ""))
    if failed_to_run:
        return 1
    return 1 if args.strict and "FAIL" in verdicts else 0


if __name__ == "__main__":
    sys.exit(main())
