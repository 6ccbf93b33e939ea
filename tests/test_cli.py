"""clawbridge.py run the way an operator runs it: the guide's curl/jq lines verbatim, configuration, signals."""
import ast
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import AGENT, BRIDGE, ROOT

needs_curl_jq = pytest.mark.skipif(not (shutil.which("curl") and shutil.which("jq")), reason="needs curl and jq")


def guide(line, bridge, token=None):
    """Run one shell line from MULTI_INSTANCE.md with its bridge addresses pointed at the test bridge.
    Returns stdout; a non-zero exit fails the test."""
    for host in ("http://bridge:8787", "http://bridge.ip:8787", "http://100.64.xxx.xxx:8787",
                 "http://openclaw-bridge:8787"):
        line = line.replace(host, bridge.url)
    if token:
        line = line.replace("curl ", f"curl -H 'Authorization: Bearer {token}' ")
    result = subprocess.run(["bash", "-o", "pipefail", "-c", line], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, f"{line}\n{result.stderr}"
    return result.stdout


def run_bridge_cli(*args, env=None, cwd=None, timeout=30):
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("BRIDGE_")}
    full_env.update(env or {})
    return subprocess.run([sys.executable, BRIDGE, *args], capture_output=True, text=True, env=full_env,
                          cwd=cwd, timeout=timeout)


@pytest.fixture
def fleet(start_bridge):
    """A bridge with the guide's fleet: two instances, three agents, a few tasks."""
    bridge = start_bridge()
    for agent in ({"id": "macbook-dev-1", "roles": "backend-dev,api", "emoji": "🔧", "instanceId": "macbook",
                   "hostname": "macbook.local", "tailscaleIP": "100.64.0.10"},
                  {"id": "server-dev-1", "roles": ["backend-dev", "devops"], "instanceId": "server",
                   "hostname": "server.internal", "tailscaleIP": "100.65.0.20"},
                  {"id": "server-dev-2", "roles": ["backend-dev", "database"], "instanceId": "server"}):
        assert bridge.call("POST", "/api/agents/register", agent)[0] == 201
    bridge.tasks = [bridge.call("POST", "/api/tasks", {"title": f"task {i}", "roles": ["backend-dev"]})[2]
                    for i in range(5)]
    return bridge


@needs_curl_jq
def test_guide_lines_for_agents_and_instances(fleet):
    agents = json.loads(guide("curl http://100.64.xxx.xxx:8787/api/agents | jq .", fleet))
    assert sorted(a["id"] for a in agents) == ["macbook-dev-1", "server-dev-1", "server-dev-2"]
    assert {a["instanceId"] for a in agents} == {"macbook", "server"}
    instances = json.loads(guide("curl http://100.64.xxx.xxx:8787/api/instances | jq .", fleet))
    mac = next(i for i in instances if i["instanceId"] == "macbook")
    assert (mac["hostname"], mac["tailscaleIP"], mac["status"], mac["agentCount"]) == \
        ("macbook.local", "100.64.0.10", "online", 1)
    assert isinstance(mac["lastHeartbeat"], int)
    caps = json.loads(guide("curl http://bridge.ip:8787/api/instances/capacities | jq .", fleet))
    assert {c["instanceId"] for c in caps} == {"macbook", "server"}
    for cap in caps:
        assert cap["availableCapacity"] >= 0 and 0 <= cap["healthScore"] <= 100
        assert {"agentCount", "taskCount"} <= set(cap)
    assert sum(c["taskCount"] for c in caps) == 5
    scores = guide("curl http://bridge:8787/api/instances/capacities | jq '.[] | {id: .instanceId, healthScore}'",
                   fleet)
    assert '"id": "server"' in scores and '"healthScore"' in scores
    status = guide("""for AGENT in macbook-dev-1 server-dev-1 qa; do
  echo "Testing $AGENT..."
  curl -s http://bridge:8787/api/agents/$AGENT | jq '.status'
done""", fleet)
    assert status.count('"online"') == 2 and "null" in status, "an unknown agent shows no status"
    listing = guide("curl http://bridge:8787/api/agents | jq '.[] | {id, status, lastHeartbeat}'", fleet)
    assert listing.count('"status": "online"') == 3
    one = guide("""curl http://bridge:8787/api/instances | jq '.[] | select(.instanceId == "server")'""", fleet)
    assert json.loads(one)["agentCount"] == 2
    ids = guide("curl http://bridge:8787/api/agents | jq '.[].id'", fleet)
    assert ids.split() == ['"macbook-dev-1"', '"server-dev-1"', '"server-dev-2"']
    disc = guide("curl http://bridge:8787/api/instances | jq '.[] | {id: .instanceId, status}'", fleet)
    assert disc.count('"online"') == 2
    agent = json.loads(guide("curl http://100.64.xxx.xxx:8787/api/agents/macbook-dev-1 | jq .", fleet))
    assert agent["emoji"] == "🔧" and agent["roles"] == ["backend-dev", "api"]


@needs_curl_jq
def test_guide_manual_load_balancing(fleet):
    loads = guide("""curl "http://bridge:8787/api/agents?instanceId=server" | jq '.[] | {id, activeTasks: .activeTasks | length}'""",
                  fleet)
    assert '"id": "server-dev-1"' in loads and '"activeTasks"' in loads and "macbook" not in loads
    task = next(t for t in fleet.tasks if t["assignedTo"] != "macbook-dev-1")
    moved = json.loads(guide(f"""curl -X PUT http://bridge:8787/api/tasks/{task["id"]} \\
  -H "Content-Type: application/json" \\
  -d '{{"assignedTo": "macbook-dev-1"}}'""", fleet))
    assert moved["assignedTo"] == "macbook-dev-1" and moved["epoch"] == task["epoch"] + 1
    spread = json.loads(guide("""curl "http://bridge:8787/api/tasks?limit=100" | \\
  jq 'group_by(.assignedTo) | map({agent: .[0].assignedTo, count: length})'""", fleet))
    assert sum(row["count"] for row in spread) == 5
    assert {row["agent"] for row in spread} <= {"macbook-dev-1", "server-dev-1", "server-dev-2"}
    synced = json.loads(guide("curl -X POST http://bridge:8787/api/sync", fleet))
    assert synced["success"] is True
    health = json.loads(guide("curl http://bridge:8787/health", fleet))
    assert health["status"] == "ok"


@needs_curl_jq
def test_guide_lines_with_a_token(start_bridge, tmp_path):
    (tmp_path / ".env").write_text("BRIDGE_PORT=8787\nBRIDGE_TOKEN=your-secret-token\nINSTANCE_ID=claw-bridge-central\n"
                                   "\n# Logging\nDEBUG=bridge:*\nLOG_LEVEL=info\n")
    bridge = start_bridge()
    refused = subprocess.run(["curl", "-s", "-w", "%{http_code}", f"{bridge.url}/api/agents"],
                             capture_output=True, text=True)
    assert refused.stdout.endswith("401") and '"unauthorized"' in refused.stdout
    assert json.loads(guide("curl http://bridge:8787/api/agents | jq .", bridge, token="your-secret-token")) == []
    assert json.loads(guide("curl http://bridge:8787/health", bridge)) == {"status": "ok", "version": "0.1.0"}
    # the request line is logged just after the reply is sent
    assert wait_until(lambda: " DEBUG " in bridge.output(), 5), "DEBUG=bridge:* from .env turns on debug logging"
    assert "your-secret-token" not in bridge.output()


def test_sigterm_finishes_and_flushes(start_bridge, tmp_path):
    bridge = start_bridge()
    assert bridge.call("POST", "/api/agents/register", {"id": "a1"})[0] == 201
    assert bridge.stop() == 0
    snapshots = list((tmp_path / ".clawhub").glob("snapshot-*.json"))
    assert snapshots, "a snapshot is written at shutdown"
    doc = json.loads(snapshots[-1].read_text())
    assert any(dict(zip(doc["fields"]["agents"], row))["id"] == "a1" for row in doc["agents"])
    assert "stopped cleanly" in bridge.output()


def test_non_loopback_without_token_refuses_to_start(tmp_path):
    result = run_bridge_cli("--port", "0", env={"BRIDGE_HOST": "0.0.0.0"}, cwd=tmp_path)
    assert result.returncode == 2 and "BRIDGE_TOKEN" in result.stderr and "--insecure" in result.stderr


@pytest.mark.parametrize("extra", [{"BRIDGE_TOKEN": "t0ken"}, {"_flag": "--insecure"}])
def test_non_loopback_with_token_or_insecure_serves(start_bridge, extra):
    env = {"BRIDGE_HOST": "0.0.0.0", **{k: v for k, v in extra.items() if not k.startswith("_")}}
    bridge = start_bridge(env=env, args=[extra["_flag"]] if "_flag" in extra else [])
    assert bridge.call("GET", "/health")[0] == 200


@pytest.mark.parametrize("env,key", [({"BRIDGE_PORT": "eighty"}, "BRIDGE_PORT"),
                                     ({"OFFLINE_AFTER": "0"}, "OFFLINE_AFTER"),
                                     ({"LOG_LEVEL": "chatty"}, "LOG_LEVEL")])
def test_bad_configuration_exits_2_naming_the_key(tmp_path, env, key):
    result = run_bridge_cli(env=env, cwd=tmp_path)
    assert result.returncode == 2 and key in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / ".clawhub").exists(), "nothing is created before the config is valid"


def test_print_config_layers_and_redacts(tmp_path):
    (tmp_path / ".env").write_text("BRIDGE_PORT=9100  # from the file\nBRIDGE_TOKEN=s3cr3t\nOFFLINE_AFTER=60\n")
    result = run_bridge_cli("--print-config", "--offline-after", "90", env={"BRIDGE_PORT": "9200"}, cwd=tmp_path)
    assert result.returncode == 0
    assert "BRIDGE_PORT=9200" in result.stdout and "OFFLINE_AFTER=90" in result.stdout
    assert "s3cr3t" not in result.stdout and "BRIDGE_TOKEN=(set, hidden)" in result.stdout


def test_help_is_a_manual():
    result = run_bridge_cli("--help")
    assert result.returncode == 0
    for word in ("backup", "--data-dir", "--port", "--insecure", "BRIDGE_TOKEN", "Exit codes"):
        assert word in result.stdout
    backup = run_bridge_cli("backup", "--help")
    assert "consistent copy" in backup.stdout


def test_port_in_use_is_a_clear_error(start_bridge, tmp_path):
    first = start_bridge()
    other = tmp_path / "other"
    other.mkdir()
    result = run_bridge_cli("--port", str(first.port), cwd=other)
    assert result.returncode == 1 and "cannot listen" in result.stderr and "Traceback" not in result.stderr


def imported_modules(path):
    tree = ast.parse(Path(path).read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and not node.level:
            yield node.module.split(".")[0]


@pytest.mark.parametrize("program", [BRIDGE, AGENT])
def test_programs_use_only_the_standard_library(program):
    if not hasattr(sys, "stdlib_module_names"):
        pytest.skip("the list of standard modules needs Python 3.10+ (the programs themselves run on 3.9)")
    outside = sorted(set(imported_modules(program)) - set(sys.stdlib_module_names) - {"__future__"})
    assert outside == []
    shared_check = ROOT.parent / "shared" / "tools" / "stdlib_check.py"
    if shared_check.exists():
        result = subprocess.run([sys.executable, str(shared_check), program], capture_output=True, text=True)
        assert result.returncode == 0 and result.stdout == ""


# --- liveness and failover end to end: the real watchdog, short thresholds ---

class Beater:
    """Sends instance heartbeats every 0.25 s for the instances in `alive`, like clawagent.py run would."""

    def __init__(self, bridge, instances):
        import threading
        self.bridge, self.alive = bridge, set(instances)
        self.stop_event = threading.Event()
        self.thread = threading.Thread(target=self.loop, daemon=True)
        self.thread.start()

    def loop(self):
        while not self.stop_event.wait(0.25):
            for instance in list(self.alive):
                try:
                    self.bridge.call("POST", f"/api/instances/{instance}/heartbeat", {"heartbeatInterval": 500})
                except OSError:
                    pass    # the bridge is restarting

    def stop(self):
        self.stop_event.set()
        self.thread.join(5)


def wait_until(predicate, timeout=10.0):
    import time
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    return predicate()


def live_fleet(bridge, instances, agents_each=1, tasks=0):
    for instance in instances:
        for n in range(agents_each):
            body = {"id": f"{instance}-a{n}", "instanceId": instance, "heartbeatInterval": 500, "roles": ["dev"]}
            assert bridge.call("POST", "/api/agents/register", body)[0] == 201
    return [bridge.call("POST", "/api/tasks", {"title": f"job {i}", "roles": ["dev"]})[2] for i in range(tasks)]


FAST = {"OFFLINE_AFTER": "2"}


def test_a_dead_instances_tasks_move_to_a_live_one(start_bridge):
    bridge = start_bridge(env=FAST)
    tasks = live_fleet(bridge, ["mac", "srv"], tasks=2)
    on_mac = [t["id"] for t in tasks if t["assignedTo"] == "mac-a0"]
    assert on_mac, "the fleet spreads work over both instances"
    beater = Beater(bridge, ["srv"])     # mac goes silent
    try:
        moved = wait_until(lambda: all(bridge.call("GET", f"/api/tasks/{t}")[2]["assignedTo"] == "srv-a0"
                                       for t in on_mac), timeout=8)
        assert moved, "the dead instance's work moved"
        instances = {i["instanceId"]: i for i in bridge.call("GET", "/api/instances")[2]}
        assert instances["mac"]["status"] == "offline" and instances["srv"]["status"] == "online"
        task = bridge.call("GET", f"/api/tasks/{on_mac[0]}")[2]
        assert task["epoch"] == 2 and task["history"][-1]["event"] == "task-reassigned"
        assert "instance mac is offline" in bridge.output()
    finally:
        beater.stop()


def test_a_bridge_restart_reassigns_nothing(start_bridge, tmp_path):
    bridge = start_bridge(env=FAST)
    tasks = live_fleet(bridge, ["mac", "srv"], tasks=4)
    before = {t["id"]: (t["assignedTo"], t["epoch"]) for t in tasks}
    bridge.kill()
    import time
    time.sleep(2.5)     # the fleet was unheard for longer than its threshold while the bridge was down
    bridge = start_bridge(env=FAST)
    beater = Beater(bridge, ["mac", "srv"])
    try:
        time.sleep(3)   # more than a threshold after the start, with beats flowing
        after = {t["id"]: (t["assignedTo"], t["epoch"]) for t in bridge.call("GET", "/api/tasks")[2]}
        assert after == before
        assert all(i["status"] == "online" for i in bridge.call("GET", "/api/instances")[2])
    finally:
        beater.stop()


def test_most_instances_silent_at_once_moves_nothing(start_bridge):
    bridge = start_bridge(env=FAST)
    tasks = live_fleet(bridge, ["i0", "i1", "i2", "i3"], tasks=4)
    beater = Beater(bridge, ["i0"])      # three of four go quiet: looks like the bridge's own network
    try:
        assert wait_until(lambda: bridge.call("GET", "/health")[2].get("disruption"), timeout=8)
        after = {t["id"]: t["assignedTo"] for t in bridge.call("GET", "/api/tasks")[2]}
        assert after == {t["id"]: t["assignedTo"] for t in tasks}
        assert all(i["status"] == "online" for i in bridge.call("GET", "/api/instances")[2])
        assert "disruption" in bridge.output()
        beater.alive.update(["i1", "i2", "i3"])
        assert wait_until(lambda: not bridge.call("GET", "/health")[2].get("disruption"), timeout=5)
    finally:
        beater.stop()


@pytest.mark.parametrize("program", [BRIDGE, AGENT])
def test_programs_are_python_3_9_syntax(program):
    ast.parse(Path(program).read_text(encoding="utf-8"), feature_version=(3, 9))


def test_sigterm_lets_a_request_in_flight_finish(start_bridge):
    """A request whose body is still arriving when SIGTERM comes is answered and saved before the exit."""
    import signal
    import socket
    import time
    bridge = start_bridge()
    body = json.dumps({"title": "arrives during shutdown"}).encode()
    with socket.create_connection(("127.0.0.1", bridge.port), timeout=10) as sock:
        sock.sendall(b"POST /api/tasks HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n" % len(body) + body[:5])
        time.sleep(0.3)     # the bridge has read the head and waits for the body
        bridge.proc.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        sock.sendall(body[5:])
        reply = sock.makefile("rb").read()
    assert reply.startswith(b"HTTP/1.1 201"), reply[:200]
    assert bridge.stop() == 0
    again = start_bridge()
    assert [t["title"] for t in again.call("GET", "/api/tasks")[2]] == ["arrives during shutdown"]


def files_open_in(pid):
    """What the descriptors of a running process point at; one closed while they are read is left out."""
    names = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            names.append(os.readlink(f"/proc/{pid}/fd/{fd}"))
        except FileNotFoundError:
            pass
    return names


@pytest.mark.skipif(not hasattr(sys, "orig_argv") or not Path("/proc/self/cmdline").exists(),
                    reason="needs sys.orig_argv (3.10+) and /proc")
def test_a_script_run_serves_as_a_module_in_the_same_process(start_bridge, tmp_path):
    """`python3 clawbridge.py` replaces itself (same pid, arguments and interpreter options) with an interpreter
    running the file's compiled code as a module, which frees the parse tree Python keeps for a script; the
    working directory still cannot shadow a standard module, just as for the script."""
    import clawbridge
    marker = tmp_path / "shadowed"
    (tmp_path / "logging.py").write_text(f"open({str(marker)!r}, 'w').close()\nraise SystemExit('shadowed')\n")
    options = ["-W", "ignore::DeprecationWarning"]
    bridge = start_bridge(args=("--instance-id", "reloaded"), python=(sys.executable, *options))
    status, _, body = bridge.call("GET", "/health")
    assert status == 200 and body["instanceId"] == "reloaded"
    argv = [a.decode() for a in Path(f"/proc/{bridge.proc.pid}/cmdline").read_bytes().split(b"\0")[:-1]]
    code_fd = argv[len(options) + 3]    # the descriptor the compiled code came through, closed once read
    assert code_fd.isdigit() and argv[1:] == [*options, "-c", clawbridge.RUN_AS_MODULE, code_fd, BRIDGE, "--port",
                                              "0", "--instance-id", "reloaded"]
    open_files = files_open_in(bridge.proc.pid)
    assert not any("clawbridge-code" in name for name in open_files), open_files
    assert not marker.exists()


@pytest.mark.skipif(not hasattr(sys, "orig_argv") or not Path("/proc/self/cmdline").exists(),
                    reason="needs sys.orig_argv (3.10+) and /proc")
def test_a_script_run_without_memfd_serves_as_it_was_started(start_bridge, tmp_path):
    """Where memfd_create is refused (a seccomp filter, an old kernel), the script does not replace itself:
    it serves as it was started, with nothing left open."""
    hooks = tmp_path / "hooks"
    hooks.mkdir()
    (hooks / "sitecustomize.py").write_text(
        "import errno, os\n"
        "def refused(*args):\n"
        "    raise OSError(errno.ENOSYS, 'memfd_create refused')\n"
        "os.memfd_create = refused\n")
    bridge = start_bridge(env={"PYTHONPATH": str(hooks)}, args=("--instance-id", "as-started"))
    status, _, body = bridge.call("GET", "/health")
    assert status == 200 and body["instanceId"] == "as-started"
    argv = [a.decode() for a in Path(f"/proc/{bridge.proc.pid}/cmdline").read_bytes().split(b"\0")[:-1]]
    assert argv[1:] == [BRIDGE, "--port", "0", "--instance-id", "as-started"]
    open_files = files_open_in(bridge.proc.pid)
    assert not any("clawbridge-code" in name for name in open_files), open_files


def test_the_bridge_read_from_stdin_runs_as_it_is(tmp_path):
    """`python3 - < clawbridge.py` has no file to run again as a module: it runs where it is."""
    with open(BRIDGE, "rb") as source:
        result = subprocess.run([sys.executable, "-", "--help"], stdin=source, capture_output=True, text=True,
                                cwd=tmp_path, timeout=30)
    assert result.returncode == 0 and "usage: clawbridge.py" in result.stdout, result.stderr
