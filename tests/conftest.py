"""Shared fixtures: the real bridge in a thread on 127.0.0.1:0, the real programs as subprocesses, and a clock
that tests move by hand."""
import http.client
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import clawbridge  # noqa: E402

BRIDGE = str(ROOT / "clawbridge.py")
AGENT = str(ROOT / "clawagent.py")


class FakeClock:
    """A clock the test moves by hand: monotonic seconds and wall milliseconds advance together."""

    def __init__(self, mono=1000.0, ms=1_700_000_000_000):
        self.mono, self.ms = mono, ms

    def now(self):
        return clawbridge.Now(self.mono, self.ms)

    def advance(self, seconds):
        self.mono += seconds
        self.ms += int(seconds * 1000)


def http_call(port, method, path, body=None, headers=None, raw=None, host="127.0.0.1", timeout=10):
    """One request on a new connection. Returns (status, headers dict, parsed JSON or None)."""
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
        hdrs = {"Content-Type": "application/json"} if data is not None else {}
        hdrs.update(headers or {})
        conn.request(method, path, body=data, headers=hdrs)
        resp = conn.getresponse()
        payload = resp.read()
        parsed = json.loads(payload) if payload else None
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, parsed
    finally:
        conn.close()


class LiveBridge:
    """The real BridgeServer serving in a thread, with the Bridge object at hand for white-box checks."""

    def __init__(self, data_dir, clock=None, **settings):
        self.config = clawbridge.Config(data_dir=str(data_dir), port=0, instance_id="test", **settings)
        self.bridge = clawbridge.Bridge.open(self.config, clock=clock)
        self.server = clawbridge.BridgeServer(("127.0.0.1", 0), self.bridge)
        self.port = self.server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.01},
                                       daemon=True)
        self.thread.start()

    def call(self, method, path, body=None, **kw):
        return http_call(self.port, method, path, body, **kw)

    def close(self):
        self.server.shutdown()
        self.server.server_close()
        self.bridge.close()


@pytest.fixture
def clock():
    return FakeClock()


@pytest.fixture
def live(tmp_path, clock):
    """A bridge on a fresh data dir, driven by the fake clock."""
    bridge = LiveBridge(tmp_path / "data", clock=clock)
    yield bridge
    bridge.close()


class BridgeProcess:
    """clawbridge.py run as an operator runs it; the port comes from its start-up line. python is the command
    line before the script: the interpreter, and any options of its own or a launcher."""

    def __init__(self, workdir, env=None, args=(), python=(sys.executable,)):
        self.workdir = Path(workdir)
        self.log_path = self.workdir / f"bridge-{time.monotonic_ns()}.log"
        full_env = {k: v for k, v in os.environ.items() if not k.startswith(("BRIDGE_", "CLAW"))}
        full_env.update({"PYTHONUNBUFFERED": "1"}, **(env or {}))
        self.log = open(self.log_path, "w")
        self.proc = subprocess.Popen([*python, BRIDGE, "--port", "0", *args], cwd=self.workdir,
                                     env=full_env, stdout=self.log, stderr=subprocess.STDOUT)
        self.port = self.wait_for_port()
        self.url = f"http://127.0.0.1:{self.port}"

    def wait_for_port(self, timeout=15):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            match = re.search(r"Bridge running on http://[^:]+:(\d+)", self.log_path.read_text())
            if match:
                return int(match.group(1))
            if self.proc.poll() is not None:
                raise RuntimeError(f"bridge exited with {self.proc.returncode}:\n{self.log_path.read_text()}")
            time.sleep(0.02)
        raise RuntimeError("bridge did not start:\n" + self.log_path.read_text())

    def call(self, method, path, body=None, **kw):
        return http_call(self.port, method, path, body, **kw)

    def output(self):
        return self.log_path.read_text()

    def kill(self):
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)
        self.log.close()

    def stop(self, timeout=15):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(timeout)
        self.log.close()
        return self.proc.returncode


@pytest.fixture
def start_bridge(tmp_path):
    """Start clawbridge.py as a subprocess in tmp_path (data in ./.clawhub); stopped at teardown."""
    procs = []

    def start(env=None, args=(), workdir=None, python=(sys.executable,)):
        proc = BridgeProcess(workdir or tmp_path, env, args, python)
        procs.append(proc)
        return proc

    yield start
    for proc in procs:
        if proc.proc.poll() is None:
            proc.kill()
