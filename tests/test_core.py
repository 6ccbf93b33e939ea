"""The pure domain: registration, assignment order, transitions, fencing, ids, config parsing, routing."""
import json

import pytest

import clawbridge as cb
from conftest import FakeClock


@pytest.fixture
def world():
    """A state, a clock, and helpers to act on them the way the service does."""
    class World:
        def __init__(self):
            self.state = cb.State()
            self.clock = FakeClock()

        def do(self, fn, *args):
            result = fn(self.state, self.clock.now(), *args)
            self.state.take_changes()
            return result

        def agent(self, agent_id, instance="i1", roles=("dev",), max_tasks=3, **extra):
            return self.do(cb.register_agent, {"id": agent_id, "instanceId": instance, "roles": list(roles),
                                               "maxConcurrentTasks": max_tasks, **extra})[0]

        def task(self, title="t", **fields):
            return self.do(cb.create_task, {"title": title, **fields})

        def active(self, agent_id):
            return set(self.state.active[agent_id])

    return World()


# --- registration ---

def test_register_is_an_idempotent_upsert_that_keeps_tasks(world):
    world.agent("a1")
    task = world.task(roles=["dev"])
    assert task["assignedTo"] == "a1"
    view, created = world.do(cb.register_agent, {"id": "a1", "name": "Alice", "roles": "dev,qa"})
    assert not created
    assert view["name"] == "Alice" and view["roles"] == ("dev", "qa")
    assert view["activeTasks"] == [task["id"]]
    assert view["instanceId"] == "i1", "fields not given are kept"


@pytest.mark.parametrize("payload,field", [
    ({"id": ".hidden"}, "id"),
    ({"id": "a" * 65}, "id"),
    ({"id": "a b"}, "id"),
    ({"id": "ok", "maxConcurrentTasks": 0}, "maxConcurrentTasks"),
    ({"id": "ok", "maxConcurrentTasks": True}, "maxConcurrentTasks"),
    ({"id": "ok", "heartbeatInterval": "fast"}, "heartbeatInterval"),
    ({"id": "ok", "roles": [1, 2]}, "roles"),
    ({"id": "ok", "tailscaleIP": "not-an-ip"}, "tailscaleIP"),
    ({"id": "ok", "metadata": []}, "metadata"),
    ({"id": "ok", "instanceId": "../etc"}, "instanceId"),
])
def test_register_rejects_bad_fields_naming_them(world, payload, field):
    with pytest.raises(cb.BridgeError) as err:
        world.do(cb.register_agent, payload)
    assert err.value.status == 400 and err.value.field == field
    assert "ok" not in world.state.agents


def test_registration_journals_the_agent_and_its_instance(world):
    cb.register_agent(world.state, world.clock.now(), {"id": "a1", "instanceId": "mac"})
    ops = world.state.take_changes().ops
    assert {(op[0], op[1]) for op in ops} == {("put", "agents"), ("put", "instances")}


# --- assignment order ---

def test_assignment_prefers_role_then_lowest_workload(world):
    world.agent("qa1", roles=["qa"])
    world.agent("dev1", roles=["dev"])
    world.agent("dev2", roles=["dev"])
    first = world.task(roles=["dev"])
    second = world.task(roles=["dev"])
    assert {first["assignedTo"], second["assignedTo"]} == {"dev1", "dev2"}, "spread by workload"
    assert world.task(roles=["qa"])["assignedTo"] == "qa1"


def test_assignment_breaks_ties_by_preferred_instance_then_id(world):
    world.agent("b", instance="mac")
    world.agent("c", instance="server")
    assert world.task(instanceId="server")["assignedTo"] == "c"
    world.do(cb.delete_task, world.state.tasks and next(iter(world.state.tasks)))
    assert world.task()["assignedTo"] == "b", "equal candidates: lowest agent id"


def test_never_above_max_concurrent_tasks_then_queued(world):
    world.agent("solo", max_tasks=2)
    lanes = [world.task()["lane"] for _ in range(4)]
    assert lanes == ["assigned", "assigned", "queued", "queued"]
    assert len(world.active("solo")) == 2


def test_queued_work_goes_out_by_priority_when_capacity_appears(world):
    low = world.task(priority="P3")
    urgent = world.task(priority="P0")
    assert low["lane"] == urgent["lane"] == "queued"
    world.agent("late", max_tasks=1)
    assert world.state.tasks[urgent["id"]].assignedTo == "late"
    assert world.state.tasks[low["id"]].lane == "queued"


def test_empty_roles_match_any_agent_and_role_mismatch_queues(world):
    world.agent("ops", roles=["devops"])
    assert world.task()["assignedTo"] == "ops"
    assert world.task(roles=["design"])["lane"] == "queued"


def test_completion_frees_capacity_for_queued_work(world):
    world.agent("solo", max_tasks=1)
    first = world.task()
    waiting = world.task()
    world.do(cb.agent_verb, first["id"], "complete", {"agentId": "solo", "epoch": first["epoch"]})
    assert world.state.tasks[waiting["id"]].assignedTo == "solo"


# --- reassignment, epochs, notifications ---

def test_manual_reassignment_moves_the_task_and_tells_both_agents(world):
    world.agent("a1")
    world.agent("a2")
    task = world.task()
    owner = task["assignedTo"]
    other = "a2" if owner == "a1" else "a1"
    moved = world.do(cb.update_task, task["id"], {"assignedTo": other})
    assert moved["epoch"] == task["epoch"] + 1 and moved["assignedTo"] == other
    assert world.active(other) == {task["id"]} and world.active(owner) == set()
    kinds = {n.agentId: n.type for n in world.state.notifications.values() if n.taskId == task["id"]}
    assert kinds[other] == "task-assigned"
    assert any(n.agentId == owner and n.type == "task-revoked" for n in world.state.notifications.values())


def test_reassigning_to_a_full_agent_is_refused_unless_forced(world):
    world.agent("full", max_tasks=1)
    world.task()
    world.agent("b")
    task = world.task()
    with pytest.raises(cb.BridgeError) as err:
        world.do(cb.update_task, task["id"], {"assignedTo": "full"})
    assert err.value.status == 409 and err.value.code == "agent_full"
    forced = world.do(cb.update_task, task["id"], {"assignedTo": "full", "force": True})
    assert forced["assignedTo"] == "full"


def test_if_match_guards_updates(world):
    world.agent("a1")
    task = world.task()
    tag = cb.etag(world.state.tasks[task["id"]])
    world.do(cb.update_task, task["id"], {"priority": "P1"}, tag)
    with pytest.raises(cb.BridgeError) as err:
        world.do(cb.update_task, task["id"], {"priority": "P0"}, tag)
    assert err.value.status == 412
    assert world.state.tasks[task["id"]].priority == "P1"


def test_verbs_walk_the_lanes(world):
    world.agent("a1")
    task = world.task()
    body = {"agentId": "a1", "epoch": task["epoch"]}
    assert world.do(cb.agent_verb, task["id"], "claim", body)["lane"] == "assigned"
    assert world.do(cb.agent_verb, task["id"], "start", body)["lane"] == "in_progress"
    assert world.do(cb.agent_verb, task["id"], "block", {**body, "reason": "waiting"})["lane"] == "blocked"
    assert world.do(cb.agent_verb, task["id"], "complete", body)["lane"] == "done"
    assert world.do(cb.agent_verb, task["id"], "complete", body)["lane"] == "done", "a retry is harmless"
    with pytest.raises(cb.BridgeError) as err:
        world.do(cb.agent_verb, task["id"], "start", body)
    assert err.value.status == 409 and err.value.code == "invalid_transition"


@pytest.mark.parametrize("who,epoch_delta", [("a2", 0), ("a1", -1), ("a1", 1)])
def test_fencing_refuses_a_stale_owner_and_leaves_the_task_alone(world, who, epoch_delta):
    world.agent("a1")
    world.agent("a2", instance="i2")
    task = world.do(cb.update_task, world.task()["id"], {"assignedTo": "a1"})
    before = world.state.tasks[task["id"]]
    with pytest.raises(cb.BridgeError) as err:
        world.do(cb.agent_verb, task["id"], "complete", {"agentId": who, "epoch": task["epoch"] + epoch_delta})
    assert err.value.status == 409
    assert err.value.extra == {"currentAssignee": "a1", "currentEpoch": task["epoch"]}
    assert world.state.tasks[task["id"]] == before


def test_release_requeues_with_a_new_epoch_and_skips_the_releaser(world):
    world.agent("a1")
    world.agent("a2")
    task = world.task()
    owner = task["assignedTo"]
    released = world.do(cb.agent_verb, task["id"], "release", {"agentId": owner, "epoch": task["epoch"]})
    assert released["assignedTo"] not in (owner, None)
    assert released["epoch"] == task["epoch"] + 2, "one new epoch for the release, one for the new owner"
    events = [entry["event"] for entry in released["history"]]
    assert events[-2:] == ["released", "task-assigned"]


def test_claim_pulls_a_queued_task_with_its_current_epoch(world):
    world.agent("puller", roles=["dev"])
    task = world.task(roles=["design"])
    assert task["lane"] == "queued", "no designer: nobody gets it automatically"
    with pytest.raises(cb.BridgeError):
        world.do(cb.agent_verb, task["id"], "claim", {"agentId": "puller", "epoch": task["epoch"] + 3})
    claimed = world.do(cb.agent_verb, task["id"], "claim", {"agentId": "puller", "epoch": task["epoch"]})
    assert claimed["assignedTo"] == "puller" and claimed["epoch"] == task["epoch"] + 1


def test_heartbeat_reports_tasks_no_longer_owned(world):
    world.agent("a1")
    world.agent("a2")
    task = world.do(cb.update_task, world.task()["id"], {"assignedTo": "a1"})
    world.do(cb.update_task, task["id"], {"assignedTo": "a2"})
    reply = world.do(cb.record_heartbeat, "a1", {"tasks": [{"id": task["id"], "epoch": task["epoch"]}]})
    assert reply["stop"] == [task["id"]]
    assert any(n["type"] == "task-revoked" for n in reply["notifications"])
    reply = world.do(cb.record_heartbeat, "a2", {"tasks": [{"id": task["id"], "epoch": task["epoch"] + 1}]})
    assert reply["stop"] == [] and [t["id"] for t in reply["tasks"]] == [task["id"]]


def test_a_plain_heartbeat_is_soft_state(world):
    world.agent("a1")
    world.clock.advance(5)
    cb.record_heartbeat(world.state, world.clock.now(), "a1", {"status": "working"})
    ops = world.state.take_changes().ops
    assert not ops, "no journal record for a beat that changes only liveness"
    assert world.state.agents["a1"].lastHeartbeat == world.clock.ms
    assert world.state.agents["a1"].reportedStatus == "working"
    assert world.state.soft_dirty


def test_a_goodbye_beat_takes_the_agent_offline(world):
    world.agent("a1")
    world.do(cb.record_heartbeat, "a1", {"status": "offline"})
    assert world.state.agents["a1"].status == "offline"
    assert world.task()["lane"] == "queued", "offline agents get no work"


def test_deregistering_requeues_and_reassigns(world):
    world.agent("a1")
    task = world.task()
    world.agent("a2")
    world.do(cb.update_task, task["id"], {"assignedTo": "a1"})
    world.do(cb.deregister_agent, "a1")
    assert "a1" not in world.state.agents
    assert world.state.tasks[task["id"]].assignedTo == "a2"


# --- ids and state documents ---

def test_ids_grow_and_never_fall_behind_the_clock():
    state, clock = cb.State(), FakeClock()
    first = state.next_id("task", clock.now())
    second = state.next_id("task", clock.now())
    assert int(second.split("-")[1]) == int(first.split("-")[1]) + 1
    state.meta["lastId"] = 5     # as after a restore of an old backup
    assert int(state.next_id("task", clock.now()).split("-")[1]) >= clock.ms


def test_state_document_round_trip(world):
    world.agent("a1", hostname="mac.local", tailscaleIP="100.64.0.7", metadata={"k": 1})
    world.task(roles=["dev"], tags=["x"])
    world.task(lane="done")
    copy = cb.State.from_doc(json.loads(b"".join(cb.snapshot_chunks(world.state.freeze(seq=7)))))
    for section in cb.SECTIONS:
        assert getattr(copy, section) == getattr(world.state, section)
    assert copy.active == world.state.active and copy.meta == world.state.meta


def test_a_history_keeps_its_latest_entries_whatever_its_notes_hold(world):
    """A task's history is JSON text; appending never decodes it below the limit, and past it the oldest
    entries go, even when notes hold the text that separates entries."""
    task = world.state.tasks[world.task()["id"]]
    now = world.clock.now()
    for n in range(cb.HISTORY_LIMIT + 15):
        note = "],[" * (n % 3) + f"note {n}"
        task = task._replace(history=cb.add_history(task, cb.Now(now.mono, now.ms + n), "updated", "api", note))
        entries = json.loads(task.history)
        assert len(entries) == min(n + 2, cb.HISTORY_LIMIT) and entries[-1][3] == note
    assert [e[3] for e in entries] == ["],[" * (n % 3) + f"note {n}" for n in range(15, cb.HISTORY_LIMIT + 15)]
    assert cb.render_task(world.state, task)["history"][-1] == {"at": now.ms + cb.HISTORY_LIMIT + 14,
                                                              "event": "updated", "by": "api", "note": note}


def test_the_journal_carries_only_the_history_entries_a_change_adds():
    one, two = '[[1,"created",null,null]]', '[[1,"created",null,null],[2,"start","a1",null]]'
    assert cb.history_added("[]", one) == [[1, "created", None, None]]
    assert cb.history_added(one, two) == [[2, "start", "a1", None]]
    full = cb.COMPACT([[n, "updated", "api", None] for n in range(cb.HISTORY_LIMIT)])
    moved = cb.COMPACT([[n, "updated", "api", None] for n in range(1, cb.HISTORY_LIMIT + 1)])
    assert cb.history_added(full, moved) == [[cb.HISTORY_LIMIT, "updated", "api", None]], "past the limit"
    assert cb.history_added(two, one) is None, "not an append: the journal writes the whole history"


def test_past_the_limit_the_journal_still_finds_the_entries_added_whatever_the_notes_hold():
    """Past the limit an append drops the oldest entries in the text, and the journal finds the entries added
    in the texts, without decoding either: right even when notes hold "]" or "],["."""
    history = "[]"
    for n in range(cb.HISTORY_LIMIT + 12):
        entries = [[n, "note", "api", "],[" * (n % 3) + "]" * (n % 2) + f"note {n}"]] + \
            [[n, "start", "a1", None]] * (n % 4 == 0)
        longer = cb.history_extend(history, entries)
        assert longer.count("],[") + 1 == len(json.loads(longer)), "a note holds no boundary"
        assert json.loads(longer) == (json.loads(history) + entries)[-cb.HISTORY_LIMIT:]
        assert cb.history_added(history, longer) == entries
        history = longer
    again = cb.history_extend(history, [[0, "note", "api", None]] * (cb.HISTORY_LIMIT + 1))
    assert again == cb.COMPACT([[0, "note", "api", None]] * cb.HISTORY_LIMIT)
    assert cb.history_added(history, again) is None, "the whole history is new: the journal writes it whole"


def test_history_text_keeps_the_boundary_between_entries_out_of_the_notes():
    entries = [[1, "note", "api", "a ] b"], [2, "note", "x],[y", "],["], [3, "created", None, None]]
    text = cb.history_text(entries)
    assert json.loads(text) == entries and text.count("],[") == len(entries) - 1
    assert cb.history_text([[1, "created", None, None]]) == '[[1,"created",null,null]]', "plain notes as they are"
    with pytest.raises(ValueError):
        cb.history_text([[1, "note", "api", [["a"], ["b"]]]])


def test_a_large_state_is_snapshotted_less_often_so_each_change_pays_the_same():
    state = cb.State()
    assert cb.snapshot_every(state) == cb.SNAPSHOT_EVERY_CHANGES
    state.tasks = dict.fromkeys(f"task-{n}" for n in range(200_000))
    state.agents = dict.fromkeys(f"a{n}" for n in range(20_000))
    assert cb.snapshot_every(state) == int(220_000 * cb.SNAPSHOT_JOURNAL_SHARE) > cb.SNAPSHOT_EVERY_CHANGES


# --- config ---

def test_dotenv_reads_the_guides_format():
    text = ("BRIDGE_URL=http://100.64.1.1:8787\n# Heartbeat\nHEARTBEAT_INTERVAL=900000  # 15 minutes\n"
            "export LOG_LEVEL=debug\nQUOTED=\"a # not a comment\"\n\nEMPTY=\n")
    assert cb.parse_dotenv(text) == {"BRIDGE_URL": "http://100.64.1.1:8787", "HEARTBEAT_INTERVAL": "900000",
                                     "LOG_LEVEL": "debug", "QUOTED": "a # not a comment", "EMPTY": ""}


def test_dotenv_names_the_bad_line():
    with pytest.raises(cb.ConfigError, match="line 2"):
        cb.parse_dotenv("A=1\nnot a setting\n")


def test_config_precedence_flags_env_dotenv_defaults():
    _, config, _ = cb.load_config(["--port", "9001"], {"BRIDGE_PORT": "9002", "BRIDGE_HOST": "::1"},
                                  "BRIDGE_PORT=9003\nBRIDGE_HOST=10.0.0.1\nOFFLINE_AFTER=120\n")
    assert (config.port, config.host, config.offline_after) == (9001, "::1", 120)
    _, config, _ = cb.load_config([], {}, "")
    assert (config.port, config.host, config.data_dir) == (8787, "127.0.0.1", ".clawhub")
    _, config, _ = cb.load_config([], {"PORT": "7000", "STATE_DIRECTORY": "/var/lib/clawbridge"}, "")
    assert (config.port, config.data_dir) == (7000, "/var/lib/clawbridge")


def test_debug_variable_turns_on_debug_logging():
    assert cb.load_config([], {"DEBUG": "bridge:*", "LOG_LEVEL": "info"}, "")[1].log_level == "debug"
    assert cb.load_config([], {}, "DEBUG=*\n")[1].log_level == "debug"


@pytest.mark.parametrize("env,key", [
    ({"BRIDGE_PORT": "abc"}, "BRIDGE_PORT"), ({"PORT": "70000"}, "PORT"),
    ({"OFFLINE_AFTER": "-1"}, "OFFLINE_AFTER"), ({"LOG_LEVEL": "loud"}, "LOG_LEVEL"),
    ({"INSTANCE_ID": "has space"}, "INSTANCE_ID"),
])
def test_bad_config_values_name_the_key(env, key):
    with pytest.raises(cb.ConfigError, match=key):
        cb.load_config([], env, "")


def test_printed_config_hides_the_token():
    _, config, _ = cb.load_config([], {"BRIDGE_TOKEN": "hunter2"}, "")
    assert "hunter2" not in config.redacted() and "BRIDGE_TOKEN=(set, hidden)" in config.redacted()


# --- routing and request bodies ---

@pytest.mark.parametrize("method,path,handler,params", [
    ("POST", "/api/agents/register", cb.h_agents_register, {}),
    ("GET", "/api/instances/capacities", cb.h_instance_capacities, {}),
    ("GET", "/api/instances/mac", cb.h_instance_get, {"id": "mac"}),
    ("HEAD", "/health", cb.h_health, {}),
    ("PUT", "/api/notifications/n-1/read", cb.h_notification_read, {"id": "n-1"}),
])
def test_resolve_finds_the_route(method, path, handler, params):
    route = cb.resolve(method, path)
    assert route.handler is handler and route.params == params


@pytest.mark.parametrize("payload", [{"id": "register"}, {"id": "x", "instanceId": "capacities"}])
def test_ids_that_collide_with_routes_are_refused(world, payload):
    with pytest.raises(cb.BridgeError) as err:
        world.do(cb.register_agent, payload)
    assert err.value.status == 400


def test_resolve_answers_404_and_405_with_allow():
    with pytest.raises(cb.BridgeError) as err:
        cb.resolve("GET", "/api/agents/register")
    assert err.value.status == 405 and err.value.headers["Allow"] == "POST"
    with pytest.raises(cb.BridgeError) as err:
        cb.resolve("GET", "/api/nothing")
    assert err.value.status == 404
    with pytest.raises(cb.BridgeError) as err:
        cb.resolve("DELETE", "/api/tasks")
    assert err.value.status == 405 and err.value.headers["Allow"] == "GET, HEAD, POST"


@pytest.mark.parametrize("raw", [
    b"{", b"[1]", b'{"a": NaN}', b'{"a": -Infinity}', b"\xff\xfe", b"[" * 65 + b"]" * 65,
    b'{"a":' + b"[" * 70 + b"]" * 70 + b"}", b"[" * 100000 + b"]" * 100000,
])
def test_bad_bodies_are_400(raw):
    with pytest.raises(cb.BridgeError) as err:
        cb.parse_json_body(raw)
    assert err.value.status == 400 and err.value.code == "invalid_json"


def test_nesting_up_to_the_limit_is_fine():
    body = b'{"a":' + b"[" * 62 + b"]" * 62 + b"}"
    assert cb.parse_json_body(body)["a"] is not None


# --- liveness, failover, balancing (the watchdog's decisions, on a fake clock) ---

def run_for(world, seconds, beating=(), step=1.0):
    """Advance the clock, sweeping every step as the watchdog does, while the named agents keep beating."""
    reports = []
    for _ in range(int(seconds / step)):
        world.clock.advance(step)
        for agent_id in beating:
            world.do(cb.record_heartbeat, agent_id, {})
        reports.append(world.do(cb.sweep))
    return reports


@pytest.fixture
def fleet(world):
    """Two instances with two agents each, a 60 s offline threshold, and four tasks on mac."""
    world.state.offline_after = 60
    world.state.last_sweep = world.clock.mono
    for agent_id, instance in (("m1", "mac"), ("m2", "mac"), ("s1", "srv"), ("s2", "srv")):
        world.agent(agent_id, instance=instance)
    world.do(cb.set_drained, "srv", True)
    world.tasks = [world.task(title=f"t{i}") for i in range(4)]
    world.do(cb.set_drained, "srv", False)
    return world


def test_an_instance_goes_offline_only_after_its_threshold(fleet):
    run_for(fleet, 59, beating=["s1", "s2"])
    assert fleet.state.agents["m1"].status == "online"
    reports = run_for(fleet, 3, beating=["s1", "s2"])
    assert [r["offline"] for r in reports if r["offline"]] == [["mac"]]
    assert {fleet.state.agents[a].status for a in ("m1", "m2")} == {"offline"}


def test_failover_moves_unfinished_work_with_new_epochs(fleet):
    task_ids = [t["id"] for t in fleet.tasks]
    first = fleet.tasks[0]
    fleet.do(cb.agent_verb, first["id"], "complete", {"agentId": first["assignedTo"], "epoch": first["epoch"]})
    run_for(fleet, 62, beating=["s1", "s2"])
    moved = [fleet.state.tasks[t] for t in task_ids[1:]]
    assert {t.assignedTo for t in moved} <= {"s1", "s2"} and all(t.lane == "assigned" for t in moved)
    assert all(t.epoch == 2 for t in moved), "one new epoch per move"
    assert fleet.state.tasks[first["id"]].assignedTo == first["assignedTo"], "done work stays where it was"
    kinds = [(n.agentId, n.type) for n in fleet.state.notifications.values() if n.taskId == task_ids[1]]
    assert any(k == "task-reassigned" and a.startswith("s") for a, k in kinds)
    revoked = [n for n in fleet.state.notifications.values() if n.type == "task-revoked"]
    owners = sorted(t["assignedTo"] for t in fleet.tasks[1:])
    assert sorted(n.agentId for n in revoked) == sorted(set(owners)), "one notice for each agent that lost work"
    for note in revoked:
        lost = [t["id"] for t in fleet.tasks[1:] if t["assignedTo"] == note.agentId]
        assert all(task_id in note.message for task_id in lost)
        assert note.taskId == (lost[0] if len(lost) == 1 else None)


def test_an_agent_gone_offline_gets_one_notice_for_all_the_work_it_lost(world):
    """However many tasks go from an agent at once, it gets one task-revoked notice, naming the first
    REVOKED_NAMED of them: one a task would push everything else out of its heartbeats."""
    world.state.offline_after = 60
    world.state.last_sweep = world.clock.mono
    world.agent("busy", instance="mac", max_tasks=cb.REVOKED_NAMED + 5)
    held = [world.task(title=f"t{n}")["id"] for n in range(cb.REVOKED_NAMED + 5)]
    world.agent("ready", instance="srv", max_tasks=cb.REVOKED_NAMED)
    world.do(cb.register_agent, {"id": "news", "instanceId": "srv"})
    world.do(cb.notify, "busy", "message", "the notice that came before")
    run_for(world, 62, beating=["ready", "news"])
    room = cb.REVOKED_NAMED + cb.DEFAULT_MAX_TASKS      # ready's and news's
    queued = [t for t in held if world.state.tasks[t].lane == "queued"]
    assert len(queued) == len(held) - room, "the rest waits in the queue"
    [note] = [n for n in world.state.notifications.values() if n.type == "task-revoked"]
    assert note.agentId == "busy" and note.taskId is None
    assert all(t in note.message for t in held[:cb.REVOKED_NAMED]) and "and 5 more" in note.message
    reply = world.do(cb.record_heartbeat, "busy", {"tasks": [{"id": t, "epoch": 1} for t in held]})
    assert sorted(reply["stop"]) == sorted(held), "the heartbeat names every one"
    kinds = [n["type"] for n in reply["notifications"]]
    assert kinds[0] == "task-revoked" and kinds.count("task-revoked") == 1 and "message" in kinds


def test_a_returning_agent_is_told_to_stop_and_held_back(fleet):
    owner = fleet.tasks[1]["assignedTo"]
    run_for(fleet, 62, beating=["s1", "s2"])
    reply = fleet.do(cb.record_heartbeat, owner, {"tasks": [{"id": fleet.tasks[1]["id"], "epoch": 1}]})
    assert reply["stop"] == [fleet.tasks[1]["id"]]
    assert fleet.state.agents[owner].status == "online"
    fleet.do(cb.set_drained, "srv", True)
    assert fleet.task()["lane"] == "queued", "back, but on anti-flap hold"
    fleet.clock.advance(1)
    fleet.do(cb.record_heartbeat, owner, {})
    assert fleet.state.hold, "one on-time beat is not enough"
    fleet.clock.advance(1)
    fleet.do(cb.record_heartbeat, owner, {})
    assert not fleet.state.hold
    assert any(t.lane == "assigned" and t.assignedTo.startswith("m") for t in fleet.state.tasks.values()
               if t.id not in {x["id"] for x in fleet.tasks})


def test_beats_in_a_burst_count_once_towards_the_hold(fleet):
    run_for(fleet, 62, beating=["s1", "s2"])
    for _ in range(5):
        fleet.do(cb.record_heartbeat, "m1", {})
    assert "mac" in fleet.state.hold


def test_work_with_nowhere_to_go_waits_in_the_queue(fleet):
    fleet.do(cb.set_drained, "srv", True)
    run_for(fleet, 62, beating=["s1", "s2"])
    assert all(fleet.state.tasks[t["id"]].lane == "queued" for t in fleet.tasks)
    fleet.do(cb.set_drained, "srv", False)
    assert sorted(fleet.state.tasks[t["id"]].assignedTo[0] for t in fleet.tasks) == ["s"] * 4


def test_the_threshold_is_twice_the_longest_declared_interval(fleet):
    fleet.do(cb.record_heartbeat, "m1", {"heartbeatInterval": 15 * 60 * 1000})
    run_for(fleet, 120, beating=["s1", "s2"], step=2.0)
    assert fleet.state.agents["m1"].status == "online", "a 15-minute cron agent is not dead after 2 minutes"
    figures = cb.instance_figures(fleet.state, fleet.state.instances["mac"], fleet.clock.now())
    assert figures["offlineAfterMs"] == 30 * 60 * 1000


def test_a_restart_gives_every_instance_a_full_threshold(fleet):
    run_for(fleet, 50, beating=["s1", "s2"])
    restarted = cb.State.from_doc(json.loads(b"".join(cb.snapshot_chunks(fleet.state.freeze(seq=1)))))
    restarted.offline_after = 60
    fleet.state = restarted
    cb.rebaseline(restarted, fleet.clock.now())
    run_for(fleet, 59, beating=["s1", "s2"])
    assert restarted.agents["m1"].status == "online", "50 s before the restart do not count"
    run_for(fleet, 3, beating=["s1", "s2"])
    assert restarted.agents["m1"].status == "offline"


def test_a_pause_of_the_bridge_rebaselines_instead_of_expiring(fleet):
    fleet.clock.advance(600)
    report = fleet.do(cb.sweep)
    assert report.get("rebaselined") and report["offline"] == []
    assert all(a.status == "online" for a in fleet.state.agents.values())


def test_disruption_mode_moves_nothing_until_beats_return(world):
    world.state.offline_after = 30
    world.state.last_sweep = world.clock.mono
    for i in range(4):
        world.agent(f"a{i}", instance=f"i{i}")
    tasks = [world.task() for _ in range(4)]
    reports = run_for(world, 40, beating=["a0"])
    assert world.state.disruption and all(r["offline"] == [] for r in reports)
    assert all(world.state.tasks[t["id"]].epoch == 1 for t in tasks), "nothing moved"
    health = cb.instance_figures(world.state, world.state.instances["i1"], world.clock.now())
    assert health["status"] == "online"
    run_for(world, 2, beating=["a0", "a1", "a2", "a3"])
    assert not world.state.disruption


def test_disruption_ends_and_the_truly_dead_go_offline(world):
    world.state.offline_after = 30
    world.state.last_sweep = world.clock.mono
    for i in range(4):
        world.agent(f"a{i}", instance=f"i{i}")
    run_for(world, 40, beating=["a0"])
    assert world.state.disruption
    reports = run_for(world, 1, beating=["a0", "a1", "a2"])
    assert reports[-1]["offline"] == ["i3"] and not world.state.disruption


def test_a_forced_sync_acts_even_in_disruption(world):
    world.state.offline_after = 30
    world.state.last_sweep = world.clock.mono
    for i in range(3):
        world.agent(f"a{i}", instance=f"i{i}")
    run_for(world, 40)
    assert world.state.disruption
    report = world.do(cb.sync, True)
    assert sorted(report["offline"]) == ["i0", "i1", "i2"]


def test_balancing_prefers_healthier_instances_at_equal_load(world):
    world.state.offline_after = 100
    world.state.last_sweep = world.clock.mono
    world.agent("a", instance="stale")
    run_for(world, 50)
    world.agent("b", instance="fresh")
    assert world.task()["assignedTo"] == "b", "same load; the fresher instance scores higher"


def test_health_score_and_capacity_figures(fleet):
    mac = cb.instance_figures(fleet.state, fleet.state.instances["mac"], fleet.clock.now())
    assert (mac["capacity"], mac["taskCount"], mac["availableCapacity"]) == (6, 4, 2)
    assert mac["healthScore"] == round(100 - 50 * 4 / 6)
    run_for(fleet, 62, beating=["s1", "s2"])
    mac = cb.instance_figures(fleet.state, fleet.state.instances["mac"], fleet.clock.now())
    assert (mac["status"], mac["healthScore"], mac["capacity"], mac["availableCapacity"]) == ("offline", 0, 0, 0)
    fleet.do(cb.record_heartbeat, "m1", {})
    assert cb.health_score(fleet.state, "mac", fleet.clock.now()) == 100 - cb.FLAP_PENALTY, "a recent flap costs"


def test_an_instance_heartbeat_beats_every_agent_there(fleet):
    fleet.clock.advance(30)
    reply = fleet.do(cb.record_instance_heartbeat, "mac", {"heartbeatInterval": 60000})
    assert sorted(reply["agents"]) == ["m1", "m2"]
    assert all(fleet.state.seen[a] == fleet.clock.mono for a in ("m1", "m2"))
    assert fleet.state.agents["m2"].heartbeatInterval == 60000
    with pytest.raises(cb.BridgeError) as err:
        fleet.do(cb.record_instance_heartbeat, "nowhere", {})
    assert err.value.status == 404


def test_drained_instances_keep_their_tasks_and_get_none(fleet):
    before = {t["id"]: fleet.state.tasks[t["id"]].assignedTo for t in fleet.tasks}
    fleet.do(cb.set_drained, "mac", True)
    assert {t["id"]: fleet.state.tasks[t["id"]].assignedTo for t in fleet.tasks} == before
    assert fleet.task()["assignedTo"].startswith("s")


def test_notifications_are_delivered_until_acknowledged_in_a_beat(world):
    world.agent("a1")
    world.task()
    first = world.do(cb.record_heartbeat, "a1", {})["notifications"]
    assert [n["type"] for n in first] == ["task-assigned"]
    assert world.do(cb.record_heartbeat, "a1", {})["notifications"] == first, "still unread"
    reply = world.do(cb.record_heartbeat, "a1", {"readNotifications": [first[0]["id"], "ntf-0"]})
    assert reply["notifications"] == []
    assert world.state.notifications[first[0]["id"]].read
