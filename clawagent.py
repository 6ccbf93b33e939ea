#!/usr/bin/env python3
"""clawagent: the agent side of clawbridge. Registers agents with the bridge, sends their heartbeats (once, from
cron or a systemd timer, or continuously with `run`), installs the heartbeat schedule, and works the agent's
tasks under the bridge's epoch fencing. One file, standard library only, Python 3.9+; it does not need
clawbridge.py on the same machine.

Run:
    python3 clawagent.py register --agent ID --roles a,b [--emoji E] [--bridge URL]   register (idempotent)
    python3 clawagent.py setup-heartbeats --setup           a staggered cron line for every agent here
    python3 clawagent.py heartbeat --agent ID               one beat (what cron runs, with --quiet)
    python3 clawagent.py run                                beat every instance on this machine every 60 s
    python3 clawagent.py tasks --agent ID                   the agent's tasks
    python3 clawagent.py task start TASK --agent ID         claim, start, complete, block or release a task
    python3 clawagent.py doctor --agent ID                  checklist with a fix for every failure
    python3 clawagent.py COMMAND --help                     the manual of one command

Configuration (flags > environment > .env in the working dir > the agent's saved config > defaults):
    BRIDGE_URL            bridge address (--bridge)                       http://localhost:8787
    BRIDGE_TOKEN          bearer token of the bridge (--token)            (none)
    INSTANCE_ID           this machine's instance name (--instance)       the short host name
    HEARTBEAT_INTERVAL    ms between the agent's beats (--interval, s)    900000 (15 minutes)
    MAX_CONCURRENT_TASKS  tasks the agent takes at once (--max-tasks)     3
    OPENCLAW_HOME         where agent dirs live                           ~/.openclaw

Files, per agent:
    ~/.openclaw/agents/<id>/.claw/config.json   settings saved by register (mode 0600: it holds the token)
    ~/.openclaw/agents/<id>/.claw/tasks.json    the tasks the agent holds with their epochs (fencing)
    ~/.openclaw/agents/<id>/heartbeat.log       one line per heartbeat

Exit codes: 0 ok, 1 the bridge answered an error, 2 usage or configuration, 3 bridge unreachable.
"""

__version__ = "0.1.0"

# Only what every command needs is imported here; the rest is imported where it is used, so that the
# heartbeat, started by cron on every machine every few minutes, loads as little as possible.
import argparse
import json
import os
import sys
import time

# ===== Constants =====

DEFAULT_BRIDGE_URL = "http://localhost:8787"
DEFAULT_HEARTBEAT_MS = 900_000          # what an agent declares: the cron cadence, 15 minutes
DEFAULT_MAX_TASKS = 3
DEFAULT_TIMEOUT = 10.0                  # seconds, for every request
DEFAULT_RUN_INTERVAL = 60.0             # seconds between two beats of `run`
RUN_JITTER = 0.10                       # +-10% on every wait of `run`, so machines do not beat in step
BACKOFF_START = 1.0                     # first retry of `run` after the bridge became unreachable, doubling
MIN_INTERVAL_MS = 1000                  # the bridge accepts 1 s to 7 days
MAX_INTERVAL_MS = 7 * 24 * 3600 * 1000
MAX_TASKS_LIMIT = 1000
TAILSCALE_TIMEOUT = 5.0                 # seconds for `tailscale ip -4`
CRONTAB_TIMEOUT = 10.0
CLOCK_SKEW_LIMIT = 30.0                 # seconds of difference to the bridge that doctor accepts
LOG_ROTATE_BYTES = 1024 * 1024          # heartbeat.log moves to heartbeat.log.1 past this size

DOTENV_FILE = ".env"
STATE_DIR = ".claw"
CONFIG_FILE = "config.json"
TASKS_FILE = "tasks.json"
LOG_FILE = "heartbeat.log"

CRON_BEGIN = "# BEGIN clawagent heartbeats (managed by clawagent.py setup-heartbeats; change them with it)"
CRON_END = "# END clawagent heartbeats"
CRON_STEPS = (1, 2, 3, 4, 5, 6, 10, 12, 15, 20, 30, 60)    # minute steps that divide the hour evenly
UNIT_PREFIX = "clawagent-heartbeat-"
TEMPLATE_PREFIX = "clawagent-heartbeat@"   # the shipped systemd/clawagent-heartbeat@.timer

ID_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._-")
TAILSCALE_NETWORK = "100.64.0.0/10"     # the CGNAT range Tailscale hands out addresses from
TAILSCALE_DNS = "100.100.100.100"       # Tailscale's resolver: the route to it leaves by the tailnet address

EXIT_OK, EXIT_BRIDGE, EXIT_USAGE, EXIT_UNREACHABLE = 0, 1, 2, 3

# ===== Errors =====


class AgentError(Exception):
    """Every failure a user can hit: one sentence saying what to do next, and the exit code. A reply from the
    bridge comes with its HTTP status and parsed body, so callers can react to a 409 or a 404."""

    def __init__(self, message, exit_code=EXIT_USAGE, status=None, reply=None):
        super().__init__(message)
        self.exit_code = exit_code
        self.status = status
        self.reply = reply

    def code(self):
        """The bridge's snake_case error code, when the bridge sent one."""
        error = self.reply.get("error") if isinstance(self.reply, dict) else None
        return error.get("code") if isinstance(error, dict) else None


def usage_error(message):
    return AgentError(message, EXIT_USAGE)


# ===== Config =====


def parse_dotenv(text):
    """Parse the guide's .env format: KEY=VALUE lines, # comment lines, an optional `export `, quoted values,
    and a trailing `  # comment` after an unquoted value. Returns a dict; a malformed line is an AgentError."""
    values = {}
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("export "):
            line = line[len("export "):].lstrip()
        key, sep, value = line.partition("=")
        key = key.strip()
        if not sep or not is_env_key(key):
            raise usage_error(f".env line {number}: expected KEY=VALUE, got {raw.strip()[:40]!r}; fix or remove "
                              "that line")
        value = value.strip()
        if value[:1] in ("'", '"'):
            end = value.find(value[0], 1)
            if end < 0:
                raise usage_error(f".env line {number}: {key} has an opening {value[0]} but no closing one; "
                                  "close the quote")
            value = value[1:end]
        else:
            value = strip_comment(value)
        values[key] = value
    return values


def is_env_key(key):
    return bool(key) and not key[0].isdigit() and all(c == "_" or (c.isascii() and c.isalnum()) for c in key)


def strip_comment(value):
    """Drop a trailing comment from an unquoted value: a # that follows white space."""
    for index, char in enumerate(value):
        if char == "#" and index and value[index - 1] in " \t":
            return value[:index].strip()
    return value


def is_id(value):
    return (isinstance(value, str) and 1 <= len(value) <= 64 and not value.startswith(".")
            and set(value) <= ID_CHARS)


def check_id(value, key):
    if not is_id(value):
        raise usage_error(f"{key}: must be 1-64 characters of A-Z a-z 0-9 . _ - and not start with '.', got "
                          f"{value!r}")
    return value


def split_url(url):
    """(scheme, host, port, path prefix) of an http(s)://HOST[:PORT][/PREFIX] address; ValueError otherwise."""
    scheme, sep, rest = url.partition("://")
    scheme = scheme.lower()
    if not sep or scheme not in ("http", "https") or any(c in rest for c in "?#@ "):
        raise ValueError(url)
    netloc, slash, path = rest.partition("/")
    if netloc.startswith("["):
        host, bracket, port_text = netloc[1:].partition("]")
        if not bracket or (port_text and not port_text.startswith(":")):
            raise ValueError(url)
        port_text = port_text[1:]
    else:
        host, _, port_text = netloc.partition(":")
    if not host or (port_text and not (port_text.isdigit() and 0 < int(port_text) < 65536)):
        raise ValueError(url)
    port = int(port_text) if port_text else (443 if scheme == "https" else 80)
    return scheme, host, port, ("/" + path).rstrip("/") if slash else ""


def parse_bridge_url(text, key):
    try:
        split_url(text.strip())
    except ValueError:
        raise usage_error(f"{key}: expected a bridge address like http://100.64.0.1:8787, got {text!r}") from None
    return text.strip().rstrip("/")


def parse_number(text, key, low, high, unit, whole=True):
    """A number from a flag, the environment or a file, within [low, high]; the error names the key."""
    try:
        value = float(str(text).strip())
    except ValueError:
        value = float("nan")
    if not low <= value <= high or (whole and value != int(value)):
        kind = "a whole number" if whole else "a number"
        raise usage_error(f"{key}: must be {kind} of {unit} from {plain(low)} to {plain(high)}, got {text!r}")
    return int(value) if whole else value


def plain(number):
    return str(int(number)) if number == int(number) else f"{number:g}"


class Settings:
    """Resolved settings for one agent: where the bridge is and how to talk to it, and what to declare."""

    def __init__(self, bridge, token, shared_token, instance_id, interval_ms, max_tasks, timeout):
        self.bridge = bridge
        self.token = token                  # the bearer token sent
        self.shared_token = shared_token    # the fleet's BRIDGE_TOKEN, saved by register
        self.instance_id = instance_id
        self.interval_ms = interval_ms
        self.max_tasks = max_tasks
        self.timeout = timeout


def resolve_settings(flags, environ, dotenv, saved, hostname):
    """Settings from, in order: flags (a dict of the flags given), the environment, the .env file, the agent's
    saved config, defaults. Pure. A bad value raises an AgentError (exit 2) naming where it came from.
    The bearer token: --token, else the agentToken the bridge issued this agent, else BRIDGE_TOKEN."""

    def pick(flag, key, saved_key, default):
        if flags.get(flag) is not None:
            return flags[flag], "--" + flag.replace("_", "-")
        for source, where in ((environ, "{}"), (dotenv, "{} in .env")):
            if source.get(key, "") != "":
                return source[key], where.format(key)
        if saved.get(saved_key) not in (None, ""):
            return saved[saved_key], f"{saved_key} in the agent's saved config"
        return default, key

    bridge, bridge_key = pick("bridge", "BRIDGE_URL", "bridge", DEFAULT_BRIDGE_URL)
    bridge = parse_bridge_url(str(bridge), bridge_key)
    shared_token, token_key = pick("token", "BRIDGE_TOKEN", "token", "")
    shared_token = str(shared_token).strip()
    if not all(33 <= ord(c) < 127 for c in shared_token):
        raise usage_error(f"{token_key}: the token must be printable ASCII without spaces")
    token = shared_token if flags.get("token") is not None else (saved.get("agentToken") or shared_token)
    instance, instance_key = pick("instance", "INSTANCE_ID", "instanceId", hostname.split(".")[0] or "default")
    check_id(str(instance), instance_key)
    if flags.get("interval") is not None:
        seconds = parse_number(flags["interval"], "--interval", MIN_INTERVAL_MS / 1000, MAX_INTERVAL_MS / 1000,
                               "seconds", whole=False)
        interval_ms = int(seconds * 1000)
    else:
        text, key = pick(None, "HEARTBEAT_INTERVAL", "heartbeatInterval", DEFAULT_HEARTBEAT_MS)
        interval_ms = parse_number(text, key, MIN_INTERVAL_MS, MAX_INTERVAL_MS, "milliseconds")
    text, key = pick("max_tasks", "MAX_CONCURRENT_TASKS", "maxConcurrentTasks", DEFAULT_MAX_TASKS)
    max_tasks = parse_number(text, key, 1, MAX_TASKS_LIMIT, "tasks")
    timeout = parse_number(flags.get("timeout") or DEFAULT_TIMEOUT, "--timeout", 0.1, 600, "seconds", whole=False)
    return Settings(bridge, str(token), shared_token, str(instance), interval_ms, max_tasks, timeout)


# --- files under ~/.openclaw/agents/<id>/ ---


def openclaw_home(environ):
    """~/.openclaw, or OPENCLAW_HOME. The home dir comes from $HOME, as cron and systemd set it."""
    if environ.get("OPENCLAW_HOME"):
        return os.path.abspath(environ["OPENCLAW_HOME"])
    home = environ.get("HOME") or os.path.expanduser("~")
    return os.path.join(home, ".openclaw")


def agent_dir(environ, agent_id):
    return os.path.join(openclaw_home(environ), "agents", agent_id)


def state_path(environ, agent_id, name):
    return os.path.join(agent_dir(environ, agent_id), STATE_DIR, name)


def read_json_file(path, default=None):
    """A JSON document from a file; default when the file does not exist. A broken file is an AgentError."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        return default
    except (OSError, ValueError) as exc:
        raise usage_error(f"cannot read {path} ({getattr(exc, 'strerror', None) or exc}); fix or delete it, "
                          "then register the agent again") from None


def write_private_json(path, doc):
    """Write a JSON file readable by its owner only (0600: the config holds the token), atomically: a temp file
    in the same directory, fsync, rename. A crash leaves the old file or the new one, never half of one."""
    directory = os.path.dirname(path)
    os.makedirs(directory, mode=0o700, exist_ok=True)
    temp = f"{path}.{os.getpid()}.tmp"
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(doc, f, indent=2, ensure_ascii=False)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(temp, path)
    except BaseException:
        if os.path.exists(temp):
            os.unlink(temp)
        raise


def load_agent_config(environ, agent_id):
    """The config register saved for this agent, or {} when it was never registered from this machine."""
    doc = read_json_file(state_path(environ, agent_id, CONFIG_FILE), {})
    return doc if isinstance(doc, dict) else {}


def save_agent_config(environ, agent_id, doc):
    write_private_json(state_path(environ, agent_id, CONFIG_FILE), doc)


def load_task_state(environ, agent_id):
    """What the agent keeps between runs in tasks.json: the tasks it holds, {task id: {id, epoch, title, lane}}
    (sent with every beat for fencing), and the ids of the notifications it printed, which the next beat
    acknowledges (readNotifications) so that the bridge stops sending them."""
    doc = read_json_file(state_path(environ, agent_id, TASKS_FILE), {})
    doc = doc if isinstance(doc, dict) else {}
    tasks = doc.get("tasks") if isinstance(doc.get("tasks"), list) else []
    seen = doc.get("readNotifications") if isinstance(doc.get("readNotifications"), list) else []
    return {t["id"]: t for t in tasks if isinstance(t, dict) and is_id(t.get("id"))}, [n for n in seen if is_id(n)]


def load_held_tasks(environ, agent_id):
    return load_task_state(environ, agent_id)[0]


def save_task_state(environ, agent_id, held, seen=None):
    if seen is None:
        seen = load_task_state(environ, agent_id)[1]
    write_private_json(state_path(environ, agent_id, TASKS_FILE),
                       {"agent": agent_id, "updatedAt": int(time.time() * 1000), "tasks": list(held.values()),
                        "readNotifications": seen})


def held_entry(task):
    return {"id": task["id"], "epoch": task.get("epoch"), "title": task.get("title", ""), "lane": task.get("lane")}


def local_agents(environ):
    """[(agent id, saved config)] of every agent registered from this machine, sorted by id."""
    root = os.path.join(openclaw_home(environ), "agents")
    try:
        names = sorted(os.listdir(root))
    except OSError:
        return []
    found = []
    for name in names:
        if is_id(name) and os.path.isfile(state_path(environ, name, CONFIG_FILE)):
            found.append((name, load_agent_config(environ, name)))
    return found


def load_dotenv(path):
    """The .env settings: the given file (which must exist) or ./.env when present."""
    try:
        with open(path or DOTENV_FILE, encoding="utf-8") as f:
            return parse_dotenv(f.read())
    except FileNotFoundError:
        if path:
            raise usage_error(f"the settings file {path} does not exist; fix --env-file") from None
        return {}
    except (OSError, UnicodeDecodeError) as exc:
        raise usage_error(f"cannot read the settings file {path or DOTENV_FILE} ({exc}); fix its permissions or "
                          "encoding") from None


# ===== HTTP client =====
# A small HTTP/1.1 client on a raw socket: http.client and urllib.request cost tens of milliseconds to import,
# which every cron heartbeat on every machine would pay. One request per connection (Connection: close).


def unreachable(url, reason):
    return AgentError(f"cannot reach the bridge at {url} ({reason}); check BRIDGE_URL or --bridge and that the "
                      f"bridge is running (curl {url}/health)", EXIT_UNREACHABLE)


def http_exchange(url, method, path, body=None, token="", timeout=DEFAULT_TIMEOUT):
    """One request to the bridge at url. Returns (status, headers with lower-case names, body bytes).
    Raises an AgentError (exit 3) when the bridge cannot be reached or does not speak HTTP."""
    import socket
    scheme, host, port, prefix = split_url(url)
    payload = b"" if body is None else json.dumps(body, ensure_ascii=False).encode("utf-8")
    host_header = f"[{host}]" if ":" in host else host
    if port != (443 if scheme == "https" else 80):
        host_header += f":{port}"
    lines = [f"{method} {prefix}{path} HTTP/1.1", f"Host: {host_header}", f"User-Agent: clawagent/{__version__}",
             "Accept: application/json", "Connection: close"]
    if body is not None:
        lines += ["Content-Type: application/json", f"Content-Length: {len(payload)}"]
    if token:
        lines.append(f"Authorization: Bearer {token}")
    request = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + payload
    deadline = time.monotonic() + timeout
    try:
        # an ASCII host goes as bytes: a str would load the idna codec (and unicodedata) to encode it
        sock = socket.create_connection((host.encode() if host.isascii() else host, port), timeout=timeout)
        try:
            if scheme == "https":
                import ssl
                sock = ssl.create_default_context().wrap_socket(sock, server_hostname=host)
            sock.sendall(request)
            raw = read_response(sock, deadline)
        finally:
            sock.close()
    except socket.timeout:
        raise unreachable(url, f"no answer within {timeout:g} s") from None
    except socket.gaierror:
        raise unreachable(url, f"unknown host name {host!r}") from None
    except ConnectionRefusedError:
        raise unreachable(url, "connection refused") from None
    except OSError as exc:
        raise unreachable(url, exc.strerror or str(exc) or type(exc).__name__) from None
    try:
        return parse_response(raw)
    except ValueError:
        raise unreachable(url, "the server there does not answer HTTP") from None


def read_response(sock, deadline):
    """Read until the server closes or the Content-Length is complete, within the deadline."""
    import socket
    data = b""
    need = None
    while need is None or len(data) < need:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise socket.timeout()
        sock.settimeout(remaining)
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
        end = data.find(b"\r\n\r\n")
        if need is None and end >= 0:
            length = header_value(data[:end], b"content-length")
            if length is not None and length.strip().isdigit():
                need = end + 4 + int(length)
    return data


def header_value(head, name):
    for line in head.split(b"\r\n")[1:]:
        key, _, value = line.partition(b":")
        if key.strip().lower() == name:
            return value.strip()
    return None


def parse_response(raw):
    """(status, headers, body) of a raw HTTP response; ValueError when it is not one."""
    head, sep, body = raw.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    version, _, rest = status_line.partition(" ")
    if not sep or not version.startswith("HTTP/") or not rest[:3].isdigit():
        raise ValueError("not an HTTP response")
    headers = {}
    for line in header_lines:
        key, _, value = line.partition(":")
        headers[key.strip().lower()] = value.strip()
    if headers.get("transfer-encoding", "").lower() == "chunked":
        body = dechunk(body)
    elif headers.get("content-length", "").isdigit():
        body = body[:int(headers["content-length"])]
    return int(rest[:3]), headers, body


def dechunk(body):
    out = b""
    while body:
        size_line, _, body = body.partition(b"\r\n")
        size = int(size_line.split(b";")[0].strip() or b"0", 16)
        if size == 0:
            break
        out, body = out + body[:size], body[size + 2:]
    return out


class Client:
    """The bridge's API as this agent sees it: JSON in, JSON out, errors turned into AgentErrors that say what
    to do (wrong URL, bad token, agent not registered)."""

    def __init__(self, settings):
        self.url = settings.bridge
        self.token = settings.token
        self.timeout = settings.timeout

    def exchange(self, method, path, body=None):
        """(status, headers, parsed JSON) for any answer; raises only when the bridge is not there."""
        status, headers, data = http_exchange(self.url, method, path, body, self.token, self.timeout)
        try:
            parsed = json.loads(data.decode("utf-8")) if data else None
        except ValueError:
            raise AgentError(f"the server at {self.url} answered HTTP {status} but not in JSON, so it is not a "
                             "clawbridge; check BRIDGE_URL or --bridge", EXIT_UNREACHABLE) from None
        return status, headers, parsed

    def call(self, method, path, body=None):
        """The parsed reply of a 2xx answer; an AgentError (exit 1) for an error answer."""
        status, _, parsed = self.exchange(method, path, body)
        if 200 <= status < 300:
            return parsed
        raise self.error(status, parsed)

    def error(self, status, parsed):
        error = parsed.get("error") if isinstance(parsed, dict) else None
        error = error if isinstance(error, dict) else {}
        message = str(error.get("message") or f"HTTP {status}").rstrip(".")
        if status == 401:
            hint = "the token was refused: set BRIDGE_TOKEN or pass --token with the bridge's token"
        elif status == 403:
            hint = "this token may not do that: use a token with the right scope (BRIDGE_TOKEN or --token)"
        elif error.get("code") == "agent_not_found":
            hint = f"if it was registered, check that {self.url} is the right bridge (BRIDGE_URL or --bridge)"
        elif status in (429, 503):
            hint = "retry in a minute; if it persists, check the bridge log"
        else:
            hint = ""
        text = f"the bridge answered {status}: {message}" + (f"; {hint}" if hint else "")
        return AgentError(text, EXIT_BRIDGE, status=status, reply=parsed)


# ===== Commands =====

# --- this machine: host name, Tailscale address, crontab, systemd units ---


def host_name():
    import socket
    return socket.gethostname()


def in_tailscale_range(text):
    import ipaddress
    try:
        address = ipaddress.ip_address(text.strip())
    except ValueError:
        return False
    return address.version == 4 and address in ipaddress.ip_network(TAILSCALE_NETWORK)


def is_loopback(host):
    import ipaddress
    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def detect_tailscale_ip():
    """This machine's Tailscale IPv4: `tailscale ip -4` when the command exists, else an address of this machine
    in 100.64.0.0/10, else None."""
    import shutil
    import subprocess
    command = shutil.which("tailscale")
    if command:
        try:
            out = subprocess.run([command, "ip", "-4"], capture_output=True, text=True,
                                 timeout=TAILSCALE_TIMEOUT).stdout
        except (OSError, subprocess.SubprocessError):
            out = ""
        for word in out.split():
            if in_tailscale_range(word):
                return word
    return tailnet_interface_address()


def tailnet_interface_address():
    """An address in 100.64.0.0/10 on a network interface. On Linux each interface is asked (SIOCGIFADDR);
    elsewhere the address the route to Tailscale's resolver leaves by (a UDP connect sends no packet)."""
    import socket
    candidates = []
    try:
        import fcntl
        import struct
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            for _, name in socket.if_nameindex():
                try:
                    packed = fcntl.ioctl(sock.fileno(), 0x8915, struct.pack("256s", name[:15].encode()))
                    candidates.append(socket.inet_ntoa(packed[20:24]))
                except OSError:
                    continue
    except (ImportError, OSError, AttributeError):
        pass
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.connect((TAILSCALE_DNS, 53))
            candidates.append(sock.getsockname()[0])
    except OSError:
        pass
    return next((c for c in candidates if in_tailscale_range(c)), None)


def crontab_command():
    import shutil
    command = shutil.which("crontab")
    if not command:
        raise usage_error("the crontab command is not installed; install cron (apt-get install cron, or "
                          "yum install cronie), or use --systemd for a systemd timer instead")
    return command


def read_crontab():
    """The user's crontab text ('' when there is none)."""
    import subprocess
    try:
        done = subprocess.run([crontab_command(), "-l"], capture_output=True, text=True, timeout=CRONTAB_TIMEOUT)
    except (OSError, subprocess.SubprocessError) as exc:
        raise usage_error(f"crontab -l failed ({exc}); check that you may use cron, then retry") from None
    if done.returncode != 0:
        if "no crontab" in done.stderr.lower():
            return ""
        raise usage_error(f"crontab -l failed ({done.stderr.strip() or done.returncode}); check that you may use "
                          "cron (/etc/cron.allow), then retry")
    return done.stdout


def write_crontab(text):
    import subprocess
    try:
        done = subprocess.run([crontab_command(), "-"], input=text, capture_output=True, text=True,
                              timeout=CRONTAB_TIMEOUT)
    except (OSError, subprocess.SubprocessError) as exc:
        raise usage_error(f"crontab - failed ({exc}); check that you may use cron, then retry") from None
    if done.returncode != 0:
        raise usage_error(f"crontab refused the new table ({done.stderr.strip() or done.returncode}); check the "
                          "--schedule you gave, then retry")


def split_crontab(text):
    """(lines before the clawagent block, {agent id: line} inside it, lines after it)."""
    lines = text.splitlines()
    begins = [i for i, line in enumerate(lines) if line.startswith(CRON_BEGIN.split(" (")[0])]
    ends = [i for i, line in enumerate(lines) if line.startswith(CRON_END)]
    if not begins and not ends:
        return lines, {}, []
    if len(begins) != 1 or len(ends) != 1 or ends[0] < begins[0]:
        raise usage_error("the clawagent block in your crontab is damaged (its BEGIN/END lines); fix it with "
                          "crontab -e, then retry")
    entries = {}
    for line in lines[begins[0] + 1:ends[0]]:
        agent_id = cron_line_agent(line)
        if agent_id:
            entries[agent_id] = line
    return lines[:begins[0]], entries, lines[ends[0] + 1:]


def cron_line_agent(line):
    words = line.split()
    if "--agent" in words and words.index("--agent") + 1 < len(words):
        return words[words.index("--agent") + 1]
    return None


def join_crontab(before, entries, after):
    block = [CRON_BEGIN, *entries.values(), CRON_END] if entries else []
    lines = before + block + after
    return "\n".join(lines) + "\n" if lines else ""


def heartbeat_step(interval_ms):
    """Minutes between two scheduled beats: the longest even divisor of the hour that is not longer than the
    interval the agent declares, so the bridge never waits longer than it was told."""
    minutes = (interval_ms or DEFAULT_HEARTBEAT_MS) / 60000
    return max([s for s in CRON_STEPS if s <= minutes] or [1])


def stagger_minute(agent_id, step):
    """A stable minute offset per agent, so a fleet does not beat all at once."""
    import zlib
    return zlib.crc32(agent_id.encode()) % step


# How each scheduler writes: every minute, once an hour at minute m, every s minutes from minute m.
CRON_FORMATS = ("* * * * *", "{m} * * * *", "{m}-59/{s} * * * *")
SYSTEMD_FORMATS = ("*-*-* *:*:00", "*-*-* *:{m:02d}:00", "*-*-* *:{m:02d}/{s}:00")


def beat_schedule(agent_id, interval_ms, formats):
    """The agent's staggered schedule in one scheduler's notation (CRON_FORMATS or SYSTEMD_FORMATS)."""
    step = heartbeat_step(interval_ms)
    every_minute, hourly, stepped = formats
    chosen = every_minute if step == 1 else hourly if step == 60 else stepped
    return chosen.format(m=stagger_minute(agent_id, step), s=step)



def launcher():
    """(directory, command words) that start this program for a scheduled beat. As a module run from its own
    directory when its file name allows it, Python reuses the bytecode compiled into __pycache__ instead of
    compiling the whole file at every beat (the largest part of a beat's cost); otherwise as a script."""
    import shlex
    directory, name = os.path.split(os.path.abspath(__file__))
    module = name[:-3] if name.endswith(".py") else ""
    if module.isidentifier():
        return directory, f"{shlex.quote(sys.executable)} -m {module}"
    return None, f"{shlex.quote(sys.executable)} {shlex.quote(os.path.join(directory, name))}"


def heartbeat_command(environ, agent_id, for_cron):
    """The command that sends one quiet beat, with absolute paths and what it needs from the environment."""
    import shlex
    directory, program = launcher()
    prefix = f"cd {shlex.quote(directory)} && " if directory else ""
    if environ.get("OPENCLAW_HOME"):
        prefix += f"OPENCLAW_HOME={shlex.quote(openclaw_home(environ))} "
    command = f"{prefix}{program} heartbeat --agent {agent_id} --quiet"
    return command.replace("%", "\\%") if for_cron else command


def systemd_dir(environ):
    base = environ.get("XDG_CONFIG_HOME") or os.path.join(environ.get("HOME") or os.path.expanduser("~"), ".config")
    return os.path.join(base, "systemd", "user")


def systemd_units(environ, agent_id, calendar):
    """{file name: text} of the .service and .timer pair that beats agent_id on the calendar."""
    import shlex
    name = UNIT_PREFIX + agent_id
    env_line = ""
    if environ.get("OPENCLAW_HOME"):
        env_line = f"Environment=OPENCLAW_HOME={shlex.quote(openclaw_home(environ))}\n"
    directory, program = launcher()
    if directory:
        env_line += f"WorkingDirectory={directory}\n"
    service = (f"[Unit]\nDescription=clawagent heartbeat of agent {agent_id}\n"
               "Wants=network-online.target\nAfter=network-online.target\n\n"
               f"[Service]\nType=oneshot\n{env_line}"
               f"ExecStart={program} heartbeat --agent {agent_id} --quiet\n")
    timer = (f"[Unit]\nDescription=clawagent heartbeat of agent {agent_id} ({calendar})\n\n"
             f"[Timer]\nOnCalendar={calendar}\nAccuracySec=10s\nPersistent=true\nUnit={name}.service\n\n"
             "[Install]\nWantedBy=timers.target\n")
    return {f"{name}.service": service, f"{name}.timer": timer}


def running_schedulers():
    """Process ids of `clawagent.py run` on this machine (Linux /proc; empty elsewhere)."""
    found = []
    try:
        pids = [p for p in os.listdir("/proc") if p.isdigit() and int(p) != os.getpid()]
    except OSError:
        return found
    for pid in pids:
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                args = f.read().decode(errors="replace").split("\0")
        except OSError:
            continue
        scripts = [i for i, arg in enumerate(args) if arg.endswith("clawagent.py")]
        if scripts and "run" in args[scripts[0] + 1:]:
            found.append(int(pid))
    return found


# --- shared by the commands ---


def given_flags(args, *names):
    return {name: getattr(args, name, None) for name in names}


def agent_settings(args, environ, dotenv, agent_id):
    """(settings, saved config) for one agent, from its flags, the environment, .env and its saved config."""
    saved = load_agent_config(environ, agent_id)
    flags = given_flags(args, "bridge", "token", "instance", "interval", "max_tasks", "timeout")
    return resolve_settings(flags, environ, dotenv, saved, saved.get("hostname") or host_name()), saved


def print_json(doc):
    print(json.dumps(doc, indent=2, ensure_ascii=False))


def register_hint(agent_id, url):
    return f"python3 clawagent.py register --agent {agent_id} --roles ROLES --bridge {url}"


def describe_task(task):
    return (f"{task['id']}  {task.get('lane', '?')}  {task.get('priority', '')}  epoch {task.get('epoch')}  "
            f"{task.get('title', '')}")


def when(ms):
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ms / 1000)) if ms else "never"


# --- register ---


def cmd_register(args, environ, dotenv):
    agent_id = check_id(args.agent, "--agent")
    hostname = host_name()
    settings, saved = agent_settings(args, environ, dotenv, agent_id)
    roles = args.roles if args.roles is not None else saved.get("roles")
    if isinstance(roles, str):
        roles = [r.strip() for r in roles.split(",") if r.strip()]
    if args.tailscale_ip is not None:
        if args.tailscale_ip and not in_tailscale_range(args.tailscale_ip):
            raise usage_error(f"--tailscale-ip: {args.tailscale_ip!r} is not an IPv4 address in "
                              f"{TAILSCALE_NETWORK}; give the output of `tailscale ip -4`")
        tailscale_ip = args.tailscale_ip or None
    else:
        tailscale_ip = detect_tailscale_ip()
    workspace = args.workspace if args.workspace is None else os.path.abspath(os.path.expanduser(args.workspace))
    profile = {
        "name": args.name if args.name is not None else saved.get("name"),
        "emoji": args.emoji if args.emoji is not None else saved.get("emoji"),
        "roles": roles,
        "model": args.model if args.model is not None else saved.get("model"),
        "workspace": workspace if workspace is not None else saved.get("workspace"),
    }
    body = {"id": agent_id, **{k: v for k, v in profile.items() if v is not None},
            "instanceId": settings.instance_id, "hostname": hostname, "heartbeatInterval":
            settings.interval_ms, "maxConcurrentTasks": settings.max_tasks}
    if tailscale_ip:
        body["tailscaleIP"] = tailscale_ip
    client = Client(settings)
    status, _, reply = client.exchange("POST", "/api/agents/register", body)
    if status not in (200, 201):
        raise client.error(status, reply)
    config = {"id": agent_id, "bridge": settings.bridge, "token": settings.shared_token,
              "instanceId": settings.instance_id, "hostname": hostname, "tailscaleIP": tailscale_ip,
              "heartbeatInterval": settings.interval_ms, "maxConcurrentTasks": settings.max_tasks,
              **profile, "registeredAt": int(time.time() * 1000)}
    agent_token = reply.get("agentToken") if isinstance(reply, dict) else None
    if agent_token or saved.get("agentToken"):
        config["agentToken"] = agent_token or saved["agentToken"]
    save_agent_config(environ, agent_id, config)
    if args.json:
        shown = dict(reply) if isinstance(reply, dict) else reply
        if isinstance(shown, dict) and "agentToken" in shown:
            shown["agentToken"] = "(saved in the agent's config)"
        print_json(shown)
        return EXIT_OK
    agent = reply if isinstance(reply, dict) else {}
    what = "Registered" if status == 201 else "Already registered; updated"
    label = " ".join(x for x in (agent.get("emoji") or profile["emoji"], agent_id) if x)
    print(f"✅ {what} {label} on {settings.bridge}")
    print(f"   instance   {settings.instance_id} (host {hostname}, "
          f"Tailscale {tailscale_ip or 'not found'})")
    print(f"   roles      {', '.join(agent.get('roles') or roles or []) or '(any)'}")
    print(f"   heartbeat  every {settings.interval_ms / 60000:g} min, up to {settings.max_tasks} tasks at once")
    if agent.get("activeTasks"):
        print(f"   tasks      {', '.join(agent['activeTasks'])}")
    print(f"   config     {state_path(environ, agent_id, CONFIG_FILE)}"
          + (" (with the agent token the bridge issued)" if agent_token else ""))
    print(f"Next: python3 clawagent.py setup-heartbeats --agent {agent_id}")
    return EXIT_OK


# --- heartbeat ---


def cmd_heartbeat(args, environ, dotenv):
    agent_id = check_id(args.agent, "--agent")
    started = time.monotonic()
    try:
        return send_heartbeat(args, environ, dotenv, agent_id, started)
    except AgentError as exc:
        if os.path.isdir(agent_dir(environ, agent_id)):     # no stray dir for a mistyped id
            append_heartbeat_log(environ, agent_id, f"error exit={exc.exit_code} {exc}", started)
        raise


def send_heartbeat(args, environ, dotenv, agent_id, started):
    """One beat. Tells the bridge which tasks (and epochs) the agent holds; keeps what the bridge answers."""
    settings, saved = agent_settings(args, environ, dotenv, agent_id)
    held, seen = load_task_state(environ, agent_id)
    body = {"heartbeatInterval": settings.interval_ms, "hostname": saved.get("hostname") or host_name(),
            "instanceId": settings.instance_id,
            "tasks": [{"id": t["id"], "epoch": t["epoch"]} for t in held.values()]}
    if seen:
        body["readNotifications"] = seen
    if saved.get("tailscaleIP"):
        body["tailscaleIP"] = saved["tailscaleIP"]
    try:
        reply = Client(settings).call("POST", f"/api/agents/{agent_id}/heartbeat", body)
    except AgentError as exc:
        if exc.code() == "agent_not_found":
            exc.args = (f"agent {agent_id} is not registered on the bridge at {settings.bridge}; run: "
                        f"{register_hint(agent_id, settings.bridge)}",)
        raise
    stop = [t for t in reply.get("stop", []) if isinstance(t, str)]
    tasks = [t for t in reply.get("tasks", []) if isinstance(t, dict) and is_id(t.get("id"))]
    new = [t for t in tasks if t["id"] not in held or held[t["id"]].get("epoch") != t.get("epoch")]
    keep = {t["id"]: held_entry(t) for t in tasks if t["id"] not in stop}
    notes = [n for n in reversed(reply.get("notifications", [])) if isinstance(n, dict)]   # oldest first
    # The bridge sends a notification until a beat acknowledges it: the ones printed now are acknowledged
    # by the next beat. A quiet beat prints none, so it acknowledges none and nothing is lost.
    now_seen = [] if args.quiet else [n["id"] for n in notes if is_id(n.get("id"))]
    if keep != held or now_seen != seen:
        save_task_state(environ, agent_id, keep, now_seen)
    append_heartbeat_log(environ, agent_id, f"ok tasks={len(keep)} new={len(new)} stop={len(stop)} "
                                            f"notifications={len(notes)}", started)
    if args.quiet:
        return EXIT_OK
    if args.json:
        print_json(reply)
        return EXIT_OK
    print(f"💓 {agent_id}: beat ok ({len(keep)} tasks, {len(new)} new, {len(stop)} to stop, "
          f"{len(notes)} unread notifications; bridge time {when(reply.get('serverTime'))})")
    new_ids = {t["id"] for t in new}
    for task in tasks:
        if task["id"] not in stop:
            print(f"  {'NEW ' if task['id'] in new_ids else 'task'}  {describe_task(task)}")
    for task_id in stop:
        print(f"  STOP  {task_id}: it is no longer yours (moved, cancelled or deleted); stop working on it")
    for note in notes:
        print(f"  note  [{note.get('type', 'message')}] {note.get('message', '')}")
    return EXIT_OK


def append_heartbeat_log(environ, agent_id, text, started):
    """One line per beat in ~/.openclaw/agents/<id>/heartbeat.log; the file is rotated once past 1 MiB."""
    path = os.path.join(agent_dir(environ, agent_id), LOG_FILE)
    try:
        os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
        if os.path.exists(path) and os.path.getsize(path) > LOG_ROTATE_BYTES:
            os.replace(path, path + ".1")
        with open(path, "a", encoding="utf-8") as f:
            f.write(f"{time.strftime('%Y-%m-%dT%H:%M:%S%z')} {text} "
                    f"ms={int((time.monotonic() - started) * 1000)}\n")
    except OSError as exc:
        print(f"clawagent: cannot write {path} ({exc.strerror}); check the permissions of that directory",
              file=sys.stderr)


# --- run ---


def cmd_run(args, environ, dotenv):
    import logging
    import signal
    import threading
    interval = parse_number(args.interval, "--interval", 1, 86400, "seconds", whole=False)
    if not instance_groups(args, environ, dotenv):
        raise usage_error("no agents are registered on this machine; run clawagent.py register --agent ID "
                          "--roles ROLES first, or give --instance (or INSTANCE_ID) to beat an instance whose "
                          "agents were registered elsewhere")
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(message)s")
    log = logging.getLogger("clawagent")
    if args.once:
        return beat_round(args, environ, dotenv, interval, log, {})
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    # The beats run in a daemon thread so that a signal ends the program at once, even mid-request.
    worker = threading.Thread(target=run_scheduler, args=(args, environ, dotenv, interval, log, stop),
                              name="beats", daemon=True)
    worker.start()
    while worker.is_alive() and not stop.wait(0.5):
        pass
    log.info("stopping")
    return EXIT_OK


def run_scheduler(args, environ, dotenv, interval, log, stop):
    """Beat every instance, then wait interval +-10%; while the bridge is unreachable retry after 1, 2, 4 ...
    seconds (never longer than the interval) and say when it answers again."""
    import random
    log.info("beating the instances of this machine every %g s (Ctrl-C or SIGTERM stops)", interval)
    failures, down_since, seen = 0, None, {}
    while not stop.is_set():
        try:
            code = beat_round(args, environ, dotenv, interval, log, seen)
        except AgentError as exc:      # e.g. a config file broken while running: say so, keep going
            log.error("%s", exc)
            code = exc.exit_code
        except Exception:              # the scheduler outlives its own bugs; the next round may work
            log.exception("a round of beats failed; trying again at the next one")
            code = EXIT_BRIDGE
        if code == EXIT_UNREACHABLE:
            failures += 1
            down_since = down_since or time.monotonic()
            delay = min(BACKOFF_START * 2 ** (failures - 1), interval)
            log.warning("bridge unreachable (attempt %d); retrying in %.0f s", failures, delay)
        else:
            if failures:
                log.info("bridge reachable again after %d failed attempts (%.0f s)", failures,
                         time.monotonic() - down_since)
            failures, down_since = 0, None
            delay = interval * random.uniform(1 - RUN_JITTER, 1 + RUN_JITTER)
        stop.wait(delay)


def instance_groups(args, environ, dotenv):
    """{(bridge, token, instance id): (settings, hostname, tailscale IP, [agent ids])} for this machine's agents
    (read again every round, so new registrations are picked up), plus --instance/INSTANCE_ID when given."""
    groups = {}
    flags = given_flags(args, "bridge", "token", "instance", "timeout")
    hostname = None
    for agent_id, saved in local_agents(environ):
        hostname = saved.get("hostname") or hostname or host_name()
        settings = resolve_settings(flags, environ, dotenv, saved, hostname)
        key = (settings.bridge, settings.token, settings.instance_id)
        group = groups.setdefault(key, (settings, saved.get("hostname") or hostname, saved.get("tailscaleIP"), []))
        group[3].append(agent_id)
    if not groups and (args.instance or environ.get("INSTANCE_ID") or dotenv.get("INSTANCE_ID")):
        hostname = host_name()
        settings = resolve_settings(flags, environ, dotenv, {}, hostname)
        groups[(settings.bridge, settings.token, settings.instance_id)] = (settings, hostname, None, [])
    return groups


def beat_round(args, environ, dotenv, interval, log, seen):
    """One POST /api/instances/{id}/heartbeat per instance. Returns an exit code: the worst of the round."""
    worst = EXIT_OK
    for (bridge, _, instance_id), (settings, hostname, tailscale_ip, agents) in \
            instance_groups(args, environ, dotenv).items():
        body = {"heartbeatInterval": int(interval * 1000), "hostname": hostname}
        if tailscale_ip:
            body["tailscaleIP"] = tailscale_ip
        try:
            reply = Client(settings).call("POST", f"/api/instances/{instance_id}/heartbeat", body)
        except AgentError as exc:
            if exc.code() == "instance_not_found":
                exc.args = (f"the bridge at {bridge} knows no agent on instance {instance_id}; register them "
                            f"again: {register_hint(agents[0] if agents else 'ID', bridge)}",)
            (log.warning if exc.exit_code == EXIT_UNREACHABLE else log.error)("instance %s: %s", instance_id, exc)
            worst = max(worst, exc.exit_code)
            seen.pop((bridge, instance_id), None)
            continue
        beaten = reply.get("agents", []) if isinstance(reply, dict) else []
        level = log.debug if seen.get((bridge, instance_id)) == beaten else log.info
        level("instance %s on %s: beat ok for %s", instance_id, bridge, ", ".join(beaten) or "no agents")
        seen[(bridge, instance_id)] = beaten
    return worst


# --- setup-heartbeats ---


def cmd_setup_heartbeats(args, environ, dotenv):
    modes = [m for m in ("setup", "list", "remove") if getattr(args, m)]
    if len(modes) + bool(args.agent and not args.remove) != 1 or (args.agent and args.remove):
        raise usage_error("give exactly one of --setup, --agent ID, --list or --remove ID; see "
                          "clawagent.py setup-heartbeats --help")
    if args.list:
        return list_heartbeats(environ)
    if args.remove:
        return remove_heartbeat(environ, check_id(args.remove, "--remove"))
    if args.setup:
        agents = local_agents(environ)
        if not agents:
            raise usage_error("no agents are registered on this machine; run clawagent.py register --agent ID "
                              "--roles ROLES first")
    else:
        agent_id = check_id(args.agent, "--agent")
        saved = load_agent_config(environ, agent_id)
        if not saved:
            raise usage_error(f"agent {agent_id} is not registered on this machine; run "
                              f"python3 clawagent.py register --agent {agent_id} --roles ROLES first")
        agents = [(agent_id, saved)]
    if args.schedule and len(agents) != 1:
        raise usage_error("--schedule applies to one agent: use it with --agent ID")
    if args.systemd:
        return install_systemd(args, environ, agents)
    return install_cron(args, environ, agents)


def install_cron(args, environ, agents):
    before, entries, after = split_crontab(read_crontab())
    changes = []
    for agent_id, saved in agents:
        old = entries.get(agent_id)
        if args.schedule:
            schedule = args.schedule.strip()
            if len(schedule.split()) != 5 and not schedule.startswith("@"):
                raise usage_error(f"--schedule: expected five cron fields like '*/15 * * * *', got {schedule!r}")
        elif old and args.setup:
            schedule = " ".join(old.split()[:5])   # --setup keeps a schedule chosen before with --schedule
        else:
            schedule = beat_schedule(agent_id, saved.get("heartbeatInterval"), CRON_FORMATS)
        entries[agent_id] = f"{schedule} {heartbeat_command(environ, agent_id, for_cron=True)}"
        changes.append(f"{'updated' if old else 'added'}: {entries[agent_id]}")
    write_crontab(join_crontab(before, entries, after))
    print("\n".join(changes))
    print(f"Your crontab now beats {len(entries)} agent(s); see it with: crontab -l  "
          f"(each beat appends to ~/.openclaw/agents/<id>/{LOG_FILE})")
    return EXIT_OK


def install_systemd(args, environ, agents):
    directory = systemd_dir(environ)
    timers = []
    for agent_id, saved in agents:
        calendar = args.schedule or beat_schedule(agent_id, saved.get("heartbeatInterval"), SYSTEMD_FORMATS)
        units = systemd_units(environ, agent_id, calendar)
        for name, text in units.items():
            if args.install:
                os.makedirs(directory, exist_ok=True)
                with open(os.path.join(directory, name), "w", encoding="utf-8") as f:
                    f.write(text)
                print(f"wrote {os.path.join(directory, name)}")
            else:
                print(f"# ~/.config/systemd/user/{name}\n{text}")
        timers.append(f"{UNIT_PREFIX}{agent_id}.timer")
    if args.install:
        print(f"Next: systemctl --user daemon-reload && systemctl --user enable --now {' '.join(timers)}  "
              "(and once: loginctl enable-linger $USER, so they run while you are logged out)")
    else:
        print("# Write these with --install, or save them under ~/.config/systemd/user/ yourself.")
    return EXIT_OK


def installed_timers(environ):
    """{agent id: timer path} of the heartbeat timers written under ~/.config/systemd/user/."""
    directory = systemd_dir(environ)
    try:
        names = os.listdir(directory)
    except OSError:
        return {}
    return {n[len(UNIT_PREFIX):-len(".timer")]: os.path.join(directory, n) for n in sorted(names)
            if n.startswith(UNIT_PREFIX) and n.endswith(".timer")}


def enabled_template_timers(environ):
    """{agent id: link} of the shipped clawagent-heartbeat@<id>.timer enabled system-wide or for this user."""
    found = {}
    for directory in ("/etc/systemd/system/timers.target.wants",
                      os.path.join(systemd_dir(environ), "timers.target.wants")):
        try:
            names = os.listdir(directory)
        except OSError:
            continue
        for name in names:
            if name.startswith(TEMPLATE_PREFIX) and name.endswith(".timer"):
                found[name[len(TEMPLATE_PREFIX):-len(".timer")]] = os.path.join(directory, name)
    return found


def scheduled_timers(environ):
    """Every heartbeat timer that runs an agent: those setup-heartbeats wrote and the enabled templates."""
    return {**enabled_template_timers(environ), **installed_timers(environ)}


def list_heartbeats(environ):
    import shutil
    entries = split_crontab(read_crontab())[1] if shutil.which("crontab") else {}
    timers = scheduled_timers(environ)
    for agent_id, line in entries.items():
        print(f"{agent_id}  cron  {line}")
    for agent_id, path in timers.items():
        print(f"{agent_id}  systemd  {path}")
    if not entries and not timers:
        print("No heartbeats installed; install them with: python3 clawagent.py setup-heartbeats --setup")
    return EXIT_OK


def remove_heartbeat(environ, agent_id):
    import shutil
    removed = False
    if shutil.which("crontab"):
        before, entries, after = split_crontab(read_crontab())
        if entries.pop(agent_id, None):
            write_crontab(join_crontab(before, entries, after))
            print(f"removed the cron line of {agent_id}")
            removed = True
    timer = installed_timers(environ).get(agent_id)
    if timer:
        for path in (timer, timer[:-len(".timer")] + ".service"):
            if os.path.exists(path):
                os.unlink(path)
        print(f"removed the systemd units of {agent_id}; now run: systemctl --user disable --now "
              f"{UNIT_PREFIX}{agent_id}.timer; systemctl --user daemon-reload")
        removed = True
    if not removed:
        print(f"No heartbeat was installed for {agent_id}; nothing to remove.")
    return EXIT_OK


# --- tasks and task verbs ---


def cmd_tasks(args, environ, dotenv):
    agent_id = check_id(args.agent, "--agent")
    settings, _ = agent_settings(args, environ, dotenv, agent_id)
    try:
        reply = Client(settings).call("GET", f"/api/agents/{agent_id}/tasks")
    except AgentError as exc:
        raise not_registered(exc, agent_id, settings) from None
    if args.json:
        print_json(reply)
        return EXIT_OK
    agent = reply.get("agent", {})
    tasks = reply.get("tasks", [])
    print(f"{agent_id}: {len(tasks)} of at most {agent.get('maxConcurrentTasks', '?')} tasks "
          f"({agent.get('status', '?')}, last heartbeat {when(agent.get('lastHeartbeat'))})")
    for task in tasks:
        print(f"  {describe_task(task)}")
    return EXIT_OK


def not_registered(exc, agent_id, settings):
    """A 404 for the agent becomes the one thing to do: register it."""
    if exc.code() == "agent_not_found":
        exc.args = (f"agent {agent_id} is not registered on the bridge at {settings.bridge}; run: "
                    f"{register_hint(agent_id, settings.bridge)}",)
    return exc


def cmd_task(args, environ, dotenv):
    agent_id = check_id(args.agent, "--agent")
    task_id = check_id(args.task_id, "TASK_ID")
    settings, _ = agent_settings(args, environ, dotenv, agent_id)
    client = Client(settings)
    held = load_held_tasks(environ, agent_id)
    epoch = held[task_id].get("epoch") if task_id in held else None
    if epoch is None:       # not held here (e.g. a queued task to claim): ask the bridge for its epoch
        epoch = client.call("GET", f"/api/tasks/{task_id}").get("epoch")
    body = {"agentId": agent_id, "epoch": epoch}
    if args.reason:
        body["reason"] = args.reason
    try:
        task = client.call("POST", f"/api/tasks/{task_id}/{args.verb}", body)
    except AgentError as exc:
        if exc.status == 409 and isinstance(exc.reply, dict) and "currentAssignee" in exc.reply:
            raise moved_away(exc, environ, agent_id, task_id, held) from None
        if exc.code() == "task_not_found" and held.pop(task_id, None):
            save_task_state(environ, agent_id, held)
        raise not_registered(exc, agent_id, settings) from None
    if task.get("assignedTo") == agent_id and task.get("lane") not in ("done", "cancelled", "queued"):
        held[task_id] = held_entry(task)
    else:
        held.pop(task_id, None)
    save_task_state(environ, agent_id, held)
    if args.json:
        print_json(task)
    else:
        print(f"{args.verb} ok: {describe_task(task)}")
    return EXIT_OK


def moved_away(exc, environ, agent_id, task_id, held):
    """A 409 from a verb: the task belongs to someone else now, or to us under a newer epoch. Either way the
    copy held here is stale: drop it, so the next heartbeat starts from what the bridge says."""
    owner, epoch = exc.reply.get("currentAssignee"), exc.reply.get("currentEpoch")
    if task_id in held:
        held.pop(task_id)
        save_task_state(environ, agent_id, held)
    if owner and owner != agent_id:
        text = f"task {task_id} was moved to agent {owner} (epoch {epoch}); stop working on it"
    elif not owner:
        text = f"task {task_id} was put back in the queue (epoch {epoch}); stop working on it"
    elif exc.code() == "stale_epoch":
        text = (f"task {task_id} was given to you again under epoch {epoch}; stop the old work and run "
                f"clawagent.py heartbeat --agent {agent_id} to pick it up")
    else:
        return exc      # e.g. invalid_transition: the bridge's own message says what is wrong
    return AgentError(text, EXIT_BRIDGE, status=exc.status, reply=exc.reply)


# --- doctor ---


def cmd_doctor(args, environ, dotenv):
    agent_id = check_id(args.agent, "--agent")
    checks = []     # (ok, what, fix)

    def check(ok, what, fix=""):
        checks.append((bool(ok), what, fix))
        return ok

    config_path = state_path(environ, agent_id, CONFIG_FILE)
    try:
        saved = load_agent_config(environ, agent_id)
        problem = f"register from this machine: {register_hint(agent_id, 'URL')}"
    except AgentError as exc:
        saved, problem = {}, str(exc)
    if check(saved, f"config found: {config_path}", problem):
        mode = os.stat(config_path).st_mode & 0o777
        check(mode & 0o077 == 0, f"config readable by its owner only (mode {mode:04o})",
              f"it holds the token: chmod 600 {config_path}")
    flags = given_flags(args, "bridge", "token", "timeout")
    settings = resolve_settings(flags, environ, dotenv, saved, saved.get("hostname") or host_name())
    client = Client(settings)
    reachable = False
    try:
        sent = time.time()
        status, headers, health = client.exchange("GET", "/health")
        received = time.time()
        health = health if isinstance(health, dict) else {}
        reachable = check(status == 200, f"bridge reachable: {settings.bridge} (HTTP {status}, "
                          f"{health.get('status', '?')}, version {health.get('version', '?')})",
                          "the bridge answers but is degraded: check its log and free disk space")
    except AgentError as exc:
        check(False, f"bridge reachable: {settings.bridge}",
              f"{exc}; the address comes from --bridge, BRIDGE_URL, .env or the saved config")
    if reachable:
        status, _, agent = client.exchange("GET", f"/api/agents/{agent_id}")
        check(status != 401, "token accepted", "set BRIDGE_TOKEN (or --token) to the bridge's BRIDGE_TOKEN, then "
              "register again so the saved config has it")
        if status != 401:
            agent = agent if isinstance(agent, dict) else {}
            check(status == 200, f"agent registered: {agent_id}" + (
                f" (instance {agent.get('instanceId')}, {agent.get('status')}, last heartbeat "
                f"{when(agent.get('lastHeartbeat'))})" if status == 200 else f" (HTTP {status})"),
                f"run: {register_hint(agent_id, settings.bridge)}")
        skew = clock_skew(health, headers, sent, received)
        if skew is None:
            check(False, "clock skew: the bridge did not say its time", "use a bridge of version 0.1 or later")
        else:
            check(abs(skew) <= CLOCK_SKEW_LIMIT, f"clock skew: {skew:+.1f} s against the bridge",
                  "this clock is off: enable time sync (timedatectl set-ntp true, or install chrony)")
    else:
        check(False, "token accepted, agent registered, clock skew: not checked", "make the bridge reachable first")
    address = detect_tailscale_ip()
    local = is_loopback(split_url(settings.bridge)[1])
    check(address or local, f"Tailscale present: {address or 'no tailscale command and no 100.64.0.0/10 address'}"
          + (" (not needed: the bridge is on this machine)" if local and not address else ""),
          "install Tailscale (https://tailscale.com/download), run `sudo tailscale up`, then register again so "
          "the address is recorded")
    check(*schedule_check(environ, agent_id))
    if args.json:
        print_json([{"ok": ok, "check": what, "fix": fix} for ok, what, fix in checks])
    else:
        for ok, what, fix in checks:
            print(f"{'ok  ' if ok else 'FAIL'}  {what}")
            if not ok:
                print(f"      fix: {fix}")
        failed = sum(1 for ok, _, _ in checks if not ok)
        print("All checks passed." if not failed else f"{failed} check(s) failed; apply the fixes above, then run "
              f"clawagent.py doctor --agent {agent_id} again.")
    return EXIT_OK if all(ok for ok, _, _ in checks) else EXIT_BRIDGE


def clock_skew(health, headers, sent, received):
    """Seconds the bridge's clock is ahead of this one: from serverTime in /health (given with the token),
    else from the Date header (to the second)."""
    middle = (sent + received) / 2
    if isinstance(health.get("serverTime"), (int, float)):
        return health["serverTime"] / 1000 - middle
    if headers.get("date"):
        import email.utils
        try:
            return email.utils.parsedate_to_datetime(headers["date"]).timestamp() - middle
        except (TypeError, ValueError):
            return None
    return None


def schedule_check(environ, agent_id):
    """(ok, what, fix) for 'this agent's heartbeat is scheduled': a cron line, a systemd timer or `run`."""
    import shutil
    fix = (f"run: python3 clawagent.py setup-heartbeats --agent {agent_id} (or --systemd --install), or keep "
           "clawagent.py run going")
    if shutil.which("crontab"):
        try:
            line = split_crontab(read_crontab())[1].get(agent_id)
        except AgentError as exc:
            return False, f"heartbeat scheduled: cannot read the crontab ({exc})", fix
        if line:
            return True, f"heartbeat scheduled: cron line {' '.join(line.split()[:5])}", fix
    timer = scheduled_timers(environ).get(agent_id)
    if timer:
        return True, f"heartbeat scheduled: systemd timer {timer}", fix
    pids = running_schedulers()
    if pids:
        return True, f"heartbeat scheduled: clawagent.py run is running (pid {pids[0]})", fix
    return False, "heartbeat scheduled: no cron line, systemd timer or clawagent.py run for this agent", fix


# ===== Entry =====

COMMON_EPILOG = ("Settings: flags > environment > ./.env > the agent's saved config > defaults.\n"
                 "Exit codes: 0 ok, 1 the bridge answered an error, 2 usage or configuration, 3 bridge unreachable.")

MANUALS = {    # command: (what it does, examples); wrapped here so that --help keeps the examples as written
    "register": (
        "Register an agent with the bridge, or update it: registering again is safe and keeps its tasks.\n"
        "Records this machine's host name and Tailscale IPv4 (`tailscale ip -4`, else an address in\n"
        "100.64.0.0/10) and saves the agent's settings, token included, to\n"
        "~/.openclaw/agents/<id>/.claw/config.json (mode 0600), so later commands need only --agent. The\n"
        "instance is --instance, else INSTANCE_ID, else the short host name.",
        "  python3 clawagent.py register --agent macbook-dev-1 --roles backend-dev,api --emoji 🔧 \\\n"
        "      --bridge http://localhost:8787\n"
        "  python3 clawagent.py register --agent macbook-qa --roles qa,testing --emoji 🧪\n"
        "  BRIDGE_URL=http://100.64.0.1:8787 python3 clawagent.py register --agent server-dev-1 \\\n"
        "      --roles backend-dev,devops --instance server --max-tasks 5 --interval 300"),
    "heartbeat": (
        "Send one heartbeat for an agent: what cron runs. Tells the bridge the tasks the agent holds with\n"
        "their epochs (~/.openclaw/agents/<id>/.claw/tasks.json), keeps the tasks the bridge answers, and\n"
        "prints new tasks, unread notifications and the tasks to stop working on (moved to another\n"
        "agent). Printed notifications are acknowledged by the next beat; --quiet prints and acknowledges\n"
        "none. Appends one line to ~/.openclaw/agents/<id>/heartbeat.log. Starts no other program: it\n"
        "uses the Tailscale address saved by register.",
        "  python3 clawagent.py heartbeat --agent dev-1\n"
        "  python3 clawagent.py heartbeat --agent dev-1 --quiet      # silent unless it fails (cron)\n"
        "  tail -f ~/.openclaw/agents/dev-1/heartbeat.log"),
    "run": (
        "The heartbeat scheduler: beats every instance that has agents registered on this machine (one\n"
        "request per instance) every --interval seconds (+-10% jitter) and declares that interval, so the\n"
        "bridge notices a dead machine within its OFFLINE_AFTER. While the bridge is unreachable it\n"
        "retries after 1, 2, 4 ... seconds and logs when it is back. SIGTERM or Ctrl-C stops it at once\n"
        "(exit 0). Use either this or setup-heartbeats for an agent, not both: --once declares its\n"
        "--interval too, so cron runs heartbeat, not run --once. Logs go to stderr.",
        "  python3 clawagent.py run\n"
        "  BRIDGE_URL=http://100.64.0.1:8787 INSTANCE_ID=server python3 clawagent.py run\n"
        "  python3 clawagent.py run --once             # one round, then exit"),
    "setup-heartbeats": (
        "Install the agents' heartbeats in your crontab, inside a '# BEGIN clawagent' ... '# END\n"
        "clawagent' block; other crontab lines are left alone. Each agent beats at its HEARTBEAT_INTERVAL\n"
        "(15 minutes by default) at a minute offset derived from its id, so a fleet does not beat all at\n"
        "once. With --systemd it prints a .service/.timer pair per agent instead (--install writes them\n"
        "to ~/.config/systemd/user/).",
        "  python3 clawagent.py setup-heartbeats --setup                 # every agent on this machine\n"
        "  python3 clawagent.py setup-heartbeats --agent server-dev\n"
        "  python3 clawagent.py setup-heartbeats --agent server-dev --schedule '*/5 * * * *'\n"
        "  python3 clawagent.py setup-heartbeats --list\n"
        "  python3 clawagent.py setup-heartbeats --remove server-dev\n"
        "  python3 clawagent.py setup-heartbeats --setup --systemd --install"),
    "tasks": (
        "List the tasks assigned to an agent, with their lane, priority and epoch.",
        "  python3 clawagent.py tasks --agent dev-1\n"
        "  python3 clawagent.py tasks --agent dev-1 --json | jq '.tasks[].id'"),
    "task": (
        "Act on a task as the agent: claim (a queued or assigned task), start, complete, block (with\n"
        "--reason) or release (back to the queue). Sends the epoch the agent holds; when the task was\n"
        "moved to another agent meanwhile, says so, forgets the task and exits 1: stop working on it.",
        "  python3 clawagent.py task claim task-1707900000000 --agent dev-1\n"
        "  python3 clawagent.py task start task-1707900000000 --agent dev-1\n"
        "  python3 clawagent.py task block task-1707900000000 --agent dev-1 --reason 'waiting for the API key'\n"
        "  python3 clawagent.py task complete task-1707900000000 --agent dev-1"),
    "doctor": (
        "Check an agent's setup and print one ok/FAIL line per check, with the fix of every failure:\n"
        "saved config, bridge reachable, token accepted, agent registered, clock skew, Tailscale,\n"
        "heartbeat scheduled. Exit 0 when all pass, 1 otherwise.",
        "  python3 clawagent.py doctor --agent dev-1"),
}


def add_bridge_options(parser):
    parser.add_argument("--bridge", metavar="URL", help="bridge address (BRIDGE_URL; default http://localhost:8787)")
    parser.add_argument("--token", help="bridge token (BRIDGE_TOKEN, which keeps it out of ps, is better)")
    parser.add_argument("--timeout", metavar="SECONDS", help="timeout of every request (default 10)")
    parser.add_argument("--env-file", metavar="FILE", help="KEY=VALUE settings file (default ./.env when present)")


def build_parser(only=None):
    """The command line: one subcommand per task of an agent machine, each with its manual in --help. With
    only (a command name), that subcommand alone: argparse builds every parser it is given, and a cron beat
    should not pay for the other six."""
    parser = argparse.ArgumentParser(
        prog="clawagent.py", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="The agent side of clawbridge: register agents, send their heartbeats, work their tasks.",
        epilog="`clawagent.py COMMAND --help` is the manual of each command, with examples.\n" + COMMON_EPILOG)
    parser.add_argument("--version", action="version", version=f"clawagent {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    def command(name, summary):
        description, examples = MANUALS[name]
        sub = commands.add_parser(name, help=summary, description=description,
                                  epilog=f"Examples:\n{examples}\n\n{COMMON_EPILOG}",
                                  formatter_class=argparse.RawDescriptionHelpFormatter)
        return sub

    def wanted(name):
        return only is None or name == only

    agent_help = "the agent's id (1-64 of A-Z a-z 0-9 . _ -)"
    if wanted("register"):
        sub = command("register", "register an agent (idempotent) and save its settings")
        sub.add_argument("--agent", required=True, help=agent_help)
        sub.add_argument("--roles", help="comma-separated roles, e.g. backend-dev,api")
        sub.add_argument("--emoji", help="an emoji shown with the agent")
        sub.add_argument("--name", help="display name (default: the id)")
        sub.add_argument("--model", help="the model the agent runs")
        sub.add_argument("--workspace", metavar="DIR", help="the agent's working directory")
        sub.add_argument("--instance", help="instance (machine) name (INSTANCE_ID; default the short host name)")
        sub.add_argument("--max-tasks", metavar="N", help="tasks at once (MAX_CONCURRENT_TASKS; default 3)")
        sub.add_argument("--interval", metavar="SECONDS",
                         help="heartbeat cadence it declares (HEARTBEAT_INTERVAL in ms; default 900 s)")
        sub.add_argument("--tailscale-ip", metavar="IP", help="Tailscale address to record instead of detecting it")
        sub.add_argument("--json", action="store_true", help="print the agent as the bridge returned it")
        add_bridge_options(sub)

    if wanted("heartbeat"):
        sub = command("heartbeat", "send one heartbeat (for cron)")
        sub.add_argument("--agent", required=True, help=agent_help)
        sub.add_argument("--instance", help="instance name (INSTANCE_ID; default the saved one)")
        sub.add_argument("--interval", metavar="SECONDS", help="cadence to declare (HEARTBEAT_INTERVAL in ms)")
        sub.add_argument("--quiet", action="store_true", help="print nothing when the beat succeeds")
        sub.add_argument("--json", action="store_true", help="print the bridge's reply")
        add_bridge_options(sub)

    if wanted("run"):
        sub = command("run", "beat every instance of this machine continuously")
        sub.add_argument("--interval", metavar="SECONDS", default=str(DEFAULT_RUN_INTERVAL),
                         help="seconds between beats (default 60)")
        sub.add_argument("--instance", help="beat this instance (INSTANCE_ID) instead of the saved ones")
        sub.add_argument("--once", action="store_true", help="one round, then exit")
        sub.add_argument("--verbose", action="store_true", help="log every beat")
        add_bridge_options(sub)

    if wanted("setup-heartbeats"):
        sub = command("setup-heartbeats", "install staggered heartbeat cron lines (or systemd timers)")
        sub.add_argument("--setup", action="store_true", help="a heartbeat for every agent registered on this machine")
        sub.add_argument("--agent", help="a heartbeat for this agent")
        sub.add_argument("--schedule", metavar="CRON",
                         help="cron schedule for --agent (with --systemd: an OnCalendar expression)")
        sub.add_argument("--list", action="store_true", help="show the installed heartbeats")
        sub.add_argument("--remove", metavar="ID", help="remove the heartbeat of this agent")
        sub.add_argument("--systemd", action="store_true", help="a systemd .service/.timer pair instead of cron")
        sub.add_argument("--install", action="store_true", help="with --systemd: write the units to "
                                                                "~/.config/systemd/user/")

    if wanted("tasks"):
        sub = command("tasks", "list an agent's tasks")
        sub.add_argument("--agent", required=True, help=agent_help)
        sub.add_argument("--json", action="store_true", help="print the bridge's reply")
        add_bridge_options(sub)

    if wanted("task"):
        sub = command("task", "claim, start, complete, block or release a task")
        sub.add_argument("verb", choices=("claim", "start", "complete", "block", "release"))
        sub.add_argument("task_id", metavar="TASK_ID")
        sub.add_argument("--agent", required=True, help=agent_help)
        sub.add_argument("--reason", metavar="TEXT", help="why (recorded in the task's history)")
        sub.add_argument("--json", action="store_true", help="print the task")
        add_bridge_options(sub)

    if wanted("doctor"):
        sub = command("doctor", "check an agent's setup, with a fix for each failure")
        sub.add_argument("--agent", required=True, help=agent_help)
        sub.add_argument("--json", action="store_true", help="print the checks as JSON")
        add_bridge_options(sub)
    return parser


COMMANDS = {
    "register": cmd_register,
    "heartbeat": cmd_heartbeat,
    "run": cmd_run,
    "setup-heartbeats": cmd_setup_heartbeats,
    "tasks": cmd_tasks,
    "task": cmd_task,
    "doctor": cmd_doctor,
}


def main(argv=None):
    """Run one command; returns its exit code. Expected failures are one line on stderr, never a traceback."""
    for stream in (sys.stdout, sys.stderr):
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="replace")    # an emoji must not crash a C-locale cron job
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser(only=argv[0] if argv and argv[0] in COMMANDS else None)
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    environ = dict(os.environ)
    try:
        dotenv = load_dotenv(getattr(args, "env_file", None)) if args.command != "setup-heartbeats" else {}
        return COMMANDS[args.command](args, environ, dotenv)
    except AgentError as exc:
        print(f"clawagent: {exc}", file=sys.stderr)
        return exc.exit_code
    except BrokenPipeError:     # the reader went away (| head): stop quietly, as Unix tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 128 + 13
    except OSError as exc:      # a local file or directory: permissions, a full disk
        where = f" ({exc.filename})" if exc.filename else ""
        print(f"clawagent: {exc.strerror or exc}{where}; check the permissions and free space there, then retry",
              file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
