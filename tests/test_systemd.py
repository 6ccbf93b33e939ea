"""The systemd units in systemd/: `systemd-analyze verify` on each (when systemd is installed), the directives
the issue asks for, the sd_notify contract clawbridge.service relies on, and `make install`."""
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from conftest import AGENT, BRIDGE, ROOT

import clawagent  # noqa: E402  (conftest put the repo on sys.path)
import clawbridge  # noqa: E402

UNIT_DIR = ROOT / "systemd"
UNITS = sorted(p.name for p in UNIT_DIR.iterdir() if p.suffix in (".service", ".timer"))
EXPECTED_UNITS = {"clawbridge.service", "clawagent-beats.service", "clawagent-heartbeat@.service",
                  "clawagent-heartbeat@.timer"}
INSTALLED = {"python": "/usr/bin/python3", "clawbridge.py": "/usr/local/bin/clawbridge.py",
             "clawagent.py": "/usr/local/bin/clawagent.py"}
SECTIONS = {".service": {"Unit", "Service", "Install"}, ".timer": {"Unit", "Timer", "Install"}}
TEST_AGENT = "test-agent"


def read_unit(name):
    """[(section, key, value)] of a unit file in systemd/, in order."""
    return parse_unit((UNIT_DIR / name).read_text(encoding="utf-8"), name)


def parse_unit(text, name):
    """[(section, key, value)] of a unit's text, in order; a line that is neither a comment, a section header
    nor Key=Value fails the test."""
    entries, section = [], None
    for number, line in enumerate(text.splitlines(), 1):
        text = line.strip()
        if not text or text[0] in "#;":
            continue
        assert not text.endswith("\\"), f"{name}:{number}: keep directives on one line"
        if text.startswith("[") and text.endswith("]"):
            section = text[1:-1]
            assert section in SECTIONS[Path(name).suffix], f"{name}:{number}: unexpected section [{section}]"
            continue
        key, sep, value = text.partition("=")
        assert section and sep and re.fullmatch(r"[A-Z][A-Za-z]+", key.strip()), \
            f"{name}:{number}: not a Key=Value directive inside a section: {line!r}"
        entries.append((section, key.strip(), value.strip()))
    return entries


def values(entries, section, key):
    return [v for s, k, v in entries if s == section and k == key]


def one(entries, section, key):
    found = values(entries, section, key)
    assert len(found) == 1, f"[{section}] {key}= should be set once, found {found}"
    return found[0]


def seconds(span):
    """A systemd time span of one number and unit ('30s', '2min', '15min') in seconds."""
    match = re.fullmatch(r"(\d+)\s*(s|sec|min|m|h)?", span)
    assert match, f"unexpected time span {span!r}"
    return int(match.group(1)) * {None: 1, "s": 1, "sec": 1, "min": 60, "m": 60, "h": 3600}[match.group(2)]


# ===== systemd-analyze verify =====

def staged_unit(directory, name):
    """Copy a unit (and its template partner) into directory, pointing the installed paths at this checkout,
    since verify checks that ExecStart's program exists; a template becomes the instance @test-agent.
    Returns the file to verify."""
    stem = Path(name).stem
    partners = [n for n in UNITS if Path(n).stem == stem] if stem.endswith("@") else [name]
    for partner in partners:
        text = (UNIT_DIR / partner).read_text(encoding="utf-8")
        text = text.replace(INSTALLED["python"], sys.executable)
        text = text.replace(INSTALLED["clawbridge.py"], BRIDGE).replace(INSTALLED["clawagent.py"], AGENT)
        (directory / partner.replace("@.", f"@{TEST_AGENT}.")).write_text(text, encoding="utf-8")
    return directory / name.replace("@.", f"@{TEST_AGENT}.")


def verify_findings(path):
    """What `systemd-analyze verify` says about one unit file. It exits 0 on unknown keys and unparsable
    values, only printing them, so the lines that name the unit are the findings."""
    result = subprocess.run(["systemd-analyze", "verify", "--man=no", str(path)], capture_output=True,
                            text=True, timeout=60, cwd=path.parent)
    names = {path.name, path.name.replace(".timer", ".service")}
    lines = [line for line in (result.stdout + result.stderr).splitlines() if any(n in line for n in names)]
    if result.returncode != 0:
        lines.append(f"exit code {result.returncode}: {result.stderr.strip()}")
    return lines


needs_systemd_analyze = pytest.mark.skipif(
    not shutil.which("systemd-analyze"),
    reason="systemd-analyze is not installed (apt-get install systemd provides it)")


@needs_systemd_analyze
@pytest.mark.parametrize("name", UNITS)
def test_systemd_analyze_verify_accepts_the_unit(name, tmp_path):
    assert verify_findings(staged_unit(tmp_path, name)) == []


@needs_systemd_analyze
def test_systemd_analyze_verify_findings_are_caught(tmp_path):
    """The check above can fail: a misspelt key and a bad value are reported although verify exits 0."""
    path = staged_unit(tmp_path, "clawbridge.service")
    path.write_text(path.read_text().replace("Restart=on-failure", "Restart=sometimes\nWatchdogSecs=30s"))
    findings = verify_findings(path)
    assert any("sometimes" in line for line in findings), findings
    assert any("WatchdogSecs" in line for line in findings), findings


# ===== What the units say =====

def test_all_units_are_shipped():
    assert EXPECTED_UNITS <= set(UNITS)


@pytest.mark.parametrize("name", UNITS)
def test_unit_is_well_formed(name):
    entries = read_unit(name)
    sections = {s for s, _, _ in entries}
    main = "Timer" if name.endswith(".timer") else "Service"
    assert {"Unit", main} <= sections
    assert values(entries, "Unit", "Description")
    if main == "Service":
        exec_start = one(entries, "Service", "ExecStart").split()
        assert exec_start[0] == INSTALLED["python"], exec_start
        if exec_start[1] == "-m":       # a module, from the directory the programs are installed in
            assert exec_start[2] + ".py" in INSTALLED and one(entries, "Service", "WorkingDirectory") == \
                str(Path(INSTALLED[exec_start[2] + ".py"]).parent), exec_start
        else:
            assert exec_start[1] in INSTALLED.values(), exec_start


def test_bridge_unit_has_the_directives_of_the_issue():
    unit = read_unit("clawbridge.service")
    service = {k: v for s, k, v in unit if s == "Service" and k != "SystemCallFilter"}
    assert service["Type"] == "notify"
    assert service["NotifyAccess"] == "main"
    # The bridge feeds the watchdog every WatchdogSec/2, and only when its sweep is recent (10 periods).
    assert seconds(service["WatchdogSec"]) >= 2 * 10 * clawbridge.WATCHDOG_PERIOD
    # On SIGTERM it drains requests for SHUTDOWN_GRACE seconds, then snapshots: more than that before SIGKILL.
    assert seconds(service["TimeoutStopSec"]) >= clawbridge.SHUTDOWN_GRACE + 10
    assert service["ExecStart"] == f"{INSTALLED['python']} {INSTALLED['clawbridge.py']}"
    assert service["EnvironmentFile"] == "-/etc/clawbridge.env"
    assert service["Restart"] == "on-failure"
    assert service["RestartPreventExitStatus"] == "2"     # a configuration error does not loop
    assert service["DynamicUser"] == "yes"
    assert service["StateDirectory"] == "clawbridge"
    assert service["StateDirectoryMode"] == "0700"
    assert "BRIDGE_DATA_DIR" not in service.get("Environment", "")   # the data dir is $STATE_DIRECTORY
    for key, value in [("ProtectSystem", "strict"), ("ProtectHome", "yes"), ("PrivateTmp", "yes"),
                       ("PrivateDevices", "yes"), ("NoNewPrivileges", "yes"), ("CapabilityBoundingSet", "")]:
        assert service[key] == value, key
    # AF_UNIX carries sd_notify; without it READY=1 never arrives and systemd kills the bridge at start.
    assert set(service["RestrictAddressFamilies"].split()) == {"AF_INET", "AF_INET6", "AF_UNIX"}
    assert "@system-service" in values(unit, "Service", "SystemCallFilter")
    assert int(service["LimitNOFILE"]) > clawbridge.MAX_CONNECTIONS + 64
    assert int(service["TasksMax"]) > clawbridge.MAX_CONNECTIONS + 16
    assert values(unit, "Install", "WantedBy") == ["multi-user.target"]


def test_every_directive_of_the_bridge_unit_is_commented():
    lines = (UNIT_DIR / "clawbridge.service").read_text(encoding="utf-8").splitlines()
    uncommented = [line for before, line in zip([""] + lines, lines)
                   if re.match(r"[A-Z][A-Za-z]+=", line) and not before.startswith("#")]
    assert uncommented == []


def test_beats_unit_runs_the_scheduler():
    unit = read_unit("clawagent-beats.service")
    assert one(unit, "Service", "ExecStart") == f"{INSTALLED['python']} {INSTALLED['clawagent.py']} run"
    assert one(unit, "Service", "Restart") == "on-failure"
    assert one(unit, "Service", "EnvironmentFile") == "-/etc/clawagent.env"
    # No fixed User=: it must run as the user whose ~/.openclaw holds the agents (a drop-in or a user unit).
    assert values(unit, "Service", "User") == []


def test_heartbeat_template_beats_one_agent_like_setup_heartbeats_does():
    service, timer = read_unit("clawagent-heartbeat@.service"), read_unit("clawagent-heartbeat@.timer")
    generated = clawagent.systemd_units({}, TEST_AGENT, "*:00/15")
    made_service, made_timer = (parse_unit(generated[clawagent.UNIT_PREFIX + TEST_AGENT + suffix], "made" + suffix)
                                for suffix in (".service", ".timer"))
    # The same command after the program path, with the agent id as the instance name.
    ours = one(service, "Service", "ExecStart").replace("%i", TEST_AGENT).split()
    theirs = one(made_service, "Service", "ExecStart").split()
    assert ours[1:] == theirs[1:] == ["-m", "clawagent", "heartbeat", "--agent", TEST_AGENT, "--quiet"]
    assert values(service, "Service", "WorkingDirectory") and values(made_service, "Service", "WorkingDirectory")
    assert one(service, "Service", "Type") == one(made_service, "Service", "Type") == "oneshot"
    assert one(service, "Service", "EnvironmentFile") == "-/etc/clawagent.env"
    # Persistent= only acts on OnCalendar= timers: a missed beat is sent when the machine is back.
    assert one(timer, "Timer", "Persistent") == one(made_timer, "Timer", "Persistent") == "true"
    assert values(timer, "Timer", "OnCalendar") and values(made_timer, "Timer", "OnCalendar")
    assert one(timer, "Timer", "Unit") == "clawagent-heartbeat@%i.service"
    assert values(timer, "Install", "WantedBy") == values(made_timer, "Install", "WantedBy") == ["timers.target"]


def test_heartbeat_timer_beats_at_the_declared_interval_with_a_fixed_stagger():
    timer = read_unit("clawagent-heartbeat@.timer")
    # Every quarter hour: the HEARTBEAT_INTERVAL register declares by default ...
    assert one(timer, "Timer", "OnCalendar") == "*:00/15"
    assert clawagent.DEFAULT_HEARTBEAT_MS == 15 * 60 * 1000
    # ... shifted by a per-agent offset below one interval that stays the same, so beats stay 15 min apart.
    assert seconds(one(timer, "Timer", "RandomizedDelaySec")) == 15 * 60
    assert one(timer, "Timer", "FixedRandomDelay") == "true"


# ===== The bridge's side of Type=notify =====

def test_bridge_notifies_systemd_and_keeps_its_data_in_the_state_directory(tmp_path):
    """What clawbridge.service relies on: READY=1 once serving, WATCHDOG=1 while healthy, STOPPING=1 and exit 0
    on SIGTERM, and the data in $STATE_DIRECTORY when BRIDGE_DATA_DIR is not set."""
    short = tempfile.mkdtemp(prefix="claw-")       # AF_UNIX socket paths are limited to 108 bytes
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind(os.path.join(short, "notify"))
    listener.settimeout(10)
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("BRIDGE_", "NOTIFY_", "WATCHDOG_", "STATE_DIRECTORY", "LOG_"))}
    env.update(NOTIFY_SOCKET=os.path.join(short, "notify"), WATCHDOG_USEC="1000000", STATE_DIRECTORY=str(state))
    proc = subprocess.Popen([sys.executable, BRIDGE, "--port", "0"], cwd=tmp_path, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)

    def until(word):
        started = time.monotonic()
        while True:
            message = listener.recv(4096).decode()
            if word in message.split("\n"):
                return time.monotonic() - started
            assert time.monotonic() - started < 10, f"no {word} from the bridge"

    try:
        until("READY=1")
        assert until("WATCHDOG=1") < 3      # fed every WATCHDOG_USEC/2 = 0.5 s
        proc.send_signal(signal.SIGTERM)
        until("STOPPING=1")
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        stderr = proc.stderr.read()
        proc.stderr.close()
        listener.close()
        shutil.rmtree(short)
    assert str(state) in stderr
    assert list(state.glob("snapshot-*.json")), stderr



MDWE_LAUNCHER = """
import ctypes, os, sys
if ctypes.CDLL(None, use_errno=True).prctl(65, 1, 0, 0, 0) != 0:     # PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN
    sys.exit(77)
os.execv(sys.executable, [sys.executable, *sys.argv[1:]])
"""


def test_bridge_serves_under_memory_deny_write_execute(start_bridge):
    """clawbridge.service sets MemoryDenyWriteExecute=yes, which on Linux 6.3+ is prctl(PR_SET_MDWE), kept
    across exec: the bridge starts itself again as a module, gives its free heap back (through ctypes) and
    serves under it, as under the unit."""
    if not sys.platform.startswith("linux"):
        pytest.skip("PR_SET_MDWE is Linux's")
    probe = subprocess.run([sys.executable, "-c", MDWE_LAUNCHER, "-c", "import mmap; mmap.mmap(-1, 4096, prot=7)"],
                           capture_output=True, text=True)
    if probe.returncode == 77:
        pytest.skip("this kernel has no PR_SET_MDWE (Linux 6.3+)")
    assert probe.returncode != 0 and "Permission denied" in probe.stderr, "memory both writable and executable"
    bridge = start_bridge(python=(sys.executable, "-c", MDWE_LAUNCHER))
    status, _, body = bridge.call("GET", "/health")
    assert status == 200 and body["status"] == "ok"
    assert "Traceback" not in bridge.output()


def test_giving_the_heap_back_is_skipped_where_ctypes_cannot_load(monkeypatch):
    """Under SELinux's execmem denial (or an older libffi under MemoryDenyWriteExecute) importing ctypes
    raises MemoryError; a bridge must start anyway."""
    class NoExecMemory:
        def find_spec(self, name, path=None, target=None):
            if name == "ctypes":
                raise MemoryError
            return None
    monkeypatch.delitem(sys.modules, "ctypes", raising=False)
    monkeypatch.setattr(sys, "meta_path", [NoExecMemory(), *sys.meta_path])
    clawbridge.release_free_heap()
    assert "ctypes" not in sys.modules


# ===== make install =====

@pytest.mark.skipif(not shutil.which("make"), reason="make is not installed")
def test_make_install_puts_the_programs_and_units_where_the_units_expect_them(tmp_path):
    result = subprocess.run(["make", "install", f"DESTDIR={tmp_path}", "PREFIX=/usr/local"], cwd=ROOT,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    for program in ("clawbridge.py", "clawagent.py"):
        installed = tmp_path / INSTALLED[program].lstrip("/")
        assert installed.read_bytes() == (ROOT / program).read_bytes()
        assert installed.stat().st_mode & 0o777 == 0o755
    unit_dir = tmp_path / "usr/local/lib/systemd/system"
    assert {p.name for p in unit_dir.iterdir()} >= EXPECTED_UNITS
    for name in UNITS:
        installed = unit_dir / name
        assert installed.read_bytes() == (UNIT_DIR / name).read_bytes()
        assert installed.stat().st_mode & 0o777 == 0o644
        unit = read_unit(name)
        for value in values(unit, "Service", "ExecStart"):
            words = value.split()
            if words[1] == "-m":    # a module in the WorkingDirectory, with its bytecode compiled at install
                directory = tmp_path / one(unit, "Service", "WorkingDirectory").lstrip("/")
                assert (directory / f"{words[2]}.py").is_file(), f"{name}: {value}"
                assert list((directory / "__pycache__").glob(f"{words[2]}.*.pyc")), f"{name}: no bytecode"
            else:
                assert (tmp_path / words[1].lstrip("/")).is_file(), f"{name}: {value}"
