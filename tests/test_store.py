"""Storage: what survives a restart, a kill -9, a torn or corrupt file, a full or failing disk, a second bridge on
the same data, and a restore from a backup. Real processes and real HTTP on 127.0.0.1; crashes are SIGKILL."""
import errno
import gc
import hashlib
import http.client
import json
import os
import random
import resource
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from unittest import mock

import pytest

import clawbridge
from conftest import BRIDGE, BridgeProcess, LiveBridge

GAP = clawbridge.RESTORE_EPOCH_GAP
SOFT_FIELDS = ("lastHeartbeat", "reportedStatus", "currentTask")   # heartbeat state, not fsynced per beat
CLOCK_FIELDS = ("healthScore",)     # derived from the bridge's monotonic clock, which a new process restarts
ALL_TASKS = "/api/tasks?limit=10000"

# ===== helpers: the API =====


def ok(result, expect=(200, 201)):
    """The body of a call that must succeed."""
    status, _, body = result
    assert status in expect, f"expected {expect}, got {status}: {body}"
    return body


def register(bridge, agent_id, **fields):
    return ok(bridge.call("POST", "/api/agents/register", {"id": agent_id, **fields}))


def new_task(bridge, **fields):
    return ok(bridge.call("POST", "/api/tasks", {"title": "a task", **fields}), expect=(201,))


def put_task(bridge, task_id, **fields):
    return ok(bridge.call("PUT", f"/api/tasks/{task_id}", fields))


def act(bridge, task, verb, **extra):
    """An agent verb sent by the task's current owner with its current epoch."""
    body = {"agentId": task["assignedTo"], "epoch": task["epoch"], **extra}
    return ok(bridge.call("POST", f"/api/tasks/{task['id']}/{verb}", body))


def notify(bridge, agent_id, message):
    return ok(bridge.call("POST", "/api/notifications", {"agentId": agent_id, "message": message}), expect=(201,))


def detailed_health(bridge):
    return ok(bridge.call("GET", "/health"))


def api_view(bridge, ignore=()):
    """Everything a client can read, keyed by id, in a form that compares across restarts."""
    view = {}
    for section, path, key in (("agents", "/api/agents", "id"), ("tasks", ALL_TASKS, "id"),
                               ("notifications", "/api/notifications", "id"),
                               ("instances", "/api/instances", "instanceId")):
        view[section] = {}
        for item in ok(bridge.call("GET", path)):
            item = {k: v for k, v in item.items() if k not in ignore}
            if "activeTasks" in item:
                item["activeTasks"] = sorted(item["activeTasks"])
            view[section][item[key]] = item
    return view


def populate(bridge):
    """Every kind of durable data: agents with all their fields on three instances, tasks in every lane with
    reassignments (epochs) and history, read and unread notifications, a deleted agent and a deleted task, and
    a heartbeat's soft state. Returns {name: task id}."""
    register(bridge, "mac-1", name="Mac One", emoji="🔧", roles=["backend", "api"], model="sonnet",
             workspace="/home/me/ws", instanceId="macbook", hostname="mac.local", tailscaleIP="100.64.0.10",
             heartbeatInterval=60000, maxConcurrentTasks=10, metadata={"gpu": False, "list": ["a", {"b": 1}]})
    register(bridge, "srv-1", roles="backend,devops", instanceId="server", hostname="srv.internal",
             maxConcurrentTasks=10)
    register(bridge, "srv-2", roles=["qa"], instanceId="server")
    register(bridge, "leaver", instanceId="laptop")
    ids = {"queued": new_task(bridge, title="nobody can do this", roles=["astronomy"], priority="P0",
                              tags=["x", "y"], instanceId="server")["id"],
           "unicode": new_task(bridge, title="Ünïcødé ✓ 日本 \u2028 line", description="d" * 5000,
                               assignedTo="srv-2")["id"]}
    moved = new_task(bridge, title="moved twice", assignedTo="mac-1")
    put_task(bridge, moved["id"], assignedTo="srv-1")
    ids["moved"] = put_task(bridge, moved["id"], assignedTo="mac-1", priority="P1")["id"]
    progress = act(bridge, new_task(bridge, title="in progress", assignedTo="srv-1"), "start")
    ids["progress"] = progress["id"]
    ids["blocked"] = act(bridge, act(bridge, new_task(bridge, assignedTo="mac-1"), "start"), "block",
                         reason="waiting for keys")["id"]
    ids["done"] = act(bridge, act(bridge, new_task(bridge, assignedTo="srv-1"), "start"), "complete")["id"]
    ids["review"] = put_task(bridge, new_task(bridge, assignedTo="mac-1")["id"], lane="review")["id"]
    ids["cancelled"] = put_task(bridge, new_task(bridge, assignedTo="srv-1")["id"], lane="cancelled")["id"]
    ids["released"] = act(bridge, new_task(bridge, assignedTo="srv-2"), "release")["id"]
    ids["requeued"] = new_task(bridge, title="was the leaver's", assignedTo="leaver")["id"]
    ok(bridge.call("DELETE", "/api/agents/leaver"))
    ok(bridge.call("DELETE", f"/api/tasks/{new_task(bridge, title='deleted')['id']}"))
    note = notify(bridge, "srv-2", "hello ✓")
    notify(bridge, "srv-2", "unread")
    ok(bridge.call("PUT", f"/api/notifications/{note['id']}/read"))
    ok(bridge.call("POST", "/api/agents/srv-2/heartbeat", {"status": "working", "currentTask": ids["unicode"]}))
    return ids


def task_map(bridge):
    return {t["id"]: t for t in ok(bridge.call("GET", ALL_TASKS))}


# ===== helpers: processes and files =====


def data_dir(tmp_path):
    """Where start_bridge() keeps its data."""
    return tmp_path / ".clawhub"


def run_cli(args, cwd, env=None, timeout=15):
    """Run clawbridge.py to its exit. Returns (exit code, output, seconds); fails if it keeps running."""
    full_env = {k: v for k, v in os.environ.items() if not k.startswith(("BRIDGE_", "CLAW"))}
    full_env.update(env or {})
    started = time.monotonic()
    proc = subprocess.Popen([sys.executable, BRIDGE, *args], cwd=cwd, env=full_env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        output, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        output, _ = proc.communicate()
        pytest.fail(f"clawbridge.py {' '.join(args)} kept running:\n{output}")
    return proc.returncode, output, time.monotonic() - started


def refused_start(cwd, *args):
    """Start a bridge that must refuse; returns its output after checking the exit code is 1."""
    code, output, _ = run_cli(["--port", "0", *args], cwd)
    assert code == 1, f"exit code {code}:\n{output}"
    assert "Traceback" not in output
    return output


def file_digests(directory):
    """{name: sha256} of the data files (the lock file aside)."""
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.iterdir()) if p.is_file() and p.name != clawbridge.LOCK_FILE}


def data_files(directory):
    """(snapshot seqs, segment first seqs) in a data dir."""
    snapshots, segments = clawbridge.list_data_files(str(directory))
    return [seq for seq, _ in snapshots], [seq for seq, _ in segments]


def newest_segment(directory):
    return directory / clawbridge.list_data_files(str(directory))[1][-1][1]


def wait_until(predicate, timeout=10, what="condition"):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def restart(start_bridge, bridge, how, **start_options):
    """Stop a bridge subprocess (SIGTERM, which must exit 0, or SIGKILL) and start it again with the same
    start_options (env, args), so on the same data."""
    if how == "kill":
        bridge.kill()
    else:
        assert bridge.stop() == 0, bridge.output()
    return start_bridge(**start_options)


class Live(LiveBridge):
    """LiveBridge that may be closed twice (tests restart it by hand) and whose Store may use another fsync,
    the OS-call boundary where a failing disk is simulated."""

    closed = False

    def __init__(self, directory, clock, fsync=os.fsync):
        real_open = clawbridge.Bridge.open

        def open_with_fsync(config, clock=None):
            return real_open(config, clock=clock, fsync=fsync)

        with mock.patch.object(clawbridge.Bridge, "open", open_with_fsync):
            super().__init__(directory, clock=clock)

    def close(self):
        if not self.closed:
            self.closed = True
            super().close()

    def crash(self):
        """Stop without the final snapshot, as after kill -9: what is on disk is what the journal holds."""
        self.closed = True
        self.server.shutdown()
        self.server.server_close()
        self.bridge.store.close()


@pytest.fixture
def open_live(tmp_path, clock):
    """Open in-thread bridges on tmp_path/data, one at a time; any still open is closed at teardown."""
    opened = []

    def open_(fsync=os.fsync):
        live = Live(tmp_path / "data", clock, fsync)
        opened.append(live)
        return live

    yield open_
    for live in opened:
        live.close()


class Disk:
    """The fsync the Store is given: the real one, slowed by `delay` (a slow disk), or failing with EIO while
    `failing` is set. It remembers how much of each journal segment the fsyncs covered."""

    def __init__(self, delay=0.0):
        self.failing, self.delay, self.calls = False, delay, 0
        self.lock = threading.Lock()
        self.synced = {}    # journal path -> bytes covered by a completed fsync

    def __call__(self, fd):
        with self.lock:
            self.calls += 1
        if self.failing:
            raise OSError(errno.EIO, "Input/output error (injected)")
        time.sleep(self.delay)
        size = os.fstat(fd).st_size
        os.fsync(fd)
        path = os.readlink(f"/proc/self/fd/{fd}")
        if "journal-" in path:
            with self.lock:
                self.synced[path] = max(self.synced.get(path, 0), size)

    def durable_journal(self):
        """The journal bytes known to be on disk."""
        with self.lock:
            covered = sorted(self.synced.items())
        data = b""
        for path, size in covered:
            with open(path, "rb") as f:
                data += f.read(size)
        return data


# ===== helpers: load with acknowledgements =====


class Acked:
    """What the bridge acknowledged (2xx): the latest state of each task, notification ids, agent ids, and
    every id it ever issued."""

    def __init__(self):
        self.lock = threading.Lock()
        self.tasks, self.notes, self.agents, self.issued = {}, set(), set(), set()

    def task(self, task):
        with self.lock:
            self.issued.add(task["id"])
            old = self.tasks.get(task["id"])
            if old is None or task["version"] >= old["version"]:
                self.tasks[task["id"]] = task

    def note(self, note):
        with self.lock:
            self.issued.add(note["id"])
            self.notes.add(note["id"])

    def agent(self, agent):
        with self.lock:
            self.agents.add(agent["id"])

    def copy(self):
        with self.lock:
            other = Acked()
            other.tasks, other.notes = dict(self.tasks), set(self.notes)
            other.agents, other.issued = set(self.agents), set(self.issued)
            return other

    def count(self):
        with self.lock:
            return len(self.tasks) + len(self.notes) + len(self.agents)


class WriteLoad:
    """Client threads writing on a new connection per request (creates, updates, reassignments, verbs,
    notifications, registrations), recording every 2xx in `acked`. A thread stops at its first connection
    error, which is how a kill -9 of the bridge shows."""

    def __init__(self, bridge, acked, agents, threads=4, seed=0):
        self.bridge, self.acked, self.agents = bridge, acked, agents
        self.stop = threading.Event()
        self.failures = []      # unexpected statuses
        self.disconnects = 0
        self.threads = [threading.Thread(target=self.worker, args=(seed * 100 + n,), daemon=True)
                        for n in range(threads)]
        for thread in self.threads:
            thread.start()

    def finish(self):
        self.stop.set()
        for thread in self.threads:
            thread.join(30)

    def worker(self, seed):
        rng = random.Random(seed)
        mine = []       # this thread's tasks: no other client touches them, so the last ack is the latest state
        while not self.stop.is_set():
            try:
                self.step(rng, mine, seed)
            except (OSError, http.client.HTTPException):
                self.disconnects += 1
                return

    def step(self, rng, mine, seed):
        roll = rng.random()
        if not mine or roll < 0.25:
            status, body = self.call("POST", "/api/tasks", {"title": f"load {seed}", "force": True,
                                                             "assignedTo": rng.choice(self.agents)})
            if status == 201:
                mine.append(body)
                self.acked.task(body)
            return
        index = rng.randrange(len(mine))
        task = mine[index]
        if roll < 0.45:
            status, body = self.call("PUT", f"/api/tasks/{task['id']}",
                                     {"title": f"edit {rng.random()}", "priority": rng.choice(clawbridge.PRIORITIES)})
        elif roll < 0.65:
            target = rng.choice([a for a in self.agents if a != task["assignedTo"]] or self.agents)
            status, body = self.call("PUT", f"/api/tasks/{task['id']}", {"assignedTo": target, "force": True})
        elif roll < 0.8 and task["lane"] in ("assigned", "in_progress"):
            verb = "start" if task["lane"] == "assigned" else "complete"
            status, body = self.call("POST", f"/api/tasks/{task['id']}/{verb}",
                                     {"agentId": task["assignedTo"], "epoch": task["epoch"]})
        elif roll < 0.92:
            status, body = self.call("POST", "/api/notifications",
                                     {"agentId": rng.choice(self.agents), "message": f"note {seed}"})
            if status == 201:
                self.acked.note(body)
            return
        else:
            status, body = self.call("POST", "/api/agents/register",
                                     {"id": f"extra-{seed}-{rng.randrange(10 ** 9)}", "instanceId": "extra"})
            if status in (200, 201):
                self.acked.agent(body)
            return
        if status == 200:
            mine[index] = body
            self.acked.task(body)

    def call(self, method, path, body):
        status, _, reply = self.bridge.call(method, path, body)
        if status >= 300:
            self.failures.append((method, path, status, reply))
        return status, reply


def start_fleet(bridge, acked, prefix="a"):
    """Agents the load assigns work to, on two instances. Returns their ids."""
    agents = [f"{prefix}{n}" for n in range(4)]
    for n, agent_id in enumerate(agents):
        acked.agent(register(bridge, agent_id, instanceId=f"host-{n % 2}", maxConcurrentTasks=1000))
    return agents


def assert_acked_present(bridge, acked, epoch_gap=0):
    """Every acknowledged write is there with at least the acknowledged version (and, after a restore from a
    backup, an epoch at least epoch_gap higher)."""
    tasks = task_map(bridge)
    lost = sorted(set(acked.tasks) - set(tasks))
    assert not lost, f"{len(lost)} acknowledged tasks lost, e.g. {lost[:5]}"
    for task_id, want in acked.tasks.items():
        got = tasks[task_id]
        assert got["version"] >= want["version"], f"{task_id}: acknowledged v{want['version']}, found {got}"
        assert got["epoch"] >= want["epoch"] + epoch_gap, f"{task_id}: acknowledged epoch {want['epoch']}"
        if got["version"] == want["version"]:
            for field in ("lane", "assignedTo", "title", "priority"):
                assert got[field] == want[field], f"{task_id}.{field}: acknowledged {want}, found {got}"
    notes = {n["id"] for n in ok(bridge.call("GET", "/api/notifications"))}
    assert acked.notes <= notes, f"acknowledged notifications lost: {sorted(acked.notes - notes)[:5]}"
    agents = {a["id"] for a in ok(bridge.call("GET", "/api/agents"))}
    assert acked.agents <= agents, f"acknowledged agents lost: {sorted(acked.agents - agents)[:5]}"


def check_indexes(state):
    """The derived indexes agree with the entities: each agent's active set is exactly its unfinished tasks, the
    queue holds exactly the queued tasks, instance membership matches the agents."""
    for agent_id, agent in state.agents.items():
        unfinished = {t.id for t in state.tasks.values()
                      if t.assignedTo == agent_id and t.lane in clawbridge.ACTIVE_LANES}
        assert set(state.active.get(agent_id, ())) == unfinished, agent_id
        assert agent_id in state.members.get(agent.instanceId, ())
    assert set(state.active) <= set(state.agents)
    for priority in clawbridge.PRIORITIES:
        assert set(state.queued[priority]) == {t.id for t in state.tasks.values()
                                               if t.lane == "queued" and t.priority == priority}
    for task in state.tasks.values():
        assert task.lane not in clawbridge.ACTIVE_LANES or task.assignedTo in state.agents, task
    assert sum(len(m) for m in state.members.values()) == len(state.agents)


def index_view(state):
    return {"active": {a: sorted(ids) for a, ids in state.active.items()},
            "queued": {p: list(ids) for p, ids in state.queued.items()},
            "members": {i: sorted(ids) for i, ids in state.members.items() if ids},
            "inbox": {a: list(ids) for a, ids in state.inbox.items()}}


def sections(doc):
    """A state document's data as {section: {key: item}}, JSON-normalised."""
    doc = json.loads(json.dumps(doc))
    return {s: {item[clawbridge.SECTION_KEYS[s]]: item for item in doc[s]} for s in clawbridge.SECTIONS}


def without_soft(secs):
    secs = json.loads(json.dumps(secs))
    for agent in secs["agents"].values():
        for field in SOFT_FIELDS:
            agent.pop(field, None)
    return secs


# ===== round trips =====


def test_load_data_rebuilds_the_live_state_from_journal_and_snapshots(open_live, tmp_path):
    live = open_live()
    populate(live)
    directory = str(tmp_path / "data")

    def stored():
        documents, info = clawbridge.load_data(directory)
        assert info["seq"] == live.bridge.store.journal.appended
        assert documents.meta == live.bridge.state.meta
        return sections(documents.freeze(info["seq"]))

    def in_memory():
        return sections(live.bridge.state.to_doc(0))

    assert data_files(directory)[0] == [], "so far the state lives in the journal alone"
    assert without_soft(stored()) == without_soft(in_memory())
    live.bridge.snapshot()
    assert stored() == in_memory(), "a snapshot carries the soft state too"
    put_task(live, new_task(live, title="after the snapshot", assignedTo="srv-1")["id"], lane="review")
    notify(live, "mac-1", "after the snapshot")
    assert stored() == in_memory(), "snapshot plus journal"
    live.bridge.snapshot()
    ok(live.call("DELETE", "/api/agents/srv-2"))
    assert stored() == in_memory()
    assert len(data_files(directory)[0]) == 2


def indexes(state):
    """The indexes a State derives from its entities, in a form that compares: sets where order means
    nothing, lists where it does (the queues, the inboxes)."""
    return {"active": {a: set(ids) for a, ids in state.active.items() if ids},
            "roomy": set(state.roomy),
            "queued": {p: list(ids) for p, ids in state.queued.items()},
            "members": {i: set(ids) for i, ids in state.members.items()},
            "inbox": {a: list(ids) for a, ids in state.inbox.items() if ids},
            "unread": {a: set(ids) for a, ids in state.unread.items() if ids}}


def test_a_start_builds_the_indexes_the_live_bridge_kept(open_live):
    """A start fills the entity maps from the snapshot and the journal and derives the indexes once at the end:
    they must be the ones the running bridge kept change by change, through moves between instances, lanes
    and agents, deletes and reads, both for what the snapshot holds and for what only the journal holds."""
    live = open_live()
    ids = populate(live)
    live.bridge.snapshot()
    register(live, "mac-1", instanceId="server", maxConcurrentTasks=2)      # moves to another instance
    register(live, "late", roles=["astronomy"], instanceId="laptop")        # takes the queued P0 task
    act(live, task_map(live)[ids["progress"]], "complete")
    put_task(live, ids["review"], lane="queued", assignedTo=None, priority="P2")
    new_task(live, title="after the snapshot", priority="P2")
    ok(live.call("DELETE", f"/api/tasks/{ids['released']}"))
    unread = notify(live, "srv-2", "after the snapshot")
    ok(live.call("PUT", f"/api/notifications/{unread['id']}/read"))
    notify(live, "late", "welcome")
    with live.bridge.lock:
        before = indexes(live.bridge.state)
    assert before["active"]["late"] == {ids["queued"]} and "mac-1" in before["members"]["server"]
    live.crash()
    again = open_live()
    with again.bridge.lock:
        assert indexes(again.bridge.state) == before


def test_a_start_keeps_one_copy_of_each_repeated_value(open_live):
    """What makes a large state fit in memory: the values many entities repeat (lanes, priorities, agent and
    instance ids, role lists) are one object each after a start, whether they came from the snapshot, from
    a task the journal holds whole, or from a change the journal holds as the fields it changed."""
    live = open_live()
    for n in range(3):
        register(live, f"a{n}", roles=["dev", "ops"], instanceId="rack", maxConcurrentTasks=5)
    made = [new_task(live, title=f"t{n}", roles=["dev", "ops"], assignedTo=f"a{n % 3}") for n in range(6)]
    live.bridge.snapshot()
    made += [new_task(live, title=f"late {n}", roles=["dev", "ops"], assignedTo=f"a{n % 3}") for n in range(3)]
    put_task(live, made[0]["id"], title="renamed")                  # a change of no repeated value
    for task in (made[1], made[7]):                                 # a change of one, to two tasks
        put_task(live, task["id"], lane="review")
    for task in (made[2], made[5]):                                 # of three; then assigned again
        put_task(live, task["id"], lane="queued", assignedTo=None, priority="P3")
    live.crash()
    state = open_live().bridge.state
    tasks = list(state.tasks.values())
    assert len(tasks) == 9

    def copies(values):
        return len({id(value) for value in values})
    assert copies(t.roles for t in tasks) == 1 and tasks[0].roles == ("dev", "ops")
    for lane in ("assigned", "review"):
        assert copies(t.lane for t in tasks if t.lane == lane) == 1, lane
    assert copies(t.priority for t in tasks if t.priority == "P3") == 1
    assert copies(t.priority for t in tasks if t.priority == tasks[0].priority) == 1
    for agent in state.agents.values():
        held = [t.assignedTo for t in tasks if t.assignedTo == agent.id]
        assert held and copies(held) == 1, agent.id
    assert copies(a.instanceId for a in state.agents.values()) == 1
    assert copies([*(a.roles for a in state.agents.values()), tasks[0].roles]) == 1


def test_restart_in_process_keeps_everything_identical(open_live, clock):
    live = open_live()
    ids = populate(live)
    before = api_view(live)
    live.close()
    live = open_live()
    assert api_view(live) == before
    tasks = before["tasks"]
    assert tasks[ids["moved"]]["epoch"] == 3 and tasks[ids["moved"]]["priority"] == "P1"
    assert [h["event"] for h in tasks[ids["blocked"]]["history"]][-1] == "block"
    assert {t["lane"] for t in tasks.values()} == {"queued", "assigned", "in_progress", "blocked", "review", "done",
                                                   "cancelled"}
    assert "leaver" not in before["agents"] and "laptop" not in before["instances"]
    assert [n["read"] for n in before["notifications"].values() if n["agentId"] == "srv-2"].count(True) == 1


def test_a_long_history_is_journaled_as_its_new_entries_and_rebuilt_whole(open_live, clock):
    """A task update journals the entries it adds to the history, not the whole history again; a restart
    (journal replayed on the snapshot) rebuilds the same latest HISTORY_LIMIT entries."""
    live = open_live()
    ok(live.call("POST", "/api/agents/register", {"id": "w1"}), (201,))
    task = ok(live.call("POST", "/api/tasks", {"title": "busy", "assignedTo": "w1"}), (201,))
    ok(live.call("POST", "/api/sync", {}))      # a snapshot: the updates below are replayed from the journal
    for n in range(clawbridge.HISTORY_LIMIT + 10):
        clock.advance(1)
        ok(live.call("PUT", f"/api/tasks/{task['id']}", {"title": f"busy {n}"}))
    before = ok(live.call("GET", f"/api/tasks/{task['id']}"))
    assert len(before["history"]) == clawbridge.HISTORY_LIMIT
    assert before["history"][-1]["note"] == "title" and before["title"] == f"busy {clawbridge.HISTORY_LIMIT + 9}"
    segments = sorted(Path(live.config.data_dir).glob("journal-*.jsonl"))
    last = json.loads(segments[-1].read_text().splitlines()[-1])
    [(kind, section, item)] = [op for op in last["ops"] if op[1] == "tasks"]
    assert "history" not in item and len(item["historyAdd"]) == 1, item
    live.close()
    assert ok(open_live().call("GET", f"/api/tasks/{task['id']}")) == before


def test_a_changed_task_is_journaled_as_the_fields_that_changed_and_replayed_whole(open_live, clock):
    """A new entity is journaled whole ("put"); a change to one as the fields that changed ("set"); a restart
    from the journal alone rebuilds every field."""
    live = open_live()
    register(live, "w1", roles=["dev"])
    task = new_task(live, title="before", description="stays as it was", roles=["dev"], tags=["t"])
    clock.advance(1)
    after = put_task(live, task["id"], title="after")
    records = [json.loads(line) for line in newest_segment(Path(live.config.data_dir)).read_text().splitlines()]
    [(kind, _, item)] = [op for op in records[-1]["ops"] if op[1] == "tasks"]     # beside its audit entry
    assert kind == "set" and set(item) == {"id", "title", "version", "updatedAt", "historyAdd"}, item
    assert item["title"] == "after" and item["historyAdd"] == [[after["updatedAt"], "updated", "api", "title"]]
    created = [op for record in records for op in record["ops"] if op[1] == "tasks" and op[0] == "put"]
    assert created and set(created[0][2]) == set(clawbridge.Task._fields), "a new task is journaled whole"
    live.close()
    assert ok(open_live().call("GET", f"/api/tasks/{task['id']}")) == after


def a_snapshot(open_live):
    """A closed bridge whose data dir holds one snapshot of populate()'s data and no journal after it.
    Returns (the snapshot's path, its document, the state as sections())."""
    live = open_live()
    populate(live)
    live.bridge.snapshot()
    expected = sections(live.bridge.state.to_doc(0))
    live.close()
    [snapshot] = Path(live.config.data_dir).glob("snapshot-*.json")
    return snapshot, json.loads(snapshot.read_text()), expected


def loaded_state(snapshot):
    state, info = clawbridge.load_data(str(snapshot.parent), target=clawbridge.State)
    assert info["problems"] == [], info
    return state


@pytest.mark.parametrize("layout", ["indented", "one line"])
def test_a_snapshot_in_another_json_layout_loads_the_same_state(open_live, layout):
    """Snapshots are read a line at a time as the bridge writes them; any other layout of the same JSON (an
    operator's jq or a hand edit) is read whole, to the same state."""
    snapshot, doc, expected = a_snapshot(open_live)
    snapshot.write_text(json.dumps(doc, indent=2) if layout == "indented" else json.dumps(doc))
    state = loaded_state(snapshot)
    assert sections(state.to_doc(0)) == expected
    moved = [t for t in state.tasks.values() if json.loads(t.history)[-1][1] == "task-assigned"][0]
    longer = clawbridge.add_history(moved, clawbridge.Now(0.0, 10 ** 13), "note", "api", None)
    assert json.loads(longer)[:-1] == json.loads(moved.history), "a history read whole takes appends"


def one_entity_a_line(doc, separators=None):
    """A snapshot document laid out as the bridge writes it: the head on the first line, one entity a line
    (with json.dumps' white space, unless separators say otherwise)."""
    head = {k: v for k, v in doc.items() if k not in clawbridge.SECTIONS}
    parts = [json.dumps(head)[:-1]]
    for section in clawbridge.SECTIONS:
        parts.append(f',\n"{section}":[' + ",\n".join("\n" * (i == 0) + json.dumps(item, separators=separators)
                                                      for i, item in enumerate(doc[section])) + "]")
    return "".join(parts) + "}\n"


def format_2(doc):
    """A snapshot document (format 3) as format 2 wrote it: no checksum, a task's history a list of entries,
    first in its row."""
    fields = {s: list(clawbridge.FORMAT_2_FIELDS[clawbridge.ENTITY_TYPES[s]]) for s in clawbridge.SECTIONS}
    objects = {s: [dict(zip(doc["fields"][s], row)) for row in doc[s]] for s in clawbridge.SECTIONS}
    for task in objects["tasks"]:
        task["history"] = json.loads(task["history"])
    head = {k: v for k, v in doc.items() if k not in clawbridge.SECTIONS and k != "checksum"}
    return {**head, "version": 2, "fields": fields,
            **{s: [[item[f] for f in fields[s]] for item in objects[s]] for s in clawbridge.SECTIONS}}


def test_snapshots_of_format_1_and_2_and_rows_of_other_fields_load_the_same_state(open_live):
    """Format 1 wrote one object a line; format 2 first wrote rows in field order (a task's history last),
    then with a task's history first, both without a checksum and with the history as a list; a row written
    by a version with other fields (one dropped since, one not known yet) is read by name, the missing field
    taking its default."""
    snapshot, doc, expected = a_snapshot(open_live)
    assert doc["version"] == 3 and doc["checksum"].startswith("crc32:")
    old = format_2(doc)
    fields = old.pop("fields")
    objects = {s: [dict(zip(fields[s], row)) for row in old[s]] for s in clawbridge.SECTIONS}
    snapshot.write_text(one_entity_a_line({**old, **objects, "version": 1}))
    assert sections(loaded_state(snapshot).to_doc(0)) == expected

    in_field_order = {s: [[item[f] for f in clawbridge.ENTITY_TYPES[s]._fields] for item in objects[s]]
                      for s in clawbridge.SECTIONS}      # as format 2 wrote them first: a task's history last
    snapshot.write_text(one_entity_a_line({**old, **in_field_order, "fields": {
        s: list(clawbridge.ENTITY_TYPES[s]._fields) for s in clawbridge.SECTIONS}}))
    assert sections(loaded_state(snapshot).to_doc(0)) == expected

    snapshot.write_text(one_entity_a_line(format_2(doc), separators=(",", ":")))     # format 2 as it was last
    assert sections(loaded_state(snapshot).to_doc(0)) == expected
    fields = doc["fields"]
    objects = {s: [dict(zip(fields[s], row)) for row in doc[s]] for s in clawbridge.SECTIONS}

    other = [f for f in fields["tasks"] if f != "tags"] + ["futureField"]
    rows = [[item[f] if f in item else "x" for f in other] for item in objects["tasks"]]
    snapshot.write_text(one_entity_a_line({**doc, "fields": {**fields, "tasks": other}, "tasks": rows}))
    state = loaded_state(snapshot)
    for task_id, task in expected["tasks"].items():
        assert json.loads(json.dumps(clawbridge.entity_doc(state.tasks[task_id]))) == {**task, "tags": []}


def test_the_readme_jq_line_turns_snapshot_rows_into_objects(open_live):
    if shutil.which("jq") is None:
        pytest.skip("jq is not installed")
    snapshot, _, expected = a_snapshot(open_live)
    recipe = ".fields.tasks as $f | .tasks[] | [$f, .] | transpose | map({(.[0]): .[1]}) | add | .history |= fromjson"
    assert recipe in Path(__file__).resolve().parents[1].joinpath("README.md").read_text()
    out = subprocess.run(["jq", "-c", recipe, str(snapshot)], capture_output=True, text=True, check=True).stdout
    assert {t["id"]: t for t in map(json.loads, out.strip().split("\n"))} == expected["tasks"]  # U+2028 in titles


@pytest.mark.parametrize("op", [["frob", "tasks", "task-1"], ["set", "tasks", {"id": "nobody", "title": "x"}],
                                ["put", "tasks", {"id": "t", "title": "x", "history": [["not", "four"]]}]])
def test_a_damaged_journal_operation_refuses_to_start_rather_than_guess(tmp_path, op):
    directory = tmp_path / "data"
    directory.mkdir()
    (directory / "journal-000000000001.jsonl").write_text(json.dumps({"seq": 1, "ops": [op]}) + "\n")
    with pytest.raises(clawbridge.StorageError, match="damaged entry"):
        clawbridge.load_data(str(directory), target=clawbridge.State)
    assert gc.isenabled(), "the collector, off while loading, is on again after a failed load"


def test_a_start_leaves_no_collection_to_walk_what_it_loaded(open_live):
    """Loading makes objects for every stored value with the collector off; the bridge freezes them before
    the collector is on again, so that no collection at start-up walks them all (a third of a second on 100k
    tasks)."""
    live = open_live()
    live.bridge.run(lambda state, now: [clawbridge.create_task(state, now, {"title": f"task {n}", "tags": [f"t{n}"]})
                                        for n in range(2000)])
    live.close()
    walked = []

    def before_a_collection(phase, info):
        if phase == "start" and info["generation"] == 0:
            walked.append(len(gc.get_objects(generation=0)))

    gc.callbacks.append(before_a_collection)
    try:
        live = open_live()
    finally:
        gc.callbacks.remove(before_a_collection)
    assert len(live.bridge.state.tasks) == 2000
    assert max(walked, default=0) < 2000, f"a collection at start-up walked {max(walked)} objects"


def test_ids_and_epochs_never_repeat_after_a_restart_even_if_the_clock_went_back(open_live, clock):
    live = open_live()
    register(live, "a1", maxConcurrentTasks=100)
    register(live, "a2", maxConcurrentTasks=100)
    first = [new_task(live, assignedTo="a1") for _ in range(5)]
    notify(live, "a1", "x")
    epochs = {t["id"]: put_task(live, t["id"], assignedTo="a2")["epoch"] for t in first}
    view = api_view(live)
    issued = set(view["tasks"]) | set(view["notifications"])
    live.close()
    clock.ms -= 3       # the wall clock stepped back (NTP); the fake one stands still, so ids ran ahead of it
    live = open_live()
    later = [notify(live, "a2", "y") for _ in range(10)] + [new_task(live) for _ in range(5)]
    assert not issued & {item["id"] for item in later}
    for task in first:
        assert put_task(live, task["id"], assignedTo="a1")["epoch"] == epochs[task["id"]] + 1


@pytest.mark.parametrize("how", ["term", "kill"])
def test_restart_of_the_real_bridge_keeps_everything(start_bridge, how):
    bridge = start_bridge()
    populate(bridge)
    ignore = CLOCK_FIELDS + (SOFT_FIELDS if how == "kill" else ())
    before = api_view(bridge, ignore)
    bridge = restart(start_bridge, bridge, how)
    assert api_view(bridge, ignore) == before
    assert new_task(bridge, assignedTo="mac-1")["assignedTo"] == "mac-1", "and it takes writes"


def test_heartbeats_are_soft_state_yet_kept_by_a_clean_restart(start_bridge):
    bridge = start_bridge()
    register(bridge, "a1", instanceId="box")
    seq = detailed_health(bridge)["storage"]["journalSeq"]
    for n in range(20):
        beat = ok(bridge.call("POST", "/api/agents/a1/heartbeat", {"status": "working", "currentTask": f"t{n}"}))
    assert detailed_health(bridge)["storage"]["journalSeq"] == seq, "a plain beat adds no journal record"
    moved = ok(bridge.call("POST", "/api/agents/a1/heartbeat", {"hostname": "new-host"}))
    assert detailed_health(bridge)["storage"]["journalSeq"] == seq + 1, "a beat that changes the agent is journaled"
    bridge = restart(start_bridge, bridge, "kill")
    agent = ok(bridge.call("GET", "/api/agents/a1"))
    assert agent["hostname"] == "new-host" and agent["updatedAt"] == moved["agent"]["updatedAt"]
    beat = ok(bridge.call("POST", "/api/agents/a1/heartbeat", {"status": "working", "currentTask": "last"}))
    bridge = restart(start_bridge, bridge, "term")
    agent = ok(bridge.call("GET", "/api/agents/a1"))
    assert (agent["lastHeartbeat"], agent["currentTask"]) == (beat["agent"]["lastHeartbeat"], "last")


# ===== kill -9 =====


def test_every_acknowledged_write_survives_kill_9_under_load(start_bridge):
    acked = Acked()
    bridge = start_bridge()
    agents = start_fleet(bridge, acked)
    for trial in range(5):
        already = acked.count()
        load = WriteLoad(bridge, acked, agents, threads=6, seed=trial)
        wait_until(lambda: acked.count() >= already + 100, what="the load to get going")
        time.sleep(random.Random(trial).uniform(0, 0.3))
        bridge.kill()
        load.finish()
        assert not load.failures, load.failures[:3]
        issued = set(acked.issued)
        bridge = start_bridge()
        assert_acked_present(bridge, acked)
        fresh = [new_task(bridge, assignedTo=agents[0])["id"], notify(bridge, agents[0], "after restart")["id"]]
        assert not issued & set(fresh), "an id handed out before the crash was handed out again"
    assert acked.count() >= 500


# ===== torn and damaged journal =====


def made_once(tmp_path_factory, name, build):
    """A data dir filled by build(bridge) on a real bridge, which is then killed: made once per module for
    the tests that each start from a copy of it (a bridge's start and filling cost more than such a test).
    Returns (the data dir, what build returned)."""
    workdir = tmp_path_factory.mktemp(name)
    bridge = BridgeProcess(workdir)
    try:
        return data_dir(workdir), build(bridge)
    finally:
        bridge.kill()


def copy_of(made, tmp_path):
    """A copy of a made_once data dir where start_bridge() looks for its data."""
    source, _ = made
    shutil.copytree(source, data_dir(tmp_path))
    return data_dir(tmp_path)


@pytest.fixture(scope="module")
def journal_only(tmp_path_factory):
    """A bridge's data dir with data only in its journal: (data dir, view before the kill)."""
    def build(bridge):
        populate(bridge)
        return api_view(bridge, CLOCK_FIELDS + SOFT_FIELDS)
    return made_once(tmp_path_factory, "journal-only", build)


@pytest.fixture
def killed_with_journal(journal_only, tmp_path):
    """A copy of journal_only for this test: (view before the kill, newest segment path)."""
    return journal_only[1], newest_segment(copy_of(journal_only, tmp_path))


@pytest.mark.parametrize("tail", ["garbage", "half record", "record without newline"])
def test_a_torn_last_line_is_cut_off_and_the_bridge_starts(start_bridge, killed_with_journal, tail):
    before, segment = killed_with_journal
    good = segment.read_bytes()
    last = good.splitlines()[-1]
    torn = {"garbage": b"\x00\xff{garbage",
            "half record": last[:len(last) // 2],
            "record without newline": json.dumps({"seq": json.loads(last)["seq"] + 1, "ops": []}).encode()}[tail]
    segment.write_bytes(good + torn)
    bridge = start_bridge()
    assert api_view(bridge, CLOCK_FIELDS + SOFT_FIELDS) == before
    assert segment.read_bytes() == good, "the torn tail is cut off, the records before it kept"
    written = new_task(bridge, title="after the repair", assignedTo="mac-1")
    bridge = restart(start_bridge, bridge, "kill")
    assert task_map(bridge)[written["id"]]["title"] == "after the repair", "appends after the cut are readable"


@pytest.mark.parametrize("where", ["first line", "line before the last"])
def test_a_damaged_line_followed_by_records_refuses_to_start(killed_with_journal, tmp_path, where):
    _, segment = killed_with_journal
    lines = segment.read_bytes().splitlines(keepends=True)
    index = 0 if where == "first line" else len(lines) - 2
    lines[index] = b"#" * (len(lines[index]) - 1) + b"\n"
    segment.write_bytes(b"".join(lines))
    digests = file_digests(data_dir(tmp_path))
    output = refused_start(tmp_path)
    assert segment.name in output and "damaged" in output
    assert file_digests(data_dir(tmp_path)) == digests, "nothing is cut or rewritten when recovery is refused"


# ===== snapshots =====


@pytest.fixture(scope="module")
def snapshots_made(tmp_path_factory):
    """A bridge's data dir with two snapshots (forced with /api/sync) and journal records after each:
    (data dir, (view before the kill, [older, newer] snapshot names))."""
    def build(bridge):
        populate(bridge)
        seqs = [ok(bridge.call("POST", "/api/sync"))["snapshotSeq"]]
        moved = new_task(bridge, title="between the snapshots", assignedTo="mac-1")
        put_task(bridge, moved["id"], assignedTo="srv-1")
        seqs.append(ok(bridge.call("POST", "/api/sync"))["snapshotSeq"])
        act(bridge, put_task(bridge, moved["id"], assignedTo="mac-1"), "start")
        notify(bridge, "mac-1", "after the last snapshot")
        return api_view(bridge, CLOCK_FIELDS + SOFT_FIELDS), [f"snapshot-{seq:012d}.json" for seq in seqs]
    made = made_once(tmp_path_factory, "two-snapshots", build)
    assert [f"snapshot-{seq:012d}.json" for seq in data_files(made[0])[0]] == made[1][1]
    return made


@pytest.fixture
def two_snapshots_and_a_journal(snapshots_made, tmp_path):
    """A copy of snapshots_made for this test: (view before the kill, [older, newer] snapshot paths)."""
    directory = copy_of(snapshots_made, tmp_path)
    before, names = snapshots_made[1]
    return before, [directory / name for name in names]


def corrupt(path, how):
    data = path.read_bytes()
    damaged = {"truncated": data[:len(data) // 2], "garbage": b"\x00" * len(data),
               "not a snapshot": b'{"hello": "world"}\n',
               "damaged entity": data.replace(b'\n["mac-1"', b'\n[0,"mac-1"', 1),     # one value too many
               "damaged task row": data.replace(b'\n["task-', b'\n[0,"task-', 1),        # one value too many
               "damaged task history": data.replace(b'"[[', b'"[[\\"x\\"],', 1),    # still a JSON string
               "one value changed": data.replace(b'"srv-1"', b'"srv-2"', 1),     # only the checksum tells
               "no checksum line": data[:data.rindex(b'"checksum"')],
               "damaged field names": data.replace(b'"fields":{"agents":', b'"fields":{"agents":7,"x":', 1)}[how]
    assert damaged != data
    path.write_bytes(damaged)


@pytest.mark.parametrize("how", ["truncated", "garbage", "not a snapshot", "damaged entity", "damaged task row",
                                 "damaged task history", "one value changed", "no checksum line",
                                 "damaged field names"])
def test_a_corrupt_newest_snapshot_falls_back_to_the_older_one_and_the_journal(start_bridge, how,
                                                                            two_snapshots_and_a_journal):
    before, (older, newer) = two_snapshots_and_a_journal
    corrupt(newer, how)
    bridge = start_bridge()
    assert api_view(bridge, CLOCK_FIELDS + SOFT_FIELDS) == before
    assert not newer.exists() and newer.with_name(newer.name + ".corrupt").exists(), "kept aside for inspection"
    assert newer.name in bridge.output(), "the log says which file was bad"
    written = new_task(bridge, title="after the fallback", assignedTo="srv-1")
    bridge = restart(start_bridge, bridge, "kill")
    assert task_map(bridge)[written["id"]]["title"] == "after the fallback"
    after = api_view(bridge, CLOCK_FIELDS + SOFT_FIELDS)["tasks"]
    assert {task_id: after[task_id] for task_id in before["tasks"]} == before["tasks"], "the renamed file stays out"


@pytest.mark.parametrize("damage", ["both corrupt", "both missing"])
def test_no_good_state_left_refuses_to_start_and_leaves_the_data_alone(two_snapshots_and_a_journal, tmp_path,
                                                                      damage):
    _, snapshots = two_snapshots_and_a_journal
    directory = data_dir(tmp_path)
    segments = data_files(directory)[1]
    assert segments[0] > 1, "the journal no longer starts at record 1"
    for path in snapshots:
        if damage == "both corrupt":
            corrupt(path, "truncated")
        else:
            path.unlink()
    digests = file_digests(directory)
    output = refused_start(tmp_path)
    named = [path.name for path in snapshots] if damage == "both corrupt" else [f"journal-{segments[0]:012d}"]
    assert any(name in output for name in named), f"the message names the file:\n{output}"
    assert file_digests(directory) == digests, "the data dir is not overwritten"


def test_snapshots_rotate_and_prune_and_the_rest_still_recovers(start_bridge, tmp_path):
    bridge = start_bridge()
    register(bridge, "a1", maxConcurrentTasks=100)
    seqs = []
    for round_ in range(4):
        task = new_task(bridge, title=f"round {round_}", assignedTo="a1")
        put_task(bridge, task["id"], priority="P0")
        seqs.append(ok(bridge.call("POST", "/api/sync"))["snapshotSeq"])
    new_task(bridge, title="only in the journal", assignedTo="a1")
    before = api_view(bridge, CLOCK_FIELDS + SOFT_FIELDS)
    bridge.kill()
    directory = data_dir(tmp_path)
    assert data_files(directory) == (seqs[-2:], [seq + 1 for seq in seqs[-2:]]), sorted(os.listdir(directory))
    assert not [name for name in os.listdir(directory) if ".tmp" in name], "no temp file is left behind"
    bridge = start_bridge()
    assert api_view(bridge, CLOCK_FIELDS + SOFT_FIELDS) == before


# ===== the data-dir lock =====


def test_a_second_bridge_on_the_same_data_dir_refuses_to_start(start_bridge, tmp_path):
    first = start_bridge()
    register(first, "a1")
    link = tmp_path / "same-data"
    link.symlink_to(data_dir(tmp_path))
    for args in ([], ["--data-dir", str(data_dir(tmp_path))], ["--data-dir", str(link)]):
        code, output, seconds = run_cli(["--port", "0", *args], tmp_path, timeout=5)
        assert code != 0 and "already using the data directory" in output, output
        assert seconds < 5
    assert first.proc.poll() is None
    new_task(first, assignedTo="a1")
    bridge = restart(start_bridge, first, "kill")
    assert len(task_map(bridge)) == 1 and "a1" in api_view(bridge)["agents"]


# ===== backup and restore =====


def test_backup_under_load_restores_everything_acknowledged_before_it(start_bridge, tmp_path):
    acked = Acked()
    original = start_bridge()
    agents = start_fleet(original, acked)
    populate(original)
    load = WriteLoad(original, acked, agents, threads=4)
    wait_until(lambda: acked.count() >= 60, what="the load to get going")
    before = acked.copy()
    dest = tmp_path / "backup"
    code, output, _ = run_cli(["backup", str(dest), "--data-dir", str(data_dir(tmp_path))], tmp_path)
    assert code == 0 and "backup written" in output, output
    wait_until(lambda: acked.count() >= before.count() + 60, what="more writes after the backup")
    load.finish()       # the original's last writes, as if its host died now
    assert not load.failures, load.failures[:3]
    restored = start_bridge(env={"BRIDGE_DATA_DIR": str(dest)})
    assert restored.port != original.port
    fresh = [new_task(restored, assignedTo=agents[0]) for _ in range(20)]
    fresh_notes = [notify(restored, agents[0], "on the copy") for _ in range(5)]
    assert_acked_present(restored, before, epoch_gap=GAP)
    assert_acked_present(original, acked)       # the original was not disturbed by the backup
    assert restored.stop() == 0
    digests = file_digests(dest)
    code, output, _ = run_cli(["backup", str(dest), "--data-dir", str(data_dir(tmp_path))], tmp_path)
    assert code == 1 and "already holds bridge data" in output, output
    assert file_digests(dest) == digests, "a backup never writes over bridge data"
    clashes = acked.issued & {item["id"] for item in fresh + fresh_notes}
    assert not clashes, f"the copy handed out ids the original had already issued: {sorted(clashes)[:5]}"


def test_restore_keeps_epochs_past_the_gap_across_its_own_restarts(start_bridge, tmp_path):
    original = start_bridge()
    register(original, "a1")
    register(original, "a2")
    task = new_task(original, assignedTo="a1")
    task = put_task(original, task["id"], assignedTo="a2")
    dest = tmp_path / "copy"
    assert run_cli(["backup", str(dest), "--data-dir", str(data_dir(tmp_path))], tmp_path)[0] == 0
    original.kill()
    on_copy = {"args": ["--data-dir", str(dest)]}
    restored = start_bridge(**on_copy)
    assert task_map(restored)[task["id"]]["epoch"] == task["epoch"] + GAP
    moved = put_task(restored, task["id"], assignedTo="a1")
    assert moved["epoch"] == task["epoch"] + GAP + 1
    restored = restart(start_bridge, restored, "kill", **on_copy)
    assert task_map(restored)[task["id"]]["epoch"] >= moved["epoch"]


# ===== a failing disk =====


def broken_disk(open_live):
    """An in-thread bridge with one acknowledged task, whose disk then starts failing fsync (EIO); the write
    that meets the failure is answered 503. Returns (live, disk, the acknowledged task)."""
    disk = Disk()
    live = open_live(disk)
    register(live, "a1", maxConcurrentTasks=100)
    kept = new_task(live, title="before the failure", assignedTo="a1")
    disk.failing = True
    status, _, body = live.call("POST", "/api/tasks", {"title": "refused"})
    assert (status, body["error"]["code"]) == (503, "storage_unavailable")
    return live, disk, kept


def test_each_acknowledged_write_is_fsynced_before_its_reply_and_writers_share_fsyncs(open_live):
    disk = Disk(delay=0.03)     # a slow disk, so that writers pile up behind an fsync
    live = open_live(disk)
    register(live, "a1", maxConcurrentTasks=100)
    calls, writers = disk.calls, 16
    barrier, early = threading.Barrier(writers), []

    def writer(n):
        barrier.wait()
        task = new_task(live, title=f"burst {n}", assignedTo="a1")
        if task["id"].encode() not in disk.durable_journal():
            early.append(task["id"])

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(writers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert len(task_map(live)) == writers
    assert not early, f"acknowledged before an fsync covered the journal record: {early}"
    assert disk.calls - calls <= writers // 2, f"{disk.calls - calls} fsyncs for {writers} concurrent writes"


class CountingCondition(threading.Condition):
    """A condition that counts how often a thread went to sleep on it."""
    sleeps = 0

    def wait(self, timeout=None):
        CountingCondition.sleeps += 1
        return super().wait(timeout)


def journal_writers(journal, writers, rounds, witness=lambda: None):
    """writers threads, each appending a record to the journal and waiting for it, rounds times. Returns
    [(seq, error or None, what witness() said as the wait returned)] in the order the waits returned."""
    journal.this_round = CountingCondition(journal.lock)
    journal.next_round = CountingCondition(journal.lock)
    CountingCondition.sleeps = 0
    barrier, returned = threading.Barrier(writers), []

    def writer():
        barrier.wait()
        for _ in range(rounds):
            seq = journal.append({"ops": []})
            try:
                journal.wait(seq)
                returned.append((seq, None, witness()))
            except OSError as exc:
                returned.append((seq, exc, witness()))
                return

    threads = [threading.Thread(target=writer, daemon=True) for _ in range(writers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert not any(thread.is_alive() for thread in threads), "a writer never woke up"
    return returned


def test_a_finished_fsync_wakes_only_the_writers_it_covered(tmp_path):
    """Group commit: each wait returns only once an fsync that began after its record was written has ended,
    and a writer sleeps about once per record (the fsync that covers it), not once per fsync of anyone's."""
    covered = []    # the last record each finished fsync covered, appended as it ends

    def slow_fsync(fd):
        target = journal.sync_target
        time.sleep(0.005)
        os.fsync(fd)
        covered.append(target)

    journal = clawbridge.Journal(str(tmp_path), 1, fsync=slow_fsync)
    returned = journal_writers(journal, writers=24, rounds=8, witness=lambda: max(covered, default=0))
    assert sorted(seq for seq, _, _ in returned) == list(range(1, 24 * 8 + 1))
    assert all(error is None for _, error, _ in returned)
    early = [(seq, on_disk) for seq, _, on_disk in returned if on_disk < seq]
    assert not early, f"waits that returned before an fsync covered their record: {early[:5]}"
    assert journal.synced == 24 * 8 and covered[-1] == 24 * 8
    assert len(covered) < 24 * 8 / 2, f"{len(covered)} fsyncs for {24 * 8} writes: no group commit"
    # one sleep a write, two for a writer picked to run an fsync that another one began first; woken by every
    # fsync, they sleep about twice as often
    assert CountingCondition.sleeps <= 1.4 * 24 * 8, \
        f"{CountingCondition.sleeps} sleeps for {24 * 8} writes: writers woken by fsyncs that did not cover them"


def test_a_failed_fsync_wakes_every_waiting_writer_to_raise(tmp_path):
    started, release = threading.Event(), threading.Event()

    def failing_fsync(fd):
        started.set()
        release.wait(10)    # every writer has appended and waits behind this fsync
        raise OSError(errno.EIO, "I/O error")

    threading.Timer(0.3, release.set).start()
    journal = clawbridge.Journal(str(tmp_path), 1, fsync=failing_fsync)
    returned = journal_writers(journal, writers=8, rounds=1)
    assert started.is_set() and len(returned) == 8
    assert all(isinstance(error, OSError) and error.errno == errno.EIO for _, error, _ in returned)
    assert isinstance(journal.failed, OSError) and journal.synced == 0


def test_a_failed_write_wakes_every_writer_of_its_round_to_raise(tmp_path):
    """Two writers wait for the round after the one in progress. When that round's write fails, the writer
    that ran it raises, and the other must be woken to raise too, not sleep on, waiting for a round that
    nobody will run; nothing of theirs is left in the file."""
    started, release = threading.Event(), threading.Event()

    def first_fsync_waits(fd):
        started.set()
        release.wait(10)
        os.fsync(fd)

    journal = clawbridge.Journal(str(tmp_path), 1, fsync=first_fsync_waits)
    journal.this_round = CountingCondition(journal.lock)
    journal.next_round = CountingCondition(journal.lock)
    CountingCondition.sleeps = 0
    outcome = {}

    def writer(name):
        seq = journal.append({"ops": [name]})
        try:
            journal.wait(seq)
            outcome[name] = seq
        except OSError as exc:
            outcome[name] = exc

    first = threading.Thread(target=writer, args=("first",), daemon=True)
    first.start()
    assert started.wait(10)
    later = [threading.Thread(target=writer, args=(name,), daemon=True) for name in ("second", "third")]
    for thread in later:
        thread.start()
    deadline = time.monotonic() + 10
    while CountingCondition.sleeps < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert CountingCondition.sleeps == 2, "both later writers wait behind the round in progress"
    path = os.path.join(str(tmp_path), journal.segment)
    with open(path, "rb") as f:
        assert [json.loads(line)["ops"] for line in f] == [["first"]], "only the first round's record is written"
    writable = journal.fd
    journal.fd = os.open(path, os.O_RDONLY)     # the next round's write fails
    release.set()
    for thread in [first, *later]:
        thread.join(5)
    assert not any(thread.is_alive() for thread in [first, *later]), f"a writer sleeps on: {outcome}"
    assert outcome["first"] == 1
    assert isinstance(outcome["second"], OSError) and isinstance(outcome["third"], OSError)
    assert isinstance(journal.failed, OSError) and journal.synced == 1
    os.close(journal.fd)
    journal.fd = writable
    assert journal.discard_unsynced() == 1 and journal.appended == 1 and not journal.unwritten
    with open(path, "rb") as f:
        assert [json.loads(line)["ops"] for line in f] == [["first"]]


def test_records_wait_in_memory_for_a_round_and_a_rotation_or_close_writes_them_first(tmp_path):
    """A record reaches the file only in a round (wait), never at append, which runs under the state lock;
    rotate and close, which no round may follow, write and fsync what is still in memory."""
    journal = clawbridge.Journal(str(tmp_path), 1)

    def in_file(name):
        with open(tmp_path / name, "rb") as f:
            return [json.loads(line)["seq"] for line in f]

    first = journal.segment
    assert [journal.append({"ops": []}) for _ in range(3)] == [1, 2, 3]
    assert in_file(first) == [] and journal.synced == 0
    journal.wait(2)
    assert in_file(first) == [1, 2, 3] and journal.synced == 3, "a round writes all that was appended before it"
    journal.append({"ops": []})
    assert journal.rotate() == 4 and in_file(first) == [1, 2, 3, 4] and journal.synced == 4
    second = journal.segment
    assert second != first
    journal.append({"ops": []})
    journal.close()
    assert in_file(second) == [5]


def test_a_rotation_whose_write_fails_marks_the_journal_failed_and_leaves_nothing_of_it(tmp_path):
    disk = Disk()
    journal = clawbridge.Journal(str(tmp_path), 1, fsync=disk)
    journal.append({"ops": []})
    journal.wait(1)
    journal.append({"ops": ["not on disk"]})
    disk.failing = True
    with pytest.raises(OSError):
        journal.rotate()
    assert isinstance(journal.failed, OSError) and journal.synced == 1
    assert journal.discard_unsynced() == 1 and journal.appended == 1
    with open(tmp_path / journal.segment, "rb") as f:
        assert [json.loads(line)["seq"] for line in f] == [1]


def test_a_failing_fsync_refuses_writes_until_a_snapshot_succeeds(open_live):
    live, disk, kept = broken_disk(open_live)
    status, _, health = live.call("GET", "/health")
    assert (status, health["status"]) == (503, "degraded")
    for method, path, payload in (("PUT", f"/api/tasks/{kept['id']}", {"title": "changed"}),
                                  ("POST", "/api/agents/register", {"id": "a2"}),
                                  ("POST", "/api/notifications", {"agentId": "a1", "message": "m"}),
                                  ("POST", "/api/tasks", {"title": "refused too"})):
        status, _, body = live.call(method, path, payload)
        assert (status, body["error"]["code"]) == (503, "storage_unavailable"), (method, path)
    with pytest.raises(OSError):
        live.bridge.snapshot()      # what the Flusher retries: no recovery while the disk still fails
    assert live.call("GET", "/health")[0] == 503
    disk.failing = False
    live.bridge.snapshot()
    status, _, health = live.call("GET", "/health")
    assert (status, health["status"]) == (200, "ok")
    after = new_task(live, title="after the recovery", assignedTo="a1")
    before_restart = api_view(live)
    live.close()
    live = open_live()
    assert api_view(live) == before_restart
    titles = {t["id"]: t["title"] for t in before_restart["tasks"].values()}
    assert (titles[kept["id"]], titles[after["id"]]) == ("before the failure", "after the recovery")
    assert "refused too" not in titles.values() and "a2" not in before_restart["agents"]


def test_a_snapshot_that_comes_before_the_refused_writers_take_back_their_changes_leaves_them_out(open_live):
    """After a failed fsync the writers it refused take their changes back (discard_unsynced), but the
    Flusher's snapshot, the way storage recovers, may get the state lock first. It must hold only what the
    journal held: not the refused change, and with the journal going on after it in order, so that the
    writes acknowledged after the recovery are there after a restart (a crash: no final snapshot)."""
    disk = Disk()
    live = open_live(disk)
    register(live, "a1", maxConcurrentTasks=100)
    kept = new_task(live, title="before the failure", assignedTo="a1")
    bridge = live.bridge
    take_back = bridge.discard_unsynced

    def snapshot_first():
        disk.failing = False
        bridge.snapshot()
        take_back()

    with mock.patch.object(bridge, "discard_unsynced", snapshot_first):
        disk.failing = True
        status, _, body = live.call("POST", "/api/tasks", {"title": "refused"})
    assert (status, body["error"]["code"]) == (503, "storage_unavailable")
    assert live.call("GET", "/health")[0] == 200
    after = [new_task(live, title=f"after the recovery {n}", assignedTo="a1")["id"] for n in range(3)]
    before_restart = api_view(live)
    titles = {t["title"] for t in before_restart["tasks"].values()}
    assert "refused" not in titles and {"before the failure", "after the recovery 2"} <= titles
    assert {kept["id"], *after} <= set(before_restart["tasks"])
    live.crash()
    live = open_live()
    assert api_view(live) == before_restart


def test_reads_keep_working_while_writes_are_refused(open_live):
    live, _, kept = broken_disk(open_live)
    status, _, tasks = live.call("GET", ALL_TASKS)
    assert status == 200, f"a read during a storage failure: {status} {tasks}"
    assert {t["id"]: t["title"] for t in tasks}[kept["id"]] == "before the failure"
    assert ok(live.call("GET", "/api/agents/a1"))["activeTasks"] == [kept["id"]]


def test_a_write_answered_503_did_not_happen(open_live):
    """The 503 says the change was not saved and to retry, so it must not show up later (a retry would
    otherwise create the task twice)."""
    live, disk, _ = broken_disk(open_live)
    disk.failing = False
    live.bridge.snapshot()
    assert "refused" not in [t["title"] for t in ok(live.call("GET", ALL_TASKS))]
    live.close()
    live = open_live()
    assert "refused" not in [t["title"] for t in ok(live.call("GET", ALL_TASKS))]


def limit_file_size(pid, size):
    """Set the bridge process's RLIMIT_FSIZE: a write past `size` bytes fails with EFBIG, like a full disk."""
    resource.prlimit(pid, resource.RLIMIT_FSIZE, (size, resource.RLIM_INFINITY))


@pytest.mark.parametrize("where", ["mid-segment", "first record of a segment"])
def test_a_failed_journal_write_is_503_and_recovery_loses_nothing(start_bridge, tmp_path, where):
    bridge = start_bridge()
    acked = Acked()
    agents = start_fleet(bridge, acked)
    ok(bridge.call("POST", "/api/sync"))
    if where == "mid-segment":
        acked.task(new_task(bridge, assignedTo=agents[0]))
    segment = newest_segment(data_dir(tmp_path))
    limit_file_size(bridge.proc.pid, segment.stat().st_size + 20)      # the next record is written only in part
    status, _, body = bridge.call("POST", "/api/tasks", {"title": "refused", "assignedTo": agents[0]})
    assert (status, body["error"]["code"]) == (503, "storage_unavailable")
    status, _, health = bridge.call("GET", "/health")
    assert (status, health["status"]) == (503, "degraded")
    limit_file_size(bridge.proc.pid, resource.RLIM_INFINITY)
    wait_until(lambda: bridge.call("GET", "/health")[0] == 200, what="the Flusher's recovery snapshot")
    for n in range(3):
        acked.task(new_task(bridge, title=f"after the recovery {n}", assignedTo=agents[1]))
    bridge = restart(start_bridge, bridge, "kill")
    assert_acked_present(bridge, acked)


# ===== concurrent mutations =====


@pytest.fixture
def frequent_thread_switches():
    """Switch threads every few microseconds instead of every 5 ms, so that unlocked check-then-act code
    would interleave and show."""
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)
    yield
    sys.setswitchinterval(interval)


def test_concurrent_creates_and_reassignments_keep_indexes_and_fence_epochs(open_live, frequent_thread_switches):
    live = open_live()
    agents = [f"a{n}" for n in range(4)]
    for n, agent_id in enumerate(agents):
        register(live, agent_id, instanceId=f"host-{n % 2}", maxConcurrentTasks=1000)
    shared = [new_task(live, assignedTo="a0")["id"] for _ in range(3)]
    answers, created, errors, lock = [], [], [], threading.Lock()

    def worker(seed):
        rng = random.Random(seed)
        own = new_task(live, assignedTo=rng.choice(agents))
        own_epochs = [own["epoch"]]
        for _ in range(30):
            roll = rng.random()
            if roll < 0.4:
                status, _, body = live.call("PUT", f"/api/tasks/{rng.choice(shared)}",
                                            {"assignedTo": rng.choice(agents)})
            elif roll < 0.6:
                target = rng.choice([a for a in agents if a != own["assignedTo"]])
                own = put_task(live, own["id"], assignedTo=target)
                own_epochs.append(own["epoch"])
                continue
            elif roll < 0.75:
                status, _, body = live.call("POST", "/api/tasks", {"title": "c", "assignedTo": rng.choice(agents)})
            elif roll < 0.85:
                status, _, body = live.call("PUT", f"/api/tasks/{rng.choice(shared)}", {"lane": "queued"})
            else:
                task = ok(live.call("GET", f"/api/tasks/{rng.choice(shared)}"))
                status, _, body = live.call("POST", f"/api/tasks/{task['id']}/start",
                                            {"agentId": task["assignedTo"] or "a0", "epoch": task["epoch"]})
            with lock:
                if status in (200, 201):
                    answers.append(body)
                    if status == 201:
                        created.append(body["id"])
                elif status != 409:
                    errors.append((status, body))
        with lock:
            answers.append(own)
            created.append(own["id"])
            if own_epochs != list(range(own_epochs[0], own_epochs[0] + len(own_epochs))):
                errors.append(("epochs of a task reassigned one after another", own_epochs))

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(10)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not errors, errors[:3]
    final = task_map(live)
    assert len(set(created)) == len(created) and set(created) <= set(final), "each create made its own task"
    owners, versions = {}, {}
    for task in answers:
        if task["assignedTo"]:
            owner = owners.setdefault((task["id"], task["epoch"]), task["assignedTo"])
            assert owner == task["assignedTo"], f"epoch {task['epoch']} of {task['id']} given to two agents"
        seen = versions.setdefault((task["id"], task["version"]), (task["epoch"], task["assignedTo"], task["lane"]))
        assert seen == (task["epoch"], task["assignedTo"], task["lane"]), f"two writes made v{task['version']}"
        assert final[task["id"]]["epoch"] >= task["epoch"] and final[task["id"]]["version"] >= task["version"]
    check_indexes(live.bridge.state)
    for agent in ok(live.call("GET", "/api/agents")):
        unfinished = {t["id"] for t in final.values()
                      if t["assignedTo"] == agent["id"] and t["lane"] in clawbridge.ACTIVE_LANES}
        assert set(agent["activeTasks"]) == unfinished
    before = api_view(live)
    indexes = index_view(live.bridge.state)
    live.close()
    live = open_live()
    check_indexes(live.bridge.state)
    assert api_view(live) == before
    assert index_view(live.bridge.state)["active"] == indexes["active"]


def test_queue_order_survives_a_restart(tmp_path, clock):
    """Which queued task an agent gets next must not depend on whether the bridge restarted meanwhile."""
    def scenario(directory, restart_midway):
        live = Live(directory, clock)
        try:
            register(live, "x", roles=["r"], maxConcurrentTasks=1)
            first = new_task(live, title="first", roles=["r"])
            new_task(live, title="second", roles=["r"])
            new_task(live, title="third", roles=["r"])
            act(live, first, "release")     # back in the queue, behind the two that waited all along
            if restart_midway:
                live.close()
                live = Live(directory, clock)
            register(live, "y", roles=["r"], maxConcurrentTasks=1)
            return {task["title"]: task["assignedTo"] for task in task_map(live).values()}
        finally:
            live.close()

    without = scenario(tmp_path / "plain", False)
    with_restart = scenario(tmp_path / "restarted", True)
    assert with_restart == without


HAND_LAYOUTS = ["format 2", "format 3 without its checksum"]


def with_history(doc, layout, history, separators=None):
    """The text of a snapshot whose first task has the given history (a list of entries), as a hand edit or
    an older version leaves it: in format 2 (a list, first in the row, read a line at a time), or in format 3
    without the checksum line that vouches for the rows (its text, read whole and checked). Returns (text,
    the task's id)."""
    if layout == "format 2":
        doc, value = format_2(doc), history
    else:
        value = json.dumps(history, separators=separators)
    fields = doc["fields"]["tasks"]
    row = doc["tasks"][0]
    row[fields.index("history")] = value
    return one_entity_a_line(doc, separators=separators), row[fields.index("id")]


@pytest.mark.parametrize("layout", HAND_LAYOUTS)
def test_a_snapshot_history_longer_than_the_limit_keeps_the_latest_entries(open_live, layout):
    """A task's history past HISTORY_LIMIT (a hand edit, or a version with a higher limit) keeps only the
    latest entries, as after any change."""
    snapshot, doc, _ = a_snapshot(open_live)
    long_history = [[n, "note", "api", f"entry {n}"] for n in range(clawbridge.HISTORY_LIMIT + 5)]
    text, task_id = with_history(doc, layout, long_history)
    snapshot.write_text(text)
    assert json.loads(loaded_state(snapshot).tasks[task_id].history) == long_history[-clawbridge.HISTORY_LIMIT:]


@pytest.mark.parametrize("layout", HAND_LAYOUTS)
def test_a_snapshot_history_whose_notes_hold_the_entry_boundary_keeps_counting_right(open_live, layout):
    """History text kept from a snapshot must have "],[" only between entries; a note holding it (as an
    agent's verb note may) is written so that it does not, and appends past the limit keep exactly the
    latest entries, in memory and after a restart on the journal."""
    snapshot, doc, _ = a_snapshot(open_live)
    history = [[n, "note", "api", "x],[y" if n % 2 else "]"] for n in range(clawbridge.HISTORY_LIMIT)]
    text, task_id = with_history(doc, layout, history, separators=(",", ":"))
    snapshot.write_text(text)
    task = loaded_state(snapshot).tasks[task_id]
    assert json.loads(task.history) == history and task.history.count("],[") == len(history) - 1
    live = open_live()
    ok(live.call("POST", f"/api/agents/register", {"id": "noter"}))
    given = ok(live.call("PUT", f"/api/tasks/{task.id}", {"assignedTo": "noter", "force": True}))
    notes = [e["note"] for e in given["history"]]
    assert notes[:-1] == [e[3] for e in history][len(history) + 1 - clawbridge.HISTORY_LIMIT:]
    for n, verb in enumerate(("start", "block", "start")):
        ok(live.call("POST", f"/api/tasks/{task.id}/{verb}", {"agentId": "noter", "epoch": given["epoch"],
                                                             "note": f"],[{n}]"}))
    after = ok(live.call("GET", f"/api/tasks/{task.id}"))["history"]
    assert [e["note"] for e in after] == (notes + ["],[0]", "],[1]", "],[2]"])[-clawbridge.HISTORY_LIMIT:]
    live.close()
    assert ok(open_live().call("GET", f"/api/tasks/{task.id}"))["history"] == after


@pytest.mark.parametrize("layout", HAND_LAYOUTS)
def test_a_snapshot_history_with_white_space_is_read_to_compact_text(open_live, layout):
    """History text kept from a snapshot must be joined by "],[" as appends count entries; one laid out with
    white space (a hand edit) is encoded again, so the limit still holds after appends."""
    snapshot, doc, _ = a_snapshot(open_live)
    history = [[n, "note", "api", None] for n in range(clawbridge.HISTORY_LIMIT)]
    text, task_id = with_history(doc, layout, history)      # json.dumps: ", " between values
    snapshot.write_text(text)
    task = loaded_state(snapshot).tasks[task_id]
    assert task.history == clawbridge.COMPACT(history)
    longer = clawbridge.add_history(task, clawbridge.Now(0.0, 10 ** 13), "note", "api", None)
    assert len(json.loads(longer)) == clawbridge.HISTORY_LIMIT


@pytest.mark.parametrize("history", ["[[1,2]]", "not json", "{}", "[[1,\"note\",\"api\",null]"])
def test_a_snapshot_history_text_nobody_vouches_for_is_checked(open_live, history):
    """A task's history as text is taken as it is only from a snapshot whose checksum holds: read whole (its
    checksum line gone, say), text that is not a list of [at, event, by, note] is a damaged entry, and the
    start falls back to the journal."""
    snapshot, doc, expected = a_snapshot(open_live)
    doc["tasks"][0][doc["fields"]["tasks"].index("history")] = history
    snapshot.write_text(one_entity_a_line(doc))
    state, info = clawbridge.load_data(str(snapshot.parent), target=clawbridge.State)
    assert [p for p in info["problems"] if snapshot.name in p and "damaged entry" in p], info["problems"]
    assert sections(state.to_doc(0))["tasks"] == expected["tasks"]


def test_a_snapshot_larger_than_a_block_is_checked_whole(tmp_path):
    """A snapshot is written and checked in pieces of SNAPSHOT_BLOCK characters: one spanning many of them
    loads back to the same state, and one byte changed in any piece makes it damaged."""
    state = clawbridge.State()
    for n in range(400):
        state.put_task(clawbridge.Task(id=f"task-{n}", title=f"task {n} \u00e9\u2028", description="d" * 500,
                                       history=clawbridge.COMPACT([[n, "created", None, f"\u00fc {n}"]])))
    path = tmp_path / f"snapshot-{1:012d}.json"
    clawbridge.atomic_write(str(path), clawbridge.snapshot_chunks(state.freeze(1)))
    data = path.read_bytes()
    assert len(data) > 3 * clawbridge.SNAPSHOT_BLOCK
    assert loaded_state(path).to_doc(1) == state.to_doc(1)
    for near in (len(data) // 3, len(data) * 2 // 3, len(data) - 600):
        at = data.index(b"ddd", near)      # inside a description
        path.write_bytes(data[:at] + b"e" + data[at + 1:])
        with pytest.raises(clawbridge.StorageError, match="checksum does not match"):
            clawbridge.load_data(str(tmp_path), target=clawbridge.State)


JSON_SAMPLES = [{}, [], "", "plain", "Ünïcødé ✓ 日本 \u2028 \"quoted\" \\ \n\t\x00", 0, -1, 2 ** 70, 1.5, -0.0,
                1e300, float("nan"), float("inf"), None, True, False,
                {"nested": [{"a": [1, [2, [3]]]}, None], "é": "ü", "": [True, 1.25]},
                [[1796239698218, "updated", "api", "title"]], {1: "int key", 2.5: "float key", None: "n", True: "t"}]


@pytest.mark.parametrize("ascii_only", [True, False], ids=["escaped", "utf-8"])
def test_the_compact_encoder_writes_what_json_dumps_writes(ascii_only):
    """Data files and replies are encoded by an encoder made once: the text must be json.dumps's, byte for byte,
    and what json cannot encode is refused the same way; where the C encoder is missing, json's own is used."""
    encode = clawbridge.compact_encoder(ensure_ascii=ascii_only)
    for value in JSON_SAMPLES:
        assert encode(value) == json.dumps(value, separators=(",", ":"), ensure_ascii=ascii_only), value
    for bad in ({"set": {1}}, [object()], {("tuple", "key"): 1}):
        with pytest.raises(TypeError):
            encode(bad)
    with mock.patch.object(json.encoder, "c_make_encoder", None):
        fallback = clawbridge.compact_encoder(ensure_ascii=ascii_only)
    assert fallback.__self__.ensure_ascii is ascii_only     # json.JSONEncoder(...).encode
    assert all(fallback(value) == encode(value) for value in JSON_SAMPLES)
