#!/usr/bin/env python3
"""clawbridge: the central bridge that coordinates a fleet of OpenClaw agents.

Agents on several machines ("instances") register, send heartbeats and get tasks; the bridge knows which
instances are alive, balances work across them, moves the work of a dead instance to a live one and tells
agents what changed. One file, standard library only, Python 3.9+.

Run:
    python3 clawbridge.py                  serve on 127.0.0.1:8787, data in ./.clawhub/
    python3 clawbridge.py backup DEST      write a consistent copy of the data dir (bridge may be running)
    python3 clawbridge.py restore SRC      replace the data dir with a backup (bridge must be stopped)
    python3 clawbridge.py check            verify a data dir offline: parse, count, report problems
    python3 clawbridge.py --healthcheck    probe the running bridge's /health (exit 0 healthy, 1 not)
    python3 clawbridge.py --print-config   show the resolved configuration (secrets redacted)
    python3 clawbridge.py --help           every flag

Configuration (flags > environment > .env file > defaults):
    BRIDGE_HOST      address to listen on                      127.0.0.1
    BRIDGE_PORT      port (PORT is an alias)                   8787
    BRIDGE_TOKEN     bearer token required on /api/*           (none)
    BRIDGE_DATA_DIR  data directory                            $STATE_DIRECTORY, else ./.clawhub
    INSTANCE_ID      this bridge's own instance name           the short host name
    OFFLINE_AFTER    seconds of silence before offline         300
    LOG_LEVEL        debug, info, warning or error             info
    LOG_FORMAT       text, or json for one JSON object a line  text
    DEBUG            bridge:* (or *) is the same as debug      (none)
    BRIDGE_READ_TOKEN            a token that may only read    (none)
    BRIDGE_REQUIRE_AGENT_TOKENS  1: agents must use their own  0
    BRIDGE_WEBHOOK_URL  where alerts are POSTed as JSON        (none)
    ARCHIVE_AFTER_DAYS  finished tasks leave memory after      30

Exit codes: 0 ok, 1 runtime failure (data unreadable, data dir in use, port taken), 2 usage or configuration.
"""

__version__ = "0.1.0"

import os
import sys

# Run as a script (`python3 clawbridge.py`), Python keeps the parse tree of the whole file, about 10 MB, until
# the script returns: for a bridge, its whole life. So a script run at once replaces itself (exec: the same
# process, pid, arguments and interpreter options) with an interpreter that runs this file's code as a module
# named clawbridge, which frees that memory. The code, compiled already, goes across in an anonymous file in
# memory (memfd), so it is not compiled a second time and nothing is written to disk. Imported, run with -m,
# read from stdin, on Python 3.9 (no sys.orig_argv) or without memfd (not Linux), it runs as it is.
RUN_AS_MODULE = ("import marshal, os, sys, types; fd = int(sys.argv.pop(1)); sys.argv.pop(0); "
                 "code = marshal.loads(os.pread(fd, os.fstat(fd).st_size, 0)); os.close(fd); "
                 "here = os.path.dirname(os.path.abspath(sys.argv[0])); "
                 "sys.path[:1] = [here] if sys.path[:1] == [''] else sys.path[:1]; "
                 "module = sys.modules['clawbridge'] = types.ModuleType('clawbridge'); module.__file__ = sys.argv[0]; "
                 "exec(code, vars(module)); sys.exit(module.main())")
if __name__ == "__main__" and __spec__ is None and getattr(sys, "orig_argv", None) and hasattr(os, "memfd_create"):
    _script_at = len(sys.orig_argv) - len(sys.argv)     # the interpreter's own options come before it
    if _script_at >= 1 and sys.orig_argv[_script_at:] == sys.argv and os.path.isfile(sys.argv[0]) and \
            sys.executable:
        _code_fd = None
        try:
            import marshal
            _code_fd = os.memfd_create("clawbridge-code", 0)
            with open(_code_fd, "wb", closefd=False) as _code:
                _code.write(marshal.dumps(sys._getframe().f_code))     # this module's code, as compiled
            os.set_inheritable(_code_fd, True)
            os.execv(sys.executable, [sys.executable, *sys.orig_argv[1:_script_at], "-c", RUN_AS_MODULE,
                                      str(_code_fd), *sys.argv])
        except (OSError, ValueError):
            if _code_fd is not None:
                os.close(_code_fd)      # the interpreter cannot be started again: run here, parse tree and all

import argparse
import binascii
import bisect
import collections
import email.utils
import errno
import faulthandler
import fcntl
import functools
import gc
import hashlib
import hmac
import itertools
import http
import http.client
import io
import ipaddress
import json
import logging
import math
import re
import secrets
import signal
import socket
import struct
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import NamedTuple, Optional

# ===== Constants =====

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8787
DEFAULT_DATA_DIR = ".clawhub"
DEFAULT_OFFLINE_AFTER = 300.0       # seconds
DEFAULT_LOG_LEVEL = "info"
DOTENV_FILE = ".env"

MAX_BODY_BYTES = 1024 * 1024        # larger bodies are refused with 413
MAX_URL_BYTES = 8192                # longer request targets are refused with 414
MAX_HEADER_BYTES = 32 * 1024        # more header bytes are refused with 431
MAX_HEADER_LINES = 100              # and so are more header lines
MAX_CONNECTIONS = 256               # connections served at once: one thread each
REQUEST_DEADLINE = 10.0             # seconds an idle or still-arriving request may hold a connection
DEADLINE_CHECK = 0.25               # how often connections are checked against it
EVICT_AFTER = 1.0                   # when full, a connection idle this long makes room for a new one
ADMIT_WAIT = 1.0                    # how long a new connection waits for room before it gets 503 busy
AUTH_FAILURES = 10                  # failed authentications from one address within AUTH_WINDOW ...
AUTH_WINDOW = 60.0                  # ... lock that address out for AUTH_LOCKOUT seconds (429)
AUTH_LOCKOUT = 60.0
AUTH_TRACKED = 4096                 # addresses remembered by the limiter
AUDIT_LIMIT = 10000                 # audit entries kept
MAX_JSON_DEPTH = 64
SOCKET_TIMEOUT = 30.0               # a client silent this long mid-request or idle on keep-alive is dropped
REQUEST_QUEUE_SIZE = 1024           # listen backlog; the stdlib default of 5 stalls bursts of new connections
SHUTDOWN_GRACE = 10.0               # seconds SIGTERM waits for in-flight requests
SERVE_POLL = 0.1                    # seconds between the HTTP loop's looks for a stop: how soon SIGTERM stops it

ID_PATTERN = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,63}")
RESERVED_IDS = {"agents": {"register"}, "instances": {"capacities"}}   # they would shadow a route
MAX_NAME = 200                      # names, titles, host names
MAX_TEXT = 64 * 1024                # descriptions and messages
MAX_ROLES = 32
MAX_TAGS = 32
HISTORY_LIMIT = 50                  # a task keeps its latest history entries
HEARTBEAT_NOTIFICATIONS = 50        # unread notifications returned with a heartbeat
REVOKED_NAMED = 20                  # task ids named by the one task-revoked notice of an agent gone offline
DEFAULT_PAGE = 1000                 # GET /api/tasks without ?limit=
MAX_PAGE = 10000

DEFAULT_MAX_TASKS = 3
MAX_TASKS_LIMIT = 1000
MIN_INTERVAL_MS = 100                # declared heartbeat intervals, ms
MAX_INTERVAL_MS = 7 * 24 * 3600 * 1000

DEFAULT_ARCHIVE_AFTER_DAYS = 30.0   # done and cancelled tasks older than this move to archive files
READ_NOTIFICATION_DAYS = 7.0        # read notifications older than this are dropped
ARCHIVE_PERIOD = 3600.0             # seconds between two archive passes
WEBHOOK_QUEUE = 1000                # alerts waiting to be sent; the oldest are dropped past this
WEBHOOK_TRIES = 6                   # attempts per alert, with backoff doubling from 1 s
WEBHOOK_TIMEOUT = 5.0
SNAPSHOT_EVERY_CHANGES = 10000      # journal records between two snapshots, at the least ...
SNAPSHOT_JOURNAL_SHARE = 0.25       # ... or this share of the entities held, if more: a snapshot costs in
                                    # proportion to the state, so its cost per change stays flat
SNAPSHOT_EVERY_SECONDS = 60.0       # a dirty state is snapshotted at least this often
FLUSHER_PERIOD = 1.0
LOG_HELD = 256                      # request lines held back at most before they are written (LogHandler)
RESTORE_EPOCH_GAP = 1000            # epochs jump this far when a bridge starts on a backup copy
RESTORE_ID_GAP = 10 ** 9            # and the id counter this far past the clock

WATCHDOG_PERIOD = 0.5               # seconds between two liveness sweeps
SWEEP_GAP = 5.0                     # a longer pause between sweeps (suspend, stall) re-baselines liveness
DISRUPTION_SHARE = 0.55             # one sweep expiring this share of online instances (and at least
DISRUPTION_MIN = 3                  # this many) is taken for a fault on the bridge's side: nothing moves
ANTI_FLAP_BEATS = 2                 # on-time beats a returning instance sends before it gets new work
BEAT_SPACING = 1.0                  # beats closer together than this count once towards the hold
FLAP_WINDOW = 3600.0                # offline transitions this recent lower the health score
FLAP_PENALTY, FLAP_PENALTY_MAX = 10, 30

PRIORITIES = ("P0", "P1", "P2", "P3")
DEFAULT_PRIORITY = "P2"
LANES = ("queued", "assigned", "in_progress", "blocked", "review", "done", "cancelled")
LANE_ALIASES = {"proposed": "queued", "development": "in_progress"}
ACTIVE_LANES = frozenset(("assigned", "in_progress", "blocked", "review"))
FINISHED_LANES = frozenset(("done", "cancelled"))

log = logging.getLogger("clawbridge")

# ===== Errors =====


class BridgeError(Exception):
    """Every error a client or an operator can cause: an HTTP status, a snake_case code and one sentence."""

    def __init__(self, status, code, message, field=None, extra=None, headers=None):
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.field = field
        self.extra = extra or {}
        self.headers = headers or {}

    def body(self):
        error = {"code": self.code, "message": self.message}
        if self.field:
            error["field"] = self.field
        return {"error": error, **self.extra}


def bad_request(message, field=None, code="invalid_field"):
    return BridgeError(400, code, message, field)


def not_found(kind, ident):
    hint = f"; register it first with: python3 clawagent.py register --agent {ident}" if kind == "agent" else ""
    return BridgeError(404, f"{kind}_not_found", f"No {kind} with id '{ident}'{hint}.")


def forbidden(message):
    return BridgeError(403, "forbidden", message)


def conflict(code, message, **extra):
    return BridgeError(409, code, message, extra=extra)


def storage_unavailable():
    return BridgeError(503, "storage_unavailable",
                       "The bridge cannot write to its data directory right now; the change was not saved. "
                       "Check the bridge log and free disk space, then retry.")


class ConfigError(Exception):
    """A bad configuration value: the message names the key and what it accepts."""


class StorageError(Exception):
    """The data directory cannot be read, written or trusted; the message names the file."""


# ===== Config =====


class Config(NamedTuple):
    """Resolved bridge settings. Built by load_config() from flags, environment, .env and defaults."""
    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT
    token: str = ""
    read_token: str = ""
    require_agent_tokens: bool = False
    data_dir: str = DEFAULT_DATA_DIR
    instance_id: str = ""
    offline_after: float = DEFAULT_OFFLINE_AFTER
    log_level: str = DEFAULT_LOG_LEVEL
    log_format: str = "text"
    webhook_url: str = ""
    archive_after_days: float = DEFAULT_ARCHIVE_AFTER_DAYS
    insecure: bool = False

    def redacted(self):
        """KEY=VALUE lines in the .env format, with secrets hidden."""
        return "\n".join([
            f"BRIDGE_HOST={self.host}",
            f"BRIDGE_PORT={self.port}",
            f"BRIDGE_TOKEN={'(set, hidden)' if self.token else '(not set)'}",
            f"BRIDGE_READ_TOKEN={'(set, hidden)' if self.read_token else '(not set)'}",
            f"BRIDGE_REQUIRE_AGENT_TOKENS={'1' if self.require_agent_tokens else '0'}",
            f"BRIDGE_DATA_DIR={self.data_dir}",
            f"INSTANCE_ID={self.instance_id}",
            f"OFFLINE_AFTER={self.offline_after:g}",
            f"LOG_LEVEL={self.log_level}",
            f"LOG_FORMAT={self.log_format}",
            f"BRIDGE_WEBHOOK_URL={'(set, hidden)' if self.webhook_url else '(not set)'}",
            f"ARCHIVE_AFTER_DAYS={self.archive_after_days:g}",
            f"INSECURE={'1' if self.insecure else '0'}",
        ])


def parse_dotenv(text):
    """Parse the guide's .env format: KEY=VALUE lines, # comment lines, an optional `export `, quoted values,
    and a trailing `  # comment` after an unquoted value. Returns a dict; a malformed line is a ConfigError."""
    values = {}
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("export "):
            line = line[len("export "):].lstrip()
        key, sep, value = line.partition("=")
        key = key.strip()
        if not sep or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key):
            raise ConfigError(f".env line {number}: expected KEY=VALUE, got {raw.strip()[:40]!r}")
        value = value.strip()
        if value[:1] in ("'", '"'):
            quote = value[0]
            end = value.find(quote, 1)
            if end < 0:
                raise ConfigError(f".env line {number}: {key} has an opening {quote} but no closing one")
            value = value[1:end]
        else:
            value = re.split(r"\s+#", value, maxsplit=1)[0].strip()
        values[key] = value
    return values


def add_common_options(parser):
    parser.add_argument("--data-dir", metavar="DIR", default=argparse.SUPPRESS,
                        help="data directory (BRIDGE_DATA_DIR; default $STATE_DIRECTORY, else ./.clawhub)")
    parser.add_argument("--env-file", metavar="FILE", default=argparse.SUPPRESS,
                        help="KEY=VALUE settings file (default: ./.env when present)")
    parser.add_argument("--log-level", choices=("debug", "info", "warning", "error"), default=argparse.SUPPRESS,
                        help="log verbosity (LOG_LEVEL; default info)")


def add_serve_options(parser):
    parser.add_argument("--host", default=argparse.SUPPRESS,
                        help="address to listen on (BRIDGE_HOST; default 127.0.0.1)")
    parser.add_argument("--port", default=argparse.SUPPRESS,
                        help="port to listen on, 0 for any free port (BRIDGE_PORT or PORT; default 8787)")
    parser.add_argument("--offline-after", metavar="SECONDS", default=argparse.SUPPRESS,
                        help="silence after which an instance is offline (OFFLINE_AFTER; default 300)")
    parser.add_argument("--instance-id", default=argparse.SUPPRESS,
                        help="this bridge's own instance name (INSTANCE_ID; default the host name)")
    parser.add_argument("--insecure", action="store_true", default=argparse.SUPPRESS,
                        help="allow listening on a non-loopback address without BRIDGE_TOKEN")
    parser.add_argument("--print-config", action="store_true", default=argparse.SUPPRESS,
                        help="print the resolved configuration (token hidden) and exit")
    parser.add_argument("--healthcheck", action="store_true", default=argparse.SUPPRESS,
                        help="ask the bridge at BRIDGE_HOST:BRIDGE_PORT for /health and exit 0 when it is healthy, "
                             "1 otherwise (for Docker HEALTHCHECK; no curl needed)")


def build_parser():
    """The command line: serve by default, or one of the maintenance commands."""
    parser = argparse.ArgumentParser(
        prog="clawbridge.py",
        description="The central bridge for a fleet of OpenClaw agents: registration, heartbeats, tasks, "
                    "instance liveness, failover and load balancing over a small JSON HTTP API. "
                    "With no command it serves.",
        epilog="Every setting also has an environment variable (table in README.md): flags win over the "
               "environment, which wins over the .env file. The token is read only from BRIDGE_TOKEN, never "
               "from a flag, so it does not show in ps. Exit codes: 0 ok, 1 runtime failure (data "
               "unreadable, data dir in use, port taken), 2 usage or configuration.")
    add_common_options(parser)
    add_serve_options(parser)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    serve = commands.add_parser("serve", help="run the bridge (the default)",
                                description="Run the bridge until SIGTERM or Ctrl-C.")
    add_common_options(serve)
    add_serve_options(serve)
    backup = commands.add_parser(
        "backup", help="write a consistent copy of the data dir to DEST",
        description="Write a consistent copy of the data directory to DEST (created if missing; it must hold "
                    "no bridge data). Safe while the bridge runs: the copy has every change acknowledged "
                    "before the backup began. Start a bridge on the copy with BRIDGE_DATA_DIR=DEST.")
    add_common_options(backup)
    backup.add_argument("dest", metavar="DEST", help="directory to write the copy into")
    restore = commands.add_parser(
        "restore", help="replace the data dir with a backup (the bridge must be stopped)",
        description="Replace the state in the data directory with the backup in SRC (a directory written by "
                    "'backup', or any data dir). Refuses while a bridge holds the data directory. The files "
                    "it replaces are kept in a before-restore-<time> folder inside the data directory. The "
                    "next start raises every task's epoch past anything handed out since the backup.")
    add_common_options(restore)
    restore.add_argument("src", metavar="SRC", help="directory holding the backup")
    check = commands.add_parser(
        "check", help="verify a data dir offline: parse it, count it, report problems",
        description="Read the data directory as a start would, without changing it, and report what it "
                    "holds and any problem found (a corrupt snapshot, a damaged journal record). Exit 0 when "
                    "it is sound, 1 when there is a problem. Safe while the bridge runs.")
    add_common_options(check)
    return parser


def load_config(argv, environ, dotenv_text):
    """Resolve settings from argv, the environment and the .env text. Returns (command, Config, args).
    Pure: no file or network access. A bad value raises ConfigError naming the key."""
    args = build_parser().parse_args(argv)
    dotenv = parse_dotenv(dotenv_text or "")
    flags = vars(args)

    def pick(flag, *keys, default=None):
        if flag and flag in flags:
            return str(flags[flag]), "--" + flag.replace("_", "-")
        for source in (environ, dotenv):
            for key in keys:
                if source.get(key, "") != "":
                    return source[key], key
        return default, keys[0] if keys else flag

    host, _ = pick("host", "BRIDGE_HOST", default=DEFAULT_HOST)
    port_text, port_key = pick("port", "BRIDGE_PORT", "PORT", default=str(DEFAULT_PORT))
    if not port_text.isdigit() or int(port_text) > 65535:
        raise ConfigError(f"{port_key}: must be a whole number from 0 to 65535, got {port_text!r}")
    offline_text, offline_key = pick("offline_after", "OFFLINE_AFTER", default=str(DEFAULT_OFFLINE_AFTER))
    try:
        offline_after = float(offline_text)
    except ValueError:
        offline_after = -1.0
    if not 1 <= offline_after <= 30 * 86400:
        raise ConfigError(f"{offline_key}: must be a number of seconds from 1 to 2592000, got {offline_text!r}")
    level, level_key = pick("log_level", "LOG_LEVEL", default=DEFAULT_LOG_LEVEL)
    level = level.lower()
    if level == "warn":
        level = "warning"
    if level not in ("debug", "info", "warning", "error"):
        raise ConfigError(f"{level_key}: must be debug, info, warning or error, got {level!r}")
    log_format, format_key = pick(None, "LOG_FORMAT", default="text")
    if log_format not in ("text", "json"):
        raise ConfigError(f"{format_key}: must be text or json, got {log_format!r}")
    webhook_url, webhook_key = pick(None, "BRIDGE_WEBHOOK_URL", default="")
    if webhook_url and not re.match(r"https?://[^/\s]+", webhook_url):
        raise ConfigError(f"{webhook_key}: must be an http:// or https:// URL")
    archive_text, archive_key = pick(None, "ARCHIVE_AFTER_DAYS", default=str(DEFAULT_ARCHIVE_AFTER_DAYS))
    try:
        archive_after_days = float(archive_text)
    except ValueError:
        archive_after_days = -1.0
    if not 0 < archive_after_days <= 36500:
        raise ConfigError(f"{archive_key}: must be a number of days above 0, got {archive_text!r}")
    debug, _ = pick(None, "DEBUG", default="")
    if "bridge" in debug or debug.strip() == "*":
        level = "debug"
    default_dir = environ.get("STATE_DIRECTORY", "").split(":")[0] or DEFAULT_DATA_DIR
    data_dir, _ = pick("data_dir", "BRIDGE_DATA_DIR", default=default_dir)
    token, _ = pick(None, "BRIDGE_TOKEN", default="")
    read_token, _ = pick(None, "BRIDGE_READ_TOKEN", default="")
    strict_text, strict_key = pick(None, "BRIDGE_REQUIRE_AGENT_TOKENS", default="0")
    if strict_text.lower() not in ("1", "0", "true", "false", "yes", "no", "on", "off"):
        raise ConfigError(f"{strict_key}: must be 1 or 0, got {strict_text!r}")
    require_agent_tokens = strict_text.lower() in ("1", "true", "yes", "on")
    if (read_token or require_agent_tokens) and not token:
        raise ConfigError("BRIDGE_READ_TOKEN and BRIDGE_REQUIRE_AGENT_TOKENS need BRIDGE_TOKEN: set it as well")
    if read_token and read_token == token:
        raise ConfigError("BRIDGE_READ_TOKEN: must differ from BRIDGE_TOKEN")
    instance_id, instance_key = pick("instance_id", "INSTANCE_ID", default=socket.gethostname().split(".")[0])
    if not ID_PATTERN.fullmatch(instance_id or ""):
        raise ConfigError(f"{instance_key}: must be 1-64 characters of A-Z a-z 0-9 . _ - "
                          f"(not starting with .), got {instance_id!r}")
    config = Config(host=host, port=int(port_text), token=token, read_token=read_token,
                    require_agent_tokens=require_agent_tokens, data_dir=data_dir, instance_id=instance_id,
                    offline_after=offline_after, log_level=level, log_format=log_format, webhook_url=webhook_url,
                    archive_after_days=archive_after_days, insecure=bool(flags.get("insecure")))
    return args.command or "serve", config, args


def is_loopback(host):
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


# ===== Storage =====
# The data dir holds snapshots (snapshot-<seq>.json, one JSON document each: a head line naming the fields
# of each section, then one entity a line as a row of values, then the CRC-32 of all that; format 1 wrote
# objects, format 2 had no checksum and a task's history as a list, not as its text) and journal
# segments (journal-<first seq>.jsonl, one JSON record per line: {"seq", "ops": [op, ...], "meta"}, each op
# ["put", section, entity] for a new entity, ["set", section, {key, changed fields}] for a changed one (a
# task's history as "historyAdd", the entries added to it), or ["del", section, key]). Each acknowledged
# change is one journal record, fsynced before the reply is sent; a snapshot of the whole state is written
# off the request path every SNAPSHOT_EVERY_CHANGES records or SNAPSHOT_EVERY_SECONDS, and the journal then
# starts a new segment.
# The latest two snapshots and every segment after the older one are kept, so a corrupt snapshot falls
# back to its predecessor plus the journal.

SNAPSHOT_RE = re.compile(r"snapshot-(\d{12})\.json")
SEGMENT_RE = re.compile(r"journal-(\d{12})\.jsonl")
LOCK_FILE = "lock"
SECTIONS = ("agents", "instances", "tasks", "notifications", "audit")
SECTION_KEYS = {"agents": "id", "instances": "instanceId", "tasks": "id", "notifications": "id", "audit": "id"}
FORMAT_NAME = "clawbridge-state"
FORMAT_VERSION = 3                  # 2: entities as rows of values, named once in the head's "fields";
#                                     3: a task's history as its text, and the checksum line at the end
CHECKSUM_KEY = "checksum"           # the last line of a snapshot: '"checksum":"crc32:<8 hex digits>"}'
CHECKSUM_LINE = re.compile(r'"checksum":"crc32:([0-9a-f]{8})"\}\n')
CHECKSUM_SIZE = len('"checksum":"crc32:00000000"}\n')


def fsync_dir(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path, chunks, fsync=os.fsync):
    """Write an iterable of bytes to path so that readers see the old file or the whole new one, never a
    part: a temp file in the same dir, flush, fsync, os.replace, fsync the dir; the temp is removed on
    failure."""
    directory = os.path.dirname(os.path.abspath(path))
    temp = f"{path}.tmp-{os.getpid()}-{threading.get_ident()}"
    try:
        with open(temp, "wb", opener=lambda p, f: os.open(p, f, 0o600)) as out:
            for chunk in chunks:
                out.write(chunk)
            out.flush()
            fsync(out.fileno())
        os.replace(temp, path)
        fsync_dir(directory)
    except BaseException:
        try:
            os.unlink(temp)
        except OSError:
            pass
        raise


def compact_encoder(ensure_ascii=True):
    """A function that encodes a value as compact JSON text, like json.JSONEncoder(separators=(",", ":"),
    check_circular=False).encode, for values that never contain themselves. That method makes a new C encoder
    on every call, which is most of the cost of encoding a small value; this one is made once. Where the C
    encoder is missing or encodes a sample differently, it is that method."""
    plain = json.JSONEncoder(separators=(",", ":"), ensure_ascii=ensure_ascii, check_circular=False)
    try:
        strings = json.encoder.encode_basestring_ascii if ensure_ascii else json.encoder.encode_basestring
        chunks = json.encoder.c_make_encoder(None, plain.default, strings, None, ":", ",", False, False, True)

        def encode(value):
            return "".join(chunks(value, 0))
        sample = {"a": [1, -2.5, 1e300, None, True, False, "\u00e9\u2028\"\\"], "b": {"c": []}, "d": ""}
        if encode(sample) == plain.encode(sample) and encode("x") == '"x"':
            return encode
    except (AttributeError, TypeError, ValueError):
        pass
    return plain.encode


# JSON as every data file holds it; stored data is decoded JSON or entity tuples, never circular
COMPACT = compact_encoder()


def entity_row(item, cls):
    """One entity as a snapshot row: its values in field order, a task's history as its text (a JSON
    string). item is an entity tuple or a plain stored object (a task's history a list)."""
    if type(item) is dict:
        values = [item[f] if f in item else cls._field_defaults[f] for f in cls._fields]
        if cls._fields[-1] == "history" and type(values[-1]) is not str:
            values[-1] = history_from_json(values[-1])
        return COMPACT(values)
    return COMPACT(item)


SNAPSHOT_BLOCK = 1 << 16    # characters of rows joined into one piece of a snapshot: one write, one checksum step


def snapshot_chunks(doc):
    """Serialise a state document piece by piece, so one large json.dumps never holds the interpreter for
    the whole state while requests wait: snapshot_lines as UTF-8, in pieces of about SNAPSHOT_BLOCK
    characters, each encoded once for the file and its checksum, then the checksum line, the CRC-32 of
    everything before it."""
    crc, block, size = 0, [], 0
    for text in snapshot_lines(doc):
        block.append(text)
        size += len(text)
        if size >= SNAPSHOT_BLOCK:
            piece, block, size = "".join(block).encode("utf-8"), [], 0
            crc = binascii.crc32(piece, crc)
            yield piece
    piece = "".join(block).encode("utf-8")
    yield piece
    yield f'"{CHECKSUM_KEY}":"crc32:{binascii.crc32(piece, crc):08x}"}}\n'.encode("ascii")


def snapshot_lines(doc):
    """A state document as a snapshot's text, up to its checksum line: the head (with the field names of each
    section) on the first line, then one entity a line, as a row of values."""
    head = {k: v for k, v in doc.items() if k not in SECTIONS and k != CHECKSUM_KEY}
    head.update(version=FORMAT_VERSION, fields={section: list(ENTITY_TYPES[section]._fields) for section in SECTIONS})
    yield json.dumps(head, separators=(",", ":"))[:-1]
    for section in SECTIONS:
        cls = ENTITY_TYPES[section]
        yield f',\n"{section}":['
        for i, item in enumerate(doc.get(section, ())):
            yield ("\n" if i == 0 else ",\n") + entity_row(item, cls)     # entity tuples from State.freeze
        yield "]"
    yield ",\n"


ARCHIVE_RE = re.compile(r"archive-(\d{4})-(\d{2})\.jsonl")


def read_archive_dir(data_dir):
    """{task id: Task} from the archive files of a data dir, oldest month first, later copies winning. A
    torn last line (a crash mid-write) is skipped; the tasks on it are still in the journal."""
    tasks, make = {}, entity_maker(Task, {})
    for name in sorted(n for n in os.listdir(data_dir) if ARCHIVE_RE.fullmatch(n)):
        with open(os.path.join(data_dir, name), encoding="utf-8", errors="replace") as f:
            for line in f:
                try:
                    task = make(json.loads(line))
                except (ValueError, TypeError):
                    continue
                tasks[task.id] = task
    return tasks


def list_data_files(data_dir):
    """(snapshots, segments) in the data dir as sorted lists of (seq, file name)."""
    snapshots, segments = [], []
    for name in os.listdir(data_dir):
        match = SNAPSHOT_RE.fullmatch(name)
        if match:
            snapshots.append((int(match.group(1)), name))
        match = SEGMENT_RE.fullmatch(name)
        if match:
            segments.append((int(match.group(1)), name))
    return sorted(snapshots), sorted(segments)


def empty_doc():
    return {"format": FORMAT_NAME, "version": FORMAT_VERSION, "seq": 0, "meta": {},
            **{section: [] for section in SECTIONS}}


class Documents:
    """A load target that keeps the stored entities as plain JSON objects, {section: {key: item}}: for tools
    and tests that want the documents. The bridge loads into its State, which has the same methods."""

    def __init__(self):
        self.meta = {}
        self.index = {section: {} for section in SECTIONS}

    def load(self, section, item, history_text=None):
        """One stored entity (a snapshot line or a journal put): an object, or a row in this version's field
        order (history_text, the text of a task's history as stored, is not needed here)."""
        self.loader(section)(item, history_text)

    def loader(self, section):
        """load for one section, its look-ups done once: for the many entities of a snapshot's section."""
        fields, key, items = ENTITY_TYPES[section]._fields, SECTION_KEYS[section], self.index[section]

        def load(item, history_text=None):
            if type(item) is list:
                item = dict(zip(fields, item))
            if type(item.get("history")) is str:        # a task's history as format 3 stores it: its text
                item["history"] = json.loads(item["history"])
            items[item[key]] = item
        return load

    def update(self, section, changes):
        """The fields of a stored entity that a journal "set" changed; KeyError when it is not there."""
        key = changes[SECTION_KEYS[section]]
        item = {**self.index[section][key], **changes}
        if "historyAdd" in item:
            item["history"] = (item["history"] + item.pop("historyAdd"))[-HISTORY_LIMIT:]
        self.index[section][key] = item

    def unload(self, section, key):
        self.index[section].pop(key, None)

    def loaded(self):
        pass

    def freeze(self, seq):
        return {**empty_doc(), "seq": seq, "meta": dict(self.meta),
                **{section: list(self.index[section].values()) for section in SECTIONS}}


class SnapshotLayout(Exception):
    """A snapshot not laid out one entity a line as snapshot_chunks writes it, or without its checksum line:
    it is read whole instead."""


SECTION_LINE = re.compile(r'"([a-z]+)":\[(\]?)([,}]?)\n')
ENTITY_ENDS = {",\n": None, "],\n": ",", "]}\n": "}"}   # after an entity: more follow, its section ends, all ends
RAW_DECODE = json.JSONDecoder().raw_decode      # json.loads without its per-call overhead (a third of it)


def check_snapshot_head(path, head):
    """The head of a snapshot, checked; returns {section: field names} of its rows (empty where its entities
    are objects, as format 1 wrote them and the in-memory documents of State.to_doc hold them)."""
    if not isinstance(head, dict) or head.get("format") != FORMAT_NAME or not isinstance(head.get("seq"), int) \
            or not isinstance(head.get("meta", {}), dict):
        raise StorageError(f"{path} is not a clawbridge snapshot")
    if head.get("version", 0) > FORMAT_VERSION:
        raise StorageError(f"{path} was written by a newer clawbridge (format {head.get('version')})")
    fields = head.get("fields", {})
    if not isinstance(fields, dict) or not all(isinstance(names, list) and all(isinstance(n, str) for n in names)
                                               for names in fields.values()):
        raise StorageError(f"{path} is not a clawbridge snapshot (its field names are damaged)")
    return {section: tuple(names) for section, names in fields.items()}


def load_entity(target, path, section, item, fields):
    """Hand one snapshot entity to the target: an object as it is; a row of values as an object, or as it is
    when its fields are this version's."""
    if isinstance(item, dict):
        target.load(section, item)
        return
    names = fields.get(section)
    if not isinstance(item, list) or names is None or len(item) != len(names):
        raise ValueError(f"an entry of {section} in {path} is neither an object nor a row of its fields")
    target.load(section, item if names == ENTITY_TYPES[section]._fields else dict(zip(names, item)))


def stream_snapshot(path, f, target, checksum):
    """Load a snapshot written by snapshot_chunks a line at a time: each entity goes to the target as soon as
    it is read, so no second copy of the whole state is ever built. Returns the head (format, seq, meta, ...).
    Anything not exactly in that layout, a truncated file or a format-3 one without its checksum line
    included, raises SnapshotLayout; a checksum that does not match, StorageError. checksum() is the CRC-32 of
    the file's bytes before its checksum line, once f has read it all."""
    try:
        first = f.readline()
        if not (first.startswith("{") and first.endswith(",\n")):
            raise SnapshotLayout()
        head = json.loads(first[:-2] + "}")
        fields = check_snapshot_head(path, head)
        checked = head.get("version", 0) >= 3      # its rows are vouched for by its checksum line
        target.meta.update(head.get("meta", {}))
        seen, done, verified = set(), False, False
        for line in f:      # a section's line: `"name":[`, or `"name":[]` and `,` or `}`; or the checksum line
            match = SECTION_LINE.fullmatch(line)
            if done or not match or match.group(1) in seen or bool(match.group(2)) != bool(match.group(3)):
                match = CHECKSUM_LINE.fullmatch(line) if checked and not done else None
                if match is None:
                    raise SnapshotLayout()
                if int(match.group(1), 16) != checksum():
                    raise StorageError(f"{path} is damaged: its checksum does not match what it holds")
                done = verified = True
                continue
            seen.add(match.group(1))
            done = match.group(3) == "}" if match.group(2) else stream_section(path, f, target, match.group(1),
                                                                                fields, checked)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise SnapshotLayout() from None
    if not done or checked and not verified:
        raise SnapshotLayout()
    return {k: v for k, v in head.items() if k not in SECTIONS}


def stream_section(path, f, target, section, fields, checked):
    """Load the entities of one snapshot section, one a line, up to the line that ends the section. Returns
    whether the snapshot ends there too. checked: the file is vouched for by its checksum, so a task's
    history text in a row is taken as it is."""
    # rows of this version's fields go to the target as they are; format-2 rows that start with a task's
    # history have it decoded on its own, and its text sliced from the line, not encoded again
    names, cls = fields.get(section), ENTITY_TYPES.get(section)
    direct = cls is not None and names == cls._fields
    split = cls is not None and not direct and names == FORMAT_2_FIELDS[cls]
    width = len(names or ())
    load = target.loader(section) if cls is not None else None
    vouch = checked and direct and cls._fields[-1] == "history"
    for line in f:
        if split and line.startswith("[["):
            entries, cut = RAW_DECODE(line, 1)
            if line[cut] != ",":
                raise SnapshotLayout()
            text, line = line[1:cut], "[" + line[cut + 1:]
        else:
            entries = text = None
        item, end = RAW_DECODE(line)
        after = ENTITY_ENDS.get(line[end:], False)
        if after is False:
            raise SnapshotLayout()
        if text is not None and len(item) == width - 1:
            item.append(entries)        # now in field order
            load(item, text)
        elif text is not None:      # too many or too few values: load_entity says so
            load_entity(target, path, section, [entries, *item], fields)
        elif direct and type(item) is list and len(item) == width:
            load(item, item[-1] if vouch else None)
        elif cls is not None:       # a section this version does not know is skipped
            load_entity(target, path, section, item, fields)
        if after:
            return after == "}"
    raise SnapshotLayout()      # the file ends inside the section


class ChecksumReader(io.RawIOBase):
    """A file read through, keeping the CRC-32 of its first `size` bytes as they go by."""

    def __init__(self, raw, size):
        super().__init__()
        self.raw, self.left, self.crc = raw, size, 0

    def readable(self):
        return True

    def readinto(self, buffer):
        count = self.raw.readinto(buffer)
        if count and self.left > 0:
            self.crc = binascii.crc32(memoryview(buffer)[:min(count, self.left)], self.crc)
            self.left -= count
        return count


def read_snapshot(path, new_target):
    """Load one snapshot into a new target; returns (head, target). StorageError when it is not a complete,
    well-formed snapshot; TypeError or ValueError (from the target) when an entity in it is damaged."""
    try:
        with open(path, "rb", buffering=0) as raw:
            reader = ChecksumReader(raw, os.fstat(raw.fileno()).st_size - CHECKSUM_SIZE)
            f = io.TextIOWrapper(io.BufferedReader(reader, SNAPSHOT_BLOCK), encoding="utf-8", newline="\n")
            f._CHUNK_SIZE = SNAPSHOT_BLOCK      # read in pieces of that size, not 8 KB: a third of the reading time
            target = new_target()
            return stream_snapshot(path, f, target, lambda: reader.crc), target
    except SnapshotLayout:
        pass
    try:     # another layout (written by hand, or by another tool): the whole document at once
        with open(path, "rb") as f:
            doc = json.loads(f.read().decode("utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise StorageError(f"{path} is not valid JSON ({exc})") from None
    target = new_target()
    return load_document(path, doc, target), target


def load_document(path, doc, target):
    """Load a whole snapshot document into the target; returns its head."""
    fields = check_snapshot_head(path, doc)
    target.meta.update(doc.get("meta", {}))
    for section in SECTIONS:
        items = doc.get(section, [])     # a section added since the snapshot was written starts empty
        if not isinstance(items, list):
            raise StorageError(f"{path} is not a clawbridge snapshot ({section} is not a list)")
        for item in items:
            load_entity(target, path, section, item, fields)
    return {k: v for k, v in doc.items() if k not in SECTIONS and k != CHECKSUM_KEY}


def decode_line(line):
    """json.loads of one line of bytes, cheaper for the compact lines this program writes."""
    text = line.decode("utf-8")
    try:
        value, end = RAW_DECODE(text)
        if end == len(text) - 1:
            return value
    except ValueError:
        pass
    return json.loads(text)     # white space around the value, or not JSON: as json.loads decides


def read_segment(path, expect_seq, apply):
    """Apply the journal records of one segment from expect_seq on, reading it a line at a time. Returns the
    next expected seq and the offset of a torn last line (or None). A torn or unreadable line is allowed only
    as the last one (a crash mid-append, never acknowledged)."""
    torn_at, offset = None, 0
    with open(path, "rb") as f:
        for line in f:
            if torn_at is not None:
                raise StorageError(f"{path} has a damaged record at byte {torn_at} followed by more records; "
                                   "restore from a backup or move the file away")
            record = None
            if line.endswith(b"\n"):
                try:
                    record = decode_line(line)
                except (ValueError, UnicodeDecodeError):
                    record = None
            if not isinstance(record, dict) or not isinstance(record.get("seq"), int):
                torn_at = offset
            elif record["seq"] >= expect_seq:
                if record["seq"] != expect_seq:
                    raise StorageError(f"{path} jumps from record {expect_seq - 1} to {record['seq']}; records "
                                       "are missing. Restore from a backup.")
                apply(record)
                expect_seq += 1
            offset += len(line)
    return expect_seq, torn_at


def apply_record(target, record):
    """Apply one journal record to a load target."""
    for kind, section, value in record.get("ops", ()):
        if kind == "set":
            target.update(section, value)
        elif kind == "put":
            target.load(section, value)
        elif kind == "del":
            target.unload(section, value)
        else:
            raise ValueError(f"unknown journal operation {kind!r}")
    target.meta.update(record.get("meta", {}))


def load_data(data_dir, repair=False, target=Documents):
    """Recover the last good state of a data dir: the newest readable snapshot plus the journal after it,
    loaded into a new target (Documents, or the bridge's State), whose load raises TypeError or ValueError for
    a damaged entity so that an older snapshot is tried. With repair, a torn journal tail is cut off so appends
    continue cleanly. Returns (target, info), info holding the snapshot's head; raises StorageError, naming the
    file, when no good state can be rebuilt."""
    snapshots, segments = list_data_files(data_dir)
    if not snapshots and not segments:
        built = target()
        built.loaded()
        return built, {"fresh": True, "segment": None, "seq": 0, "head": {}, "problems": []}
    problems, bad = [], []
    candidates = [os.path.join(data_dir, name) for _, name in reversed(snapshots)]
    if segments and segments[0][0] == 1:
        candidates.append(None)     # the journal alone, from record 1, is a whole history too
    elif segments and not snapshots:
        problems.append(f"{os.path.join(data_dir, segments[0][1])} starts at record {segments[0][0]} and no "
                        "snapshot holds the records before it")
    collecting = gc.isenabled()
    gc.disable()    # millions of objects are made and all live on: the collector would walk them in vain
    try:
        for source in candidates:
            try:
                head, built = read_snapshot(source, target) if source else ({"seq": 0}, target())
                info = replay(data_dir, built, head["seq"], segments, repair)
                built.loaded()
            except (StorageError, KeyError, TypeError, ValueError) as exc:
                what = str(exc) if isinstance(exc, StorageError) else f"{source or 'the journal'} holds a " \
                    f"damaged entry ({type(exc).__name__}: {exc})"
                problems.append(what)
                bad.append(source)
                log.warning("%s", what)
                continue
            if repair:
                for path in filter(None, bad):      # kept for inspection, out of the way of the next start
                    os.replace(path, path + ".corrupt")
            info["problems"] = problems + info["problems"]
            info["head"] = {**head, "seq": info["seq"]}
            return built, info
    finally:
        if collecting:
            gc.enable()
    raise StorageError("no good state can be rebuilt from the data directory " + data_dir + ": "
                       + "; ".join(problems))


def replay(data_dir, target, seq, segments, repair):
    """Apply the journal after record seq to the target. Returns the load info (last seq, segment, problems)."""
    needed = [(first, name) for i, (first, name) in enumerate(segments)
              if i + 1 == len(segments) or segments[i + 1][0] > seq + 1]
    if needed and needed[0][0] > seq + 1:
        raise StorageError(f"the journal after record {seq} is missing (first segment {needed[0][1]})")
    problems = []
    for i, (first, name) in enumerate(needed):
        path = os.path.join(data_dir, name)
        if first > seq + 1:
            raise StorageError(f"{path} starts at record {first} but record {seq + 1} is missing")
        seq, torn_at = read_segment(path, seq + 1, functools.partial(apply_record, target))
        seq -= 1
        if torn_at is not None:
            problems.append(f"{path} ends with a torn record at byte {torn_at} (an interrupted write, never "
                            "acknowledged; cut off at the next start)")
            if i + 1 < len(needed):
                log.warning("%s ends with a damaged record (never acknowledged); it is ignored", path)
            elif repair:
                log.warning("%s ends with a torn record from an interrupted write; cutting it off", path)
                with open(path, "r+b") as f:
                    f.truncate(torn_at)
                    os.fsync(f.fileno())
    return {"fresh": False, "segment": needed[-1] if needed else None, "seq": seq, "problems": problems}


class DirLock:
    """An exclusive flock on the data dir, so a second bridge on the same data refuses to start."""

    def __init__(self, data_dir):
        self.path = os.path.join(data_dir, LOCK_FILE)
        self.fd = None

    def acquire(self):
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise StorageError(f"another bridge is already using the data directory {os.path.dirname(self.path)}"
                                   " (stop it first, or give this one another BRIDGE_DATA_DIR)") from None
            raise
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self.fd = fd

    def release(self):
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


class Journal:
    """Append-only journal with group commit: records are appended in order under the caller's state lock,
    and kept in memory; each writer then waits until a round covers its record, in which one writer writes
    every record appended before the round began and fsyncs them, for all. Nothing is written to the file
    under the state lock: a write lets go of the interpreter lock, and the other writers would only queue up
    on the state lock meanwhile. A failed write or fsync marks it failed; what was not on disk is cut off
    again (discard_unsynced), and only a full snapshot (rotate + Bridge.snapshot) makes it writable again."""

    def __init__(self, data_dir, next_seq, segment_name=None, fsync=os.fsync):
        self.data_dir = data_dir
        self.fsync = fsync
        self.lock = threading.Lock()
        self.this_round = threading.Condition(self.lock)    # writers the round in progress covers
        self.next_round = threading.Condition(self.lock)    # writers that came after it began
        self.sync_target = next_seq - 1     # the last record the round in progress covers
        self.appended = next_seq - 1    # last record appended (the next round writes it to the file)
        self.synced = next_seq - 1      # last record known to be on disk
        self.unwritten = []             # the records appended since the last round began, encoded
        self.size = 0                   # bytes of whole records in the current segment, the unwritten included
        self.synced_size = 0            # of which known to be on disk
        self.syncing = False
        self.failed = None              # the OSError that broke the journal, until a snapshot repairs it
        self.fd = None
        self.fsync_seconds = 0.0
        self.fsync_count = 0
        self.open_segment(segment_name or f"journal-{next_seq:012d}.jsonl")

    def open_segment(self, name):
        self.fd = os.open(os.path.join(self.data_dir, name), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        self.segment = name
        self.size = self.synced_size = os.fstat(self.fd).st_size
        fsync_dir(self.data_dir)

    def append(self, record):
        """Give one record its seq, for the next round to write; the caller must then wait(seq)."""
        with self.lock:
            if self.failed:
                raise self.failed
            seq = self.appended + 1
            data = (COMPACT({"seq": seq, **record}) + "\n").encode("utf-8")
            self.unwritten.append(data)
            self.appended = seq
            self.size += len(data)
            return seq

    def take_unwritten(self):
        """The records not yet written, as one block of bytes (under the lock)."""
        data, self.unwritten = b"".join(self.unwritten), []
        return data

    def write_sync(self, fd, data):
        """Write a block of records at the end of the segment and fsync it (outside the lock, but for rotate
        and close). A short write goes on from where it stopped; a failure leaves what the file holds past
        synced_size for discard_unsynced to cut off."""
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        self.fsync(fd)

    def sync_unwritten(self):
        """Write and fsync the records no round has taken, under the lock and with no round in progress: for
        rotate and close, which need the segment whole. Once the journal failed, they are for
        discard_unsynced to drop."""
        if self.failed or self.synced >= self.appended:
            return
        try:
            self.write_sync(self.fd, self.take_unwritten())
            self.synced, self.synced_size = self.appended, self.size
        except OSError as exc:
            self.failed = exc
            raise
        finally:
            self.wake_all()     # they see what it did once the lock is free

    def cut_to(self, size):
        try:
            os.ftruncate(self.fd, size)
        except OSError:
            log.exception("cannot cut the journal back to its last good record")

    def wait(self, seq):
        """Return once record seq is on disk; raise the OSError if the disk refused it. One writer at a time
        runs a round: it writes every record appended before the round began, and fsyncs them. The others
        sleep until the round that covers their record ends, and only they are woken then, with one of the
        later writers to run the next round: woken all at once, most of 64 waiting writers would only wait
        again, each wake a hand-off of the interpreter lock."""
        if self.synced >= seq:      # the usual case for a read or a plain heartbeat: no lock needed to know
            return
        with self.lock:
            while self.synced < seq:
                if self.failed:
                    raise self.failed
                if self.syncing:
                    (self.this_round if seq <= self.sync_target else self.next_round).wait()
                    continue
                self.syncing = True
                target, size, fd, data = self.appended, self.size, self.fd, self.take_unwritten()
                self.sync_target = target
                self.lock.release()
                started = time.monotonic()
                done, error = False, None
                try:
                    self.write_sync(fd, data)
                    done = True
                except OSError as exc:
                    error = exc
                finally:
                    self.lock.acquire()
                    self.syncing = False
                    self.fsync_seconds += time.monotonic() - started
                    self.fsync_count += 1
                    if done:
                        self.synced, self.synced_size = max(self.synced, target), size
                    self.end_round(error)
                if error:
                    raise error

    def end_round(self, error):
        """After a round (under the lock): wake the writers it covered; the writers that came during it are
        the next round's, and one of them runs it. After a failure every writer is woken, to raise."""
        if error:
            self.failed = error
            self.wake_all()
            return
        self.this_round.notify_all()
        self.this_round, self.next_round = self.next_round, self.this_round
        self.this_round.notify()

    def wake_all(self):
        """Wake every waiting writer to look again (under the lock). Whatever fails the journal or syncs it
        outside a round calls it: the writer picked to run the next round may then have none to run, and
        the others would sleep on."""
        self.this_round.notify_all()
        self.next_round.notify_all()

    def discard_unsynced(self):
        """After a failure: forget the records not known to be on disk, so none of them can come back at the
        next start. Returns the last record kept."""
        with self.lock:
            while self.syncing:
                self.this_round.wait()
            if self.appended > self.synced:
                self.unwritten = []
                self.cut_to(self.synced_size)
                self.appended, self.size = self.synced, self.synced_size
            return self.synced

    def rotate(self):
        """Start a new segment after the last record appended, written and fsynced first. Called under the
        state lock, so no record can be appended meanwhile; returns the seq the new segment follows."""
        with self.lock:
            while self.syncing:
                self.this_round.wait()
            self.sync_unwritten()
            name = f"journal-{self.appended + 1:012d}.jsonl"
            if name == self.segment:
                self.cut_to(self.size)      # nothing was added since it began; drop what a failure left
            else:
                os.close(self.fd)
                self.open_segment(name)
            return self.appended

    def recovered(self, failure):
        with self.lock:
            if self.failed is failure:
                self.failed = None

    def close(self):
        with self.lock:
            while self.syncing:
                self.this_round.wait()
            if self.fd is not None:
                try:
                    self.sync_unwritten()
                finally:
                    os.close(self.fd)
                    self.fd = None


class Store:
    """The data dir: its lock, the journal, and snapshots. Knows JSON documents, not the domain."""

    def __init__(self, data_dir, fsync=os.fsync):
        self.data_dir = os.path.abspath(data_dir)
        self.fsync = fsync
        self.lock = DirLock(self.data_dir)
        self.journal = None
        self.snapshot_seq = 0
        self.last_snapshot_at = time.monotonic()
        self.snapshot_lock = threading.Lock()   # one snapshot writer at a time

    def open(self, target):
        """Lock the data dir and recover its state into a new target. Returns (target, snapshot head)."""
        os.makedirs(self.data_dir, mode=0o700, exist_ok=True)
        self.lock.acquire()
        try:
            built, info = load_data(self.data_dir, repair=True, target=target)
            seq, segment = info["seq"], info["segment"]
            reuse = segment[1] if segment and segment[0] <= seq + 1 else None
            self.journal = Journal(self.data_dir, seq + 1, reuse, self.fsync)
            self.snapshot_seq = seq if not info["fresh"] else 0
            return built, info["head"]
        except BaseException:
            self.lock.release()
            raise

    @property
    def healthy(self):
        return self.journal is not None and self.journal.failed is None

    def append(self, ops, meta=None):
        record = {"ops": ops}
        if meta:
            record["meta"] = meta
        return self.journal.append(record)

    def wait(self, seq):
        self.journal.wait(seq)

    def write_archive(self, tasks):
        """Append tasks to archive-YYYY-MM.jsonl by the month they were last changed, fsynced."""
        by_month = collections.defaultdict(list)
        for task in tasks:
            by_month[time.strftime("%Y-%m", time.gmtime(task.updatedAt / 1000))].append(task)
        for month, items in sorted(by_month.items()):
            path = os.path.join(self.data_dir, f"archive-{month}.jsonl")
            with open(path, "a", encoding="utf-8", opener=lambda p, f: os.open(p, f, 0o600)) as out:
                out.writelines(COMPACT(entity_doc(task)) + "\n" for task in items)
                out.flush()
                self.fsync(out.fileno())
        fsync_dir(self.data_dir)

    def read_archives(self):
        """Every archived task, the latest copy of each (a task archived twice appears once)."""
        return list(read_archive_dir(self.data_dir).values())

    def journal_bytes(self):
        return sum(os.path.getsize(os.path.join(self.data_dir, name)) for _, name in list_data_files(self.data_dir)[1])

    def changes_since_snapshot(self):
        return self.journal.appended - self.snapshot_seq

    def write_snapshot(self, doc):
        """Write doc (whose seq the journal has already rotated past) as the newest snapshot, then drop the
        files no longer needed: snapshots older than the previous one, and segments before it."""
        with self.snapshot_lock:
            seq = doc["seq"]
            name = f"snapshot-{seq:012d}.json"
            atomic_write(os.path.join(self.data_dir, name), snapshot_chunks(doc), self.fsync)
            self.snapshot_seq = max(self.snapshot_seq, seq)
            self.last_snapshot_at = time.monotonic()
            snapshots, segments = list_data_files(self.data_dir)
            keep_from = snapshots[-2][0] if len(snapshots) >= 2 else 0
            for s_seq, s_name in snapshots[:-2]:
                self.remove(s_name)
            for i, (first, s_name) in enumerate(segments[:-1]):
                if segments[i + 1][0] <= keep_from + 1:
                    self.remove(s_name)

    def remove(self, name):
        try:
            os.unlink(os.path.join(self.data_dir, name))
        except FileNotFoundError:
            pass

    def close(self):
        if self.journal:
            self.journal.close()
        self.lock.release()


def backup_data(data_dir, dest, target=Documents, attempts=5):
    """Write a consistent copy of a (possibly live) data dir into dest as one snapshot. The copy holds every
    change acknowledged before the call began; it is loaded into the target (the bridge's State checks every
    entity as a start would). Returns the document written."""
    data_dir = os.path.abspath(data_dir)
    if not os.path.isdir(data_dir):
        raise StorageError(f"there is no data directory at {data_dir}")
    os.makedirs(dest, mode=0o700, exist_ok=True)
    if any(list_data_files(dest)):
        raise StorageError(f"{dest} already holds bridge data; give an empty or new directory")
    for attempt in range(attempts):
        try:
            built, info = load_data(data_dir, repair=False, target=target)
            break
        except (FileNotFoundError, StorageError):
            # the live bridge rotated or pruned files while we read them; read again
            if attempt + 1 == attempts:
                raise
            time.sleep(0.05)
    doc = {**info["head"], **built.freeze(info["seq"]), "origin": "backup", "backupAt": int(time.time() * 1000)}
    copy_archives(data_dir, dest)
    atomic_write(os.path.join(dest, f"snapshot-{doc['seq']:012d}.json"), snapshot_chunks(doc))
    return doc


def copy_archives(source, dest):
    """Copy the archive files of one data dir into another (whole files, atomically)."""
    for name in sorted(n for n in os.listdir(source) if ARCHIVE_RE.fullmatch(n)):
        with open(os.path.join(source, name), "rb") as f:
            atomic_write(os.path.join(dest, name), [f.read()])


# ===== Domain =====
# Pure code: functions take the state, the time (`now`) and the request payload, and decide. Entities are
# immutable named tuples whose field names are the API's; a change replaces an entity, never edits it, so a
# snapshot can copy the maps under the lock and serialise them outside it.


class Now(NamedTuple):
    mono: float     # monotonic seconds: liveness and durations
    ms: int         # wall clock in Unix epoch milliseconds: what the API shows


class Agent(NamedTuple):
    id: str
    name: str = ""
    emoji: str = ""
    roles: tuple = ()
    model: str = ""
    workspace: str = ""
    instanceId: str = "default"
    hostname: str = ""
    tailscaleIP: Optional[str] = None
    heartbeatInterval: Optional[int] = None     # ms, as declared at registration or by the latest beat
    maxConcurrentTasks: int = DEFAULT_MAX_TASKS
    metadata: Optional[dict] = None
    status: str = "online"                      # liveness as the bridge sees it: online or offline
    reportedStatus: Optional[str] = None        # what the agent's latest beat said of itself (soft)
    currentTask: Optional[str] = None           # soft
    lastHeartbeat: Optional[int] = None         # soft: carried by snapshots, not fsynced per beat
    createdAt: int = 0
    updatedAt: int = 0
    tokenHash: Optional[str] = None             # sha256 of its agentToken; never shown


class Instance(NamedTuple):
    instanceId: str
    hostname: str = ""
    tailscaleIP: Optional[str] = None
    drained: bool = False
    createdAt: int = 0
    updatedAt: int = 0


class Task(NamedTuple):
    id: str
    title: str
    description: str = ""
    roles: tuple = ()
    priority: str = DEFAULT_PRIORITY
    lane: str = "queued"
    assignedTo: Optional[str] = None
    preferredInstance: Optional[str] = None
    tags: tuple = ()
    epoch: int = 0
    version: int = 1
    createdAt: int = 0
    updatedAt: int = 0
    queuedAt: int = 0       # the bridge counter when it last entered the queue: queue order within a priority
    history: str = "[]"     # [[at, event, by, note], ...], the latest HISTORY_LIMIT, as compact JSON text:
    #                         a third of the memory of tuples, and written to disk as it is; "],[" in it
    #                         is always a boundary between two entries (history_text)


class Notification(NamedTuple):
    id: str
    agentId: str
    type: str = "message"
    title: str = ""
    message: str = ""
    taskId: Optional[str] = None
    read: bool = False
    createdAt: int = 0
    readAt: Optional[int] = None


class AuditEntry(NamedTuple):
    id: str
    at: int
    actor: str          # admin, read, agent:<id>, or open (no token configured); never a token
    address: str
    action: str         # task.update, task.delete, agent.delete, instance.drain, ...
    target: str
    detail: str = ""


ENTITY_TYPES = {"agents": Agent, "instances": Instance, "tasks": Task, "notifications": Notification,
                "audit": AuditEntry}
ENTITY_NAMES = {"agents": "agent", "instances": "instance", "tasks": "task", "notifications": "notification",
                "audit": "audit"}   # State.put_<name> and drop_<name>
TUPLE_FIELDS = {"roles", "tags"}


SHARED_FIELDS = ("lane", "priority", "assignedTo", "preferredInstance", "agentId", "instanceId", "status", "type",
                 "hostname", "model")     # values that many entities repeat


def entity_maker(cls, memo):
    """make(item, history_text=None, base=None): build an entity of cls from its stored JSON, its look-ups
    done once for the many entities of a load. item is an object, tolerating fields added or dropped
    between versions, or a row of values in this version's field order; with base, an entity that item holds
    only the changed fields of. Repeated strings and role and tag lists are shared: memo, a dict the caller
    keeps for a whole load, holds one copy of each. history_text, when given, is the stored text of item's
    history list, kept instead of encoding the list again; or item's history itself, text the caller
    vouches for (from a snapshot whose checksum holds, or made by history_extend), taken as it is. Any other
    history text is decoded and checked."""
    strings, lists, history = ENTITY_LAYOUT[cls]
    index, normalised, width, same = FIELD_INDEX[cls], NORMALISED_FIELDS[cls], len(cls._fields), memo.setdefault

    def make(item, history_text=None, base=None):
        if type(item) is list and base is None:     # a snapshot row, in this version's field order
            values, share = item, True
        elif base is not None:
            values = list(base)
            for field, value in item.items():
                if field in index:
                    values[index[field]] = value
            share = not normalised.isdisjoint(item)     # else the other values are base's: shared already
        elif tuple(item) == cls._fields:      # as this version writes it: the values in field order
            values, share = list(item.values()), True
        else:
            values, share = list(cls(**{f: item[f] for f in cls._fields if f in item})), True
        if share:
            for i in strings:
                value = values[i]
                if type(value) is str:
                    values[i] = same(value, value)
            for i in lists:
                words = tuple(values[i])
                known = memo.get(words)
                if known is None:
                    known = memo[words] = tuple(same(word, word) if type(word) is str else word for word in words)
                values[i] = known
        if history is not None and values[history] is not history_text and (base is None or "history" in item):
            stored = values[history]    # a list of entries, or their text that no one vouched for: checked
            values[history] = history_from_json(json.loads(stored) if type(stored) is str else stored,
                                                stored if type(stored) is str else history_text)
        if len(values) != width:
            raise TypeError(f"{cls.__name__} has {width} fields, not {len(values)}")
        return tuple.__new__(cls, values)     # cls._make, without the cost of its call
    return make


def history_from_json(entries, text=None):
    """A task's stored history (a list of [at, event, by, note]) as the compact text the task holds. text is
    that list as stored, when the caller has it: taken as it is when it holds at most HISTORY_LIMIT entries
    and "],[" only between them (not so with white space, or with "],[" in a note: then it is encoded again)."""
    check_history(entries)
    if text is not None and len(entries) <= HISTORY_LIMIT and \
            (text.count("],[") + 1 == len(entries) if entries else text == "[]"):
        return text
    return history_text(entries[-HISTORY_LIMIT:])


def history_text(entries):
    """Compact JSON of history entries with "],[" only between two entries (a "]" inside a string is written
    \\u005d when a string holds "],["), so history_extend and history_added count and cut entries in the
    text without decoding it. ValueError for an entry that holds a list or an object there."""
    text = COMPACT(entries)
    if text.count("],[") + 1 == len(entries) or not entries:
        return text
    rows = []
    for entry in entries:
        if any(isinstance(value, (list, tuple, dict)) for value in entry):
            raise ValueError("a history entry holds a list or an object")
        rows.append("[" + ",".join(COMPACT(value).replace("]", "\\u005d") if type(value) is str else COMPACT(value)
                                   for value in entry) + "]")
    return f"[{','.join(rows)}]"


def check_history(entries):
    """ValueError unless entries is a list of [at, event, by, note] (stored history, or entries added to it)."""
    if type(entries) is not list:
        raise ValueError("a history is not a list of entries")
    for entry in entries:
        if type(entry) is not list or len(entry) != 4:
            raise ValueError("a history entry is not [at, event, by, note]")


def entity_doc(entity):
    """An entity as the plain JSON object that storage holds (a task's history as a list)."""
    item = entity._asdict()
    if "history" in item:
        item["history"] = json.loads(item["history"])
    return item


def entity_op(section, key, old, new):
    """The journal op for one change: the whole entity when it is new, only the fields that changed when it
    was there before (a task's history as the entries added to it, not all HISTORY_LIMIT again), or its
    removal."""
    if new is None:
        return ("del", section, key)
    if old is None:
        return ("put", section, entity_doc(new))
    changes = {SECTION_KEYS[section]: key}
    for field, before, after in zip(new._fields, old, new):
        if before is not after and before != after:
            changes[field] = after
    if "history" in changes:
        added = history_added(old.history, new.history)
        if added is None:
            changes["history"] = json.loads(new.history)
        else:
            del changes["history"]
            changes["historyAdd"] = added
    return ("set", section, changes)


FIELD_INDEX = {cls: {field: i for i, field in enumerate(cls._fields)} for cls in ENTITY_TYPES.values()}
# The field order of format-2 snapshot rows: a task's history (its last field) first, where the reader found
# its text without decoding the row twice (stream_section); the rest in field order.
FORMAT_2_FIELDS = {cls: ("history", *cls._fields[:-1]) if cls._fields[-1] == "history" else cls._fields
                   for cls in ENTITY_TYPES.values()}
ENTITY_LAYOUT = {cls: ([i for i, f in enumerate(cls._fields) if f in SHARED_FIELDS],
                       [i for i, f in enumerate(cls._fields) if f in TUPLE_FIELDS],
                       cls._fields.index("history") if "history" in cls._fields else None)
                 for cls in ENTITY_TYPES.values()}     # the fields entity_maker normalises, by position
NORMALISED_FIELDS = {cls: frozenset(f for f in cls._fields if f in SHARED_FIELDS or f in TUPLE_FIELDS)
                     for cls in ENTITY_TYPES.values()}


# --- validation: every field checked, a 400 that names it ---


def check_id(value, field="id"):
    if not isinstance(value, str) or not ID_PATTERN.fullmatch(value):
        raise bad_request(f"'{field}' must be 1-64 characters of A-Z a-z 0-9 . _ - and not start with '.'",
                          field, code="invalid_id")
    return value


def get_str(payload, field, limit=MAX_NAME, default=None, required=False):
    value = payload.get(field)
    if value is None:
        if required:
            raise bad_request(f"'{field}' is required", field, code="missing_field")
        return default
    if not isinstance(value, str):
        raise bad_request(f"'{field}' must be a string", field)
    if len(value) > limit:
        raise bad_request(f"'{field}' is longer than {limit} characters", field)
    if required and not value.strip():
        raise bad_request(f"'{field}' must not be empty", field, code="missing_field")
    return value


def get_int(payload, field, low, high, default=None):
    value = payload.get(field)
    if value is None:
        return default
    if (isinstance(value, bool) or not isinstance(value, (int, float))
            or (isinstance(value, float) and not math.isfinite(value)) or value != int(value)):
        raise bad_request(f"'{field}' must be a whole number", field)
    if not low <= value <= high:
        raise bad_request(f"'{field}' must be from {low} to {high}", field)
    return int(value)


def get_bool(payload, field, default=False):
    value = payload.get(field, default)
    if not isinstance(value, bool):
        raise bad_request(f"'{field}' must be true or false", field)
    return value


def get_words(payload, field, limit, default=()):
    """A list of short strings, given as a JSON array or a comma-separated string ("qa,testing")."""
    value = payload.get(field)
    if value is None:
        return default
    if isinstance(value, str):
        value = value.split(",")
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise bad_request(f"'{field}' must be an array of strings or a comma-separated string", field)
    words = tuple(dict.fromkeys(v.strip() for v in value if v.strip()))
    if len(words) > limit or any(len(w) > 64 for w in words):
        raise bad_request(f"'{field}' takes at most {limit} entries of at most 64 characters", field)
    return words


def get_optional_id(payload, field):
    value = payload.get(field)
    return None if value is None else check_id(value, field)


def get_instance_id(payload):
    value = get_optional_id(payload, "instanceId")
    if value in RESERVED_IDS["instances"]:
        raise bad_request(f"'{value}' is reserved; choose another instance id", "instanceId", code="invalid_id")
    return value


def get_lane(payload, field="lane", default=None):
    value = payload.get(field)
    if value is None:
        return default
    lane = LANE_ALIASES.get(value, value) if isinstance(value, str) else None
    if lane not in LANES:
        raise bad_request(f"'{field}' must be one of {', '.join(LANES)}", field)
    return LANES[LANES.index(lane)]


def get_priority(payload, default=None):
    value = payload.get("priority")
    if value is None:
        return default
    if value not in PRIORITIES:
        raise bad_request("'priority' must be one of P0, P1, P2, P3", "priority")
    return PRIORITIES[PRIORITIES.index(value)]


def get_ip(payload, field):
    value = get_str(payload, field, limit=64)
    if value in (None, ""):
        return None
    try:
        return normal_ip(value)
    except ValueError:
        raise bad_request(f"'{field}' must be an IP address", field) from None


@functools.lru_cache(maxsize=4096)
def normal_ip(text):
    """An IP address in its canonical form (ValueError when it is not one); an agent sends the same one with
    every beat."""
    return str(ipaddress.ip_address(text))


# --- the state and its indexes ---


class Batch(NamedTuple):
    """What one call into the domain changed: journal ops, the meta to save, log events, and the undo log
    that can take it all back."""
    ops: list
    meta: Optional[dict]
    events: list
    undo: list


NO_CHANGES = Batch((), None, (), ())


class State:
    """All bridge data in memory with the indexes derived from it. Every durable change goes through a put_
    or drop_ method, which keeps the indexes right, records the change for the journal, and remembers what
    it replaced so that a change the disk refused can be taken back (rollback)."""

    def __init__(self):
        self.agents = {}
        self.instances = {}
        self.tasks = {}
        self.notifications = {}
        self.audit = {}         # audit entry id -> AuditEntry, oldest first, at most AUDIT_LIMIT
        self.meta = {"lastId": 0}
        self.active = {}        # agent id -> {task id: None}: its unfinished tasks
        self.roomy = {}         # agent id -> None: the online agents below their maxConcurrentTasks
        self.queued = {p: {} for p in PRIORITIES}   # priority -> {task id: None} in queueing order
        self.members = {}       # instance id -> {agent id: None}
        self.inbox = {}         # agent id -> {notification id: None} in creation order
        self.unread = {}        # agent id -> {notification id: None}, the unread part of its inbox
        self.seen = {}          # agent id -> monotonic time of its last beat (never persisted)
        self.hold = {}          # instance id -> [beats still needed, time of the last counted beat]
        self.flaps = {}         # instance id -> monotonic times it went offline, within FLAP_WINDOW
        self.disruption = False
        self.last_sweep = None
        self.events = []        # (level, message, alert) for the service to log (and send) after the lock
        self.counters = collections.Counter()   # heartbeats, reassignments, ... since start (for /metrics)
        self.changes = []       # journal ops recorded since the service last took them
        self.undo = []          # (section, key, entity before the change or None), in the same order
        self.meta_changed = False
        self.soft_dirty = False
        self.offline_after = DEFAULT_OFFLINE_AFTER   # a setting, not data: the bridge sets it from its config
        self.loading = {}       # while loading: one copy of each repeated value (entity_maker)
        self.makers = {}        # while loading: {section: its entity_maker}

    @classmethod
    def from_doc(cls, doc):
        """Build the state from a state document; TypeError or ValueError when an entity is damaged."""
        state = cls()
        load_document("the state document", {"format": FORMAT_NAME, "seq": 0, **doc}, state)
        state.loaded()
        return state

    # State is a load target of the Storage section (load_data), like Documents. While loading, load, update
    # and unload fill only the entity maps; loaded derives the indexes from them once, at the end.

    def load(self, section, item, history_text=None):
        """Put one entity as storage holds it (a snapshot row or object, or a journal put), recording nothing;
        history_text is a task's history as the snapshot holds it, when the reader has it."""
        self.loader(section)(item, history_text)

    def loader(self, section):
        """load for one section, its look-ups done once: for the many entities of a snapshot's section."""
        entities, make = getattr(self, section), self.maker(section)

        def load(item, history_text=None):
            entity = make(item, history_text)
            entities[entity[0]] = entity        # every entity's key is its first field
        return load

    def maker(self, section):
        """The entity_maker of a section for the load under way."""
        make = self.makers.get(section)
        if make is None:
            make = self.makers[section] = entity_maker(ENTITY_TYPES[section], self.loading)
        return make

    def update(self, section, changes):
        """Apply a journal "set": the fields of an entity that changed. KeyError when it is not there."""
        entities = getattr(self, section)
        before, text = entities[changes[SECTION_KEYS[section]]], None
        if "historyAdd" in changes:
            changes["history"] = text = history_extend(before.history, changes.pop("historyAdd"))
        entities[before[0]] = self.maker(section)(changes, text, before)

    def unload(self, section, key):
        getattr(self, section).pop(key, None)

    def loaded(self):
        """Build the indexes from the loaded entities, as the put_ methods keep them."""
        for instance_id in self.instances:
            self.members.setdefault(instance_id, {})
        for agent in self.agents.values():
            self.index_agent(agent)
        for task in self.tasks.values():
            self.index_task(task)
        for note in self.notifications.values():
            self.index_notification(note)
        for agent_id in self.agents:
            self.check_room(agent_id)
        self.sort_queues()
        self.loading = self.makers = None

    def sort_queues(self):
        """Queue order is the order tasks entered the queue (queuedAt), the same before and after a restart."""
        for priority, bucket in self.queued.items():
            self.queued[priority] = dict.fromkeys(sorted(bucket, key=lambda t: self.tasks[t].queuedAt))

    def freeze(self, seq):
        """The whole state as a snapshot document whose sections hold the entity tuples themselves. Cheap
        enough for the lock (it copies references to immutable entities); snapshot_chunks turns them into
        JSON later, outside it."""
        return {"format": FORMAT_NAME, "version": FORMAT_VERSION, "seq": seq, "meta": dict(self.meta),
                **{section: list(getattr(self, section).values()) for section in SECTIONS}}

    def to_doc(self, seq):
        """The whole state as a plain JSON-ready document (what a snapshot file holds)."""
        doc = self.freeze(seq)
        for section in SECTIONS:
            doc[section] = [entity_doc(entity) for entity in doc[section]]
        return doc

    def take_changes(self):
        """Everything changed since the last call, as a Batch."""
        if not (self.changes or self.events or self.undo or self.meta_changed):
            return NO_CHANGES       # a read or a plain heartbeat
        batch = Batch(self.changes, dict(self.meta) if self.meta_changed else None, self.events, self.undo)
        self.changes, self.events, self.undo, self.meta_changed = [], [], [], False
        return batch

    def rollback(self, undo):
        """Take back a batch of changes, newest first, as if they had never happened (soft state aside)."""
        for section, key, old in reversed(undo):
            if section == "meta":
                self.meta = old
            elif old is not None:
                STATE_PUTS[section](self, old, record=False)
            elif key in getattr(self, section):
                STATE_DROPS[section](self, key, record=False)
        self.sort_queues()
        for agent_id, inbox in self.inbox.items():
            self.inbox[agent_id] = dict.fromkeys(sorted(inbox, key=lambda n: self.notifications[n].createdAt))
            self.unread[agent_id] = {n: None for n in self.inbox[agent_id] if not self.notifications[n].read}

    def say(self, level, message, alert=None):
        """Something for the log, and with alert (the event name) for the webhook too."""
        self.events.append((level, message, alert))

    def record(self, section, key, old, new):
        """Note one durable change for the journal, and what it replaced for a rollback; new is the entity put,
        or None when it is dropped."""
        self.changes.append(entity_op(section, key, old, new))
        self.undo.append((section, key, old))

    def tick(self, now):
        """The next value of the bridge's counter: it grows by one and never falls behind the wall clock (in
        ms), so ids made from it never repeat, even after a restore from an older backup."""
        if not self.meta_changed:
            self.undo.append(("meta", None, dict(self.meta)))
        value = max(self.meta["lastId"] + 1, now.ms)
        self.meta["lastId"] = value
        self.meta_changed = True
        return value

    def next_id(self, prefix, now):
        return f"{prefix}-{self.tick(now)}"

    def put_agent(self, agent, record=True):
        old = self.agents.get(agent.id)
        if record:
            self.record("agents", agent.id, old, agent)
        if old is not None and old.instanceId != agent.instanceId:
            self.members.get(old.instanceId, {}).pop(agent.id, None)
        self.agents[agent.id] = agent
        self.index_agent(agent)
        self.check_room(agent.id)

    def index_agent(self, agent):
        self.members.setdefault(agent.instanceId, {})[agent.id] = None
        self.active.setdefault(agent.id, {})
        self.inbox.setdefault(agent.id, {})
        self.unread.setdefault(agent.id, {})

    def drop_agent(self, agent_id, record=True):
        agent = self.agents.pop(agent_id)
        if record:
            self.record("agents", agent_id, agent, None)
        self.members.get(agent.instanceId, {}).pop(agent_id, None)
        self.active.pop(agent_id, None)
        self.roomy.pop(agent_id, None)
        self.inbox.pop(agent_id, None)
        self.unread.pop(agent_id, None)
        self.seen.pop(agent_id, None)

    def put_instance(self, instance, record=True):
        if record:
            old = self.instances.get(instance.instanceId)
            self.record("instances", instance.instanceId, old, instance)
        self.instances[instance.instanceId] = instance
        self.members.setdefault(instance.instanceId, {})

    def drop_instance(self, instance_id, record=True):
        old = self.instances.pop(instance_id, None)
        if record:
            self.record("instances", instance_id, old, None)
        self.members.pop(instance_id, None)

    def put_task(self, task, record=True):
        old = self.tasks.get(task.id)
        if record:
            self.record("tasks", task.id, old, task)
        if old is not None:
            if old.assignedTo and old.id in self.active.get(old.assignedTo, ()):
                del self.active[old.assignedTo][old.id]
                self.check_room(old.assignedTo)
            if old.lane == "queued" and (task.lane, task.priority) != ("queued", old.priority):
                self.queued[old.priority].pop(old.id, None)
        self.tasks[task.id] = task
        if self.index_task(task):
            self.check_room(task.assignedTo)

    def index_task(self, task):
        """Enter a task in its agent's active tasks or in its queue; True when it is active."""
        if task.assignedTo and task.lane in ACTIVE_LANES:
            self.active.setdefault(task.assignedTo, {})[task.id] = None
            return True
        if task.lane == "queued" and task.id not in self.queued[task.priority]:
            self.queued[task.priority][task.id] = None      # a task that stays queued keeps its place
        return False

    def drop_task(self, task_id, record=True):
        task = self.tasks.pop(task_id)
        if record:
            self.record("tasks", task_id, task, None)
        if task.assignedTo and task_id in self.active.get(task.assignedTo, ()):
            del self.active[task.assignedTo][task_id]
            self.check_room(task.assignedTo)
        self.queued[task.priority].pop(task_id, None)

    def check_room(self, agent_id):
        """Keep roomy right for an agent whose status, limit or active tasks may have changed: assignment
        looks only at agents with room, not at the whole fleet, which is mostly busy when work queues."""
        agent = self.agents.get(agent_id)
        if agent is not None and agent.status == "online" and \
                len(self.active.get(agent_id, ())) < agent.maxConcurrentTasks:
            self.roomy[agent_id] = None
        else:
            self.roomy.pop(agent_id, None)

    def put_notification(self, note, record=True):
        if record:
            old = self.notifications.get(note.id)
            self.record("notifications", note.id, old, note)
        self.notifications[note.id] = note
        self.index_notification(note)

    def index_notification(self, note):
        self.inbox.setdefault(note.agentId, {})[note.id] = None
        unread = self.unread.setdefault(note.agentId, {})
        if note.read:
            unread.pop(note.id, None)
        else:
            unread[note.id] = None

    def put_audit(self, entry, record=True):
        if record:
            self.record("audit", entry.id, self.audit.get(entry.id), entry)
        self.audit[entry.id] = entry

    def drop_audit(self, entry_id, record=True):
        entry = self.audit.pop(entry_id)
        if record:
            self.record("audit", entry_id, entry, None)

    def drop_notification(self, note_id, record=True):
        note = self.notifications.pop(note_id)
        if record:
            self.record("notifications", note_id, note, None)
        self.inbox.get(note.agentId, {}).pop(note_id, None)
        self.unread.get(note.agentId, {}).pop(note_id, None)


STATE_PUTS = {section: getattr(State, "put_" + ENTITY_NAMES[section]) for section in SECTIONS}
STATE_DROPS = {section: getattr(State, "drop_" + ENTITY_NAMES[section]) for section in SECTIONS}


# --- reading: what the API shows ---


def agent_load(state, agent):
    return len(state.active.get(agent.id, ())) / max(1, agent.maxConcurrentTasks)


def render_agent(state, agent):
    view = agent._asdict()
    del view["tokenHash"]
    view["activeTasks"] = list(state.active.get(agent.id, ()))
    view["workload"] = round(agent_load(state, agent), 3)
    return view


def task_instance(state, task):
    agent = state.agents.get(task.assignedTo) if task.assignedTo else None
    return agent.instanceId if agent else None


def render_task(state, task):
    view = task._asdict()
    view["instanceId"] = task_instance(state, task)
    view["history"] = [{"at": at, "event": event, "by": by, "note": note}
                       for at, event, by, note in json.loads(task.history)]
    return view


def instance_agents(state, instance_id):
    return [state.agents[a] for a in state.members.get(instance_id, ())]


def instance_status(agents):
    return "online" if any(a.status == "online" for a in agents) else "offline"


def instance_figures(state, instance, now):
    """Everything the instance endpoints show, computed from its agents."""
    agents = instance_agents(state, instance.instanceId)
    online = [a for a in agents if a.status == "online"]
    beats = [a.lastHeartbeat for a in agents if a.lastHeartbeat]
    capacity, active = instance_capacity(state, online)
    return {
        "instanceId": instance.instanceId,
        "hostname": instance.hostname,
        "tailscaleIP": instance.tailscaleIP,
        "status": instance_status(agents),
        "agentCount": len(agents),
        "onlineAgents": len(online),
        "lastHeartbeat": max(beats) if beats else None,
        "taskCount": sum(len(state.active.get(a.id, ())) for a in agents),
        "capacity": capacity,
        "availableCapacity": max(0, capacity - active),
        "healthScore": health_score(state, instance.instanceId, now),
        "drained": instance.drained,
        "hold": instance.instanceId in state.hold,
        "offlineAfterMs": int(instance_threshold(agents, state.offline_after) * 1000),
        "createdAt": instance.createdAt,
        "updatedAt": instance.updatedAt,
    }


def instance_capacity(state, online):
    """(capacity, active tasks) of an instance's online agents."""
    return (sum(a.maxConcurrentTasks for a in online), sum(len(state.active.get(a.id, ())) for a in online))


def instance_threshold(agents, offline_after):
    """Seconds of silence after which an instance is offline: never less than twice the longest interval
    its agents declared, so a 15-minute cron agent is not declared dead between two beats."""
    longest = max((a.heartbeatInterval or 0 for a in agents), default=0)
    return max(offline_after, 2 * longest / 1000.0)


def health_score(state, instance_id, now):
    """0-100, 0 when offline. An online instance starts at 100 and loses up to 50 for load (active tasks /
    capacity), up to 30 for staleness (time since its freshest beat / its offline threshold) and 10 per
    time it went offline in the last hour (at most 30); it never drops below 1 while online."""
    agents = instance_agents(state, instance_id)
    online = [a for a in agents if a.status == "online"]
    if not online:
        return 0
    capacity, active = instance_capacity(state, online)
    load = min(1.0, active / capacity) if capacity else 1.0
    last = max((state.seen.get(a.id, now.mono) for a in online), default=now.mono)
    staleness = min(1.0, max(0.0, now.mono - last) / instance_threshold(agents, state.offline_after))
    flaps = sum(1 for t in state.flaps.get(instance_id, ()) if now.mono - t <= FLAP_WINDOW)
    penalty = min(FLAP_PENALTY_MAX, FLAP_PENALTY * flaps)
    return max(1, min(100, round(100 - 50 * load - 30 * staleness - penalty)))


# --- writing: the decisions ---


def add_history(task, now, event, by=None, note=None):
    """The task's history text with one entry more."""
    return history_extend(task.history, [[now.ms, event, by, note]])


def history_extend(text, entries):
    """History text with entries appended, the oldest dropped past HISTORY_LIMIT. "],[" in the text is always
    a boundary between two entries (history_text), so the entries are counted, and the oldest cut off, in
    the text as it is."""
    check_history(entries)
    if not entries:
        return text
    if text == "[]" or len(entries) >= HISTORY_LIMIT:
        return history_text(entries[-HISTORY_LIMIT:])
    cut = 1     # where the first entry kept begins
    for _ in range(text.count("],[") + 1 + len(entries) - HISTORY_LIMIT):
        cut = text.index("],[", cut) + 2
    return f"[{text[cut:-1]},{history_text(entries)[1:]}"


def history_added(old, new):
    """The entries that history text new adds at the end of old (cut to the latest HISTORY_LIMIT), as a list,
    or None when new is not old plus a few entries. The texts are compared as they are: new is old, less up
    to a few of its oldest entries, and then the ones added."""
    if old == "[]":
        return json.loads(new)
    count, cut = old.count("],[") + 1, 1
    for dropped in range(min(count, 9)):     # a change adds a few entries, so drops at most as many (8)
        if dropped:
            cut = old.index("],[", cut) + 2
        end = len(old) - cut        # in new, where the entries kept from old end
        if new.startswith(old[cut:-1], 1) and new[end:end + 1] == ",":
            added = json.loads("[" + new[end + 1:])
            if dropped == max(0, count + len(added) - HISTORY_LIMIT):
                return added
    return None


def notify(state, now, agent_id, kind, message, task_id=None, title=""):
    note = Notification(id=state.next_id("ntf", now), agentId=agent_id, type=kind, title=title or kind,
                        message=message, taskId=task_id, createdAt=now.ms)
    state.put_notification(note)
    return note


def touch_instance(state, now, instance_id, hostname=None, tailscale_ip=None):
    """Create the instance on first sight, and keep its host name and address current."""
    old = state.instances.get(instance_id)
    if old is None:
        state.put_instance(Instance(instanceId=instance_id, hostname=hostname or "", tailscaleIP=tailscale_ip,
                                    createdAt=now.ms, updatedAt=now.ms))
        return
    changes = {}
    if hostname and hostname != old.hostname:
        changes["hostname"] = hostname
    if tailscale_ip and tailscale_ip != old.tailscaleIP:
        changes["tailscaleIP"] = tailscale_ip
    if changes:
        state.put_instance(old._replace(updatedAt=now.ms, **changes))


def forget_instance_if_empty(state, instance_id):
    if instance_id in state.instances and not state.members.get(instance_id):
        state.drop_instance(instance_id)


def register_agent(state, now, payload, actor=None, new_token=None):
    """Idempotent upsert. A new agent is online at once (registration is its first beat); re-registering
    keeps its tasks and changes only the fields given. An agent without a token, or asking for
    "rotateToken", gets new_token as its agentToken, shown this once and kept only as a hash.
    actor is the agent calling with its own token (None for the admin). Returns (agent view, created)."""
    agent_id = check_id(payload.get("id") if "id" in payload else payload.get("agentId"), "id")
    if agent_id in RESERVED_IDS["agents"]:
        raise bad_request(f"'{agent_id}' is reserved; choose another agent id", "id", code="invalid_id")
    if actor is not None and actor != agent_id:
        raise forbidden(f"An agent token may only register its own agent ({actor}).")
    rotate = get_bool(payload, "rotateToken")
    fields = {
        "name": get_str(payload, "name"),
        "emoji": get_str(payload, "emoji", limit=16),
        "roles": get_words(payload, "roles", MAX_ROLES, default=None),
        "model": get_str(payload, "model"),
        "workspace": get_str(payload, "workspace", limit=1024),
        "instanceId": get_instance_id(payload),
        "hostname": get_str(payload, "hostname"),
        "tailscaleIP": get_ip(payload, "tailscaleIP"),
        "heartbeatInterval": get_int(payload, "heartbeatInterval", MIN_INTERVAL_MS, MAX_INTERVAL_MS),
        "maxConcurrentTasks": get_int(payload, "maxConcurrentTasks", 1, MAX_TASKS_LIMIT),
    }
    metadata = payload.get("metadata")
    if metadata is not None and not isinstance(metadata, dict):
        raise bad_request("'metadata' must be a JSON object", "metadata")
    if metadata is not None:
        try:
            size = len(json.dumps(metadata, allow_nan=False))
        except ValueError:
            raise bad_request("'metadata' holds a number too large to represent", "metadata") from None
        if size > MAX_TEXT:
            raise bad_request(f"'metadata' is larger than {MAX_TEXT} bytes", "metadata")
    fields["metadata"] = metadata
    given = {k: v for k, v in fields.items() if v is not None}
    old = state.agents.get(agent_id)
    base = old or Agent(id=agent_id, name=agent_id, createdAt=now.ms)
    token = None
    if new_token and (base.tokenHash is None or rotate):
        token = f"{agent_id}~{new_token}"
        given["tokenHash"] = token_hash(token)
    agent = base._replace(status="online", lastHeartbeat=now.ms, updatedAt=now.ms, **given)
    was = instance_state(state, agent.instanceId)
    state.put_agent(agent)
    touch_instance(state, now, agent.instanceId, agent.hostname, agent.tailscaleIP)
    if old is not None and old.instanceId != agent.instanceId:
        forget_instance_if_empty(state, old.instanceId)
    note_beat(state, now, agent, was)
    assign_queued(state, now)
    view = render_agent(state, state.agents[agent_id])
    if token:
        view["agentToken"] = token
    return view, old is None


def token_hash(token):
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def agent_of_token(state, token):
    """The agent whose agentToken this is, or None. Agent tokens are '<agent id>~<secret>'."""
    agent = state.agents.get(token.split("~", 1)[0]) if "~" in token else None
    if agent is None or agent.tokenHash is None:
        return None
    return agent.id if hmac.compare_digest(agent.tokenHash, token_hash(token)) else None


def add_audit(state, now, who, address, action, target, detail=""):
    """Record an admin action; the oldest entries go once there are more than AUDIT_LIMIT."""
    state.put_audit(AuditEntry(id=state.next_id("audit", now), at=now.ms, actor=who, address=address,
                               action=action, target=target, detail=detail[:500]))
    while len(state.audit) > AUDIT_LIMIT:
        state.drop_audit(next(iter(state.audit)))


def list_audit(state, now, query):
    limit = query_int(query, "limit", 1, MAX_PAGE, DEFAULT_PAGE)
    return [entry._asdict() for entry in itertools.islice(reversed(state.audit.values()), limit)]


def get_agent(state, agent_id):
    agent = state.agents.get(check_id(agent_id))
    if agent is None:
        raise not_found("agent", agent_id)
    return agent


def deregister_agent(state, now, agent_id):
    """Remove an agent; its unfinished tasks move to other agents, or back to the queue."""
    agent = get_agent(state, agent_id)
    moved = take_offline(state, now, [agent.id])
    for note_id in list(state.inbox.get(agent.id, ())):
        state.drop_notification(note_id)
    state.drop_agent(agent.id)
    forget_instance_if_empty(state, agent.instanceId)
    return {"deleted": agent.id, **moved}


def instance_state(state, instance_id):
    """'new', 'online' or 'offline': where an instance stands before a beat changes it."""
    if instance_id not in state.instances:
        return "new"
    return instance_status(instance_agents(state, instance_id))


def note_beat(state, now, agent, instance_was):
    """Liveness bookkeeping for one beat of an online agent. An instance coming back from offline is online
    at once but on hold (no new work) for ANTI_FLAP_BEATS further on-time beats. Returns True when this
    beat released a hold."""
    state.seen[agent.id] = now.mono
    instance_id = agent.instanceId
    if instance_was == "offline":
        state.hold[instance_id] = [ANTI_FLAP_BEATS, now.mono]
        state.say(logging.INFO, f"instance {instance_id} is back online; new work after {ANTI_FLAP_BEATS} "
                                "more on-time beats", alert="instance.online")
        return False
    hold = state.hold.get(instance_id)
    if hold is None or now.mono - hold[1] < BEAT_SPACING:
        return False
    hold[0] -= 1
    hold[1] = now.mono
    if hold[0] > 0:
        return False
    del state.hold[instance_id]
    state.say(logging.INFO, f"instance {instance_id} is steady again and takes new work")
    return True


def apply_beat(state, now, agent, payload):
    """One beat from one agent: liveness (soft), what it says of itself (soft), and any change to where it
    runs or how often it beats (durable). Returns True when the beat may have made room for queued work."""
    reported = get_str(payload, "status", limit=64)
    state.counters["heartbeats"] += 1
    durable = {
        "instanceId": get_instance_id(payload),
        "hostname": get_str(payload, "hostname"),
        "tailscaleIP": get_ip(payload, "tailscaleIP"),
        "heartbeatInterval": get_int(payload, "heartbeatInterval", MIN_INTERVAL_MS, MAX_INTERVAL_MS),
    }
    durable = {k: v for k, v in durable.items() if v is not None and v != getattr(agent, k)}
    current = get_str(payload, "currentTask", limit=MAX_NAME, default=agent.currentTask)
    if reported == "offline":
        # a clean goodbye: offline at once, and its work moves on
        state.put_agent(agent._replace(status="offline", lastHeartbeat=now.ms, reportedStatus=reported,
                                       updatedAt=now.ms, **durable))
        take_offline(state, now, [agent.id])
        return True
    was = instance_state(state, durable.get("instanceId", agent.instanceId))
    updated = agent._replace(status="online", lastHeartbeat=now.ms, currentTask=current,
                             reportedStatus=reported or agent.reportedStatus, **durable)
    if durable or agent.status != "online":
        state.put_agent(updated._replace(updatedAt=now.ms))
        touch_instance(state, now, updated.instanceId, updated.hostname, updated.tailscaleIP)
        if "instanceId" in durable:
            forget_instance_if_empty(state, agent.instanceId)
    else:
        state.put_agent(updated, record=False)
        state.soft_dirty = True
    released = note_beat(state, now, updated, was)
    return released or agent.status != "online"


def record_heartbeat(state, now, agent_id, payload):
    """POST /api/agents/{id}/heartbeat: the beat, then the answer the agent needs: its tasks, its unread
    notifications, and the tasks it holds but no longer owns (stop)."""
    agent = get_agent(state, agent_id)
    held = held_tasks(payload)
    seen_notes = payload.get("readNotifications")
    seen_notes = [] if seen_notes is None else seen_notes
    if not isinstance(seen_notes, list) or len(seen_notes) > MAX_PAGE:
        raise bad_request("'readNotifications' must be an array of notification ids", "readNotifications")
    for note_id in seen_notes:
        note = state.notifications.get(check_id(note_id, "readNotifications"))
        if note is not None and note.agentId == agent.id:
            mark_read(state, now, note_id)
    if apply_beat(state, now, agent, payload):
        assign_queued(state, now)
    return heartbeat_reply(state, now, agent.id, held)


def record_instance_heartbeat(state, now, instance_id, payload, actor=None):
    """POST /api/instances/{id}/heartbeat: one beat for every agent on the instance (clawagent.py run)."""
    members = list(state.members.get(check_id(instance_id), ()))
    if not members:
        raise not_found("instance", instance_id)
    if actor is not None and actor not in members:
        raise forbidden(f"An agent token may only beat its own instance; {actor} is not on {instance_id}.")
    payload = {k: v for k, v in payload.items() if k in ("status", "hostname", "tailscaleIP", "heartbeatInterval")}
    room = [apply_beat(state, now, state.agents[agent_id], payload) for agent_id in members]
    assigned = assign_queued(state, now) if any(room) else []
    return {"success": True, "instanceId": instance_id, "agents": members, "assigned": assigned,
            "serverTime": now.ms}


def held_tasks(payload):
    """The tasks an agent says it holds: [{id, epoch}] (or bare ids). Returns {task id: epoch or None}."""
    value = payload.get("tasks")
    if value is None:
        return {}
    if not isinstance(value, list) or len(value) > MAX_TASKS_LIMIT:
        raise bad_request(f"'tasks' must be an array of at most {MAX_TASKS_LIMIT} {{id, epoch}} objects", "tasks")
    held = {}
    for item in value:
        if isinstance(item, str):
            item = {"id": item}
        if not isinstance(item, dict):
            raise bad_request("'tasks' entries must be {id, epoch} objects", "tasks")
        held[check_id(item.get("id"), "tasks[].id")] = get_int(item, "epoch", 0, 2 ** 53)
    return held


def heartbeat_reply(state, now, agent_id, held):
    agent = state.agents[agent_id]
    stop = []
    for task_id, epoch in held.items():
        task = state.tasks.get(task_id)
        if (task is None or task.assignedTo != agent_id or task.lane == "cancelled"
                or (epoch is not None and epoch != task.epoch)):
            stop.append(task_id)
    return {
        "success": True,
        "agent": render_agent(state, agent),
        "tasks": [render_task(state, state.tasks[t]) for t in state.active.get(agent_id, ())],
        "notifications": notifications_for(state, agent_id, unread=True, limit=HEARTBEAT_NOTIFICATIONS),
        "stop": stop,
        "serverTime": now.ms,
    }


def notifications_for(state, agent_id, unread=False, limit=None):
    """An agent's notifications, newest first."""
    found = []
    source = state.unread if unread else state.inbox
    for note_id in reversed(source.get(agent_id, {})):
        found.append(state.notifications[note_id]._asdict())
        if limit and len(found) >= limit:
            break
    return found


# --- tasks and assignment ---


def eligible(state, agent):
    """Whether an agent may get new work now: online, on an instance neither drained nor on anti-flap hold,
    with fewer active tasks than its maxConcurrentTasks."""
    if agent.status != "online" or agent.instanceId in state.hold:
        return False
    instance = state.instances.get(agent.instanceId)
    if instance is not None and instance.drained:
        return False
    return len(state.active.get(agent.id, ())) < agent.maxConcurrentTasks


def role_match(task, agent):
    return not task.roles or any(role in agent.roles for role in task.roles)


class Candidates:
    """The eligible agents in assignment order: lowest workload, then best instance health, then (per
    task) the preferred instance, then agent id, so equal candidates are chosen the same way every time.
    Kept sorted as work is handed out, so placing many tasks at once (a failover, a queue pass) costs a
    short search per task instead of a look at every agent."""

    def __init__(self, state, now, exclude=None):
        self.state = state
        self.health = {}
        self.now = now
        self.entries = sorted(self.key(agent) for agent in map(state.agents.__getitem__, state.roomy)
                              if agent.id != exclude and eligible(state, agent))

    def key(self, agent):
        if agent.instanceId not in self.health:
            self.health[agent.instanceId] = health_score(self.state, agent.instanceId, self.now)
        return (agent_load(self.state, agent), -self.health[agent.instanceId], agent.id)

    def pick(self, task):
        """The best agent for task, or None."""
        choice, rank = None, None
        for load, neg_health, agent_id in self.entries:
            agent = self.state.agents[agent_id]
            if rank is not None and (load, neg_health) != rank:
                break
            if not role_match(task, agent):
                continue
            if rank is None:
                choice, rank = agent, (load, neg_health)
            if not task.preferredInstance or agent.instanceId == task.preferredInstance:
                return agent
        return choice

    def place(self, state, now, task, kind="task-assigned", by="bridge", tell_previous=True):
        """Give task to the best agent and keep the order right. Returns the agent, or None."""
        agent = self.pick(task)
        if agent is None:
            return None
        old_key = self.key(agent)
        assign(state, now, task, agent, kind=kind, by=by, tell_previous=tell_previous)
        del self.entries[bisect.bisect_left(self.entries, old_key)]
        if eligible(state, agent):
            bisect.insort(self.entries, self.key(agent))
        return agent

    def __bool__(self):
        return bool(self.entries)


def assign(state, now, task, agent, kind="task-assigned", by=None, lane="assigned", tell_previous=True):
    """Give task to agent: a new epoch, the new assignee told (kind), and (with tell_previous) the old one told
    it lost the task."""
    previous = task.assignedTo
    epoch = task.epoch + 1
    updated = task._replace(assignedTo=agent.id, lane=lane, epoch=epoch, version=task.version + 1,
                            updatedAt=now.ms, history=add_history(task, now, kind, by or agent.id, agent.id))
    state.put_task(updated)
    notify(state, now, agent.id, kind, f"Task {task.id} ({task.title[:80]}) is now yours, epoch {epoch}.", task.id)
    if tell_previous and previous and previous != agent.id and previous in state.agents:
        notify(state, now, previous, "task-revoked",
               f"Task {task.id} was moved to {agent.id}; stop working on it.", task.id)
    return updated


def requeue(state, now, task, event, by=None):
    """Put the task back at the end of the queue, with a new epoch that fences out its former owner."""
    task = task._replace(assignedTo=None, lane="queued", epoch=task.epoch + (1 if task.assignedTo else 0),
                         version=task.version + 1, updatedAt=now.ms, queuedAt=state.tick(now),
                         history=add_history(task, now, event, by or task.assignedTo))
    state.put_task(task)
    return task


def revoke_notice(state, now, task, reason):
    if task.assignedTo and task.assignedTo in state.agents:
        notify(state, now, task.assignedTo, "task-revoked", f"Task {task.id} {reason}; stop working on it.",
               task.id)


def assign_queued(state, now, only=None, exclude=None):
    """Give queued tasks, highest priority and oldest first, to the best eligible agents. Returns the ids of
    the tasks assigned."""
    pool = Candidates(state, now, exclude)
    done = []
    if not pool:
        return done         # nobody has room: do not walk the queue
    for task_id in (only if only is not None else queue_order(state)):
        if not pool:
            break
        task = state.tasks.get(task_id)
        if task is not None and task.lane == "queued" and pool.place(state, now, task):
            done.append(task_id)
    return done


def queue_order(state):
    """Queued task ids, highest priority first and first queued first within a priority."""
    for priority in PRIORITIES:
        yield from list(state.queued[priority])


# --- liveness and failover ---


def take_offline(state, now, agent_ids):
    """Mark agents offline and move their unfinished work: each task goes to the best eligible agent
    elsewhere with a new epoch (a task-reassigned notice to the new owner), or back to the queue when nobody
    fits; each agent gets one task-revoked notice for all it lost (notify_revoked). Returns
    {"reassigned": {task: agent}, "queued": [tasks]}."""
    orphans = []
    for agent_id in agent_ids:
        agent = state.agents[agent_id]
        if agent.status != "offline":
            state.put_agent(agent._replace(status="offline", updatedAt=now.ms))
        state.seen.pop(agent_id, None)
        orphans.extend(state.tasks[t] for t in state.active.get(agent_id, ()))
    orphans.sort(key=lambda t: (t.priority, t.createdAt, t.id))
    pool = Candidates(state, now)
    moved = {"reassigned": {}, "queued": []}
    lost = {}       # agent id -> the ids of the tasks it lost, in the order they were handed on
    for task in orphans:
        lost.setdefault(task.assignedTo, []).append(task.id)
        agent = pool.place(state, now, task, kind="task-reassigned", by="failover", tell_previous=False)
        if agent is not None:
            moved["reassigned"][task.id] = agent.id
            state.counters["reassignments"] += 1
        else:
            state.counters["requeued"] += 1
            requeue(state, now, task, "requeued", "failover")
            moved["queued"].append(task.id)
    for agent_id, task_ids in lost.items():
        notify_revoked(state, now, agent_id, task_ids)
    return moved


def notify_revoked(state, now, agent_id, task_ids):
    """The task-revoked notice of an agent gone offline: one for all the tasks it lost (to other agents or
    back to the queue), as one a task would crowd everything else out of its heartbeats. It names the first
    REVOKED_NAMED of them and carries the task's id (taskId) when there is only one; the heartbeat's stop
    list has every one."""
    named = ", ".join(task_ids[:REVOKED_NAMED])
    if len(task_ids) > REVOKED_NAMED:
        named += f" and {len(task_ids) - REVOKED_NAMED} more"
    what = f"{len(task_ids)} task{'s' if len(task_ids) > 1 else ''}"
    notify(state, now, agent_id, "task-revoked", f"{agent_id} went offline; {what} it held went to other agents "
           f"or back to the queue: {named}. Stop working on them.", task_ids[0] if len(task_ids) == 1 else None)


def rebaseline(state, now):
    """Treat every online agent as heard from now: after a start, or a pause of the bridge itself (a
    suspended VM, a stalled process), so that the bridge's own silence is not blamed on the fleet."""
    for agent in state.agents.values():
        if agent.status == "online":
            state.seen[agent.id] = now.mono
    state.last_sweep = now.mono


def sweep(state, now, force=False):
    """The watchdog's pass: mark instances offline whose silence exceeds their threshold and move their
    work. When most of the fleet is going silent at once (DISRUPTION_SHARE of the online instances, at
    least DISRUPTION_MIN) the fault is more likely the bridge's: nothing is marked or moved until beats
    return, unless force. Returns a report.

    Beats are staggered, so a cut network makes instances pass their thresholds one by one, not in one
    pass. So when any instance expires, every online instance silent for over half its threshold counts as
    going silent: a healthy one never is, as its threshold is at least twice its declared interval."""
    gap = now.mono - state.last_sweep if state.last_sweep is not None else 0.0
    if gap > SWEEP_GAP and not force:
        rebaseline(state, now)
        state.say(logging.WARNING, f"the watchdog was paused for {gap:.1f}s (suspend or stall); liveness "
                                   "restarts from now instead of expiring everyone")
        return {"offline": [], "reassigned": {}, "queued": [], "disruption": state.disruption,
                "rebaselined": True}
    state.last_sweep = now.mono
    online, expired, silent = 0, [], []
    for instance_id in state.instances:
        agents = instance_agents(state, instance_id)
        live = [a for a in agents if a.status == "online"]
        if not live:
            continue
        online += 1
        silence = now.mono - max(state.seen.get(a.id, now.mono) for a in live)
        threshold = instance_threshold(agents, state.offline_after)
        if silence > threshold / 2:
            silent.append(instance_id)
        if silence > threshold:
            expired.append((instance_id, silence, [a.id for a in live]))
    suspect = bool(expired) and len(silent) >= DISRUPTION_MIN and len(silent) >= DISRUPTION_SHARE * online
    if suspect and not force:
        if not state.disruption:
            state.say(logging.WARNING, f"disruption: {len(silent)} of {online} instances went silent at once; "
                                       "suspecting the bridge's own network, marking nothing offline",
                      alert="disruption.start")
        state.disruption = True
        return {"offline": [], "reassigned": {}, "queued": [], "disruption": True, "silent": silent}
    if state.disruption:
        state.say(logging.WARNING, "disruption over: beats are back", alert="disruption.end")
    state.disruption = False
    report = {"offline": [], "reassigned": {}, "queued": [], "disruption": False}
    for instance_id, silence, agent_ids in expired:
        state.hold.pop(instance_id, None)
        flaps = state.flaps.setdefault(instance_id, [])
        flaps[:] = [t for t in flaps if now.mono - t <= FLAP_WINDOW] + [now.mono]
        moved = take_offline(state, now, agent_ids)
        report["offline"].append(instance_id)
        report["reassigned"].update(moved["reassigned"])
        report["queued"].extend(moved["queued"])
        state.counters["instances_offline"] += 1
        state.say(logging.WARNING, f"instance {instance_id} is offline (silent {silence:.0f}s); "
                                   f"{len(moved['reassigned'])} tasks reassigned, {len(moved['queued'])} queued",
                  alert="instance.offline")
    return report


def set_drained(state, now, instance_id, drained):
    """Drain (no new work, keeps its tasks) or undrain an instance."""
    instance = state.instances.get(check_id(instance_id))
    if instance is None:
        raise not_found("instance", instance_id)
    if instance.drained != drained:
        state.put_instance(instance._replace(drained=drained, updatedAt=now.ms))
    if not drained:
        assign_queued(state, now)
    return instance_figures(state, state.instances[instance_id], now)


def finished_before(state, now, cutoff_ms):
    """Done and cancelled tasks last changed before cutoff_ms: what the archive takes out of memory."""
    return [t for t in state.tasks.values() if t.lane in FINISHED_LANES and t.updatedAt < cutoff_ms]


def forget_archived(state, now, archived, read_before_ms):
    """Drop the archived tasks from memory (those unchanged since they were written to the archive), and
    read notifications older than read_before_ms. Returns (tasks dropped, notifications dropped)."""
    dropped = 0
    for task in archived:
        if state.tasks.get(task.id) == task:
            state.drop_task(task.id)
            dropped += 1
    old_notes = [n.id for n in state.notifications.values() if n.read and (n.readAt or 0) < read_before_ms]
    for note_id in old_notes:
        state.drop_notification(note_id)
    return dropped, len(old_notes)


def fleet_figures(state, now):
    """Counts for /metrics."""
    return {
        "agents": collections.Counter(a.status for a in state.agents.values()),
        "instances": collections.Counter(instance_status(instance_agents(state, i)) for i in state.instances),
        "tasks": collections.Counter(t.lane for t in state.tasks.values()),
        "disruption": state.disruption,
        "counters": dict(state.counters),
    }


def sync(state, now, force=False):
    """POST /api/sync: a sweep and an assignment pass now."""
    report = sweep(state, now, force)
    report["assigned"] = assign_queued(state, now)
    return report


def get_task(state, task_id):
    task = state.tasks.get(check_id(task_id))
    if task is None:
        raise not_found("task", task_id)
    return task


def create_task(state, now, payload):
    """A new task: assigned at once to the given agent or the best eligible one, else queued."""
    title = get_str(payload, "title", required=True).strip()
    instance, preferred = get_optional_id(payload, "instanceId"), get_optional_id(payload, "preferredInstance")
    task = Task(
        id=state.next_id("task", now), title=title,
        description=get_str(payload, "description", limit=MAX_TEXT, default=""),
        roles=get_words(payload, "roles", MAX_ROLES), priority=get_priority(payload, DEFAULT_PRIORITY),
        preferredInstance=instance or preferred,
        tags=get_words(payload, "tags", MAX_TAGS), createdAt=now.ms, updatedAt=now.ms,
        history=history_text([[now.ms, "created", None, None]]))
    task = task._replace(queuedAt=state.tick(now))
    lane = get_lane(payload, default="queued")
    target = get_optional_id(payload, "assignedTo")
    force = get_bool(payload, "force")
    if lane in FINISHED_LANES:
        task = task._replace(lane=lane)
        state.put_task(task)
    elif target:
        agent = assignable(state, target, force)
        state.put_task(task)
        task = assign(state, now, task, agent, by="api", lane=lane if lane in ACTIVE_LANES else "assigned")
    else:
        state.put_task(task)
        assign_queued(state, now, only=[task.id])
    return render_task(state, state.tasks[task.id])


def assignable(state, agent_id, force):
    """The agent a client named as assignee, refusing one that is offline or full unless forced."""
    agent = state.agents.get(agent_id)
    if agent is None:
        raise bad_request(f"'assignedTo' names no registered agent ('{agent_id}')", "assignedTo",
                          code="unknown_agent")
    if not force:
        if agent.status != "online":
            raise conflict("agent_offline", f"Agent {agent_id} is offline; pick another agent or send "
                           "\"force\": true.", agent=agent_id)
        if len(state.active.get(agent_id, ())) >= agent.maxConcurrentTasks:
            raise conflict("agent_full", f"Agent {agent_id} already has {agent.maxConcurrentTasks} active tasks; "
                           "pick another agent or send \"force\": true.", agent=agent_id)
    return agent


def update_task(state, now, task_id, payload, if_match=None):
    """PUT: a partial update. assignedTo reassigns (new epoch, both agents told); lane moves the task."""
    task = before = get_task(state, task_id)
    changes = {}
    if "title" in payload:
        changes["title"] = get_str(payload, "title", required=True).strip()
    if "description" in payload:
        changes["description"] = get_str(payload, "description", limit=MAX_TEXT, default="")
    if "roles" in payload:
        changes["roles"] = get_words(payload, "roles", MAX_ROLES)
    if "tags" in payload:
        changes["tags"] = get_words(payload, "tags", MAX_TAGS)
    if "priority" in payload:
        changes["priority"] = get_priority(payload, task.priority)
    if "instanceId" in payload or "preferredInstance" in payload:
        instance, preferred = get_optional_id(payload, "instanceId"), get_optional_id(payload, "preferredInstance")
        changes["preferredInstance"] = preferred if "preferredInstance" in payload else instance
    lane = get_lane(payload)
    force = get_bool(payload, "force")
    reassign = "assignedTo" in payload
    target = get_optional_id(payload, "assignedTo") if reassign else None
    if if_match is not None and if_match.strip() != "*" and if_match.strip() != etag(task):
        raise BridgeError(412, "precondition_failed",
                          "The task changed since you read it (If-Match does not match its ETag); read it again.")
    owner = target if reassign else task.assignedTo
    if lane in ACTIVE_LANES and owner is None:
        raise bad_request(f"lane '{lane}' needs an assignee; give 'assignedTo' too", "lane")
    if lane == "queued" and target:
        raise bad_request("a queued task has no assignee; leave out 'assignedTo' or pick another lane", "lane")
    agent = None
    if target and target != task.assignedTo:
        agent = assignable(state, target, force)
    elif lane in ACTIVE_LANES and task.lane not in ACTIVE_LANES:
        assignable(state, owner, force)     # reopened work goes back to its owner only if it can take it
    if changes:
        note = ",".join(sorted(changes))
        if task.lane == "queued" and changes.get("priority", task.priority) != task.priority:
            changes["queuedAt"] = state.tick(now)       # the end of its new priority's queue
        task = task._replace(version=task.version + 1, updatedAt=now.ms,
                             history=add_history(task, now, "updated", "api", note), **changes)
        state.put_task(task)
    if agent is not None:
        task = assign(state, now, task, agent, by="api", lane=lane if lane in ACTIVE_LANES else "assigned")
    elif reassign and target is None and task.assignedTo:
        revoke_notice(state, now, task, "was unassigned")
        task = requeue(state, now, task, "unassigned", "api")
    if lane and lane != task.lane:
        task = move_lane(state, now, task, lane, "api")
    if task.lane == "queued":
        assign_queued(state, now, only=[task.id])
    elif task.lane in FINISHED_LANES and before.lane in ACTIVE_LANES:
        assign_queued(state, now)       # its agent has room again
    return render_task(state, state.tasks[task.id])


def move_lane(state, now, task, lane, by):
    if lane == "queued":
        revoke_notice(state, now, task, "was put back in the queue")
        return requeue(state, now, task, "requeued", by)
    if lane == "cancelled":
        revoke_notice(state, now, task, "was cancelled")
    task = task._replace(lane=lane, version=task.version + 1, updatedAt=now.ms,
                         history=add_history(task, now, lane, by))
    state.put_task(task)
    return task


def delete_task(state, now, task_id):
    task = get_task(state, task_id)
    if task.lane in ACTIVE_LANES:
        revoke_notice(state, now, task, "was deleted")
    state.drop_task(task.id)
    if task.lane in ACTIVE_LANES:
        assign_queued(state, now)
    return {"deleted": task.id}


def etag(task):
    return f'"{task.id}-v{task.version}"'


# The agent verbs: (lanes the task may be in, lane it moves to).
VERBS = {
    "claim": (("queued", "assigned"), "assigned"),
    "start": (("assigned", "in_progress", "blocked", "review"), "in_progress"),
    "complete": (("assigned", "in_progress", "blocked", "review", "done"), "done"),
    "block": (("assigned", "in_progress", "blocked", "review"), "blocked"),
    "release": (("assigned", "in_progress", "blocked", "review"), "queued"),
}


def agent_verb(state, now, task_id, verb, payload, actor=None):
    """claim, start, complete, block, release: fenced by agentId and epoch. A caller that is not the current
    owner, or holds an old epoch, gets 409 with the current owner and epoch, and the task is untouched."""
    task = get_task(state, task_id)
    agent_id = check_id(payload.get("agentId"), "agentId")
    if actor is not None and actor != agent_id:
        raise forbidden(f"An agent token may only act as its own agent ({actor}).")
    epoch = get_int(payload, "epoch", 0, 2 ** 53)
    if epoch is None:
        raise bad_request("'epoch' is required: send the epoch you were given with the task", "epoch",
                          code="missing_field")
    reason, note, force = (get_str(payload, "reason", limit=MAX_TEXT), get_str(payload, "note", limit=MAX_TEXT),
                           get_bool(payload, "force"))
    agent = get_agent(state, agent_id)
    allowed, target = VERBS[verb]
    claiming_queue = verb == "claim" and task.lane == "queued"
    owner = task.assignedTo
    if epoch != task.epoch or (owner != agent_id and not claiming_queue):
        raise conflict("stale_owner" if owner != agent_id else "stale_epoch",
                       f"Task {task.id} is held by {owner or 'nobody'} at epoch {task.epoch}; you hold epoch "
                       f"{epoch}. Stop working on it.", currentAssignee=owner, currentEpoch=task.epoch)
    if task.lane not in allowed:
        raise conflict("invalid_transition", f"Task {task.id} is {task.lane}; '{verb}' does not apply.",
                       currentAssignee=owner, currentEpoch=task.epoch, lane=task.lane)
    note = reason or note
    if claiming_queue:
        if not eligible(state, agent) and not force:
            raise conflict("agent_full", f"Agent {agent_id} cannot take more work now (offline, drained or "
                           "at maxConcurrentTasks).", agent=agent_id)
        task = assign(state, now, task, agent, by=agent_id)
    elif verb == "release":
        task = requeue(state, now, task, "released", agent_id)
        assign_queued(state, now, only=[task.id], exclude=agent_id)
    elif task.lane != target:
        task = task._replace(lane=target, version=task.version + 1, updatedAt=now.ms,
                             history=add_history(task, now, verb, agent_id, note))
        state.put_task(task)
        if target == "done":
            assign_queued(state, now)
    return render_task(state, state.tasks[task.id])


def list_tasks(state, now, query, archived=None):
    """GET /api/tasks with its filters, over the tasks in memory or, given archived, over those archived
    tasks (as read from the archive files) that are not in memory any more. Returns (page, total)."""
    limit = query_int(query, "limit", 1, MAX_PAGE, DEFAULT_PAGE)
    offset = query_int(query, "offset", 0, 2 ** 31, 0)
    lane = get_lane(query)
    priority = get_priority(query)
    role = query.get("role")
    assignee = query.get("assignedTo")
    instance_id = query.get("instanceId")
    if assignee in ("", "none", "null"):
        assignee = None     # ?assignedTo=none lists the unassigned tasks
    matches = []
    source = state.tasks.values() if archived is None else (t for t in archived if t.id not in state.tasks)
    for task in source:
        if "assignedTo" in query and task.assignedTo != assignee:
            continue
        if ((lane and task.lane != lane) or (priority and task.priority != priority)
                or (role and role not in task.roles)
                or (instance_id and task_instance(state, task) != instance_id)):
            continue
        matches.append(task)
    return [render_task(state, t) for t in matches[offset:offset + limit]], len(matches)


def query_int(query, field, low, high, default):
    value = query.get(field)
    if value is None or value == "":
        return default
    if not re.fullmatch(r"\d{1,10}", value) or not low <= int(value) <= high:
        raise bad_request(f"'{field}' must be a whole number from {low} to {high}", field)
    return int(value)


def list_agents(state, now, query):
    status, role, instance_id = query.get("status"), query.get("role"), query.get("instanceId")
    if status is not None and status not in ("online", "offline"):
        raise bad_request("'status' must be online or offline", "status")
    source = instance_agents(state, instance_id) if instance_id else state.agents.values()
    return [render_agent(state, a) for a in source
            if (not status or a.status == status) and (not role or role in a.roles)]


def create_notification(state, now, payload):
    agent = get_agent(state, check_id(payload.get("agentId"), "agentId"))
    message = get_str(payload, "message", limit=MAX_TEXT, required=True)
    note = Notification(id=state.next_id("ntf", now), agentId=agent.id,
                        type=get_str(payload, "type", limit=64, default="message"),
                        title=get_str(payload, "title", default=""), message=message,
                        taskId=get_optional_id(payload, "taskId"), createdAt=now.ms)
    state.put_notification(note)
    return note._asdict()


def mark_read(state, now, note_id, actor=None):
    note = state.notifications.get(check_id(note_id))
    if note is None:
        raise not_found("notification", note_id)
    if actor is not None and note.agentId != actor:
        raise forbidden("An agent token may only mark its own notifications read.")
    if not note.read:
        note = note._replace(read=True, readAt=now.ms)
        state.put_notification(note)
    return note._asdict()


def list_notifications(state, now, query):
    unread = query_bool(query, "unread")
    agent_id = query.get("agentId")
    if agent_id:
        get_agent(state, agent_id)
        return notifications_for(state, agent_id, unread)
    notes = [n._asdict() for n in reversed(list(state.notifications.values())) if not (unread and n.read)]
    return notes[:MAX_PAGE]


def query_bool(query, field):
    value = query.get(field, "false").lower()
    if value not in ("true", "false", "1", "0", "yes", "no", ""):
        raise bad_request(f"'{field}' must be true or false", field)
    return value in ("true", "1", "yes")


# ===== Service =====


class SystemClock:
    """The real clock. Tests pass their own object with the same now() instead."""

    def now(self):
        return Now(time.monotonic(), int(time.time() * 1000))


class Bridge:
    """The bridge as a service: the state under one lock, its store and its clock. The HTTP layer and the
    background threads talk only to this."""

    def __init__(self, store, state, config, clock=None):
        self.store = store
        self.state = state
        self.config = config
        self.clock = clock or SystemClock()
        self.lock = threading.Lock()
        self.pending = collections.deque()      # (seq, undo) of journal records not yet known on disk
        self.alerts = Alerts(config.webhook_url, config.instance_id)
        self.requests = RequestMetrics()        # filled by the HTTP layer, shown by /metrics
        self.started = self.clock.now()
        state.offline_after = config.offline_after
        rebaseline(state, self.started)     # a restart gives every instance one full threshold

    @classmethod
    def open(cls, config, clock=None, fsync=os.fsync):
        """Lock and load the data dir, then write a snapshot when the state came from a backup copy."""
        store = Store(config.data_dir, fsync)
        collecting = gc.isenabled()
        gc.disable()    # on again only once they are frozen: the first collection would walk all that was loaded
        try:
            state, head = store.open(State)
            gc.freeze()     # the loaded entities live on and hold no cycles: no collection need walk them again
        finally:
            if collecting:
                gc.enable()
        release_free_heap()
        bridge = cls(store, state, config, clock)
        if head.get("origin") == "backup":
            bridge.run(rebase_restored)
            bridge.snapshot()
        return bridge

    def run(self, fn, *args):
        """Call a domain function under the state lock as one transaction: what it changed is journaled, and
        the result is returned once that (and anything the caller saw) is on disk. If the function raises,
        or the disk refuses the change, the change is taken back: a 503 means it did not happen. A call
        that changes nothing durable (a read, a plain heartbeat) works even while storage is failing."""
        with self.lock:
            try:
                result = fn(self.state, self.clock.now(), *args)
            except BaseException:
                self.state.rollback(self.state.take_changes().undo)
                raise
            batch = self.state.take_changes()
            if batch.ops or batch.meta:
                self.persist(batch)
            seq = self.store.journal.appended
            while self.pending and self.pending[0][0] <= self.store.journal.synced:
                self.pending.popleft()
        for level, message, alert in batch.events:
            log.log(level, "%s", message)
            if alert:
                self.alerts.send(alert, message)
        try:
            self.store.wait(seq)
        except OSError:
            log.exception("cannot fsync the journal; refusing writes until a snapshot succeeds")
            self.alerts.send("storage.degraded", "the bridge cannot fsync its journal; changes are refused")
            self.discard_unsynced()
            raise storage_unavailable() from None
        return result

    def persist(self, batch):
        """Append a batch to the journal (under the lock), or take it back and answer 503."""
        if not self.store.healthy:
            self.state.rollback(batch.undo)
            raise storage_unavailable()
        try:
            seq = self.store.append(batch.ops, batch.meta)
        except OSError:
            log.exception("cannot write to the journal; refusing writes until a snapshot succeeds")
            self.alerts.send("storage.degraded", "the bridge cannot write its journal; changes are refused")
            self.state.rollback(batch.undo)
            raise storage_unavailable() from None
        self.pending.append((seq, batch.undo))

    def discard_unsynced(self):
        """After a failed fsync: cut the records that may not be on disk and take back their changes, newest
        first, so memory and disk agree and none of them can reappear at the next start."""
        with self.lock:
            self.take_back_unsynced()

    def take_back_unsynced(self):
        """discard_unsynced, for a caller that holds the lock."""
        synced = self.store.journal.discard_unsynced()
        while self.pending and self.pending[-1][0] > synced:
            self.state.rollback(self.pending.pop()[1])

    def snapshot(self):
        """Write the whole state as a new snapshot, off the request path: only the copy of the maps and the
        journal rotation hold the lock. Also how storage recovers after a failure: the changes that the failed
        journal may not hold are taken back first, as their writers (answered 503) would do once they get the
        lock. Taken back after it, they would be in the snapshot all the same, and the journal would number
        the next records as if they had never been: a restart would skip those."""
        with self.lock:
            failure = self.store.journal.failed
            if failure is not None:
                self.take_back_unsynced()
            seq = self.store.journal.rotate()
            doc = self.state.freeze(seq)
            self.state.soft_dirty = False
        doc["savedAt"] = self.clock.now().ms
        self.store.write_snapshot(doc)
        if failure is not None:
            # memory and disk agree again: everything in memory is in this snapshot
            self.store.journal.recovered(failure)
            self.alerts.send("storage.recovered", "the bridge writes its data again")
        return seq

    def snapshot_due(self):
        changes = self.store.changes_since_snapshot()
        if not self.store.healthy or changes >= snapshot_every(self.state):
            return True
        idle = time.monotonic() - self.store.last_snapshot_at
        return (changes > 0 or self.state.soft_dirty) and idle >= SNAPSHOT_EVERY_SECONDS

    def health(self, detailed):
        healthy = self.store.healthy
        body = {"status": "ok" if healthy else "degraded", "version": __version__}
        if detailed:
            with self.lock:
                state = self.state
                body.update(
                    instanceId=self.config.instance_id,
                    uptimeMs=int((self.clock.now().mono - self.started.mono) * 1000),
                    serverTime=self.clock.now().ms,
                    agents=len(state.agents),
                    agentsOnline=sum(1 for a in state.agents.values() if a.status == "online"),
                    instances=len(state.instances),
                    tasks=len(state.tasks),
                    queued=sum(len(q) for q in state.queued.values()),
                    disruption=state.disruption,
                    watchdogAgeMs=int((self.clock.now().mono - (state.last_sweep or self.started.mono)) * 1000),
                    storage={"writable": healthy, "journalSeq": self.store.journal.appended,
                             "snapshotSeq": self.store.snapshot_seq},
                )
        return (200 if healthy else 503), body

    def archive(self):
        """Move done and cancelled tasks older than ARCHIVE_AFTER_DAYS to the monthly archive files (written
        and fsynced first, outside the lock), then out of memory; prune old read notifications. Memory is
        then bounded by open work, not by history. Returns (tasks archived, notifications pruned)."""
        now = self.clock.now()
        cutoff = now.ms - int(self.config.archive_after_days * 86400000)
        tasks = self.run(finished_before, cutoff)
        if tasks:
            self.store.write_archive(tasks)
        archived, pruned = self.run(forget_archived, tasks, now.ms - int(READ_NOTIFICATION_DAYS * 86400000))
        if archived or pruned:
            log.info("archived %d finished tasks; pruned %d read notifications", archived, pruned)
        return archived, pruned

    def alive(self):
        """Whether systemd's watchdog may be fed: storage writable and the liveness sweep recent."""
        last = self.state.last_sweep
        return self.store.healthy and last is not None and self.clock.now().mono - last < 10 * WATCHDOG_PERIOD

    def close(self):
        """Final snapshot and release of the data dir (SIGTERM path)."""
        try:
            if self.store.healthy:
                self.snapshot()
        finally:
            self.store.close()


def release_free_heap():
    """Give the C heap's free pages back to the system (glibc's malloc_trim), which otherwise keeps what the
    start freed, the compiler's and the loader's working memory, for the life of the process. Where there is
    no glibc (musl, macOS), no ctypes, or no writable and executable memory for it (systemd's
    MemoryDenyWriteExecute=, SELinux: importing ctypes raises MemoryError), nothing happens."""
    try:
        import ctypes       # here, not at the top: only a serving bridge needs it
        ctypes.CDLL(None).malloc_trim(0)
    except (ImportError, OSError, AttributeError, MemoryError):
        pass


def snapshot_every(state):
    """Journal records between two snapshots: SNAPSHOT_EVERY_CHANGES, or a share of the entities held when
    that is more, so that a large state is not written out again every few seconds under load (the journal
    a start replays stays in proportion to the snapshot it reads)."""
    held = len(state.agents) + len(state.instances) + len(state.tasks) + len(state.notifications) + len(state.audit)
    return max(SNAPSHOT_EVERY_CHANGES, int(held * SNAPSHOT_JOURNAL_SHARE))


def rebase_restored(state, now):
    """A bridge starting on a backup copy cannot know which epochs and ids the lost bridge handed out after
    the backup: every epoch (and version, so old ETags fail) jumps by RESTORE_EPOCH_GAP, and the id counter
    by RESTORE_ID_GAP past the clock, which covers a lost bridge that ran ahead of the clock."""
    for task in list(state.tasks.values()):
        # updatedAt stays: an epoch jump is not a change anyone made (and finished tasks still archive on time)
        state.put_task(task._replace(epoch=task.epoch + RESTORE_EPOCH_GAP, version=task.version + RESTORE_EPOCH_GAP))
    state.tick(now)
    state.meta["lastId"] = max(state.meta["lastId"], now.ms) + RESTORE_ID_GAP
    state.meta["restoredAt"] = now.ms
    return None


# ===== HTTP =====


class Principal(NamedTuple):
    """Who is calling: admin (BRIDGE_TOKEN), read (BRIDGE_READ_TOKEN), agent (its own agentToken), or open
    (no BRIDGE_TOKEN is configured, so everyone is admin)."""
    kind: str
    agent_id: Optional[str] = None

    def __str__(self):
        return f"agent:{self.agent_id}" if self.kind == "agent" else self.kind


OPEN, ADMIN, READER = Principal("open"), Principal("admin"), Principal("read")


class Request(NamedTuple):
    method: str
    path: str
    params: dict
    query: dict
    headers: object
    body: Optional[dict]
    who: Optional[Principal]    # None: no valid token (only on open routes)
    actor: Optional[str]        # the agent id the domain must hold an agent caller to; None for the admin
    address: str


def audited(state, now, who, address, action, target, detail, fn, *args):
    """Run an admin action and record it in the audit trail, in one transaction."""
    result = fn(state, now, *args)
    add_audit(state, now, who, address, action, target, detail)
    return result


encode_detail = json.JSONEncoder(ensure_ascii=False).encode     # json.dumps, but made once


def run_audited(bridge, req, action, fn, *args):
    detail = encode_detail(req.body)[:500] if req.body else ""
    return bridge.run(audited, str(req.who), req.address, action, req.params.get("id", ""), detail, fn, *args)


def h_health(bridge, req):
    return bridge.health(detailed=req.who is not None and req.who.kind in ("open", "admin", "read"))


def h_agents_register(bridge, req):
    new_token = secrets.token_urlsafe(24) if bridge.config.token else None   # tokens mean nothing when auth is off
    agent, created = bridge.run(register_agent, require_body(req), req.actor, new_token)
    return (201 if created else 200), agent


def h_agents_list(bridge, req):
    return 200, bridge.run(list_agents, req.query)


def h_agent_get(bridge, req):
    return 200, bridge.run(lambda s, now: render_agent(s, get_agent(s, req.params["id"])))


def h_agent_delete(bridge, req):
    return 200, run_audited(bridge, req, "agent.delete", deregister_agent, req.params["id"])


def h_agent_heartbeat(bridge, req):
    return 200, bridge.run(record_heartbeat, req.params["id"], req.body or {})


def h_agent_tasks(bridge, req):
    def agent_tasks(state, now):
        agent = get_agent(state, req.params["id"])
        return {"agent": render_agent(state, agent),
                "tasks": [render_task(state, state.tasks[t]) for t in state.active.get(agent.id, ())]}
    return 200, bridge.run(agent_tasks)


def h_agent_notifications(bridge, req):
    def agent_notes(state, now):
        return notifications_for(state, get_agent(state, req.params["id"]).id, query_bool(req.query, "unread"))
    return 200, bridge.run(agent_notes)


def h_instances_list(bridge, req):
    return 200, bridge.run(lambda s, now: [instance_figures(s, i, now) for i in s.instances.values()])


def h_instance_get(bridge, req):
    def one(state, now):
        instance = state.instances.get(check_id(req.params["id"]))
        if instance is None:
            raise not_found("instance", req.params["id"])
        return instance_figures(state, instance, now)
    return 200, bridge.run(one)


CAPACITY_FIELDS = ("instanceId", "status", "agentCount", "taskCount", "capacity", "availableCapacity",
                   "healthScore", "drained")


def h_instance_capacities(bridge, req):
    _, instances = h_instances_list(bridge, req)
    return 200, [{k: figures[k] for k in CAPACITY_FIELDS} for figures in instances]


def h_instance_heartbeat(bridge, req):
    return 200, bridge.run(record_instance_heartbeat, req.params["id"], req.body or {}, req.actor)


def h_instance_drain(bridge, req):
    return 200, run_audited(bridge, req, "instance.drain", set_drained, req.params["id"], True)


def h_instance_undrain(bridge, req):
    return 200, run_audited(bridge, req, "instance.undrain", set_drained, req.params["id"], False)


def h_tasks_list(bridge, req):
    archived = bridge.store.read_archives() if query_bool(req.query, "archived") else None   # disk, not locked
    page, total = bridge.run(list_tasks, req.query, archived)
    return 200, page, {"X-Total-Count": str(total)}


def h_tasks_create(bridge, req):
    return 201, bridge.run(create_task, require_body(req))


def h_task_get(bridge, req):
    def one(state, now):
        task = get_task(state, req.params["id"])
        return render_task(state, task), etag(task)
    task, tag = bridge.run(one)
    return 200, task, {"ETag": tag}


def h_task_update(bridge, req):
    task = run_audited(bridge, req, "task.update", update_task, req.params["id"], require_body(req),
                       req.headers.get("If-Match"))
    return 200, task, {"ETag": f'"{task["id"]}-v{task["version"]}"'}


def h_task_delete(bridge, req):
    return 200, run_audited(bridge, req, "task.delete", delete_task, req.params["id"])


def task_verb(verb):
    def handler(bridge, req):
        return 200, bridge.run(agent_verb, req.params["id"], verb, require_body(req), req.actor)
    handler.__name__ = f"h_task_{verb}"
    return handler


def h_notifications_list(bridge, req):
    return 200, bridge.run(list_notifications, req.query)


def h_notifications_create(bridge, req):
    return 201, bridge.run(create_notification, require_body(req))


def h_notification_read(bridge, req):
    return 200, bridge.run(mark_read, req.params["id"], req.actor)


def h_sync(bridge, req):
    body_force, query_force = get_bool(req.body or {}, "force"), query_bool(req.query, "force")
    force = body_force or query_force
    report = run_audited(bridge, req, "sync.force", sync, True) if force else bridge.run(sync, False)
    try:
        report["snapshotSeq"] = bridge.snapshot()
    except OSError:
        log.exception("POST /api/sync: cannot write the snapshot")
        raise BridgeError(503, "storage_unavailable", "The sweep ran but the snapshot could not be written; "
                          "check the bridge log and free disk space, then retry.") from None
    return 200, {"success": True, **report}


def h_audit(bridge, req):
    return 200, bridge.run(list_audit, req.query)


def h_openapi(bridge, req):
    return 200, OPENAPI


def h_metrics(bridge, req):
    return 200, render_metrics(bridge).encode(), {"Content-Type": PROMETHEUS_TYPE}


PROMETHEUS_TYPE = "text/plain; version=0.0.4; charset=utf-8"
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class RequestMetrics:
    """Request counts and a latency histogram per route, since the start."""

    def __init__(self):
        self.lock = threading.Lock()
        self.counts = collections.Counter()     # (method, route, status) -> requests
        self.latency = {}                       # route -> [count per bucket..., count above, sum, count]

    def observe(self, method, route, status, seconds):
        with self.lock:
            self.counts[(method, route, status)] += 1
            row = self.latency.setdefault(route, [0] * (len(LATENCY_BUCKETS) + 3))
            row[bisect.bisect_left(LATENCY_BUCKETS, seconds)] += 1
            row[-2] += seconds
            row[-1] += 1

    def copy(self):
        with self.lock:
            return dict(self.counts), {route: list(row) for route, row in self.latency.items()}


def prometheus_labels(labels):
    def escape(value):
        return str(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    return "{" + ",".join(f'{k}="{escape(v)}"' for k, v in labels.items()) + "}" if labels else ""


def metric(lines, name, kind, help_text, samples):
    """Append one metric family in the Prometheus text format; samples are (name suffix, labels, value)."""
    lines.append(f"# HELP {name} {help_text}")
    lines.append(f"# TYPE {name} {kind}")
    lines.extend(f"{name}{suffix}{prometheus_labels(labels)} {value}" for suffix, labels, value in samples)


def histogram_samples(latency):
    for route, row in sorted(latency.items()):
        for bound, running in zip(LATENCY_BUCKETS, itertools.accumulate(row[:len(LATENCY_BUCKETS)])):
            yield "_bucket", {"route": route, "le": f"{bound:g}"}, running
        yield "_bucket", {"route": route, "le": "+Inf"}, row[-1]
        yield "_sum", {"route": route}, round(row[-2], 6)
        yield "_count", {"route": route}, row[-1]


COUNTERS = (("heartbeats", "Agent beats received (an instance beat counts each of its agents)."),
            ("reassignments", "Tasks moved to another agent by failover."),
            ("requeued", "Tasks put back in the queue by failover."),
            ("instances_offline", "Times an instance was marked offline."))


def render_metrics(bridge):
    """GET /metrics: the fleet, the bridge's own work, its requests and its storage."""
    fleet = bridge.run(fleet_figures)
    counts, latency = bridge.requests.copy()
    journal = bridge.store.journal
    lines = []
    metric(lines, "clawbridge_build_info", "gauge", "Version of the running bridge.",
           [("", {"version": __version__, "python": sys.version.split()[0]}, 1)])
    metric(lines, "clawbridge_uptime_seconds", "gauge", "Seconds since the bridge started.",
           [("", {}, round(bridge.clock.now().mono - bridge.started.mono, 3))])
    metric(lines, "clawbridge_agents", "gauge", "Agents by status.",
           [("", {"status": k}, fleet["agents"].get(k, 0)) for k in ("online", "offline")])
    metric(lines, "clawbridge_instances", "gauge", "Instances by status.",
           [("", {"status": k}, fleet["instances"].get(k, 0)) for k in ("online", "offline")])
    metric(lines, "clawbridge_tasks", "gauge", "Tasks in memory by lane.",
           [("", {"lane": lane}, fleet["tasks"].get(lane, 0)) for lane in LANES])
    metric(lines, "clawbridge_disruption", "gauge", "1 while the bridge suspects its own network.",
           [("", {}, int(fleet["disruption"]))])
    for name, text in COUNTERS:
        metric(lines, f"clawbridge_{name}_total", "counter", text, [("", {}, fleet["counters"].get(name, 0))])
    metric(lines, "clawbridge_http_requests_total", "counter", "HTTP requests by method, route and status.",
           [("", {"method": m, "route": r, "status": s}, n) for (m, r, s), n in sorted(counts.items())])
    metric(lines, "clawbridge_http_request_duration_seconds", "histogram", "Time to answer a request, by route.",
           histogram_samples(latency))
    metric(lines, "clawbridge_storage_writable", "gauge", "1 while the data dir accepts writes.",
           [("", {}, int(bridge.store.healthy))])
    metric(lines, "clawbridge_journal_bytes", "gauge", "Bytes of journal kept on disk.",
           [("", {}, bridge.store.journal_bytes())])
    metric(lines, "clawbridge_journal_seq", "gauge", "Sequence number of the last journal record.",
           [("", {}, journal.appended)])
    metric(lines, "clawbridge_journal_fsyncs_total", "counter", "fsync calls on the journal.",
           [("", {}, journal.fsync_count)])
    metric(lines, "clawbridge_journal_fsync_seconds_total", "counter",
           "Time spent in journal fsyncs (with the write of the records each one covers).",
           [("", {}, round(journal.fsync_seconds, 6))])
    metric(lines, "clawbridge_webhooks_total", "counter", "Alerts to BRIDGE_WEBHOOK_URL by outcome.",
           [("", {"result": k}, bridge.alerts.counts.get(k, 0)) for k in ("sent", "failed", "dropped")])
    return "\n".join(lines) + "\n"


# Who may call what (checked by authorize()):
#   open      anyone, no token needed
#   read      the admin and the read token
#   tasks     the admin, the read token, and any agent
#   self      the admin; the read token (GET); an agent for its own {id}
#   agent     the admin; an agent for itself (the domain checks whose task, notification or instance it is)
#   register  the admin; an agent re-registering itself
#   admin     the admin only
ROUTES = [
    ("GET", "/health", h_health, "open"),
    ("POST", "/api/agents/register", h_agents_register, "register"),
    ("GET", "/api/agents", h_agents_list, "read"),
    ("GET", "/api/agents/{id}", h_agent_get, "self"),
    ("DELETE", "/api/agents/{id}", h_agent_delete, "admin"),
    ("POST", "/api/agents/{id}/heartbeat", h_agent_heartbeat, "self"),
    ("GET", "/api/agents/{id}/tasks", h_agent_tasks, "self"),
    ("GET", "/api/agents/{id}/notifications", h_agent_notifications, "self"),
    ("GET", "/api/instances", h_instances_list, "read"),
    ("GET", "/api/instances/capacities", h_instance_capacities, "read"),
    ("GET", "/api/instances/{id}", h_instance_get, "read"),
    ("POST", "/api/instances/{id}/heartbeat", h_instance_heartbeat, "agent"),
    ("POST", "/api/instances/{id}/drain", h_instance_drain, "admin"),
    ("POST", "/api/instances/{id}/undrain", h_instance_undrain, "admin"),
    ("GET", "/api/tasks", h_tasks_list, "tasks"),
    ("POST", "/api/tasks", h_tasks_create, "admin"),
    ("GET", "/api/tasks/{id}", h_task_get, "tasks"),
    ("PUT", "/api/tasks/{id}", h_task_update, "admin"),
    ("DELETE", "/api/tasks/{id}", h_task_delete, "admin"),
    *[("POST", f"/api/tasks/{{id}}/{verb}", task_verb(verb), "agent") for verb in VERBS],
    ("GET", "/api/notifications", h_notifications_list, "read"),
    ("POST", "/api/notifications", h_notifications_create, "admin"),
    ("PUT", "/api/notifications/{id}/read", h_notification_read, "agent"),
    ("POST", "/api/sync", h_sync, "admin"),
    ("GET", "/api/audit", h_audit, "admin"),
    ("GET", "/openapi.json", h_openapi, "open"),
    ("GET", "/metrics", h_metrics, "read"),
]


# --- the API description (GET /openapi.json), made from ROUTES and the schemas below ---


def nullable(schema):
    return {"anyOf": [schema, {"type": "null"}]}


def obj(required=(), **properties):
    schema = {"type": "object", "properties": properties}
    if required:
        schema["required"] = list(required)
    return schema


def ref(name):
    return {"$ref": f"#/components/schemas/{name}"}


def array(items, limit=None):
    schema = {"type": "array", "items": items}
    if limit:
        schema["maxItems"] = limit
    return schema


def text(limit=MAX_NAME, nonblank=False):
    schema = {"type": "string", "maxLength": limit}
    if nonblank:
        schema["pattern"] = r"[^\s\x1c-\x1f\x85]"     # what str.strip() leaves
    return schema


ID_SCHEMA = {"type": "string", "pattern": f"^{ID_PATTERN.pattern}$"}
INT, NUM, BOOL, STR = {"type": "integer"}, {"type": "number"}, {"type": "boolean"}, {"type": "string"}
MS = {"type": "integer", "description": "Unix epoch milliseconds"}
WORDS = {"anyOf": [array({"type": "string", "maxLength": 64}, MAX_ROLES),
                   {"type": "string", "pattern": f"^[^,]{{0,64}}(,[^,]{{0,64}}){{0,{MAX_ROLES - 1}}}$"},
                   {"type": "null"}]}
IP = {"anyOf": [{"type": "string", "format": "ipv4"}, {"type": "string", "format": "ipv6"},
                {"type": "string", "maxLength": 0}, {"type": "null"}]}
LANE_NAMES = {"type": "string", "enum": list(LANES) + list(LANE_ALIASES)}
INTERVAL = nullable({"type": "integer", "minimum": MIN_INTERVAL_MS, "maximum": MAX_INTERVAL_MS})
EPOCH = {"type": "integer", "minimum": 0, "maximum": 2 ** 53}
BOOL_TEXT = {"type": "string", "pattern": "^([Tt][Rr][Uu][Ee]|[Ff][Aa][Ll][Ss][Ee]|[Yy][Ee][Ss]|[Nn][Oo]|1|0)?$"}
EMPTY = {"type": "string", "maxLength": 0}      # ?limit= and the like: the same as leaving the parameter out


def or_empty(schema):
    return {"anyOf": [schema, EMPTY]}


SCHEMAS = {
    "Error": obj(["error"], error=obj(["code", "message"], code=STR, message=STR, field=STR),
                 currentAssignee=nullable(STR), currentEpoch=INT),
    "Health": obj(["status", "version"], status={"type": "string", "enum": ["ok", "degraded"]}, version=STR),
    "Agent": obj(
        ["id", "status", "activeTasks"], id=ID_SCHEMA, name=STR, emoji=STR, roles=array(STR), model=STR,
        workspace=STR, instanceId=ID_SCHEMA, hostname=STR, tailscaleIP=nullable(STR),
        heartbeatInterval=nullable(INT), maxConcurrentTasks=INT, metadata=nullable({"type": "object"}),
        status={"type": "string", "enum": ["online", "offline"]}, reportedStatus=nullable(STR),
        currentTask=nullable(STR), lastHeartbeat=nullable(MS), createdAt=MS, updatedAt=MS,
        activeTasks=array(ID_SCHEMA), workload=NUM, agentToken=STR),
    "Task": obj(
        ["id", "title", "lane", "epoch"], id=ID_SCHEMA, title=STR, description=STR, roles=array(STR),
        priority={"type": "string", "enum": list(PRIORITIES)}, lane={"type": "string", "enum": list(LANES)},
        assignedTo=nullable(ID_SCHEMA), instanceId=nullable(ID_SCHEMA), preferredInstance=nullable(ID_SCHEMA),
        tags=array(STR), epoch=INT, version=INT, createdAt=MS, updatedAt=MS, queuedAt=INT,
        history=array(obj(["at", "event"], at=MS, event=STR, by=nullable(STR), note=nullable(STR)))),
    "Notification": obj(["id", "agentId", "type", "read"], id=ID_SCHEMA, agentId=ID_SCHEMA, type=STR, title=STR,
                        message=STR, taskId=nullable(ID_SCHEMA), read=BOOL, createdAt=MS, readAt=nullable(MS)),
    "Capacity": obj(["instanceId", "availableCapacity", "healthScore"], instanceId=ID_SCHEMA,
                    status={"type": "string", "enum": ["online", "offline"]}, agentCount=INT, taskCount=INT,
                    capacity=INT, availableCapacity={"type": "integer", "minimum": 0},
                    healthScore={"type": "integer", "minimum": 0, "maximum": 100}, drained=BOOL),
    "AuditEntry": obj(["id", "at", "actor", "action"], id=STR, at=MS, actor=STR, address=STR, action=STR,
                      target=STR, detail=STR),
    "RegisterRequest": obj(
        ["id"], id={**ID_SCHEMA, "not": {"enum": sorted(RESERVED_IDS["agents"])}}, name=nullable(text()),
        emoji=nullable(text(16)), roles=WORDS, model=nullable(text()), workspace=nullable(text(1024)),
        instanceId=nullable({**ID_SCHEMA, "not": {"enum": sorted(RESERVED_IDS["instances"])}}),
        hostname=nullable(text()), tailscaleIP=IP, heartbeatInterval=INTERVAL,
        maxConcurrentTasks=nullable({"type": "integer", "minimum": 1, "maximum": MAX_TASKS_LIMIT}),
        metadata=nullable({"type": "object"}), rotateToken=BOOL),
    "HeartbeatRequest": obj(
        status=nullable(text(64)), currentTask=nullable(text()),
        instanceId=nullable({**ID_SCHEMA, "not": {"enum": sorted(RESERVED_IDS["instances"])}}),
        hostname=nullable(text()), tailscaleIP=IP, heartbeatInterval=INTERVAL,
        tasks=nullable(array({"anyOf": [ID_SCHEMA, obj(["id"], id=ID_SCHEMA, epoch=nullable(EPOCH))]},
                             MAX_TASKS_LIMIT)),
        readNotifications=nullable(array(ID_SCHEMA, MAX_PAGE))),
    "TaskCreate": obj(
        ["title"], title=text(nonblank=True), description=nullable(text(MAX_TEXT)), roles=WORDS,
        priority=nullable({"type": "string", "enum": list(PRIORITIES)}), lane=nullable(LANE_NAMES),
        assignedTo=nullable(ID_SCHEMA), force=BOOL, tags=WORDS, instanceId=nullable(ID_SCHEMA),
        preferredInstance=nullable(ID_SCHEMA)),
    "TaskUpdate": obj(
        title=text(nonblank=True), description=nullable(text(MAX_TEXT)), roles=WORDS, tags=WORDS,
        priority=nullable({"type": "string", "enum": list(PRIORITIES)}), lane=nullable(LANE_NAMES),
        assignedTo=nullable(ID_SCHEMA), force=BOOL, instanceId=nullable(ID_SCHEMA),
        preferredInstance=nullable(ID_SCHEMA)),
    "VerbRequest": obj(["agentId", "epoch"], agentId=ID_SCHEMA, epoch=EPOCH, reason=nullable(text(MAX_TEXT)),
                       note=nullable(text(MAX_TEXT)), force=BOOL),
    "NotificationCreate": obj(["agentId", "message"], agentId=ID_SCHEMA, message=text(MAX_TEXT, nonblank=True),
                              type=nullable(text(64)), title=nullable(text()), taskId=nullable(ID_SCHEMA)),
    "InstanceHeartbeatRequest": obj(status=nullable(text(64)), hostname=nullable(text()), tailscaleIP=IP,
                                    heartbeatInterval=INTERVAL),
    "SyncRequest": obj(force=BOOL),
}
INSTANCE_VIEW = obj(["instanceId", "status", "agentCount"], **SCHEMAS["Capacity"]["properties"],
                    hostname=STR, tailscaleIP=nullable(STR), onlineAgents=INT, lastHeartbeat=nullable(MS),
                    hold=BOOL, offlineAfterMs=INT, createdAt=MS, updatedAt=MS)

# per operation: (summary, request body schema or None, body required, success status, reply schema, query)
QUERY = {
    "agents": {"instanceId": STR, "role": STR, "status": {"type": "string", "enum": ["online", "offline"]}},
    "tasks": {"archived": BOOL_TEXT, "limit": or_empty({"type": "integer", "minimum": 1, "maximum": MAX_PAGE}),
              "offset": or_empty({"type": "integer", "minimum": 0, "maximum": 2 ** 31}), "assignedTo": STR,
              "instanceId": STR, "lane": LANE_NAMES, "priority": {"type": "string", "enum": list(PRIORITIES)},
              "role": STR},
    "notes": {"agentId": or_empty(ID_SCHEMA), "unread": BOOL_TEXT},
    "unread": {"unread": BOOL_TEXT},
    "limit": {"limit": or_empty({"type": "integer", "minimum": 1, "maximum": MAX_PAGE})},
    "force": {"force": BOOL_TEXT},
}
OPERATIONS = {
    "GET /health": ("Liveness of the bridge and its storage", None, False, 200, ref("Health"), {}),
    "POST /api/agents/register": ("Register or update an agent", "RegisterRequest", True, 201, ref("Agent"), {}),
    "GET /api/agents": ("List agents", None, False, 200, array(ref("Agent")), QUERY["agents"]),
    "GET /api/agents/{id}": ("One agent", None, False, 200, ref("Agent"), {}),
    "DELETE /api/agents/{id}": ("Deregister an agent; its work moves on", None, False, 200,
                                obj(["deleted"], deleted=ID_SCHEMA, reassigned={"type": "object"},
                                    queued=array(ID_SCHEMA)), {}),
    "POST /api/agents/{id}/heartbeat": ("One beat of one agent", "HeartbeatRequest", False, 200,
                                        obj(["success", "agent", "tasks", "notifications", "stop", "serverTime"],
                                            success=BOOL, agent=ref("Agent"), tasks=array(ref("Task")),
                                            notifications=array(ref("Notification")), stop=array(ID_SCHEMA),
                                            serverTime=MS), {}),
    "GET /api/agents/{id}/tasks": ("An agent's unfinished tasks", None, False, 200,
                                   obj(["agent", "tasks"], agent=ref("Agent"), tasks=array(ref("Task"))), {}),
    "GET /api/agents/{id}/notifications": ("An agent's notifications, newest first", None, False, 200,
                                           array(ref("Notification")), QUERY["unread"]),
    "GET /api/instances": ("List instances", None, False, 200, array(INSTANCE_VIEW), {}),
    "GET /api/instances/capacities": ("Capacity and health per instance", None, False, 200,
                                      array(ref("Capacity")), {}),
    "GET /api/instances/{id}": ("One instance", None, False, 200, INSTANCE_VIEW, {}),
    "POST /api/instances/{id}/heartbeat": ("One beat for every agent on an instance", "InstanceHeartbeatRequest",
                                           False, 200, obj(["success", "instanceId", "agents"], success=BOOL,
                                                           instanceId=ID_SCHEMA, agents=array(ID_SCHEMA),
                                                           assigned=array(ID_SCHEMA), serverTime=MS), {}),
    "POST /api/instances/{id}/drain": ("Stop new work going to an instance", None, False, 200, INSTANCE_VIEW, {}),
    "POST /api/instances/{id}/undrain": ("Let new work go to an instance again", None, False, 200,
                                         INSTANCE_VIEW, {}),
    "GET /api/tasks": ("List tasks", None, False, 200, array(ref("Task")), QUERY["tasks"]),
    "POST /api/tasks": ("Create a task; assigned at once when an agent has room", "TaskCreate", True, 201,
                        ref("Task"), {}),
    "GET /api/tasks/{id}": ("One task, with an ETag", None, False, 200, ref("Task"), {}),
    "PUT /api/tasks/{id}": ("Change a task; assignedTo moves it", "TaskUpdate", True, 200, ref("Task"), {}),
    "DELETE /api/tasks/{id}": ("Delete a task", None, False, 200, obj(["deleted"], deleted=ID_SCHEMA), {}),
    **{f"POST /api/tasks/{{id}}/{verb}": (f"Agent verb '{verb}', fenced by agentId and epoch", "VerbRequest",
                                           True, 200, ref("Task"), {}) for verb in VERBS},
    "GET /api/notifications": ("List notifications, newest first", None, False, 200, array(ref("Notification")),
                               QUERY["notes"]),
    "POST /api/notifications": ("Send a notification to an agent", "NotificationCreate", True, 201,
                                ref("Notification"), {}),
    "PUT /api/notifications/{id}/read": ("Mark a notification read", None, False, 200, ref("Notification"), {}),
    "POST /api/sync": ("Sweep, assign and snapshot now", "SyncRequest", False, 200,
                       obj(["success"], success=BOOL, offline=array(ID_SCHEMA), reassigned={"type": "object"},
                           queued=array(ID_SCHEMA), assigned=array(ID_SCHEMA), disruption=BOOL,
                           snapshotSeq=INT), QUERY["force"]),
    "GET /api/audit": ("The audit trail, newest first", None, False, 200, array(ref("AuditEntry")),
                       QUERY["limit"]),
    "GET /openapi.json": ("This description", None, False, 200, {"type": "object"}, {}),
    "GET /metrics": ("Prometheus metrics (text format 0.0.4)", None, False, 200, {"type": "string"}, {}),
}


def error_statuses(method, pattern, rule, body_required):
    """Every error status an operation can answer, from what the HTTP layer and its route do."""
    codes = {400, 411, 413, 414, 431, 503}
    if rule != "open":
        codes |= {401, 403, 429}
    if "{id}" in pattern or pattern in ("/api/notifications", "/api/agents/register") or method == "POST":
        codes.add(404)
    if pattern.startswith("/api/tasks") and method in ("POST", "PUT"):
        codes.add(409)
    if method == "PUT" and pattern == "/api/tasks/{id}":
        codes.add(412)
    if pattern == "/api/agents/{id}":
        codes.add(405)      # /api/agents/register is POST only
    return sorted(codes)


def build_openapi():
    """The OpenAPI 3.1 description, one operation per ROUTES row."""
    paths = {}
    for method, pattern, _, rule in ROUTES:
        summary, body, body_required, status, reply, query = OPERATIONS[f"{method} {pattern}"]
        media = PROMETHEUS_TYPE.split(";")[0] if pattern == "/metrics" else "application/json"
        operation = {"summary": summary, "operationId": f"{method.lower()}{re.sub(r'[^A-Za-z]+', '_', pattern)}",
                     "responses": {str(status): {"description": "OK", "content": {media: {"schema": reply}}}}}
        if method == "POST" and pattern == "/api/agents/register":
            operation["responses"]["200"] = operation["responses"]["201"]
        if rule == "open":
            operation["security"] = []
        reserved = RESERVED_IDS.get(pattern.split("/")[2]) if pattern.startswith("/api/") else None
        id_schema = {**ID_SCHEMA, "not": {"enum": sorted(reserved)}} if reserved else ID_SCHEMA
        parameters = [{"name": "id", "in": "path", "required": True, "schema": id_schema}] if "{id}" in pattern else []
        parameters += [{"name": name, "in": "query", "required": False, "schema": schema}
                       for name, schema in query.items()]
        if method == "PUT" and pattern == "/api/tasks/{id}":
            parameters.append({"name": "If-Match", "in": "header", "required": False, "schema": STR})
        if parameters:
            operation["parameters"] = parameters
        if body:
            operation["requestBody"] = {"required": body_required,
                                        "content": {"application/json": {"schema": ref(body)}}}
        for code in error_statuses(method, pattern, rule, body_required):
            operation["responses"][str(code)] = {"description": http.HTTPStatus(code).phrase,
                                                 "content": {"application/json": {"schema": ref("Error")}}}
        if pattern == "/health":
            operation["responses"]["503"] = {
                "description": "Storage unavailable (degraded), or the connection limit was reached (busy)",
                "content": {"application/json": {"schema": {"anyOf": [ref("Health"), ref("Error")]}}}}
        paths.setdefault(pattern, {})[method.lower()] = operation
    return {
        "openapi": "3.1.0",
        "info": {"title": "clawbridge", "version": __version__,
                 "description": "The central bridge for a fleet of OpenClaw agents. Times are Unix epoch "
                                "milliseconds; lists are bare arrays; errors share one shape."},
        "components": {"schemas": SCHEMAS,
                       "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}},
        "security": [{"bearer": []}],
        "paths": paths,
    }


def split_path(path):
    path = path.strip("/")
    if not path:
        return []
    parts = path.split("/")
    return [urllib.parse.unquote(part) for part in parts] if "%" in path else parts


class Route(NamedTuple):
    handler: object
    params: dict
    rule: str
    pattern: str    # the route's label in /metrics


LEAF, PARAM = 0, 1      # tree keys that no path segment (always a str) can equal


def route_tree(routes):
    """ROUTES as a tree of path segments: {segment: subtree}, PARAM -> (parameter name, subtree) for a
    parameter segment, and LEAF -> {method: (handler, rule, pattern)} where a pattern ends."""
    tree = {}
    for method, pattern, handler, rule in routes:
        node = tree
        for part in split_path(pattern):
            if part.startswith("{"):
                name, node = node.setdefault(PARAM, (part[1:-1], {}))
                if name != part[1:-1]:
                    raise ValueError(f"{pattern}: another route names this parameter {{{name}}}")
            else:
                node = node.setdefault(part, {})
        node.setdefault(LEAF, {})[method] = (handler, rule, pattern)
    return tree


ROUTE_TREE = route_tree(ROUTES)
OPENAPI = build_openapi()


def match_route(node, parts, params):
    """The leaf of the most literal pattern matching parts: a literal segment is tried before a parameter,
    so /api/agents/register wins over /api/agents/{id}."""
    if not parts:
        return node.get(LEAF)
    literal = node.get(parts[0])
    if literal is not None:
        leaf = match_route(literal, parts[1:], params)
        if leaf is not None:
            return leaf
    if PARAM in node:
        name, child = node[PARAM]
        leaf = match_route(child, parts[1:], params)
        if leaf is not None:
            params[name] = parts[0]
            return leaf
    return None


def resolve(method, path):
    """Find the Route for a request; a path that matches with another method only is 405."""
    params = {}
    leaf = match_route(ROUTE_TREE, split_path(path), params)
    if leaf is None:
        raise BridgeError(404, "not_found", "No endpoint at this path; see README.md for the API.")
    found = leaf.get(method) or (leaf.get("GET") if method == "HEAD" else None)
    if found is not None:
        return Route(found[0], params, found[1], found[2])
    allowed = sorted(set(leaf) | ({"HEAD"} if "GET" in leaf else set()))
    raise BridgeError(405, "method_not_allowed", f"{method} is not allowed here; use {', '.join(allowed)}.",
                      headers={"Allow": ", ".join(allowed)})


def require_body(req):
    if req.body is None:
        if req.headers.get("Content-Length") is not None:
            raise bad_request("This request needs a JSON object body; the body was empty.", code="missing_body")
        raise BridgeError(411, "length_required",
                          "This request needs a JSON body with a Content-Length header.")
    return req.body


def reject_constant(name):
    raise ValueError(f"{name} is not valid JSON")


decode_body = json.JSONDecoder(parse_constant=reject_constant).decode     # made once, not per request


def parse_json_body(raw):
    """Decode a request body: UTF-8, JSON, an object, no NaN/Infinity, nested at most MAX_JSON_DEPTH deep."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise bad_request("The body is not valid UTF-8.", code="invalid_json") from None
    try:
        value = decode_body(text)
    except RecursionError:
        raise bad_request(f"The JSON body is nested deeper than {MAX_JSON_DEPTH} levels.",
                          code="invalid_json") from None
    except ValueError as exc:
        raise bad_request(f"The body is not valid JSON: {exc}.", code="invalid_json") from None
    if raw.count(b"[") + raw.count(b"{") > MAX_JSON_DEPTH and json_depth(value) > MAX_JSON_DEPTH:
        raise bad_request(f"The JSON body is nested deeper than {MAX_JSON_DEPTH} levels.", code="invalid_json")
    if not isinstance(value, dict):
        raise bad_request("The body must be a JSON object.", code="invalid_json")
    return value


def json_depth(value):
    depth, level = 0, [(value, 1)]
    while level:
        item, d = level.pop()
        depth = max(depth, d)
        if isinstance(item, dict):
            level.extend((v, d + 1) for v in item.values())
        elif isinstance(item, list):
            level.extend((v, d + 1) for v in item)
    return depth


def authenticate(config, state, authorization):
    """The Principal a bearer token stands for, or None for a missing or unknown one. Secrets are compared
    in constant time. Reads one agent record without the state lock: a dict lookup of an immutable entity."""
    if not config.token:
        return OPEN
    scheme, _, given = (authorization or "").partition(" ")
    given = given.strip().encode("utf-8", "replace")
    if scheme.lower() != "bearer" or not given:
        return None
    if hmac.compare_digest(given, config.token.encode()):
        return ADMIN
    if config.read_token and hmac.compare_digest(given, config.read_token.encode()):
        return READER
    agent_id = agent_of_token(state, given.decode("utf-8", "replace"))
    return Principal("agent", agent_id) if agent_id else None


AGENT_ACTIONS = ("self", "agent")   # rules whose POSTs are an agent's own business


def authorize(rule, who, method, params, config):
    """Whether who may call a route with this access rule (see ROUTES); raises 403. Returns the agent id
    the domain must hold the caller to, or None when the caller may act for anyone."""
    if rule == "open" or who.kind == "open":
        return None
    if who.kind == "read":
        if method in ("GET", "HEAD") and rule in ("read", "tasks", "self"):
            return None
        raise forbidden("The read token may only read (GET); use BRIDGE_TOKEN for changes.")
    if who.kind == "admin":
        if config.require_agent_tokens and rule in AGENT_ACTIONS and method != "GET":
            raise forbidden("Agent actions need the agent's own token (BRIDGE_REQUIRE_AGENT_TOKENS is on); "
                            "register the agent to get one.")
        return None
    if rule in ("tasks", "agent", "register") or (rule == "self" and params.get("id") == who.agent_id):
        return who.agent_id
    raise forbidden(f"An agent token may only beat, read and act for its own agent ({who.agent_id}).")


class AuthThrottle:
    """Slows down guessing: AUTH_FAILURES failed authentications from one address within AUTH_WINDOW lock
    that address out of authenticated routes for AUTH_LOCKOUT seconds (429). Other addresses are not
    affected; at most AUTH_TRACKED addresses are remembered."""

    def __init__(self):
        self.lock = threading.Lock()
        self.failures = collections.OrderedDict()   # address -> recent failure times
        self.locked = {}                            # address -> lockout end

    def retry_after(self, address, now):
        """Seconds the address must still wait, 0 when it may try."""
        if address not in self.locked:      # the usual case, known without the lock
            return 0
        with self.lock:
            until = self.locked.get(address, 0)
            if until <= now:
                self.locked.pop(address, None)
                return 0
            return until - now

    def failed(self, address, now):
        with self.lock:
            times = [t for t in self.failures.pop(address, ()) if now - t < AUTH_WINDOW] + [now]
            self.failures[address] = times
            if len(times) >= AUTH_FAILURES:
                self.locked[address] = now + AUTH_LOCKOUT
                del self.failures[address]
            while len(self.failures) > AUTH_TRACKED:
                self.failures.popitem(last=False)
            if len(self.locked) > AUTH_TRACKED:
                self.locked = {a: t for a, t in self.locked.items() if t > now}


def redact(text, config):
    """Text for the log with every secret taken out: the configured tokens and anything shaped like an
    agent token (id~secret)."""
    for secret in (config.token, config.read_token):
        if secret:
            text = text.replace(secret, "[redacted]")
    return AGENT_TOKEN_SHAPE.sub("~[redacted]", text)


AGENT_TOKEN_SHAPE = re.compile(r"~[A-Za-z0-9_-]{8,}")


# made once, not per reply; a reply is built fresh from the state and cannot refer to itself, so the encoder
# need not keep a set of the objects it is inside
encode_reply = compact_encoder(ensure_ascii=False)
STATUS_PHRASES = {status.value: status.phrase for status in http.HTTPStatus}
_date_cache = [0, ""]


def http_date():
    """The Date header, formatted once a second."""
    now = int(time.time())
    if _date_cache[0] != now:
        _date_cache[:] = [now, email.utils.formatdate(now, usegmt=True)]
    return _date_cache[1]


def response_bytes(status, body, headers, close=False, head_only=False):
    """A whole HTTP/1.1 response, to be written in one send: a JSON body, or bytes as they are (with their
    Content-Type in headers)."""
    content_type = headers.get("Content-Type", "application/json; charset=utf-8")
    if isinstance(body, bytes):
        payload = body
    else:
        try:
            payload = b"" if body is None else encode_reply(body).encode()
        except UnicodeEncodeError:      # a lone surrogate from a client's \ud800: escaped, still valid JSON
            payload = json.dumps(body, separators=(",", ":")).encode()
    head = (f"HTTP/1.1 {status} {STATUS_PHRASES[status]}\r\nServer: clawbridge/{__version__}\r\n"
            f"Date: {http_date()}\r\nContent-Type: {content_type}\r\nContent-Length: {len(payload)}\r\n"
            + ("".join(f"{k}: {v}\r\n" for k, v in headers.items() if k != "Content-Type") if headers else "")
            + ("Connection: close\r\n\r\n" if close else "\r\n")).encode("latin-1")
    return head if head_only else head + payload


# one header line, anchored at a line start: findall over the whole block finds one match per well-formed
# line and none in a bad one (a line holds one \n, at its end)
HEADER_LINE = re.compile(r"^([!#$%&'*+.^_`|~0-9A-Za-z-]+):[ \t]*([^\n]*?)[ \t]*\r?\n", re.MULTILINE)


class Headers:
    """Request headers: names case-insensitive, every value kept in order (the framing checks look for
    repeated Content-Length and Transfer-Encoding). What handlers read through req.headers."""

    def __init__(self, values):
        self.values = values    # lower-case name -> [value, ...]

    def get(self, name, default=None):
        found = self.values.get(name.lower())
        return found[0] if found else default

    def get_all(self, name, default=None):
        return self.values.get(name.lower(), default)

    def __contains__(self, name):
        return name.lower() in self.values


def read_headers(rfile):
    """Read the header block of a request. BridgeError 431 past MAX_HEADER_BYTES or MAX_HEADER_LINES, 400 for
    a line that is not `name: value` (folded lines and spaces before the colon included, as RFC 9112 asks of
    a server). Much cheaper than the email parser http.server uses."""
    size, lines = 0, []
    while True:
        line = rfile.readline(MAX_HEADER_BYTES + 1)
        size += len(line)
        if size > MAX_HEADER_BYTES:
            raise BridgeError(431, "headers_too_large", f"The headers are larger than {MAX_HEADER_BYTES} bytes.")
        if line in (b"\r\n", b"\n", b""):
            break
        lines.append(line)
        if len(lines) > MAX_HEADER_LINES:
            raise BridgeError(431, "headers_too_large", f"There are more than {MAX_HEADER_LINES} header lines.")
    # one regex pass over the block rather than one match per line
    fields = HEADER_LINE.findall(b"".join(lines).decode("latin-1"))
    if len(fields) != len(lines):
        raise BridgeError(400, "bad_request", "A header line is not 'Name: value'; send one header a line.")
    values = {}
    for name, value in fields:
        values.setdefault(name.lower(), []).append(value)
    return Headers(values)


ERROR_CODES = {400: "bad_request", 401: "unauthorized", 403: "forbidden", 404: "not_found",
               408: "request_timeout", 411: "length_required", 413: "body_too_large", 414: "uri_too_long",
               431: "headers_too_large", 500: "internal_error", 501: "not_implemented",
               503: "unavailable", 505: "http_version_not_supported"}


QUIET_ROUTES = frozenset(("/health", "/metrics"))     # polled by monitors: their lines are at debug


class AccessRecord(logging.LogRecord):
    """The record of a request line, made in half the time: LogRecord's __init__ works out the caller's
    file, module, thread and process, none of which a request line has or shows (configure_logging turns
    the last two off); this one copies them, empty, from a record made once."""

    def __init__(self, level, msg, http):
        now = time.time()
        self.__dict__.update(ACCESS_TEMPLATE)
        self.levelno, self.levelname, self.msg, self.http = level, logging.getLevelName(level), msg, http
        self.created, self.msecs = now, (now - int(now)) * 1000 // 1
        self.relativeCreated = ACCESS_TEMPLATE["relativeCreated"] + (now - ACCESS_TEMPLATE["created"]) * 1000


ACCESS_TEMPLATE = {**vars(logging.LogRecord(log.name, logging.INFO, "", 0, "", None, None)),
                   "thread": None, "threadName": None, "process": None, "processName": None}


def access_log(level, method, path, status, size, seconds, route):
    """One line per request: `method path status bytes ms`, and the same as an "http" object for
    LOG_FORMAT=json. The record is made here and handed to the logger: log.info would also walk the stack
    for the caller's file and line, which an access line does not show."""
    ms = round(seconds * 1000, 1)
    log.handle(AccessRecord(level, f"{method} {path} {status} {size} {ms:.1f}ms",
                            {"method": method, "route": route, "status": status, "bytes": size, "ms": ms}))


def http_version(text):
    """(major, minor) of an HTTP-version like HTTP/1.0, None when it is not one."""
    numbers = text[5:].split(".") if text.startswith("HTTP/") else []
    if len(numbers) != 2 or not all(n.isdigit() and len(n) <= 10 for n in numbers):
        return None
    return int(numbers[0]), int(numbers[1])


MAX_REQUEST_LINE = 65536      # longer request lines get 414, as in http.server
METHODS = frozenset(("GET", "HEAD", "POST", "PUT", "DELETE"))


class KernelTimedIO(socket.SocketIO):
    """A connection's socket as a file, the socket blocking and its timeout kept by the kernel (SO_RCVTIMEO,
    SO_SNDTIMEO). A Python socket timeout polls before every recv and send, two more waits a request, each
    of which hands the interpreter lock to another thread: about an eighth of the CPU of a heartbeat at 8
    connections went on that. A read or write that waits past the timeout fails with EAGAIN, raised here as
    the TimeoutError a Python timeout raises."""

    def readinto(self, buffer):
        try:
            return self._sock.recv_into(buffer)
        except BlockingIOError:
            raise socket.timeout("timed out") from None

    def write(self, data):
        try:
            self._sock.sendall(data)
        except BlockingIOError:
            raise socket.timeout("timed out") from None
        return len(data)


def kernel_timeout(sock, seconds):
    """Make sock blocking with its timeout kept by the kernel. False where the kernel does not take the option
    as this program packs it (a struct timeval of two C longs): the caller then uses a Python timeout, which
    makes the socket non-blocking underneath, so whatever the kernel kept does not apply."""
    value = struct.pack("@ll", int(seconds), int(seconds % 1 * 1e6))
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, value)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, value)
        if sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, len(value)) != value:
            return False
    except (OSError, AttributeError):
        return False
    sock.settimeout(None)
    return True


class Handler(BaseHTTPRequestHandler):
    """One connection. Every request of a method in METHODS goes through _dispatch; every response, errors
    included, is JSON written in one send."""

    protocol_version = "HTTP/1.1"
    server_version = f"clawbridge/{__version__}"
    sys_version = ""
    timeout = SOCKET_TIMEOUT

    def setup(self):
        self.connection = self.request
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if kernel_timeout(self.connection, self.timeout):
            self.rfile = io.BufferedReader(KernelTimedIO(self.connection, "rb"))
            self.wfile = KernelTimedIO(self.connection, "wb")
        else:       # a Python socket timeout, as http.server sets it
            super().setup()
        self.slot = self.server.connections.get(self.connection) or [False, time.monotonic(), False]

    def handle_one_request(self):
        """http.server's, without its look-up of a do_* method by name: every method we serve goes to
        _dispatch, and the response is written by then."""
        self.server.mark(self.slot, busy=False)     # waiting for, or still reading, the next request
        try:
            self.raw_requestline = self.rfile.readline(MAX_REQUEST_LINE + 1)
            if len(self.raw_requestline) > MAX_REQUEST_LINE:
                self.requestline = self.request_version = self.command = ""
                self.send_error(414)
                return
            if not self.raw_requestline:
                self.close_connection = True
                return
            if not self.parse_request():
                return
            if self.command not in METHODS:
                self.send_error(501)
                return
            self._dispatch()
        except socket.timeout as exc:   # TimeoutError from 3.10 on
            self.log_error("Request timed out: %r", exc)
            self.close_connection = True

    def _dispatch(self):
        if self.slot[2]:
            self.close_connection = True    # evicted or timed out while its request was arriving
            return
        started = time.perf_counter()
        bridge = self.server.bridge
        self._route = "unmatched"
        self.server.enter()
        # a refused request whose body was not read must close the connection, or the body would be taken
        # for the next request (request smuggling)
        lengths = self.headers.get_all("Content-Length") or []
        self._unread_body = ("Transfer-Encoding" in self.headers or len(lengths) > 1
                             or (lengths and lengths[0].strip() not in ("", "0")))
        status, size = 500, 0
        try:
            try:
                status, body, headers = self._handle(bridge)
            except BridgeError as exc:
                status, body, headers = exc.status, exc.body(), exc.headers
                if self._unread_body:
                    self.close_connection = True
            except Exception:
                log.exception("internal error on %s %s", self.command, self._loggable_path())
                status, body, headers = 500, BridgeError(500, "internal_error", "Internal error; the bridge "
                                                         "log has the details.").body(), {}
                self.close_connection = True
            size = self.send_json(status, body, headers)
        finally:
            self.server.leave()
            elapsed = time.perf_counter() - started
            bridge.requests.observe(self.command, self._route, status, elapsed)
            level = logging.DEBUG if self._route in QUIET_ROUTES else logging.INFO
            if log.isEnabledFor(level):
                access_log(level, self.command, self._loggable_path(), status, size, elapsed, self._route)

    def _loggable_path(self):
        return redact(self.path.split("?")[0][:200], self.server.bridge.config)

    def _handle(self, bridge):
        if len(self.path) > MAX_URL_BYTES:
            raise BridgeError(414, "uri_too_long", f"The request target is longer than {MAX_URL_BYTES} bytes.")
        raw_path, _, query_text = self.path.partition("?")
        if not raw_path.startswith("/"):
            raise bad_request("The request target must be a path starting with /.", code="bad_request")
        route = resolve(self.command, raw_path)
        self._route = route.pattern
        who, actor = self._authorize(bridge, route.rule, route.params)
        for value in route.params.values():
            check_id(value, "id")
        body = self.read_json()
        self.server.mark(self.slot, busy=True)
        query = {k: v[-1] for k, v in urllib.parse.parse_qs(query_text, keep_blank_values=True).items()} \
            if query_text else {}
        result = route.handler(bridge, Request(self.command, raw_path, route.params, query, self.headers, body,
                                               who, actor, self.client_address[0]))
        return result if len(result) == 3 else (*result, {})

    def _authorize(self, bridge, rule, params):
        """(principal, actor) for this request; 401, 403 or 429 when it may not proceed."""
        who = authenticate(bridge.config, bridge.state, self.headers.get("Authorization"))
        if rule == "open":
            return who, None
        address, throttle = self.client_address[0], self.server.throttle
        if who is not None and not throttle.locked:     # the usual case: nobody is locked out, no clock read
            return who, authorize(rule, who, self.command, params, bridge.config)
        now = bridge.clock.now().mono
        wait = throttle.retry_after(address, now)
        if wait:
            raise BridgeError(429, "too_many_requests", "Too many failed authentications from this address; "
                              "wait and retry with the right token.", headers={"Retry-After": str(math.ceil(wait))})
        if who is None:
            throttle.failed(address, now)
            raise BridgeError(401, "unauthorized", "Missing or wrong token: send 'Authorization: Bearer <token>' "
                              "with BRIDGE_TOKEN, BRIDGE_READ_TOKEN or the agent's own token.",
                              headers={"WWW-Authenticate": 'Bearer realm="clawbridge"'})
        return who, authorize(rule, who, self.command, params, bridge.config)

    def read_json(self):
        """The request body as a dict, None when there is none; 411, 413 and 400 for the bad cases."""
        lengths = self.headers.get_all("Content-Length") or []
        if self.headers.get("Transfer-Encoding"):
            raise BridgeError(411, "length_required", "Chunked bodies are not accepted; send Content-Length.")
        if not lengths:
            return None
        if len(lengths) > 1 or not lengths[0].strip().isdigit():
            raise bad_request("Content-Length must be one whole number.", code="bad_request")
        length = int(lengths[0])
        if length > MAX_BODY_BYTES:
            raise BridgeError(413, "body_too_large", f"The body is larger than {MAX_BODY_BYTES} bytes.")
        try:
            raw = self.rfile.read(length)
        except socket.timeout:
            self.close_connection = True
            raise BridgeError(408, "request_timeout", f"The body did not arrive: nothing came for {self.timeout:g} "
                                                      "seconds.") from None
        self._unread_body = False
        if len(raw) < length:
            self.close_connection = True
            raise bad_request("The body ended before Content-Length bytes arrived.", code="bad_request")
        if not raw.strip():
            return None
        return parse_json_body(raw)

    def handle_expect_100(self):
        length = self.headers.get("Content-Length", "")
        if length.isdigit() and int(length) > MAX_BODY_BYTES:
            self.close_connection = True
            self.send_json(413, BridgeError(413, "body_too_large",
                                            f"The body is larger than {MAX_BODY_BYTES} bytes.").body(), {})
            return False
        return super().handle_expect_100()

    def send_json(self, status, body, headers):
        data = response_bytes(status, body, headers, self.close_connection, self.command == "HEAD")
        self.wfile.write(data)
        return len(data)

    def parse_request(self):
        """The request line, as http.server reads it, then the headers with read_headers. Returns False
        once an error has been answered."""
        self.command, self.path, self.request_version = None, None, self.default_request_version
        self.close_connection = True
        self.requestline = str(self.raw_requestline, "iso-8859-1").rstrip("\r\n")
        words = self.requestline.split()
        if not 2 <= len(words) <= 3:
            if words:
                self.send_error(400)
            return False
        if len(words) == 3:
            version = words[2]
            number = (1, 1) if version == "HTTP/1.1" else http_version(version)     # the usual one, known
            if number is None:
                self.send_error(400)
                return False
            if number >= (2, 0):
                self.send_error(505)
                return False
            self.request_version = version
            self.close_connection = number < (1, 1)
        elif words[0] != "GET":
            self.send_error(400)        # HTTP/0.9 knew only GET
            return False
        self.command, self.path = words[0], words[1]
        if self.path.startswith("//"):
            self.path = "/" + self.path.lstrip("/")     # //host/path would read as a URL without scheme
        try:
            self.headers = read_headers(self.rfile)
        except BridgeError as exc:
            self.refuse(exc)
            return False
        connection = self.headers.get("Connection", "").lower()
        if connection == "close":
            self.close_connection = True
        elif connection == "keep-alive":
            self.close_connection = False
        if (self.headers.get("Expect", "").lower() == "100-continue" and self.request_version >= "HTTP/1.1"
                and not self.handle_expect_100()):
            return False
        return True

    def send_error(self, code, message=None, explain=None):
        """http.server's own errors (request line too long, unknown method) and ours from parse_request."""
        method = (getattr(self, "command", None) or "-")[:20]     # None when the request line was garbage
        text = {501: f"Method {method!r} is not supported by the bridge.",
                414: "The request line is too long.",
                505: "Only HTTP/1.0 and HTTP/1.1 are served."}.get(code, "The request is not valid HTTP.")
        self.refuse(BridgeError(code, ERROR_CODES.get(code, "bad_request"), text))

    def refuse(self, error):
        """Answer a request the HTTP layer rejected before routing, and close the connection."""
        self.close_connection = True
        self.send_json(error.status, error.body(), error.headers)
        method = (getattr(self, "command", None) or "-")[:20]
        log.info("%s %s %d (rejected by the HTTP parser)", redact(method, self.server.bridge.config),
                 self._loggable_path() if getattr(self, "path", None) else "-", error.status)

    def log_message(self, format, *args):
        log.debug("http: %s", redact(format % args, self.server.bridge.config))


class BridgeServer(ThreadingHTTPServer):
    """The threading HTTP server, hardened: one daemon thread per connection but at most MAX_CONNECTIONS of
    them. When full, a new connection takes the place of the oldest one that is only waiting (idle
    keep-alive, or a request still trickling in); when every connection is busy for ADMIT_WAIT it gets 503.
    A request that has not fully arrived within REQUEST_DEADLINE is dropped. Requests in flight are
    counted so that SIGTERM can let them finish. A thread whose connection has ended waits, as one of at most
    spare_threads spare ones, for the next connection."""

    daemon_threads = True
    block_on_close = False
    allow_reuse_address = True
    request_queue_size = REQUEST_QUEUE_SIZE
    spare_threads = 32      # enough for a burst of short connections; more would only hold memory

    def __init__(self, address, bridge):
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        # before the bind: a failing one calls server_close
        self.spares = []            # [wake lock, connection] of each thread waiting for a connection
        self.spare_lock = threading.Lock()
        self.closed = False
        super().__init__(address, Handler)
        self.bridge = bridge
        self.throttle = AuthThrottle()
        self.max_connections = MAX_CONNECTIONS
        self.request_deadline = REQUEST_DEADLINE
        self.connections = {}       # socket -> [busy, since (monotonic), closing]
        self.slots = threading.Condition(threading.Lock())
        self.inflight = 0
        self.idle = threading.Condition(threading.Lock())
        self.deadline_checked = 0.0

    def process_request(self, request, client_address):
        if self.admit(request):
            self.start_connection(request, client_address)
            return
        log.warning("all %d connections are busy; answering 503 to %s", self.max_connections, client_address[0])
        try:
            request.settimeout(1.0)
            request.sendall(response_bytes(503, BridgeError(503, "busy", "The bridge is at its connection "
                                                            "limit; retry in a second.").body(),
                                           {"Retry-After": "1"}, close=True))
        except OSError:
            pass
        self.shutdown_request(request)

    def start_connection(self, request, client_address):
        """Serve an admitted connection on a spare thread, or on a new one when none is spare: starting (and
        ending) a thread costs about as much CPU as answering a heartbeat."""
        with self.spare_lock:
            spare = self.spares.pop() if self.spares else None
        if spare is None:
            threading.Thread(target=self.serve_connections, args=(request, client_address),
                             daemon=self.daemon_threads).start()
        else:
            spare[1] = request, client_address
            spare[0].release()

    def serve_connections(self, request, client_address):
        """The life of a connection thread: serve a connection, then wait as a spare for the next one, unless
        spare_threads are spare already or the server is closed."""
        wake = threading.Lock()
        wake.acquire()      # held while the thread is not spare, so that waiting is one more acquire
        spare = [wake, None]
        while True:
            self.process_request_thread(request, client_address)
            with self.spare_lock:
                if self.closed or len(self.spares) >= self.spare_threads:
                    return
                self.spares.append(spare)
            wake.acquire()      # until start_connection hands over a connection or server_close ends it
            if spare[1] is None:
                return
            (request, client_address), spare[1] = spare[1], None

    def server_close(self):
        super().server_close()
        with self.spare_lock:
            self.closed = True
            spares, self.spares = self.spares, []
        for wake, _ in spares:
            wake.release()      # with no connection: the thread ends

    def admit(self, sock):
        """Take a connection slot for sock, making room by evicting a waiting connection if need be."""
        deadline = time.monotonic() + ADMIT_WAIT
        with self.slots:
            while True:
                now = time.monotonic()
                if sum(1 for entry in self.connections.values() if not entry[2]) < self.max_connections:
                    self.connections[sock] = [False, now, False]
                    return True
                waiting = [(entry[1], id(s), s) for s, entry in self.connections.items()
                           if not entry[0] and not entry[2] and now - entry[1] >= EVICT_AFTER]
                if waiting:
                    self.drop(min(waiting)[2])
                    continue
                if now >= deadline:
                    return False
                self.slots.wait(min(deadline - now, 0.05))

    def drop(self, sock):
        """Close a waiting connection from outside its thread (called with self.slots held)."""
        self.connections[sock][2] = True
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    @staticmethod
    def mark(slot, busy):
        """Note a connection's state change (slot is its entry in connections) from its own thread, without
        the lock: each item assignment is atomic, and since goes first so that a reader never sees the new
        state with an old time (a stale idle time would drop a connection that just finished a request)."""
        slot[1] = time.monotonic()
        slot[0] = busy

    def service_actions(self):
        """Called by serve_forever after every poll and every accepted connection: drop connections whose
        request is overdue, looking at most every DEADLINE_CHECK seconds."""
        now = time.monotonic()
        if now - self.deadline_checked < DEADLINE_CHECK:
            return
        self.deadline_checked = now
        with self.slots:
            for sock, (busy, since, closing) in list(self.connections.items()):
                if not busy and not closing and now - since > self.request_deadline:
                    self.drop(sock)

    def shutdown_request(self, request):
        with self.slots:
            self.connections.pop(request, None)
            self.slots.notify_all()
        super().shutdown_request(request)

    def enter(self):
        with self.idle:
            self.inflight += 1

    def leave(self):
        with self.idle:
            self.inflight -= 1
            if not self.inflight:
                self.idle.notify_all()

    def wait_idle(self, timeout):
        with self.idle:
            return self.idle.wait_for(lambda: self.inflight == 0, timeout)

    def handle_error(self, request, client_address):
        log.debug("connection from %s ended with an error", client_address[0], exc_info=True)


# ===== Watchdog =====


class Alerts:
    """Sends alerts (an instance offline or back, disruption start or end, storage degraded or recovered)
    to BRIDGE_WEBHOOK_URL as JSON POSTs with a Slack-compatible "text". A background thread sends them, so
    no request ever waits; at most WEBHOOK_QUEUE wait (the oldest are dropped), and each is tried
    WEBHOOK_TRIES times with a backoff that doubles from `backoff` seconds. The URL is never logged: it is
    often a secret."""

    def __init__(self, url, bridge_id, backoff=1.0):
        self.url, self.bridge_id, self.backoff = url, bridge_id, backoff
        self.queue = collections.deque()
        self.cond = threading.Condition(threading.Lock())
        self.thread = None
        self.busy = False
        self.counts = collections.Counter()     # sent, failed, dropped (for /metrics)

    def send(self, event, message):
        if not self.url:
            return
        alert = {"event": event, "text": f"clawbridge {self.bridge_id}: {message}", "message": message,
                 "bridge": self.bridge_id, "at": int(time.time() * 1000)}
        with self.cond:
            if len(self.queue) >= WEBHOOK_QUEUE:
                self.queue.popleft()
                self.counts["dropped"] += 1
            self.queue.append(alert)
            self.cond.notify()
            if self.thread is None:
                self.thread = threading.Thread(target=self.run, name="alerts", daemon=True)
                self.thread.start()

    def run(self):
        while True:
            with self.cond:
                while not self.queue:
                    self.busy = False
                    self.cond.notify_all()
                    self.cond.wait()
                alert, self.busy = self.queue.popleft(), True
            try:
                self.deliver(alert)
            except Exception:       # the sender must outlive any one alert
                self.counts["failed"] += 1
                log.exception("webhook delivery of %s failed", alert["event"])

    def deliver(self, alert):
        import urllib.request     # here, not at the top: only a bridge with a webhook needs it (a start saves ~5 ms)
        body = json.dumps(alert).encode()
        delay = self.backoff
        for attempt in range(1, WEBHOOK_TRIES + 1):
            try:
                request = urllib.request.Request(self.url, data=body, method="POST",
                                                 headers={"Content-Type": "application/json",
                                                          "User-Agent": f"clawbridge/{__version__}"})
                with urllib.request.urlopen(request, timeout=WEBHOOK_TIMEOUT) as reply:
                    reply.read()
                self.counts["sent"] += 1
                return
            except (OSError, ValueError, http.client.HTTPException) as exc:   # refused, timed out, not HTTP
                reason = getattr(exc, "code", None) or type(exc).__name__
                log.warning("webhook delivery of %s failed (attempt %d of %d: %s)", alert["event"], attempt,
                            WEBHOOK_TRIES, reason)
            if attempt < WEBHOOK_TRIES:
                time.sleep(delay)
                delay *= 2
        self.counts["failed"] += 1

    def flush(self, timeout):
        """Wait until every queued alert is handled, or timeout (at shutdown)."""
        with self.cond:
            return self.cond.wait_for(lambda: not self.queue and not self.busy, timeout)


class Watchdog(threading.Thread):
    """Runs the liveness sweep every WATCHDOG_PERIOD seconds on the bridge's monotonic clock; a failing
    sweep is logged and the next one runs as usual."""

    def __init__(self, bridge, stop, period=WATCHDOG_PERIOD):
        super().__init__(name="watchdog", daemon=True)
        self.bridge, self.stop, self.period = bridge, stop, period

    def run(self):
        while not self.stop.wait(self.period):
            try:
                self.bridge.run(sweep)
            except BridgeError as exc:
                log.debug("sweep skipped: %s", exc.message)
            except Exception:
                log.exception("watchdog sweep failed; will retry")


class Flusher(threading.Thread):
    """Background upkeep: writes snapshots every snapshot_every() journal records or SNAPSHOT_EVERY_SECONDS
    of changes (and retries after a storage failure), and runs the archive every ARCHIVE_PERIOD. Survives its
    own errors."""

    def __init__(self, bridge, stop, period=FLUSHER_PERIOD):
        super().__init__(name="flusher", daemon=True)
        self.bridge, self.stop, self.period = bridge, stop, period

    def run(self):
        last_archive = None
        while not self.stop.wait(self.period):
            try:
                flush_logs()
                if last_archive is None or time.monotonic() - last_archive >= ARCHIVE_PERIOD:
                    last_archive = time.monotonic()
                    self.bridge.archive()
                if self.bridge.snapshot_due():
                    healthy = self.bridge.store.healthy
                    self.bridge.snapshot()
                    if not healthy:
                        log.warning("storage recovered: a full snapshot was written; accepting writes again")
            except Exception:
                log.exception("snapshot failed; will retry")


# ===== Entry =====


class TextLogFormatter(logging.Formatter):
    """`time level message`, the time formatted once a second rather than once a line."""

    def __init__(self):
        super().__init__("%(asctime)s %(levelname)s %(message)s")
        self.second = (None, "")

    def format(self, record):
        if record.exc_info or record.stack_info:
            return super().format(record)
        return f"{self.formatTime(record)} {record.levelname} {record.getMessage()}"

    def formatTime(self, record, datefmt=None):
        second = int(record.created)
        if self.second[0] != second:
            self.second = (second, time.strftime("%Y-%m-%d %H:%M:%S", self.converter(second)))
        return f"{self.second[1]},{int(record.msecs):03d}"


class JsonLogFormatter(logging.Formatter):
    """LOG_FORMAT=json: one JSON object a line, for log shippers; request lines carry an "http" object."""

    def format(self, record):
        entry = {"ts": self.formatTime(record, "%Y-%m-%dT%H:%M:%S") + f".{int(record.msecs):03d}Z",
                 "level": record.levelname.lower(), "msg": record.getMessage()}
        if hasattr(record, "http"):
            entry["http"] = record.http
        if record.exc_info:
            entry["error"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


class LogHandler(logging.StreamHandler):
    """stderr, with request lines held back until the Flusher's next pass (a second at most) or LOG_HELD of
    them. Request lines are formatted and queued without the handler's lock (a deque append is atomic), so
    requests never queue for the log; any other line (start-up, warnings, errors) goes out at once under
    the lock and takes the held lines with it, so the order is kept. A bridge killed with SIGKILL loses the
    request lines of its last second, nothing else."""

    def __init__(self, stream):
        super().__init__(stream)
        self.held = collections.deque()

    def handle(self, record):
        if not hasattr(record, "http"):
            return super().handle(record)
        if self.filter(record):
            try:
                self.held.append(self.format(record) + self.terminator)
            except Exception:
                self.handleError(record)
            if len(self.held) >= LOG_HELD:
                self.flush()
        return record

    def emit(self, record):     # called with self.lock held
        try:
            self.held.append(self.format(record) + self.terminator)
            self.flush()
        except Exception:
            self.handleError(record)

    def flush(self):
        with self.lock:
            lines = []
            while self.held:
                lines.append(self.held.popleft())
            if lines:
                self.stream.write("".join(lines))
            self.stream.flush()


def flush_logs():
    """Write out held request lines (the Flusher calls it every FLUSHER_PERIOD)."""
    for handler in logging.getLogger().handlers + log.handlers:
        handler.flush()


def configure_logging(level, log_format="text", stream=None):
    handler = LogHandler(stream or sys.stderr)
    if log_format == "json":
        formatter = JsonLogFormatter()
        formatter.converter = time.gmtime
    else:
        formatter = TextLogFormatter()
    handler.setFormatter(formatter)
    # no line shows them, and each costs a lookup on every record (one per request)
    logging.logThreads = logging.logProcesses = logging.logMultiprocessing = False
    logging.basicConfig(level=getattr(logging, level.upper()), handlers=[handler], force=True)


def sd_notify(message):
    """Tell systemd (Type=notify) about our state through $NOTIFY_SOCKET; a no-op outside systemd."""
    address = os.environ.get("NOTIFY_SOCKET", "")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]      # an abstract socket
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.sendto(message.encode(), address)
        return True
    except OSError as exc:
        log.debug("cannot notify systemd: %s", exc)
        return False


def watchdog_interval():
    """How often to feed systemd's watchdog (half of WatchdogSec), or None when it is not on."""
    usec = os.environ.get("WATCHDOG_USEC", "")
    pid = os.environ.get("WATCHDOG_PID", "")
    if not usec.isdigit() or (pid and pid != str(os.getpid())):
        return None
    return int(usec) / 2e6


def restore(config, src):
    """restore SRC: replace the state in the data dir with the one in SRC (checked first). Refuses while a
    bridge holds the data dir; keeps the replaced files in before-restore-<time>/."""
    src, data_dir = os.path.abspath(src), os.path.abspath(config.data_dir)
    if not os.path.isdir(src):
        raise StorageError(f"there is no backup at {src}")
    if src == data_dir:
        raise StorageError("the backup and the data directory are the same directory")
    state, info = load_data(src, target=State)
    doc = {**info["head"], **state.freeze(info["seq"])}
    os.makedirs(data_dir, mode=0o700, exist_ok=True)
    lock = DirLock(data_dir)
    lock.acquire()
    try:
        snapshots, segments = list_data_files(data_dir)
        archives = [n for n in os.listdir(data_dir) if ARCHIVE_RE.fullmatch(n)]
        if snapshots or segments or archives:
            stamp = os.path.join(data_dir, f"before-restore-{time.strftime('%Y%m%d-%H%M%S')}")
            aside, n = stamp, 1
            while os.path.exists(aside):        # two restores within a second
                aside, n = f"{stamp}-{n}", n + 1
            os.makedirs(aside, mode=0o700)
            for name in [n for _, n in snapshots + segments] + archives:
                os.replace(os.path.join(data_dir, name), os.path.join(aside, name))
            fsync_dir(data_dir)
            print(f"the replaced files are kept in {aside}")
        copy_archives(src, data_dir)
        doc["origin"] = "backup"    # the next start raises epochs past the lost bridge's
        atomic_write(os.path.join(data_dir, f"snapshot-{doc['seq']:012d}.json"), snapshot_chunks(doc))
    finally:
        lock.release()
    print(f"restored {len(doc['agents'])} agents and {len(doc['tasks'])} tasks into {data_dir}; start the "
          "bridge to use them")
    return 0


def check(config):
    """check: read the data dir as a start would, without changing it; report what it holds and any problem.
    Returns 0 when it is sound, 1 otherwise."""
    data_dir = os.path.abspath(config.data_dir)
    if not os.path.isdir(data_dir):
        print(f"problem: there is no data directory at {data_dir}")
        return 1
    snapshots, segments = list_data_files(data_dir)
    try:
        state, info = load_data(data_dir, target=State)
    except StorageError as exc:
        print(f"problem: {exc}")
        return 1
    in_use = False
    probe = DirLock(data_dir)
    try:
        probe.acquire()
        probe.release()
    except StorageError:
        in_use = True
    lanes = collections.Counter(t.lane for t in state.tasks.values())
    archives = sorted(n for n in os.listdir(data_dir) if ARCHIVE_RE.fullmatch(n))
    print(f"data dir     {data_dir}{' (in use by a running bridge)' if in_use else ''}")
    print(f"snapshots    {', '.join(n for _, n in snapshots) or 'none'}")
    print(f"journal      {len(segments)} segment(s), up to record {info['seq']}")
    print(f"agents       {len(state.agents)} ({sum(a.status == 'online' for a in state.agents.values())} online)")
    print(f"instances    {len(state.instances)}")
    print(f"tasks        {len(state.tasks)} in memory: "
          + (", ".join(f"{lane} {lanes[lane]}" for lane in LANES if lanes[lane]) or "none"))
    print(f"archives     {', '.join(archives) or 'none'}")
    print(f"notifications {len(state.notifications)}, audit entries {len(state.audit)}")
    problems = [p for p in info["problems"] if not (in_use and "torn record" in p)]
    for problem in problems:
        print(f"problem: {problem}")
    print("sound" if not problems else f"{len(problems)} problem(s)")
    return 1 if problems else 0


def healthcheck(config):
    """--healthcheck: 0 when the bridge at BRIDGE_HOST:BRIDGE_PORT says it is healthy, 1 otherwise."""
    host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(config.host, config.host)
    url = f"http://{'[' + host + ']' if ':' in host else host}:{config.port}/health"
    import urllib.request     # here, not at the top: see Alerts.deliver
    try:
        with urllib.request.urlopen(url, timeout=5) as reply:
            healthy = json.loads(reply.read() or b"{}").get("status") == "ok"
    except (OSError, ValueError) as exc:
        print(f"clawbridge: unhealthy: {getattr(exc, 'code', None) or exc}", file=sys.stderr)
        return 1
    print("clawbridge: healthy" if healthy else "clawbridge: unhealthy", file=sys.stderr)
    return 0 if healthy else 1


def serve(config, ready=None):
    """Run the bridge until SIGTERM/SIGINT. Returns an exit code."""
    if not is_loopback(config.host) and not config.token and not config.insecure:
        log.error("refusing to listen on %s without BRIDGE_TOKEN: set BRIDGE_TOKEN (recommended) or pass "
                  "--insecure", config.host)
        return 2
    bridge = Bridge.open(config)
    try:
        server = BridgeServer((config.host, config.port), bridge)
    except OSError as exc:
        log.error("cannot listen on %s:%s: %s", config.host, config.port, exc.strerror or exc)
        bridge.close()
        return 1
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    threads = [threading.Thread(target=server.serve_forever, args=(SERVE_POLL,), name="http", daemon=True),
               Flusher(bridge, stop), Watchdog(bridge, stop)]
    for thread in threads:
        thread.start()
    host, port = server.server_address[:2]
    log.info("🌉 Bridge running on http://%s:%s (data in %s, version %s)", host, port, bridge.store.data_dir,
             __version__)
    sd_notify(f"READY=1\nSTATUS=serving on {host}:{port}")
    if ready:
        ready(server)
    feed_every, fed = watchdog_interval(), time.monotonic()
    while not stop.wait(0.5):
        if feed_every and time.monotonic() - fed >= feed_every and bridge.alive():
            sd_notify("WATCHDOG=1")     # only while the watchdog thread sweeps and storage is writable
            fed = time.monotonic()
    sd_notify("STOPPING=1")
    log.info("stopping: finishing requests in flight")
    server.shutdown()
    server.wait_idle(SHUTDOWN_GRACE)
    server.server_close()
    bridge.close()
    bridge.alerts.flush(2.0)
    log.info("stopped cleanly")
    return 0


def main(argv=None):
    faulthandler.enable()   # a hang killed by systemd's watchdog (SIGABRT) leaves every thread's stack in the log
    argv = sys.argv[1:] if argv is None else argv
    environ = dict(os.environ)
    pre = build_parser().parse_args(argv)
    env_file = getattr(pre, "env_file", None)
    dotenv_text = ""
    try:
        if env_file or os.path.exists(DOTENV_FILE):
            with open(env_file or DOTENV_FILE, encoding="utf-8") as f:
                dotenv_text = f.read()
        command, config, args = load_config(argv, environ, dotenv_text)
    except ConfigError as exc:
        print(f"clawbridge: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"clawbridge: cannot read the settings file {env_file}: {exc.strerror}", file=sys.stderr)
        return 2
    configure_logging(config.log_level, config.log_format)
    if getattr(args, "print_config", False):
        print(config.redacted())
        return 0
    if getattr(args, "healthcheck", False):
        return healthcheck(config)
    try:
        if command == "backup":
            doc = backup_data(config.data_dir, args.dest, target=State)
            print(f"backup written to {args.dest}: {len(doc['agents'])} agents, {len(doc['tasks'])} tasks, "
                  f"journal record {doc['seq']}")
            return 0
        if command == "restore":
            return restore(config, args.src)
        if command == "check":
            return check(config)
        return serve(config)
    except StorageError as exc:
        log.error("%s", exc)
        return 1
    except OSError as exc:
        log.error("cannot use the data directory: %s (%s)", exc.strerror or exc, exc.filename or "")
        return 1


if __name__ == "__main__":
    sys.exit(main())
