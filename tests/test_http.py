"""The HTTP API against the real ThreadingHTTPServer on 127.0.0.1:0: every endpoint of CONTRACT.md, the
protocol rules (404/405/411/413/501, bad bodies, JSON-only errors), the token, ids, keep-alive and a burst of
concurrent heartbeats. Time moves only through the fake clock."""
import http.client
import json
import re
import socket
import threading
import time

import pytest

from conftest import LiveBridge, http_call

MIB = 1024 * 1024
TOKEN = "s3cret"


# ===== Helpers =====


def assert_no_leak(live, text):
    """An answer never shows a traceback, the data dir or the token."""
    assert "Traceback" not in text
    assert live.config.data_dir not in text
    if live.config.token:
        assert live.config.token not in text


def check_error(live, status, headers, data, want_status, code=None, field=None):
    """The one error shape: {"error": {"code", "message", "field"?}, ...extra}, as JSON, with the status."""
    assert status == want_status, (status, data)
    assert headers["content-type"].startswith("application/json")
    assert isinstance(data, dict) and isinstance(data.get("error"), dict), data
    error = data["error"]
    assert {"code", "message"} <= set(error) <= {"code", "message", "field"}, error
    assert re.fullmatch(r"[a-z][a-z0-9_]*", error["code"]), error
    assert isinstance(error["message"], str) and error["message"].strip()
    if code is not None:
        assert error["code"] == code, error
    if field is not None:
        assert error.get("field") == field, error
    assert_no_leak(live, json.dumps(data, ensure_ascii=False))
    return data


def ok(live, method, path, body=None, status=200, **kw):
    """A request that must succeed with status; returns the parsed body."""
    got, _, data = live.call(method, path, body, **kw)
    assert got == status, (method, path, got, data)
    return data


def fails(live, method, path, body=None, status=400, code=None, field=None, **kw):
    """A request that must fail with status (and code/field when given) in the error shape; returns the body."""
    got, headers, data = live.call(method, path, body, **kw)
    return check_error(live, got, headers, data, status, code, field)


def register(live, agent_id, status=201, **fields):
    return ok(live, "POST", "/api/agents/register", {"id": agent_id, **fields}, status=status)


def new_task(live, title="task", **fields):
    return ok(live, "POST", "/api/tasks", {"title": title, **fields}, status=201)


def beat(live, agent_id, **body):
    return ok(live, "POST", f"/api/agents/{agent_id}/heartbeat", body)


def agent(live, agent_id):
    return ok(live, "GET", f"/api/agents/{agent_id}")


def task(live, task_id):
    return ok(live, "GET", f"/api/tasks/{task_id}")


def verb(live, task_id, name, agent_id, epoch, status=200):
    return ok(live, "POST", f"/api/tasks/{task_id}/{name}", {"agentId": agent_id, "epoch": epoch}, status=status)


def notes(live, agent_id, query=""):
    return ok(live, "GET", f"/api/agents/{agent_id}/notifications{query}")


def ids(items):
    return [item["id"] for item in items]


def send_head_only(port, method, path, headers, body_chunks=None):
    """A request whose headers we write by hand (no automatic Content-Length), optionally chunked."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.putrequest(method, path, skip_accept_encoding=True)
        for key, value in headers.items():
            conn.putheader(key, value)
        conn.endheaders()
        for chunk in body_chunks or ():
            conn.send(chunk)
        resp = conn.getresponse()
        payload = resp.read()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, json.loads(payload) if payload else None
    finally:
        conn.close()


def raw_exchange(port, data, timeout=10):
    """Send raw bytes on a socket and read the whole answer until the bridge closes the connection."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(data)
        chunks = []
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                break
            chunks.append(chunk)
    head, _, body = b"".join(chunks).partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines)}
    assert status_line.startswith("HTTP/1."), f"no HTTP answer, got {status_line!r} (connection closed?)"
    return int(status_line.split()[1]), headers, json.loads(body)


@pytest.fixture
def secured(tmp_path, clock):
    """A bridge that requires the token on /api/*."""
    bridge = LiveBridge(tmp_path / "d", clock=clock, token=TOKEN)
    try:
        yield bridge
    finally:
        bridge.close()


AUTH = {"Authorization": f"Bearer {TOKEN}"}


# ===== Agents =====

AGENT_FIELDS = {"id", "name", "emoji", "roles", "instanceId", "hostname", "tailscaleIP", "status", "lastHeartbeat",
                "activeTasks", "maxConcurrentTasks", "heartbeatInterval", "createdAt", "updatedAt"}


def test_register_new_agent_is_201_and_echoes_every_field(live, clock):
    body = {"name": "Dev One", "emoji": "🔧", "roles": ["backend-dev"], "model": "opus", "workspace": "/w/dev1",
            "instanceId": "macbook", "hostname": "macbook.local", "tailscaleIP": "100.64.0.7",
            "heartbeatInterval": 900000, "maxConcurrentTasks": 5, "metadata": {"team": "core"}}
    created = register(live, "dev-1", **body)
    assert AGENT_FIELDS <= set(created)
    for key, value in body.items():
        assert created[key] == value, key
    assert created["id"] == "dev-1"
    assert created["status"] == "online"
    assert created["activeTasks"] == []
    assert created["lastHeartbeat"] == created["createdAt"] == clock.ms
    assert agent(live, "dev-1") == created


def test_reregister_is_200_keeps_tasks_and_unchanged_fields(live, clock):
    first = register(live, "a1", emoji="🤖", roles=["dev"])
    held = new_task(live, "work", roles=["dev"])
    assert held["assignedTo"] == "a1"
    clock.advance(10)
    again = register(live, "a1", status=200, name="Renamed")
    assert again["name"] == "Renamed"
    assert again["emoji"] == "🤖" and again["roles"] == ["dev"]
    assert again["activeTasks"] == [held["id"]]
    assert again["createdAt"] == first["createdAt"]
    assert again["updatedAt"] == clock.ms
    after = task(live, held["id"])
    assert (after["assignedTo"], after["epoch"], after["lane"]) == ("a1", held["epoch"], "assigned")


@pytest.mark.parametrize("roles, expected", [
    (["qa", "testing"], ["qa", "testing"]),
    ("qa,testing", ["qa", "testing"]),
    ("qa, testing ,", ["qa", "testing"]),
    ("backend-dev", ["backend-dev"]),
])
def test_register_takes_roles_as_array_or_comma_string(live, roles, expected):
    assert register(live, "a1", roles=roles)["roles"] == expected
    assert agent(live, "a1")["roles"] == expected


@pytest.mark.parametrize("body, field", [
    ({}, "id"),
    ({"id": ""}, "id"),
    ({"id": ".hidden"}, "id"),
    ({"id": "a b"}, "id"),
    ({"id": "a" * 65}, "id"),
    ({"id": "a/b"}, "id"),
    ({"id": 7}, "id"),
    ({"id": "a1", "name": 123}, "name"),
    ({"id": "a1", "roles": 5}, "roles"),
    ({"id": "a1", "roles": ["ok", 3]}, "roles"),
    ({"id": "a1", "maxConcurrentTasks": "3"}, "maxConcurrentTasks"),
    ({"id": "a1", "maxConcurrentTasks": 0}, "maxConcurrentTasks"),
    ({"id": "a1", "maxConcurrentTasks": 2.5}, "maxConcurrentTasks"),
    ({"id": "a1", "heartbeatInterval": "fast"}, "heartbeatInterval"),
    ({"id": "a1", "metadata": [1, 2]}, "metadata"),
    ({"id": "a1", "tailscaleIP": "not-an-ip"}, "tailscaleIP"),
    ({"id": "a1", "instanceId": ".x"}, "instanceId"),
])
def test_register_rejects_bad_input_naming_the_field_and_creates_nothing(live, body, field):
    fails(live, "POST", "/api/agents/register", body, 400, field=field)
    assert ok(live, "GET", "/api/agents") == []


@pytest.fixture
def fleet(live):
    """q1 (i1, qa), d1 (i1, dev+ops), d2 (i2, dev, said goodbye so offline)."""
    register(live, "q1", instanceId="i1", roles=["qa"])
    register(live, "d1", instanceId="i1", roles="dev,ops")
    register(live, "d2", instanceId="i2", roles=["dev"])
    beat(live, "d2", status="offline")
    return live


@pytest.mark.parametrize("query, expected", [
    ("", {"q1", "d1", "d2"}),
    ("?instanceId=i1", {"q1", "d1"}),
    ("?instanceId=nowhere", set()),
    ("?role=dev", {"d1", "d2"}),
    ("?role=ops", {"d1"}),
    ("?status=offline", {"d2"}),
    ("?status=online", {"q1", "d1"}),
    ("?instanceId=i1&role=dev", {"d1"}),
    ("?role=dev&status=online", {"d1"}),
])
def test_list_agents_filters(fleet, query, expected):
    listed = ok(fleet, "GET", "/api/agents" + query)
    assert isinstance(listed, list)
    assert set(ids(listed)) == expected
    assert len(listed) == len(expected)


@pytest.mark.parametrize("query", ["?status=sleepy", "?status=ONLINE!"])
def test_list_agents_rejects_unknown_status(fleet, query):
    fails(fleet, "GET", "/api/agents" + query, status=400, field="status")


def test_delete_agent_requeues_its_tasks_to_another_eligible_agent(live):
    register(live, "a1")
    held = new_task(live, "work")
    assert held["assignedTo"] == "a1"
    register(live, "a2")
    assert ok(live, "DELETE", "/api/agents/a1")["deleted"] == "a1"
    fails(live, "GET", "/api/agents/a1", status=404, code="agent_not_found")
    moved = task(live, held["id"])
    assert (moved["assignedTo"], moved["lane"]) == ("a2", "assigned")
    assert moved["epoch"] > held["epoch"]
    assert agent(live, "a2")["activeTasks"] == [held["id"]]
    assert any(n["taskId"] == held["id"] and n["type"] in ("task-assigned", "task-reassigned")
               for n in notes(live, "a2"))


def test_delete_last_agent_leaves_its_task_queued_not_dropped(live):
    register(live, "a1")
    held = new_task(live, "work")
    ok(live, "DELETE", "/api/agents/a1")
    left = task(live, held["id"])
    assert (left["assignedTo"], left["lane"]) == (None, "queued")
    assert left["epoch"] > held["epoch"]


# ===== Heartbeats =====


def test_heartbeat_reply_carries_agent_tasks_notifications_stop_and_server_time(live, clock):
    register(live, "a1")
    held = new_task(live, "work")
    clock.advance(30)
    reply = beat(live, "a1", tasks=[{"id": held["id"], "epoch": held["epoch"]}])
    assert reply["success"] is True
    assert reply["serverTime"] == clock.ms
    assert reply["agent"]["id"] == "a1"
    assert reply["agent"]["lastHeartbeat"] == clock.ms
    assert [(t["id"], t["epoch"]) for t in reply["tasks"]] == [(held["id"], held["epoch"])]
    assert [(n["type"], n["taskId"]) for n in reply["notifications"]] == [("task-assigned", held["id"])]
    assert reply["stop"] == []
    assert agent(live, "a1")["lastHeartbeat"] == clock.ms


def test_heartbeat_without_a_body_is_accepted(live, clock):
    register(live, "a1")
    clock.advance(5)
    status, _, reply = send_head_only(live.port, "POST", "/api/agents/a1/heartbeat", {})
    assert status == 200 and reply["success"] is True
    assert agent(live, "a1")["lastHeartbeat"] == clock.ms


def test_heartbeat_records_what_the_agent_says_of_itself(live):
    register(live, "a1", instanceId="mac")
    beat(live, "a1", status="working", currentTask="task-9", hostname="mac.local", heartbeatInterval=60000)
    seen = agent(live, "a1")
    assert seen["hostname"] == "mac.local"
    assert seen["heartbeatInterval"] == 60000
    assert seen["reportedStatus"] == "working"
    assert seen["status"] == "online"


def test_heartbeat_unknown_agent_is_404_agent_not_found(live):
    fails(live, "POST", "/api/agents/ghost/heartbeat", {}, 404, code="agent_not_found")


@pytest.mark.parametrize("body, field", [
    ({"tasks": "task-1"}, "tasks"),
    ({"tasks": [5]}, "tasks"),
    ({"tasks": [{"id": ".bad", "epoch": 1}]}, None),
    ({"tasks": [{"id": "task-1", "epoch": "1"}]}, None),
    ({"status": 5}, "status"),
    ({"heartbeatInterval": 5}, "heartbeatInterval"),
    ({"tailscaleIP": "nope"}, "tailscaleIP"),
])
def test_heartbeat_rejects_bad_fields(live, body, field):
    register(live, "a1")
    fails(live, "POST", "/api/agents/a1/heartbeat", body, 400, field=field)


def change_reassign(live, task_id):
    register(live, "a2")
    ok(live, "PUT", f"/api/tasks/{task_id}", {"assignedTo": "a2"})


def change_delete(live, task_id):
    ok(live, "DELETE", f"/api/tasks/{task_id}")


def change_release(live, task_id):
    verb(live, task_id, "release", "a1", 1)


def change_cancel(live, task_id):
    ok(live, "PUT", f"/api/tasks/{task_id}", {"lane": "cancelled"})


@pytest.mark.parametrize("change, held_epoch, stopped", [
    (None, 1, False),
    (None, 0, True),
    (None, 2, True),
    (change_reassign, 1, True),
    (change_delete, 1, True),
    (change_release, 1, True),
    (change_cancel, 1, True),
], ids=["still-owned", "old-epoch", "unknown-epoch", "reassigned", "deleted", "released", "cancelled"])
def test_heartbeat_stop_lists_tasks_the_agent_no_longer_owns(live, change, held_epoch, stopped):
    register(live, "a1")
    held = new_task(live, "work")
    assert held["epoch"] == 1
    if change:
        change(live, held["id"])
    reply = beat(live, "a1", tasks=[{"id": held["id"], "epoch": held_epoch}, {"id": "task-never", "epoch": 1}])
    assert reply["stop"] == ([held["id"]] if stopped else []) + ["task-never"]


def test_heartbeat_status_offline_is_a_goodbye_and_later_beats_bring_it_back(live, clock):
    register(live, "a1", instanceId="i1")
    reply = beat(live, "a1", status="offline")
    assert reply["agent"]["status"] == "offline"
    assert agent(live, "a1")["status"] == "offline"
    assert ok(live, "GET", "/api/instances/i1")["status"] == "offline"
    waiting = new_task(live, "work")
    assert (waiting["lane"], waiting["assignedTo"]) == ("queued", None)
    back = beat(live, "a1")
    assert back["agent"]["status"] == "online"
    assert ok(live, "GET", "/api/instances/i1")["status"] == "online"
    for _ in range(5):      # a returning agent may be held back a few on-time beats, not forever
        clock.advance(60)
        beat(live, "a1")
    assert task(live, waiting["id"])["assignedTo"] == "a1"


def test_agent_tasks_endpoint(live):
    register(live, "a1")
    held = new_task(live, "work")
    got = ok(live, "GET", "/api/agents/a1/tasks")
    assert got["agent"]["id"] == "a1"
    assert ids(got["tasks"]) == [held["id"]]
    assert got["tasks"][0]["assignedTo"] == "a1"


def post_notes(live, clock, agent_id, count):
    made = []
    for n in range(count):
        clock.advance(1)
        made.append(ok(live, "POST", "/api/notifications", {"agentId": agent_id, "message": f"m{n}"}, status=201))
    return made


def test_agent_notifications_newest_first_and_unread_filter(live, clock):
    register(live, "a1")
    made = post_notes(live, clock, "a1", 3)
    assert ids(notes(live, "a1")) == ids(reversed(made))
    ok(live, "PUT", f"/api/notifications/{made[1]['id']}/read")
    assert ids(notes(live, "a1", "?unread=true")) == [made[2]["id"], made[0]["id"]]
    assert ids(notes(live, "a1", "?unread=false")) == ids(reversed(made))
    assert [n["read"] for n in notes(live, "a1")] == [False, True, False]


# ===== Instances =====


def test_instances_list_and_get_one(live, clock):
    register(live, "m1", instanceId="macbook", hostname="macbook.local", tailscaleIP="100.64.0.5")
    register(live, "s1", instanceId="server", hostname="server.internal")
    register(live, "s2", instanceId="server")
    listed = {i["instanceId"]: i for i in ok(live, "GET", "/api/instances")}
    assert set(listed) == {"macbook", "server"}
    mac = listed["macbook"]
    assert (mac["hostname"], mac["tailscaleIP"], mac["status"], mac["agentCount"]) == \
        ("macbook.local", "100.64.0.5", "online", 1)
    assert mac["lastHeartbeat"] == clock.ms
    assert listed["server"]["agentCount"] == 2
    assert ok(live, "GET", "/api/instances/server") == listed["server"]
    fails(live, "GET", "/api/instances/nowhere", status=404)


def test_instance_capacities_never_negative_and_health_in_range(live):
    register(live, "a1", instanceId="i1", maxConcurrentTasks=1)
    new_task(live, "first")
    forced = new_task(live, "second", assignedTo="a1", force=True)
    assert forced["assignedTo"] == "a1"
    register(live, "b1", instanceId="i2", maxConcurrentTasks=3)
    register(live, "c1", instanceId="i3")
    beat(live, "c1", status="offline")
    caps = {c["instanceId"]: c for c in ok(live, "GET", "/api/instances/capacities")}
    assert set(caps) == {"i1", "i2", "i3"}
    for cap in caps.values():
        assert {"instanceId", "agentCount", "taskCount", "capacity", "availableCapacity", "healthScore"} <= set(cap)
        assert cap["availableCapacity"] >= 0
        assert isinstance(cap["healthScore"], int) and 0 <= cap["healthScore"] <= 100
    assert (caps["i1"]["agentCount"], caps["i1"]["taskCount"], caps["i1"]["capacity"]) == (1, 2, 1)
    assert caps["i1"]["availableCapacity"] == 0
    assert (caps["i2"]["taskCount"], caps["i2"]["availableCapacity"]) == (0, 3)
    assert caps["i2"]["healthScore"] > 0
    assert caps["i3"]["healthScore"] == 0


def test_instance_heartbeat_beats_every_agent_there(live, clock):
    for agent_id, instance in (("a1", "i1"), ("a2", "i1"), ("b1", "i2")):
        register(live, agent_id, instanceId=instance)
    before = clock.ms
    clock.advance(60)
    reply = ok(live, "POST", "/api/instances/i1/heartbeat")
    assert reply["success"] is True
    assert set(reply["agents"]) == {"a1", "a2"}
    assert agent(live, "a1")["lastHeartbeat"] == agent(live, "a2")["lastHeartbeat"] == clock.ms
    assert agent(live, "b1")["lastHeartbeat"] == before
    fails(live, "POST", "/api/instances/nowhere/heartbeat", {}, 404)


# ===== Tasks =====

TASK_FIELDS = {"id", "title", "description", "roles", "priority", "lane", "assignedTo", "instanceId", "epoch",
               "createdAt", "updatedAt", "history"}


def test_create_task_with_no_agent_is_queued(live, clock):
    made = new_task(live, "Fix login", description="500 on /login", roles=["dev"], tags=["web"])
    assert TASK_FIELDS <= set(made)
    assert (made["title"], made["description"], made["roles"]) == ("Fix login", "500 on /login", ["dev"])
    assert (made["lane"], made["assignedTo"], made["priority"], made["epoch"]) == ("queued", None, "P2", 0)
    assert made["createdAt"] == clock.ms
    assert task(live, made["id"]) == made


def test_queued_task_goes_to_the_first_agent_that_registers(live):
    waiting = new_task(live, "work", roles=["dev"])
    register(live, "d1", roles=["dev"])
    got = task(live, waiting["id"])
    assert (got["assignedTo"], got["lane"], got["epoch"]) == ("d1", "assigned", 1)


def test_create_assigns_by_role_first_then_lowest_workload(live):
    register(live, "q1", roles=["qa"], instanceId="i1")
    register(live, "d1", roles=["dev"], instanceId="i2")
    register(live, "d2", roles=["dev"], instanceId="i3")
    first = new_task(live, "dev work 1", roles=["dev"])
    second = new_task(live, "dev work 2", roles=["dev"])
    # q1 is idle, but only dev agents match; the second goes to the dev agent with less work
    assert {first["assignedTo"], second["assignedTo"]} == {"d1", "d2"}
    assert first["lane"] == second["lane"] == "assigned"
    assert new_task(live, "qa work", roles=["qa"])["assignedTo"] == "q1"
    assert new_task(live, "ops work", roles=["ops"])["lane"] == "queued"
    assert first["instanceId"] == agent(live, first["assignedTo"])["instanceId"]
    kinds = [(n["type"], n["taskId"]) for n in notes(live, first["assignedTo"])]
    assert ("task-assigned", first["id"]) in kinds


def test_create_never_exceeds_max_concurrent_tasks_and_done_frees_a_slot(live):
    register(live, "a1", maxConcurrentTasks=2)
    made = [new_task(live, f"t{n}") for n in range(5)]
    assert [t["lane"] for t in made] == ["assigned", "assigned", "queued", "queued", "queued"]
    assert len(agent(live, "a1")["activeTasks"]) == 2
    verb(live, made[0]["id"], "complete", "a1", 1)
    assert len(agent(live, "a1")["activeTasks"]) == 2
    assert task(live, made[2]["id"])["assignedTo"] == "a1"


@pytest.mark.parametrize("priority", ["P0", "P1", "P2", "P3"])
def test_create_accepts_each_priority(live, priority):
    assert new_task(live, "t", priority=priority)["priority"] == priority


@pytest.mark.parametrize("body, field", [
    ({}, "title"),
    ({"title": ""}, "title"),
    ({"title": "   "}, "title"),
    ({"title": 5}, "title"),
    ({"title": "t", "priority": "P4"}, "priority"),
    ({"title": "t", "priority": "high"}, "priority"),
    ({"title": "t", "priority": 1}, "priority"),
    ({"title": "t", "lane": "doing"}, "lane"),
    ({"title": "t", "roles": 3}, "roles"),
    ({"title": "t", "assignedTo": "ghost"}, "assignedTo"),
    ({"title": "t", "assignedTo": ".x"}, "assignedTo"),
])
def test_create_task_rejects_bad_input_and_creates_nothing(live, body, field):
    fails(live, "POST", "/api/tasks", body, 400, field=field)
    status, headers, listed = live.call("GET", "/api/tasks")
    assert (status, listed, headers["x-total-count"]) == (200, [], "0")


@pytest.mark.parametrize("extra, agents, lane", [
    ({"lane": "proposed"}, False, "queued"),
    ({"lane": "queued"}, False, "queued"),
    ({"lane": "development", "assignedTo": "a1"}, True, "in_progress"),
    ({"lane": "in_progress", "assignedTo": "a1"}, True, "in_progress"),
], ids=["proposed", "queued", "development", "in_progress"])
def test_create_accepts_lane_aliases(live, extra, agents, lane):
    if agents:
        register(live, "a1")
    assert new_task(live, "t", **extra)["lane"] == lane


@pytest.fixture
def board(live):
    """a1 (i1, qa, max 1) and a2 (i2, dev, max 1) and five tasks; returns {title: task id}."""
    register(live, "a1", instanceId="i1", roles=["qa"], maxConcurrentTasks=1)
    register(live, "a2", instanceId="i2", roles=["dev"], maxConcurrentTasks=1)
    specs = [("t1", ["qa"], "P0"), ("t2", ["dev"], "P1"), ("t3", ["qa"], "P2"), ("t4", [], "P3"),
             ("t5", ["dev"], "P0")]
    made = {title: new_task(live, title, roles=roles, priority=p) for title, roles, p in specs}
    assert (made["t1"]["assignedTo"], made["t2"]["assignedTo"]) == ("a1", "a2")
    return {title: t["id"] for title, t in made.items()}


@pytest.mark.parametrize("query, titles", [
    ("", {"t1", "t2", "t3", "t4", "t5"}),
    ("?assignedTo=a1", {"t1"}),
    ("?instanceId=i2", {"t2"}),
    ("?lane=queued", {"t3", "t4", "t5"}),
    ("?lane=proposed", {"t3", "t4", "t5"}),
    ("?lane=assigned", {"t1", "t2"}),
    ("?priority=P0", {"t1", "t5"}),
    ("?role=qa", {"t1", "t3"}),
    ("?role=dev&lane=queued", {"t5"}),
    ("?lane=done", set()),
])
def test_list_tasks_filters_and_total_count(live, board, query, titles):
    status, headers, listed = live.call("GET", "/api/tasks" + query)
    assert status == 200
    assert set(ids(listed)) == {board[t] for t in titles}
    assert len(listed) == len(titles)
    assert headers["x-total-count"] == str(len(titles))


def test_list_tasks_pages_with_limit_and_offset(live, board):
    pages = []
    for offset in (0, 2, 4):
        status, headers, page = live.call("GET", f"/api/tasks?limit=2&offset={offset}")
        assert status == 200 and headers["x-total-count"] == "5"
        pages.append(ids(page))
    assert [len(p) for p in pages] == [2, 2, 1]
    assert sorted(sum(pages, [])) == sorted(board.values())
    assert ok(live, "GET", "/api/tasks?offset=5") == []


@pytest.mark.parametrize("query, field", [
    ("?limit=abc", "limit"),
    ("?limit=0", "limit"),
    ("?limit=-1", "limit"),
    ("?offset=-1", "offset"),
    ("?priority=P9", "priority"),
    ("?lane=nope", "lane"),
])
def test_list_tasks_rejects_bad_query(live, query, field):
    fails(live, "GET", "/api/tasks" + query, status=400, field=field)


def test_task_get_sends_etag_and_put_is_a_partial_update(live):
    register(live, "a1")
    made = new_task(live, "title", description="old", roles=["x"], priority="P1", assignedTo="a1")
    status, headers, got = live.call("GET", f"/api/tasks/{made['id']}")
    assert status == 200 and headers.get("etag")
    updated = ok(live, "PUT", f"/api/tasks/{made['id']}", {"description": "new"})
    assert updated["description"] == "new"
    for key in ("title", "roles", "priority", "assignedTo", "lane", "epoch"):
        assert updated[key] == got[key], key
    _, headers2, _ = live.call("GET", f"/api/tasks/{made['id']}")
    assert headers2["etag"] != headers["etag"]


def test_put_if_match_mismatch_is_412_and_match_works(live):
    made = new_task(live, "title")
    path = f"/api/tasks/{made['id']}"
    _, headers, _ = live.call("GET", path)
    old_tag = headers["etag"]
    status, put_headers, _ = live.call("PUT", path, {"title": "v2"}, headers={"If-Match": old_tag})
    assert status == 200
    new_tag = put_headers["etag"]
    assert new_tag != old_tag
    assert live.call("GET", path)[1]["etag"] == new_tag
    fails(live, "PUT", path, {"title": "v3"}, 412, headers={"If-Match": old_tag})
    assert task(live, made["id"])["title"] == "v2"
    assert ok(live, "PUT", path, {"title": "v3"}, headers={"If-Match": new_tag})["title"] == "v3"


def test_put_assigned_to_reassigns_with_a_new_epoch_and_tells_both_agents(live):
    register(live, "a1")
    held = new_task(live, "work")
    register(live, "a2")
    moved = ok(live, "PUT", f"/api/tasks/{held['id']}", {"assignedTo": "a2"})
    assert (moved["assignedTo"], moved["lane"], moved["epoch"]) == ("a2", "assigned", held["epoch"] + 1)
    assert agent(live, "a1")["activeTasks"] == []
    assert agent(live, "a2")["activeTasks"] == [held["id"]]
    newest = notes(live, "a2")[0]
    assert (newest["type"], newest["taskId"]) == ("task-assigned", held["id"])
    assert ("task-revoked", held["id"]) in [(n["type"], n["taskId"]) for n in notes(live, "a1")]
    assert beat(live, "a1", tasks=[{"id": held["id"], "epoch": held["epoch"]}])["stop"] == [held["id"]]


def test_put_to_a_full_agent_is_409_unless_forced(live):
    register(live, "a2", maxConcurrentTasks=1)
    theirs = new_task(live, "theirs")
    register(live, "a1")
    mine = new_task(live, "mine")
    assert (theirs["assignedTo"], mine["assignedTo"]) == ("a2", "a1")
    fails(live, "PUT", f"/api/tasks/{mine['id']}", {"assignedTo": "a2"}, 409, code="agent_full")
    assert task(live, mine["id"]) == mine
    forced = ok(live, "PUT", f"/api/tasks/{mine['id']}", {"assignedTo": "a2", "force": True})
    assert forced["assignedTo"] == "a2"
    assert sorted(agent(live, "a2")["activeTasks"]) == sorted([theirs["id"], mine["id"]])


def test_put_unknown_task_is_404_and_to_unknown_agent_is_400(live):
    fails(live, "PUT", "/api/tasks/task-nope", {"title": "x"}, 404)
    made = new_task(live, "t")
    fails(live, "PUT", f"/api/tasks/{made['id']}", {"assignedTo": "ghost"}, 400, field="assignedTo")


def test_delete_task(live):
    register(live, "a1")
    made = new_task(live, "t")
    ok(live, "DELETE", f"/api/tasks/{made['id']}")
    fails(live, "GET", f"/api/tasks/{made['id']}", status=404)
    assert agent(live, "a1")["activeTasks"] == []
    fails(live, "DELETE", f"/api/tasks/{made['id']}", status=404)


# ===== Agent verbs =====


@pytest.fixture
def owned(live):
    """Task assigned to a1 at epoch 1; a2 is another registered agent."""
    register(live, "a1")
    made = new_task(live, "work")
    register(live, "a2")
    assert (made["assignedTo"], made["epoch"], made["lane"]) == ("a1", 1, "assigned")
    return made


def test_agent_verbs_move_the_lanes(live, owned):
    steps = [("claim", "assigned"), ("start", "in_progress"), ("block", "blocked"), ("start", "in_progress"),
             ("complete", "done")]
    for name, lane in steps:
        moved = verb(live, owned["id"], name, "a1", 1)
        assert (moved["lane"], moved["assignedTo"], moved["epoch"]) == (lane, "a1", 1), name
        assert task(live, owned["id"])["lane"] == lane
    assert owned["id"] not in agent(live, "a1")["activeTasks"]


def test_release_puts_the_task_back_in_the_queue_with_a_new_epoch(live):
    register(live, "a1")
    made = new_task(live, "work")
    released = verb(live, made["id"], "release", "a1", 1)
    assert (released["lane"], released["assignedTo"], released["epoch"]) == ("queued", None, 2)
    assert agent(live, "a1")["activeTasks"] == []


def test_claim_takes_a_queued_task(live):
    register(live, "a1", roles=["dev"])
    waiting = new_task(live, "qa only", roles=["qa"])
    assert (waiting["lane"], waiting["epoch"]) == ("queued", 0)
    claimed = verb(live, waiting["id"], "claim", "a1", 0)
    assert (claimed["lane"], claimed["assignedTo"], claimed["epoch"]) == ("assigned", "a1", 1)


@pytest.mark.parametrize("name", ["claim", "start", "complete", "block", "release"])
@pytest.mark.parametrize("caller, epoch", [("a2", 1), ("a1", 0), ("a1", 2)],
                         ids=["other-agent", "old-epoch", "future-epoch"])
def test_agent_verb_from_a_non_owner_or_stale_epoch_is_409_and_changes_nothing(live, owned, name, caller, epoch):
    before = task(live, owned["id"])
    body = fails(live, "POST", f"/api/tasks/{owned['id']}/{name}", {"agentId": caller, "epoch": epoch}, 409)
    assert (body["currentAssignee"], body["currentEpoch"]) == ("a1", 1)
    assert task(live, owned["id"]) == before


@pytest.mark.parametrize("body, field", [
    ({"agentId": "a1"}, "epoch"),
    ({"agentId": "a1", "epoch": "1"}, "epoch"),
    ({"agentId": "a1", "epoch": None}, "epoch"),
    ({"epoch": 1}, "agentId"),
])
def test_agent_verb_needs_agent_id_and_epoch(live, owned, body, field):
    before = task(live, owned["id"])
    fails(live, "POST", f"/api/tasks/{owned['id']}/start", body, 400, field=field)
    assert task(live, owned["id"]) == before


# ===== Notifications and sync =====


def test_notifications_create_read_and_list(live, clock):
    register(live, "a1")
    register(live, "a2")
    created = ok(live, "POST", "/api/notifications",
                 {"agentId": "a1", "title": "Hi", "message": "hello", "type": "message"}, status=201)
    assert (created["agentId"], created["message"], created["read"]) == ("a1", "hello", False)
    assert created["createdAt"] == clock.ms
    ok(live, "POST", "/api/notifications", {"agentId": "a2", "message": "other"}, status=201)
    clock.advance(3)
    read = ok(live, "PUT", f"/api/notifications/{created['id']}/read")
    assert (read["id"], read["read"], read["readAt"]) == (created["id"], True, clock.ms)
    assert ok(live, "PUT", f"/api/notifications/{created['id']}/read")["read"] is True
    assert ok(live, "GET", "/api/notifications?agentId=a1&unread=true") == []
    assert ids(ok(live, "GET", "/api/notifications?agentId=a1")) == [created["id"]]
    everyone = ok(live, "GET", "/api/notifications?unread=true")
    assert [n["agentId"] for n in everyone] == ["a2"]


@pytest.mark.parametrize("method, path, body, status, field", [
    ("POST", "/api/notifications", {"agentId": "ghost", "message": "m"}, 404, None),
    ("POST", "/api/notifications", {"agentId": "a1"}, 400, "message"),
    ("POST", "/api/notifications", {"agentId": ".x", "message": "m"}, 400, "agentId"),
    ("PUT", "/api/notifications/ntf-nope/read", None, 404, None),
    ("GET", "/api/notifications?unread=maybe", None, 400, "unread"),
    ("GET", "/api/agents/a1/notifications?unread=maybe", None, 400, "unread"),
])
def test_notification_errors(live, method, path, body, status, field):
    register(live, "a1")
    fails(live, method, path, body, status, field=field)


@pytest.mark.parametrize("body", [None, {}])
def test_sync_returns_success(live, body):
    assert ok(live, "POST", "/api/sync", body)["success"] is True


# ===== Not found, ids =====


@pytest.mark.parametrize("method, path, body", [
    ("GET", "/api/agents/ghost", None),
    ("DELETE", "/api/agents/ghost", None),
    ("GET", "/api/agents/ghost/tasks", None),
    ("GET", "/api/agents/ghost/notifications", None),
    ("GET", "/api/tasks/ghost", None),
    ("DELETE", "/api/tasks/ghost", None),
    ("POST", "/api/tasks/ghost/start", {"agentId": "a1", "epoch": 1}),
    ("GET", "/api/instances/ghost", None),
    ("PUT", "/api/notifications/ghost/read", None),
])
def test_unknown_entities_are_404(live, method, path, body):
    register(live, "a1")
    data = fails(live, method, path, body, 404)
    assert data["error"]["code"].endswith("not_found")


BAD_IDS = [".hidden", "a" * 65, "a%20b", "..", "a%2Fb", "caf%C3%A9", "a%00"]


@pytest.mark.parametrize("bad", BAD_IDS)
@pytest.mark.parametrize("template", ["/api/agents/{}", "/api/tasks/{}", "/api/instances/{}",
                                      "/api/agents/{}/tasks"])
def test_bad_ids_in_the_path_are_400(live, template, bad):
    fails(live, "GET", template.format(bad), status=400, field="id")


@pytest.mark.parametrize("good", ["x", "a" * 64, "A.b_c-9", "_lead", "-dash", "dev.1"])
def test_good_ids_are_accepted(live, good):
    assert register(live, good)["id"] == good
    assert agent(live, good)["id"] == good


# ===== Protocol =====


@pytest.mark.parametrize("method, path", [
    ("GET", "/"), ("GET", "/api"), ("GET", "/api/nope"), ("GET", "/healthz"),
    ("GET", "/api/agents/a1/bogus"), ("POST", "/api/tasks/t1/explode"),
])
def test_unknown_path_is_json_404(live, method, path):
    fails(live, method, path, status=404)


@pytest.mark.parametrize("method, path, allowed", [
    ("DELETE", "/health", {"GET"}),
    ("POST", "/api/agents", {"GET"}),
    ("GET", "/api/agents/register", {"POST"}),
    ("POST", "/api/tasks/t1", {"GET", "PUT", "DELETE"}),
    ("GET", "/api/tasks/t1/claim", {"POST"}),
    ("GET", "/api/sync", {"POST"}),
    ("DELETE", "/api/notifications", {"GET", "POST"}),
    ("GET", "/api/notifications/n1/read", {"PUT"}),
])
def test_known_path_wrong_method_is_405_with_allow(live, method, path, allowed):
    status, headers, data = live.call(method, path)
    check_error(live, status, headers, data, 405)
    allow = {m.strip() for m in headers["allow"].split(",")}
    assert allowed <= allow and method not in allow


@pytest.mark.parametrize("method, path", [("PATCH", "/api/tasks/t1"), ("OPTIONS", "/health"),
                                          ("BREW", "/api/agents")])
def test_unimplemented_method_is_json_501(live, method, path):
    fails(live, method, path, status=501)


@pytest.mark.parametrize("path", ["/api/tasks", "/api/agents/register"])
@pytest.mark.parametrize("expect", [False, True], ids=["plain", "expect-100"])
def test_body_over_one_mib_is_413(live, path, expect):
    headers = {"Content-Type": "application/json", "Content-Length": str(2 * MIB)}
    if expect:
        headers["Expect"] = "100-continue"
    status, got_headers, data = send_head_only(live.port, "POST", path, headers)
    check_error(live, status, got_headers, data, 413)
    assert ok(live, "GET", "/api/tasks") == [] and ok(live, "GET", "/api/agents") == []


INVALID_BODIES = {
    "not-json": b"{not json",
    "truncated": b'{"title": "x"',
    "nan": b'{"title": "x", "n": NaN}',
    "infinity": b'{"title": "x", "n": Infinity}',
    "minus-infinity": b'{"title": "x", "n": -Infinity}',
    "bad-utf8": b'{"title": "\xff\xfe"}',
    "bad-utf8-seq": b'{"title": "\xc3\x28"}',
    "nested-65": b'{"title": "x", "d": ' + b"[" * 64 + b"]" * 64 + b"}",
    "nested-100k": b"[" * 100000 + b"]" * 100000,
    "array": b'[{"title": "x"}]',
    "string": b'"title"',
    "null": b"null",
    "number": b"42",
}


@pytest.mark.parametrize("raw", list(INVALID_BODIES.values()), ids=list(INVALID_BODIES))
def test_invalid_json_body_is_400_invalid_json(live, raw):
    fails(live, "POST", "/api/tasks", raw=raw, status=400, code="invalid_json")
    assert ok(live, "GET", "/api/tasks") == []


def test_json_nested_exactly_64_deep_is_accepted(live):
    # body object, metadata object, then 62 arrays: 64 levels
    raw = b'{"id": "deep", "metadata": {"d": ' + b"[" * 62 + b"]" * 62 + b"}}"
    status, _, made = live.call("POST", "/api/agents/register", raw=raw)
    assert status == 201 and made["id"] == "deep"


@pytest.mark.parametrize("method, path", [
    ("POST", "/api/agents/register"), ("POST", "/api/tasks"), ("POST", "/api/notifications"),
    ("PUT", "/api/tasks/t1"), ("POST", "/api/tasks/t1/start"),
])
def test_body_without_content_length_is_411(live, method, path):
    status, headers, data = send_head_only(live.port, method, path, {"Content-Type": "application/json"})
    check_error(live, status, headers, data, 411)


def test_chunked_body_is_411(live):
    """The whole request goes in one write: the bridge answers 411 and closes without reading the body."""
    body = b'{"title": "x"}'
    request = (b"POST /api/tasks HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
               b"Transfer-Encoding: chunked\r\n\r\n" + b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body))
    status, headers, data = raw_exchange(live.port, request)
    check_error(live, status, headers, data, 411)


@pytest.mark.parametrize("data, status", [
    (b"GARBAGE\r\n\r\n", 400),
    (b"hello there general kenobi\r\n\r\n", 400),
    (b"GET /health HTTP/x.y\r\n\r\n", 400),
    (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n", 400),
    # sized so that the parser reads every byte before it answers (no reset from unread data)
    (b"GET /" + b"a" * 65532, 414),
    (b"GET /health HTTP/1.1\r\nX-Big: " + b"a" * (65537 - 7), 431),
], ids=["one-word", "four-words", "bad-version", "tls-hello", "line-too-long", "header-too-long"])
def test_requests_the_http_parser_rejects_get_json_errors(live, data, status):
    got, headers, body = raw_exchange(live.port, data)
    check_error(live, got, headers, body, status)


def test_internal_error_is_a_bare_500_without_details(secured, monkeypatch):
    def explode(*args, **kwargs):
        raise RuntimeError(f"disk trouble in {secured.config.data_dir} with {TOKEN}")

    monkeypatch.setattr(secured.bridge, "run", explode)
    data = fails(secured, "GET", "/api/agents", status=500, headers=AUTH)
    assert "disk trouble" not in json.dumps(data)


def test_keep_alive_serves_several_requests_on_one_connection(live):
    conn = http.client.HTTPConnection("127.0.0.1", live.port, timeout=10)
    requests = [("GET", "/health", None), ("POST", "/api/agents/register", {"id": "a1"}),
                ("GET", "/api/agents/a1", None), ("POST", "/api/agents/a1/heartbeat", {}),
                ("POST", "/api/tasks", {"title": "t"}), ("GET", "/api/tasks", None)]
    try:
        sock = None
        for method, path, body in requests:
            data = None if body is None else json.dumps(body).encode()
            conn.request(method, path, body=data, headers={"Content-Type": "application/json"})
            resp = conn.getresponse()
            payload = json.loads(resp.read())
            assert 200 <= resp.status < 300, (path, resp.status, payload)
            assert (resp.getheader("Connection") or "").lower() != "close"
            sock = sock or conn.sock
            assert conn.sock is sock, f"the bridge closed the connection after {method} {path}"
        assert payload[0]["assignedTo"] == "a1"
    finally:
        conn.close()


def test_head_health_gives_headers_and_no_body(live):
    conn = http.client.HTTPConnection("127.0.0.1", live.port, timeout=10)
    try:
        conn.request("HEAD", "/health")
        resp = conn.getresponse()
        assert resp.status == 200
        assert resp.getheader("Content-Type").startswith("application/json")
        assert int(resp.getheader("Content-Length")) > 0
        assert resp.read() == b""
        # had the bridge sent a body after the head, it would be read here as the next response
        conn.request("GET", "/health")
        resp = conn.getresponse()
        assert resp.status == 200 and json.loads(resp.read())["status"] == "ok"
    finally:
        conn.close()


# ===== Token =====


@pytest.mark.parametrize("auth", [None, "Bearer wrong", f"Basic {TOKEN}", "Bearer", TOKEN, f"Bearer {TOKEN}x"],
                         ids=["none", "wrong", "basic", "empty", "no-scheme", "longer"])
@pytest.mark.parametrize("method, path, body", [
    ("GET", "/api/agents", None), ("GET", "/api/tasks", None), ("GET", "/api/instances/capacities", None),
    ("POST", "/api/agents/register", {"id": "intruder"}),
])
def test_api_without_the_right_token_is_401(secured, auth, method, path, body):
    headers = {"Authorization": auth} if auth else {}
    fails(secured, method, path, body, 401, headers=headers)
    fails(secured, "GET", "/api/agents/intruder", status=404, headers=AUTH)


def test_api_with_the_token_works(secured):
    assert ok(secured, "POST", "/api/agents/register", {"id": "a1"}, status=201, headers=AUTH)["id"] == "a1"
    assert ids(ok(secured, "GET", "/api/agents", headers=AUTH)) == ["a1"]
    assert ok(secured, "POST", "/api/agents/a1/heartbeat", {}, headers=AUTH)["success"] is True


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}], ids=["none", "wrong"])
def test_health_without_token_says_only_status_and_version(secured, headers):
    data = ok(secured, "GET", "/health", headers=headers)
    assert set(data) == {"status", "version"}
    assert data["status"] == "ok"


def test_health_with_token_says_more(secured):
    data = ok(secured, "GET", "/health", headers=AUTH)
    assert data["status"] == "ok" and "version" in data
    assert len(set(data) - {"status", "version"}) > 0
    assert_no_leak(secured, json.dumps(data))


# ===== Load =====


def test_300_concurrent_heartbeats_each_on_a_new_connection(live):
    agents = [f"fleet-{n}" for n in range(30)]
    for agent_id in agents:
        register(live, agent_id)
    count = 300
    barrier = threading.Barrier(count, timeout=20)
    results, errors = [], []

    def one(n):
        try:
            barrier.wait()
            status, _, data = http_call(live.port, "POST", f"/api/agents/{agents[n % len(agents)]}/heartbeat",
                                        {"status": "idle"}, timeout=20)
            results.append((status, data.get("success")))
        except Exception as exc:  # reported below with the others
            errors.append(repr(exc))

    threads = [threading.Thread(target=one, args=(n,), daemon=True) for n in range(count)]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + 25
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))
    assert not any(thread.is_alive() for thread in threads), "some heartbeats never got an answer"
    assert errors == []
    assert len(results) == count
    assert all(200 <= status < 300 and success is True for status, success in results)


def test_connection_threads_are_reused_and_end_with_the_server(tmp_path):
    """A thread whose connection has ended serves a later one (starting a thread per connection costs as
    much CPU as a heartbeat), and the spare threads end with the server."""
    live = LiveBridge(tmp_path / "data")
    before = set(threading.enumerate())
    try:
        for _ in range(40):
            with socket.create_connection(("127.0.0.1", live.port), timeout=10) as sock:
                sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                answer = b""
                while chunk := sock.recv(65536):    # to the server's end of the connection
                    answer += chunk
            assert answer.startswith(b"HTTP/1.1 200 ")
        started = set(threading.enumerate()) - before
        assert 1 <= len(started) < 10, f"{len(started)} threads for 40 connections one after another"
    finally:
        live.close()
    for thread in started:
        thread.join(5)
    assert not any(thread.is_alive() for thread in started), "spare threads outlive the server"


def test_a_request_that_fails_halfway_changes_nothing(live):
    """Each request is one transaction: a heartbeat that acknowledges a notification but carries a bad field
    is refused whole, and the notification stays unread."""
    assert live.call("POST", "/api/agents/register", {"id": "a1"})[0] == 201
    assert live.call("POST", "/api/tasks", {"title": "t"})[0] == 201
    note = live.call("GET", "/api/agents/a1/notifications?unread=true")[2][0]
    status, _, body = live.call("POST", "/api/agents/a1/heartbeat",
                                {"readNotifications": [note["id"]], "instanceId": "bad id!"})
    assert status == 400 and body["error"]["field"] == "instanceId"
    assert [n["id"] for n in live.call("GET", "/api/agents/a1/notifications?unread=true")[2]] == [note["id"]]
