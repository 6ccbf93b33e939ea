"""clawagent.py run the way an operator runs it: as a subprocess with its own HOME, against the real bridge
(the start_bridge fixture), with stand-in `crontab` and `tailscale` commands first on PATH."""
import json
import os
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from conftest import AGENT, ROOT

TAILSCALE_IP = "100.101.102.103"
AGENT_SETTINGS = ("BRIDGE_URL", "BRIDGE_TOKEN", "INSTANCE_ID", "HEARTBEAT_INTERVAL", "MAX_CONCURRENT_TASKS",
                  "OPENCLAW_HOME", "XDG_CONFIG_HOME")
STAND_INS = {
    # crontab(1) with the table in $CRONTAB_FILE; like the real one, -l fails when there is no table
    "crontab": """#!/bin/sh
case "$1" in
  -l) if [ -f "$CRONTAB_FILE" ]; then exec cat "$CRONTAB_FILE"; fi; echo "no crontab for $USER" >&2; exit 1 ;;
  -) exec cat > "$CRONTAB_FILE" ;;
esac
exit 1
""",
    # tailscale(1) that records each call, so a test can tell whether a command ran it
    "tailscale": f"""#!/bin/sh
echo "$@" >> "$TAILSCALE_CALLS"
if [ "$1 $2" = "ip -4" ]; then echo {TAILSCALE_IP}; fi
""",
}


# what a scheduled beat runs: the module from its own directory, so its compiled bytecode is reused
BEAT = f"cd {os.path.dirname(AGENT)} && {sys.executable} -m clawagent heartbeat --agent"


def run_agent(*args, env, cwd, timeout=20):
    """clawagent.py with these arguments, as a user runs it. Returns the CompletedProcess (text)."""
    return subprocess.run([sys.executable, AGENT, *args], env=env, cwd=cwd, capture_output=True, text=True,
                          encoding="utf-8", errors="replace", timeout=timeout)


def ok(result):
    assert result.returncode == 0, f"exit {result.returncode}\nstdout: {result.stdout}\nstderr: {result.stderr}"
    assert "Traceback" not in result.stderr
    return result


def fails(result, code, *phrases):
    """The command failed with this exit code, in one readable message that contains each phrase."""
    assert result.returncode == code, f"exit {result.returncode}\nstdout: {result.stdout}\nstderr: {result.stderr}"
    assert "Traceback" not in result.stderr
    for phrase in phrases:
        assert phrase in result.stderr, f"{phrase!r} not in: {result.stderr}"
    return result


class Machine:
    """One agent machine in a tmp dir: its own HOME, a working dir, the stand-ins first on PATH, an
    environment with none of the caller's agent settings."""

    def __init__(self, root, **env):
        self.root = Path(root)
        self.home, self.work, self.bin = self.root / "home", self.root / "work", self.root / "bin"
        for directory in (self.home, self.work, self.bin):
            directory.mkdir(parents=True, exist_ok=True)
        for name, text in STAND_INS.items():
            (self.bin / name).write_text(text)
            (self.bin / name).chmod(0o755)
        self.crontab = self.root / "crontab"
        self.tailscale_calls = self.root / "tailscale-calls"
        self.env = {k: v for k, v in os.environ.items()
                    if k not in AGENT_SETTINGS and not k.startswith(("BRIDGE_", "CLAW"))}
        self.env.update(HOME=str(self.home), PATH=f"{self.bin}{os.pathsep}{os.environ.get('PATH', '')}",
                        CRONTAB_FILE=str(self.crontab), TAILSCALE_CALLS=str(self.tailscale_calls), **env)

    def run(self, *args, env=None, cwd=None, timeout=20):
        """Run clawagent.py here; env adds to (or, with None, removes from) the machine's environment."""
        merged = {k: v for k, v in {**self.env, **(env or {})}.items() if v is not None}
        return run_agent(*args, env=merged, cwd=cwd or self.work, timeout=timeout)

    def agent_path(self, agent_id, *parts):
        return self.home.joinpath(".openclaw", "agents", agent_id, *parts)

    def config(self, agent_id):
        return json.loads(self.agent_path(agent_id, ".claw", "config.json").read_text())

    def held(self, agent_id):
        """{task id: epoch} of the tasks the agent holds, from its tasks file."""
        path = self.agent_path(agent_id, ".claw", "tasks.json")
        return {t["id"]: t["epoch"] for t in json.loads(path.read_text())["tasks"]} if path.exists() else {}

    def log_lines(self, agent_id):
        path = self.agent_path(agent_id, "heartbeat.log")
        return path.read_text().splitlines() if path.exists() else []


@pytest.fixture
def bridge(start_bridge):
    return start_bridge()


@pytest.fixture
def machine(tmp_path, bridge):
    """An agent machine whose BRIDGE_URL points at the test bridge."""
    return Machine(tmp_path / "machine", BRIDGE_URL=bridge.url)


def agent_on(bridge, agent_id):
    status, _, agent = bridge.call("GET", f"/api/agents/{agent_id}")
    assert status == 200, agent
    return agent


def task_on(bridge, task_id):
    status, _, task = bridge.call("GET", f"/api/tasks/{task_id}")
    assert status == 200, task
    return task


def create_task(bridge, **fields):
    status, _, task = bridge.call("POST", "/api/tasks", {"title": "Fix the login page", **fields})
    assert status == 201, task
    return task


def closed_port():
    """A loopback port nothing listens on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def cron_minute(agent_id, step=15):
    return zlib.crc32(agent_id.encode()) % step


def wait_for(predicate, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


# --- the guide, line by line ---

# MULTI_INSTANCE.md's agent commands with the contract's names ({url} is the bridge), per machine.
GUIDE_LINES = [
    ("mac", "register --agent macbook-dev-1 --roles backend-dev,api --emoji 🔧 --bridge {url}"),
    ("mac", "register --agent macbook-qa --roles qa,testing --emoji 🧪"),
    ("mac", "setup-heartbeats --setup"),
    ("server", "register --agent server-dev-1 --roles backend-dev,devops --bridge {url}"),
    ("server", "register --agent server-dev-2 --roles backend-dev,database"),
    ("server", "register --agent server-infra --roles devops,infrastructure"),
    ("server", "register --agent server-dev-1 --roles backend-dev --bridge {url}"),
    ("server", "register --agent test-agent --roles qa --bridge {url}"),
    ("mac", "register --agent macbook-pm --roles pm"),
    ("mac", "register --agent macbook-dev --roles backend-dev"),
    ("mac", "setup-heartbeats --setup"),
    ("server", "register --agent server-dev --roles backend-dev --bridge {url}"),
    ("server", "setup-heartbeats --agent server-dev"),
    ("server", "heartbeat --agent test-agent"),
    ("server", "run --once"),
]


def test_every_guide_line_works(tmp_path, bridge):
    # The Mac keeps its settings in .env (the guide's "Agent Machine 1"); the server exports them.
    mac = Machine(tmp_path / "mac")
    (mac.work / ".env").write_text(f"BRIDGE_URL={bridge.url}\nINSTANCE_ID=macbook\n\n# Heartbeat\n"
                                   "HEARTBEAT_INTERVAL=900000  # 15 minutes\nMAX_CONCURRENT_TASKS=3\n")
    server = Machine(tmp_path / "server", BRIDGE_URL=bridge.url, INSTANCE_ID="server")
    machines = {"mac": mac, "server": server}
    for name, line in GUIDE_LINES:
        ok(machines[name].run(*line.format(url=bridge.url).split()))

    status, _, agents = bridge.call("GET", "/api/agents")
    by_id = {a["id"]: a for a in agents}
    assert {i: a["instanceId"] for i, a in by_id.items()} == {
        "macbook-dev-1": "macbook", "macbook-qa": "macbook", "macbook-pm": "macbook", "macbook-dev": "macbook",
        "server-dev-1": "server", "server-dev-2": "server", "server-infra": "server", "test-agent": "server",
        "server-dev": "server"}
    assert by_id["macbook-dev-1"]["emoji"] == "🔧" and by_id["macbook-qa"]["emoji"] == "🧪"
    assert by_id["macbook-dev-1"]["roles"] == ["backend-dev", "api"]
    assert by_id["server-dev-1"]["roles"] == ["backend-dev"]           # re-registered with fewer roles
    assert all(a["tailscaleIP"] == TAILSCALE_IP and a["hostname"] == socket.gethostname() for a in agents)
    assert by_id["server-dev"]["heartbeatInterval"] == 60_000          # `run` declared its own cadence
    status, _, instances = bridge.call("GET", "/api/instances")
    assert {i["instanceId"]: i["agentCount"] for i in instances} == {"macbook": 4, "server": 5}
    # `crontab -l | grep heartbeat` (the guide's check) on each machine
    mac_cron = mac.crontab.read_text()
    assert sorted(line.split("--agent ")[1].split()[0] for line in mac_cron.splitlines() if "heartbeat --" in line) \
        == ["macbook-dev", "macbook-dev-1", "macbook-pm", "macbook-qa"]
    assert [line for line in server.crontab.read_text().splitlines() if "heartbeat --agent" in line] == \
        [f"{cron_minute('server-dev')}-59/15 * * * * {BEAT} server-dev --quiet"]
    # `tail -f ~/.openclaw/agents/agent-id/heartbeat.log`
    assert " ok " in server.log_lines("test-agent")[-1]


# --- register ---


def test_register_twice_is_idempotent_and_saves_a_private_config(bridge, machine):
    args = ("register", "--agent", "macbook-dev-1", "--roles", "backend-dev,api", "--emoji", "🔧",
            "--bridge", bridge.url, "--model", "opus", "--workspace", "ws")
    first = ok(machine.run(*args))
    assert "Registered 🔧 macbook-dev-1" in first.stdout and TAILSCALE_IP in first.stdout
    task = create_task(bridge, assignedTo="macbook-dev-1")
    again = json.loads(ok(machine.run(*args, "--json")).stdout)          # --json: the agent as the bridge has it
    assert again["id"] == "macbook-dev-1" and again["activeTasks"] == [task["id"]]
    assert again["model"] == "opus" and again["workspace"] == str(machine.work / "ws")
    status, _, agents = bridge.call("GET", "/api/agents")
    assert [a["id"] for a in agents] == ["macbook-dev-1"]

    path = machine.agent_path("macbook-dev-1", ".claw", "config.json")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    config = machine.config("macbook-dev-1")
    assert (config["bridge"], config["tailscaleIP"], config["instanceId"], config["roles"]) == \
        (bridge.url, TAILSCALE_IP, socket.gethostname().split(".")[0], ["backend-dev", "api"])
    # later commands need only --agent: the bridge address comes from the saved config
    ok(machine.run("heartbeat", "--agent", "macbook-dev-1", env={"BRIDGE_URL": None}))


def test_a_token_protected_bridge(start_bridge, tmp_path):
    bridge = start_bridge(env={"BRIDGE_TOKEN": "s3cret"})
    machine = Machine(tmp_path / "machine", BRIDGE_URL=bridge.url)
    fails(machine.run("register", "--agent", "dev-1", "--roles", "qa"), 1, "401", "BRIDGE_TOKEN", "--token")
    ok(machine.run("register", "--agent", "dev-1", "--roles", "qa", env={"BRIDGE_TOKEN": "s3cret"}))
    assert machine.config("dev-1")["token"] == "s3cret"
    ok(machine.run("heartbeat", "--agent", "dev-1"))                     # the saved token is used
    fails(machine.run("heartbeat", "--agent", "dev-1", "--token", "wrong"), 1, "token")
    doctor = fails(machine.run("doctor", "--agent", "dev-1", "--token", "wrong"), 1)
    assert "FAIL  token accepted" in doctor.stdout and "fix: set BRIDGE_TOKEN" in doctor.stdout


class StubBridge(BaseHTTPRequestHandler):
    """A later bridge that issues a token per agent at registration; it records the tokens it is sent."""
    seen = []

    def do_POST(self):
        self.rfile.read(int(self.headers["Content-Length"]))
        StubBridge.seen.append((self.path, self.headers.get("Authorization")))
        if self.path == "/api/agents/register":
            status, body = 201, {"id": "dev-1", "agentToken": "agent-only-token"}
        else:
            status, body = 200, {"success": True, "tasks": [], "notifications": [], "stop": [], "serverTime": 1}
        payload = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args):
        pass


def test_an_agent_token_from_the_bridge_is_saved_and_used(tmp_path):
    server = ThreadingHTTPServer(("127.0.0.1", 0), StubBridge)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        machine = Machine(tmp_path / "machine", BRIDGE_URL=f"http://127.0.0.1:{server.server_address[1]}",
                          BRIDGE_TOKEN="fleet-token")
        shown = ok(machine.run("register", "--agent", "dev-1", "--json")).stdout
        assert "agent-only-token" not in shown
        assert machine.config("dev-1")["agentToken"] == "agent-only-token"
        assert stat.S_IMODE(machine.agent_path("dev-1", ".claw", "config.json").stat().st_mode) == 0o600
        ok(machine.run("heartbeat", "--agent", "dev-1"))
    finally:
        server.shutdown()
        server.server_close()
    assert StubBridge.seen == [("/api/agents/register", "Bearer fleet-token"),
                               ("/api/agents/dev-1/heartbeat", "Bearer agent-only-token")]


# --- configuration and exit codes ---


def test_settings_precedence_flags_env_dotenv_saved(bridge, machine):
    dead = f"http://127.0.0.1:{closed_port()}"
    (machine.work / ".env").write_text(f"# agent machine\nBRIDGE_URL={dead}\nINSTANCE_ID=from-dotenv\n"
                                       "HEARTBEAT_INTERVAL=600000  # 10 minutes\nMAX_CONCURRENT_TASKS=5 # five\n")
    ok(machine.run("register", "--agent", "a1"))                        # environment's BRIDGE_URL beats .env's
    a1 = agent_on(bridge, "a1")
    assert (a1["instanceId"], a1["heartbeatInterval"], a1["maxConcurrentTasks"]) == ("from-dotenv", 600_000, 5)
    ok(machine.run("register", "--agent", "a2", env={"INSTANCE_ID": "from-env"}))
    ok(machine.run("register", "--agent", "a3", "--instance", "from-flag", "--max-tasks", "2", "--interval", "300",
                   "--bridge", bridge.url,
                   env={"INSTANCE_ID": "from-env", "BRIDGE_URL": dead, "MAX_CONCURRENT_TASKS": "4"}))
    assert agent_on(bridge, "a2")["instanceId"] == "from-env"
    a3 = agent_on(bridge, "a3")                                          # flags beat everything, --bridge too
    assert (a3["instanceId"], a3["maxConcurrentTasks"], a3["heartbeatInterval"]) == ("from-flag", 2, 300_000)
    # without BRIDGE_URL in the environment the .env address is used, even over the saved config ...
    fails(machine.run("heartbeat", "--agent", "a1", env={"BRIDGE_URL": None}), 3, dead)
    # ... and without both, the saved config
    (machine.work / ".env").unlink()
    ok(machine.run("heartbeat", "--agent", "a1", env={"BRIDGE_URL": None}))
    assert agent_on(bridge, "a1")["heartbeatInterval"] == 600_000       # the saved cadence is declared again


@pytest.mark.parametrize("env, dotenv, args, key", [
    ({"HEARTBEAT_INTERVAL": "abc"}, "", (), "HEARTBEAT_INTERVAL"),
    ({}, "MAX_CONCURRENT_TASKS=many  # oops\n", (), "MAX_CONCURRENT_TASKS in .env"),
    ({"BRIDGE_URL": "bridge:8787"}, "", (), "BRIDGE_URL"),
    ({"INSTANCE_ID": "my laptop"}, "", (), "INSTANCE_ID"),
    ({}, "", ("--interval", "0"), "--interval"),
    ({}, "this line is not a setting\n", (), ".env line 1"),
    ({}, "", ("--agent", ".hidden"), "--agent"),
])
def test_a_bad_setting_exits_2_and_names_it(tmp_path, env, dotenv, args, key):
    machine = Machine(tmp_path / "machine", BRIDGE_URL=f"http://127.0.0.1:{closed_port()}")
    (machine.work / ".env").write_text(dotenv)
    argv = ("register", "--agent", "dev-1", *args) if "--agent" not in args else ("register", *args)
    fails(machine.run(*argv, env=env), 2, key)


def test_usage_errors_exit_2(tmp_path):
    machine = Machine(tmp_path / "machine")
    fails(machine.run(), 2)
    fails(machine.run("register", "--roles", "qa"), 2, "--agent")
    fails(machine.run("task", "finish", "task-1", "--agent", "dev-1"), 2, "invalid choice")
    fails(machine.run("setup-heartbeats"), 2, "--setup")


def test_an_unreachable_bridge_exits_3_and_says_what_to_check(tmp_path):
    machine = Machine(tmp_path / "machine", BRIDGE_URL=f"http://127.0.0.1:{closed_port()}")
    for args in (("register", "--agent", "dev-1"), ("heartbeat", "--agent", "dev-1"), ("tasks", "--agent", "dev-1"),
                 ("task", "start", "task-1", "--agent", "dev-1"), ("run", "--once", "--instance", "lab")):
        fails(machine.run(*args), 3, "cannot reach the bridge", "BRIDGE_URL", "--bridge")


def test_bridge_errors_exit_1_and_suggest_the_fix(bridge, machine):
    fails(machine.run("heartbeat", "--agent", "ghost"), 1, "not registered",
          f"clawagent.py register --agent ghost --roles ROLES --bridge {bridge.url}")
    fails(machine.run("tasks", "--agent", "ghost"), 1, "register --agent ghost")
    ok(machine.run("register", "--agent", "dev-1"))
    fails(machine.run("task", "start", "task-404", "--agent", "dev-1"), 1, "404", "No task with id 'task-404'")
    assert bridge.call("DELETE", "/api/agents/dev-1")[0] == 200          # deregistered behind its back
    fails(machine.run("heartbeat", "--agent", "dev-1"), 1, "register --agent dev-1")
    assert machine.log_lines("dev-1")[-1].split()[1:3] == ["error", "exit=1"]


# --- heartbeat ---


def test_heartbeat_keeps_held_tasks_and_drops_the_ones_moved_away(bridge, machine):
    for agent_id in ("dev-1", "dev-2"):
        ok(machine.run("register", "--agent", agent_id, "--roles", "backend-dev"))
    machine.tailscale_calls.unlink()
    task = create_task(bridge, assignedTo="dev-1")

    def unread():
        return bridge.call("GET", "/api/agents/dev-1/notifications?unread=true")[2]

    assert ok(machine.run("heartbeat", "--agent", "dev-1", "--quiet")).stdout == ""
    assert len(unread()) == 1                                            # a quiet beat acknowledges nothing
    first = ok(machine.run("heartbeat", "--agent", "dev-1")).stdout
    assert f"{task['id']}  assigned  P2  epoch 1  Fix the login page" in first
    assert "[task-assigned]" in first
    assert machine.held("dev-1") == {task["id"]: 1}
    second = ok(machine.run("heartbeat", "--agent", "dev-1")).stdout
    assert "NEW" not in second and "[task-assigned]" not in second       # each is reported once ...
    assert unread() == []                                                # ... and acknowledged by the next beat

    assert bridge.call("PUT", f"/api/tasks/{task['id']}", {"assignedTo": "dev-2"})[0] == 200
    moved = ok(machine.run("heartbeat", "--agent", "dev-1")).stdout
    assert f"STOP  {task['id']}" in moved and "stop working on it" in moved
    assert machine.held("dev-1") == {}
    assert ok(machine.run("heartbeat", "--agent", "dev-1", "--quiet")).stdout == ""

    lines = machine.log_lines("dev-1")
    assert len(lines) == 5 and all(line.split()[1] == "ok" for line in lines)
    assert "tasks=1 new=1 stop=0" in lines[0] and "tasks=0 new=0 stop=1" in lines[3]
    assert not machine.tailscale_calls.exists()                          # no subprocess on the heartbeat path
    assert agent_on(bridge, "dev-1")["tailscaleIP"] == TAILSCALE_IP      # the saved address is sent instead


# --- run ---


def test_run_once_beats_every_instance_of_the_machine(bridge, machine):
    for agent_id, instance in (("a1", "lab-a"), ("a2", "lab-a"), ("b1", "lab-b")):
        ok(machine.run("register", "--agent", agent_id, "--instance", instance))
    before = {a: agent_on(bridge, a)["lastHeartbeat"] for a in ("a1", "a2", "b1")}
    time.sleep(0.01)
    result = ok(machine.run("run", "--once", "--interval", "30"))
    assert "instance lab-a" in result.stderr and "instance lab-b" in result.stderr
    for agent_id, beat in before.items():
        agent = agent_on(bridge, agent_id)
        assert agent["lastHeartbeat"] > beat and agent["heartbeatInterval"] == 30_000


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_run_stops_at_once_on_a_signal(bridge, machine, sig):
    ok(machine.run("register", "--agent", "dev-1", "--instance", "lab"))
    log = machine.root / "run.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, AGENT, "run"], cwd=machine.work, env=machine.env,
                                stdout=out, stderr=subprocess.STDOUT)
    try:
        assert wait_for(lambda: "beat ok" in log.read_text()), log.read_text()
        started = time.monotonic()
        proc.send_signal(sig)
        assert proc.wait(5) == 0
        assert time.monotonic() - started < 2
    finally:
        if proc.poll() is None:
            proc.kill()


def test_run_backs_off_while_the_bridge_is_down_and_logs_its_return(bridge, machine, start_bridge, tmp_path):
    ok(machine.run("register", "--agent", "dev-1", "--instance", "lab"))
    port = closed_port()
    log = machine.root / "run.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, AGENT, "run", "--bridge", f"http://127.0.0.1:{port}"],
                                cwd=machine.work, env=machine.env, stdout=out, stderr=subprocess.STDOUT)
    try:
        assert wait_for(lambda: "retrying in 2 s" in log.read_text()), log.read_text()   # 1 s, then 2 s
        (tmp_path / "second").mkdir()
        start_bridge(args=("--port", str(port)), workdir=tmp_path / "second")
        assert wait_for(lambda: "bridge reachable again" in log.read_text()), log.read_text()
        # the new bridge does not know the machine's agents: the log says to register them again
        assert wait_for(lambda: "register --agent dev-1" in log.read_text()), log.read_text()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(5) == 0
    finally:
        if proc.poll() is None:
            proc.kill()


# --- setup-heartbeats ---


def test_setup_heartbeats_edits_only_its_block_of_the_crontab(bridge, machine):
    others = "MAILTO=ops@example.com\n0 3 * * * /usr/local/bin/backup --all\n"
    machine.crontab.write_text(others)
    ok(machine.run("register", "--agent", "server-dev"))
    ok(machine.run("register", "--agent", "macbook-pm"))
    ok(machine.run("register", "--agent", "fast", "--interval", "300"))   # a 5-minute agent

    def block():
        lines = machine.crontab.read_text().splitlines()
        begin = next(i for i, line in enumerate(lines) if line.startswith("# BEGIN clawagent"))
        assert lines[:begin] == others.splitlines() and lines[-1].startswith("# END clawagent")
        return {line.split("--agent ")[1].split()[0]: line for line in lines[begin + 1:-1]}

    ok(machine.run("setup-heartbeats", "--agent", "server-dev"))
    assert block() == {"server-dev": f"{cron_minute('server-dev')}-59/15 * * * * {BEAT} server-dev --quiet"}
    ok(machine.run("setup-heartbeats", "--setup"))
    lines = block()
    assert sorted(lines) == ["fast", "macbook-pm", "server-dev"]
    assert lines["macbook-pm"].startswith(f"{cron_minute('macbook-pm')}-59/15 * * * * ")
    assert lines["fast"].startswith(f"{cron_minute('fast', 5)}-59/5 * * * * ")
    table = machine.crontab.read_text()
    ok(machine.run("setup-heartbeats", "--setup"))
    assert machine.crontab.read_text() == table                           # idempotent
    ok(machine.run("setup-heartbeats", "--agent", "macbook-pm", "--schedule", "*/5 * * * *"))
    ok(machine.run("setup-heartbeats", "--setup"))
    assert block()["macbook-pm"].startswith("*/5 * * * * ")               # --setup keeps a chosen schedule
    listed = ok(machine.run("setup-heartbeats", "--list")).stdout
    assert all(f"{agent_id}  cron  " in listed for agent_id in ("fast", "macbook-pm", "server-dev"))

    # the installed line works as cron runs it: sh, HOME set, nothing else
    command = block()["server-dev"].split(" ", 5)[5]
    done = subprocess.run(["sh", "-c", command], env={"HOME": str(machine.home), "PATH": "/usr/bin:/bin"},
                          cwd=machine.home, capture_output=True, text=True, timeout=20)
    assert (done.returncode, done.stdout, done.stderr) == (0, "", "")
    assert " ok " in machine.log_lines("server-dev")[-1]

    ok(machine.run("setup-heartbeats", "--remove", "server-dev"))
    assert sorted(block()) == ["fast", "macbook-pm"]
    for agent_id in ("fast", "macbook-pm"):
        ok(machine.run("setup-heartbeats", "--remove", agent_id))
    assert machine.crontab.read_text() == others                          # block gone, the rest untouched


def test_setup_heartbeats_without_crontab_exits_2(bridge, machine, tmp_path):
    ok(machine.run("register", "--agent", "dev-1"))
    (tmp_path / "empty-bin").mkdir()
    fails(machine.run("setup-heartbeats", "--setup", env={"PATH": str(tmp_path / "empty-bin")}), 2,
          "crontab command is not installed", "--systemd")
    fails(machine.run("setup-heartbeats", "--agent", "not-here"), 2, "register --agent not-here")


def test_setup_heartbeats_systemd_prints_and_installs_a_timer(bridge, machine):
    ok(machine.run("register", "--agent", "dev-1"))
    printed = ok(machine.run("setup-heartbeats", "--systemd", "--agent", "dev-1")).stdout
    assert f"OnCalendar=*-*-* *:{cron_minute('dev-1'):02d}/15:00" in printed
    assert f"WorkingDirectory={os.path.dirname(AGENT)}" in printed
    assert f"ExecStart={sys.executable} -m clawagent heartbeat --agent dev-1 --quiet" in printed
    units = machine.home / ".config" / "systemd" / "user"
    assert not units.exists()
    ok(machine.run("setup-heartbeats", "--systemd", "--install", "--agent", "dev-1"))
    assert sorted(p.name for p in units.iterdir()) == ["clawagent-heartbeat-dev-1.service",
                                                       "clawagent-heartbeat-dev-1.timer"]
    assert "Unit=clawagent-heartbeat-dev-1.service" in (units / "clawagent-heartbeat-dev-1.timer").read_text()
    doctor = ok(machine.run("doctor", "--agent", "dev-1")).stdout         # the crontab is empty: the timer counts
    assert "ok    heartbeat scheduled: systemd timer" in doctor
    ok(machine.run("setup-heartbeats", "--remove", "dev-1"))
    assert list(units.iterdir()) == []


# --- tasks and task verbs ---


def test_tasks_and_the_task_verbs(bridge, machine):
    for agent_id in ("dev-1", "dev-2"):
        ok(machine.run("register", "--agent", agent_id, "--roles", "backend-dev"))
    task = create_task(bridge, assignedTo="dev-1", priority="P1")
    listed = ok(machine.run("tasks", "--agent", "dev-1")).stdout
    assert f"{task['id']}  assigned  P1  epoch 1  Fix the login page" in listed

    ok(machine.run("task", "claim", task["id"], "--agent", "dev-1"))       # not held yet: epoch from the bridge
    assert machine.held("dev-1") == {task["id"]: 1}
    ok(machine.run("task", "start", task["id"], "--agent", "dev-1"))
    assert task_on(bridge, task["id"])["lane"] == "in_progress"
    ok(machine.run("task", "block", task["id"], "--agent", "dev-1", "--reason", "waiting for the API key"))
    blocked = task_on(bridge, task["id"])
    assert blocked["lane"] == "blocked" and blocked["history"][-1]["note"] == "waiting for the API key"
    ok(machine.run("task", "complete", task["id"], "--agent", "dev-1"))
    assert task_on(bridge, task["id"])["lane"] == "done" and machine.held("dev-1") == {}

    queued = create_task(bridge, roles=["nobody-has-this"])
    assert queued["lane"] == "queued"
    ok(machine.run("task", "claim", queued["id"], "--agent", "dev-1"))
    assert task_on(bridge, queued["id"])["assignedTo"] == "dev-1" and queued["id"] in machine.held("dev-1")
    ok(machine.run("task", "release", queued["id"], "--agent", "dev-1"))
    assert task_on(bridge, queued["id"])["lane"] == "queued" and machine.held("dev-1") == {}

    moved = create_task(bridge, assignedTo="dev-1")
    ok(machine.run("heartbeat", "--agent", "dev-1", "--quiet"))
    assert bridge.call("PUT", f"/api/tasks/{moved['id']}", {"assignedTo": "dev-2"})[0] == 200
    fails(machine.run("task", "start", moved["id"], "--agent", "dev-1"), 1,
          f"task {moved['id']} was moved to agent dev-2 (epoch 2); stop working on it")
    assert machine.held("dev-1") == {}
    after = task_on(bridge, moved["id"])
    assert (after["assignedTo"], after["lane"], after["epoch"]) == ("dev-2", "assigned", 2)


# --- doctor ---


def test_doctor_lists_each_check_with_a_fix(bridge, machine):
    fails(machine.run("doctor", "--agent", "dev-1"), 1)                   # nothing set up yet
    ok(machine.run("register", "--agent", "dev-1"))
    before = fails(machine.run("doctor", "--agent", "dev-1"), 1).stdout
    assert "FAIL  heartbeat scheduled" in before and "fix: run: python3 clawagent.py setup-heartbeats --agent dev-1" \
        in before
    ok(machine.run("setup-heartbeats", "--agent", "dev-1"))
    report = ok(machine.run("doctor", "--agent", "dev-1")).stdout
    checks = [line for line in report.splitlines() if line.startswith(("ok", "FAIL"))]
    assert all(line.startswith("ok ") for line in checks), report
    for name in ("config found", "bridge reachable", "token accepted", "agent registered", "clock skew",
                 f"Tailscale present: {TAILSCALE_IP}", "heartbeat scheduled: cron line"):
        assert any(name in line for line in checks), name
    down = fails(machine.run("doctor", "--agent", "dev-1", "--bridge", f"http://127.0.0.1:{closed_port()}"), 1)
    assert "FAIL  bridge reachable" in down.stdout and "check BRIDGE_URL or --bridge" in down.stdout
    assert bridge.call("DELETE", "/api/agents/dev-1")[0] == 200
    gone = fails(machine.run("doctor", "--agent", "dev-1"), 1).stdout
    assert "FAIL  agent registered" in gone and "register --agent dev-1" in gone


# --- the program itself ---


def test_each_command_has_a_manual(tmp_path):
    machine = Machine(tmp_path / "machine")
    for command in ("register", "heartbeat", "run", "setup-heartbeats", "tasks", "task", "doctor"):
        manual = ok(machine.run(command, "--help")).stdout
        assert "Examples:" in manual and f"python3 clawagent.py {command}" in manual and "Exit codes" in manual


def test_a_command_parsed_alone_is_the_command_of_the_full_line():
    """main builds only the parser of the command it is given: each must read and explain its arguments
    exactly as the full command line does, and the top level must still list every command."""
    sys.path.insert(0, str(ROOT))
    import clawagent

    def commands(parser):
        return next(a for a in parser._actions if a.dest == "command").choices

    full = clawagent.build_parser()
    assert list(commands(full)) == list(clawagent.COMMANDS)
    samples = {"task": ["start", "task-1", "--agent", "a"], "setup-heartbeats": ["--list"], "run": ["--once"]}
    for name in clawagent.COMMANDS:
        alone = clawagent.build_parser(only=name)
        assert list(commands(alone)) == [name]
        assert commands(alone)[name].format_help() == commands(full)[name].format_help()
        argv = [name, *samples.get(name, ["--agent", "a"])]
        assert vars(alone.parse_args(argv)) == vars(full.parse_args(argv))


def test_importing_has_no_side_effects(tmp_path):
    machine = Machine(tmp_path / "machine")
    done = subprocess.run([sys.executable, "-c", f"import sys; sys.path.insert(0, {str(ROOT)!r}); import clawagent"],
                          env=machine.env, cwd=machine.work, capture_output=True, text=True, timeout=20)
    assert (done.returncode, done.stdout, done.stderr) == (0, "", "")
    assert list(machine.home.iterdir()) == [] and list(machine.work.iterdir()) == []


def test_doctor_sees_an_enabled_template_timer(bridge, machine):
    """An agent run by the shipped systemd/clawagent-heartbeat@.timer counts as scheduled."""
    ok(machine.run("register", "--agent", "dev-1"))
    assert "FAIL  heartbeat scheduled" in fails(machine.run("doctor", "--agent", "dev-1"), 1).stdout
    wants = machine.home / ".config" / "systemd" / "user" / "timers.target.wants"
    wants.mkdir(parents=True)
    (wants / "clawagent-heartbeat@dev-1.timer").symlink_to("/dev/null")
    report = ok(machine.run("doctor", "--agent", "dev-1")).stdout
    assert "ok    heartbeat scheduled: systemd timer" in report and "clawagent-heartbeat@dev-1.timer" in report
