"""A seeded simulation of a fleet on the pure domain: eight instances of three or four agents over simulated
hours, with random crashes, clean shutdowns, returns, manual reassignments, drains, deregistrations, bridge
pauses and bridge restarts (from a snapshot, or from the journal alone as after kill -9). Agents act only on
what the bridge told them (their verb replies and heartbeat replies), so after a crash they come back with
stale epochs and try them.

After every step check_invariants holds: no task lost, never assigned to an offline agent, never over
capacity, epochs that never go down and go up with every change of assignee, indexes that agree with the
data. Every verb is checked against the fencing rule (only the owner at the current epoch is accepted; anyone
else gets 409 and changes nothing), every journaled task version against the epoch rules, every sweep against
the liveness rules of the contract (threshold, restart grace, disruption rule), and every restart against the
state before it.

Three runs per seed: the fleet as the issue describes it; the same with mass crashes (>= 55 % of the online
instances at once: nothing may go offline or move while they are silent); the same with free-form operator
PUTs (any lane, any assignee, finished tasks reopened). A failure names the seed, the step and the last events;
rerun one with -k, e.g. -k "edits and 1234".
"""
import json
import math
import random
from collections import Counter, deque

import pytest

import clawbridge as cb
from conftest import FakeClock

SEEDS = (7, 1234, 987654)
STEPS = 2000                    # per run: about 1.2 simulated hours
MASS_STEPS = 1200               # the runs with mass crashes, which are about the disruption rule
EDIT_STEPS = 800                # the runs with free-form PUTs (any lane, any assignee) on any task
INSTANCES = 8
OFFLINE_AFTER = 20.0            # seconds (state.offline_after); small, so that hours compress into steps
BEAT_MS = 5000                  # what most agents declare as heartbeatInterval
CRON_MS = 15000                 # a slower agent: its instance's threshold is 2 x 15 s = 30 s
ROLES = ("dev", "qa", "ops")
PRIORITIES = ("P0", "P1", "P2", "P3")
ACTIVE = ("assigned", "in_progress", "blocked", "review")
FINISHED = ("done", "cancelled")
SHARE, AT_LEAST = 0.55, 3       # the contract's disruption rule
AUTO = ("bridge", "failover")   # who assigns when no person or agent asked for it
QUEUE_CAP = 40                  # no new tasks while this many wait (keeps the run fast)

# The agent verbs as the contract describes them: lanes the task may be in, lane it moves to.
VERB_LANES = {
    "claim": (("queued", "assigned"), "assigned"),
    "start": (ACTIVE, "in_progress"),
    "complete": (ACTIVE + ("done",), "done"),
    "block": (ACTIVE, "blocked"),
    "release": (ACTIVE, "queued"),
}


class SimAgent:
    """One agent process as the test imagines it. It knows only what the bridge told it."""

    def __init__(self, agent_id, instance, roles, max_tasks, interval_ms):
        self.id, self.instance, self.roles = agent_id, instance, roles
        self.max_tasks, self.interval = max_tasks, interval_ms
        self.beliefs = {}       # task id -> epoch it believes it holds (from its replies and beats only)
        self.past = []          # every (task id, epoch) it ever believed, for replays of stale epochs
        self.heard = None       # clock time of its latest beat or registration: when the bridge heard it
        self.next_beat = 0.0
        self.retired = False    # deregistered by the operator; silent until registered again

    def payload(self):
        return {"id": self.id, "instanceId": self.instance, "roles": list(self.roles),
                "maxConcurrentTasks": self.max_tasks, "heartbeatInterval": self.interval,
                "hostname": self.instance + ".lan"}

    def believe(self, task_id, epoch):
        if self.beliefs.get(task_id) != epoch:
            self.beliefs[task_id] = epoch
            self.past.append((task_id, epoch))


class SimInstance:
    def __init__(self, instance_id):
        self.id = instance_id
        self.agents = []
        self.crashed = False
        self.crashed_at = None


def describe(task):
    if task is None:
        return "gone"
    return f"{task.lane} {task.assignedTo or '-'}@{task.epoch}"


def check_invariants(state, history):
    """Everything that must hold between any two steps. history is the Sim: what the test did and saw."""
    fail = history.fail
    tasks = state.tasks
    lost = history.created - history.deleted - tasks.keys()
    if lost:
        fail(f"tasks lost (created, never deleted by the test, no longer in the state): {sorted(lost)}")
    if tasks.keys() - history.created:
        fail(f"tasks nobody created: {sorted(tasks.keys() - history.created)}")
    if tasks.keys() & history.deleted:
        fail(f"deleted tasks came back: {sorted(tasks.keys() & history.deleted)}")

    active = {agent_id: set() for agent_id in state.agents}
    unforced = dict.fromkeys(state.agents, 0)
    queued = {}
    snapshot = {}
    for task_id, task in tasks.items():
        who, epoch = task.assignedTo, task.epoch
        snapshot[task_id] = (who, epoch)
        prev = history.prev.get(task_id)
        if prev is not None:
            if epoch < prev[1]:
                fail(f"task {task_id}: epoch went down from {prev[1]} to {epoch}")
            if who != prev[0] and epoch <= prev[1]:
                fail(f"task {task_id}: assignee changed {prev[0]} -> {who} but the epoch stayed {epoch}")
        if task.lane == "queued":
            if who is not None:
                fail(f"task {task_id} is queued but assigned to {who}")
            queued[task_id] = task.priority
        elif task.lane in ACTIVE:
            forced = history.forced.get(task_id) == (who, epoch)
            agent = state.agents.get(who) if who else None
            if agent is None:
                fail(f"task {task_id} is {task.lane} but its assignee {who!r} does not exist")
            if agent.status != "online" and not forced:
                fail(f"task {task_id} is {task.lane} on {who}, which is {agent.status}")
            active[who].add(task_id)
            if not forced:
                unforced[who] += 1

    for agent_id, agent in state.agents.items():
        if unforced[agent_id] > agent.maxConcurrentTasks:
            fail(f"agent {agent_id} holds {unforced[agent_id]} active tasks (not forced), above its "
                 f"maxConcurrentTasks {agent.maxConcurrentTasks}: {sorted(active[agent_id])}")
        indexed = set(state.active.get(agent_id, ()))
        if indexed != active[agent_id]:
            fail(f"state.active[{agent_id}] = {sorted(indexed)} but its active tasks are {sorted(active[agent_id])}")
        if (agent.status == "online") != (agent_id in state.seen):
            fail(f"agent {agent_id} is {agent.status} but state.seen {'has' if agent_id in state.seen else 'lacks'} it")
    roomy = {a.id for a in state.agents.values() if a.status == "online" and
             len(state.active.get(a.id, ())) < a.maxConcurrentTasks}
    if set(state.roomy) != roomy:
        fail(f"state.roomy = {sorted(state.roomy)} but the online agents with room are {sorted(roomy)}")
    stray = sorted(a for a, ids in state.active.items() if ids and a not in state.agents)
    if stray:
        fail(f"state.active lists tasks for agents that do not exist: {stray}")
    if state.seen.keys() - state.agents.keys():
        fail(f"state.seen has unknown agents: {sorted(state.seen.keys() - state.agents.keys())}")

    in_buckets = {}
    for priority, bucket in state.queued.items():
        for task_id in bucket:
            if task_id in in_buckets:
                fail(f"task {task_id} is in two queue buckets")
            in_buckets[task_id] = priority
    if in_buckets != queued:
        wrong = sorted(set(in_buckets.items()) ^ set(queued.items()))
        fail(f"state.queued disagrees with the queued tasks (id, priority): {wrong}")

    for instance_id in state.instances:
        members = set(state.members.get(instance_id, ()))
        expected = {a.id for a in state.agents.values() if a.instanceId == instance_id}
        if members != expected:
            fail(f"state.members[{instance_id}] = {sorted(members)} but its agents are {sorted(expected)}")
    homeless = sorted(a.id for a in state.agents.values() if a.instanceId not in state.instances)
    if homeless:
        fail(f"agents on instances the state does not know: {homeless}")
    history.prev = snapshot


class Sim:
    def __init__(self, seed, mass_crashes=False, edits=False):
        self.seed = seed
        self.rng = random.Random(seed)
        self.mass_crashes = mass_crashes
        self.edits = edits
        self.clock = FakeClock()
        self.t0 = self.clock.mono
        self.step = 0
        self.log = deque(maxlen=40)
        self.stats = Counter()
        self.state = cb.State()
        self.state.offline_after = OFFLINE_AFTER
        cb.rebaseline(self.state, self.clock.now())
        self.baseline = self.clock.mono     # the latest start or re-baseline of the bridge
        self.paused = False

        # what the test did and saw, for the invariants
        self.created, self.deleted, self.deleting = set(), set(), set()
        self.forced = {}            # task id -> (agent, epoch) of a deliberately forced assignment
        self.prev = {}              # task id -> (assignedTo, epoch) at the previous check
        self.versions = {}          # task id -> (assignedTo, epoch) of its latest journaled version
        self.epoch_owner = {}       # (task id, epoch) -> assignedTo, over the whole run
        self.accepted = {}          # (task id, epoch) -> the agent whose verbs were accepted at that epoch
        self.disk = cb.Documents()      # the journal, replayed as it is written
        self.seq = 0
        self.last_ops = []
        self.scenario = None        # a mass crash in progress

        self.instances = []
        self.agents = {}
        for i in range(INSTANCES):
            inst = SimInstance(f"inst{i}")
            cron = self.rng.random() < 0.3
            for j in range(self.rng.randint(3, 4)):
                roles = tuple(sorted(self.rng.sample(ROLES, self.rng.randint(1, 2))))
                agent = SimAgent(f"inst{i}-a{j}", inst.id, roles, self.rng.randint(1, 3),
                                 CRON_MS if cron and j == 0 else BEAT_MS)
                inst.agents.append(agent)
                self.agents[agent.id] = agent
            self.instances.append(inst)
        self.by_id = {inst.id: inst for inst in self.instances}
        order = list(self.agents.values())
        self.rng.shuffle(order)
        for agent in order:
            self.clock.advance(self.rng.uniform(0.02, 0.12))
            self.register(agent)
        self.check()

    # --- bookkeeping ---

    def t(self):
        return self.clock.mono - self.t0

    def note(self, text):
        self.log.append(f"step {self.step} t=+{self.t():.1f}s: {text}")

    def fail(self, message):
        events = "\n".join("    " + e for e in self.log)
        raise AssertionError(f"seed {self.seed}, step {self.step} (t=+{self.t():.1f}s): {message}\n"
                             f"  last events, oldest first:\n{events}")

    def check(self):
        check_invariants(self.state, self)

    def call(self, fn, *args):
        """fn(state, now, *args) then state.take_changes(), as Bridge.run does; the journal ops are checked
        one by one and replayed into self.disk."""
        self.last_ops = []
        try:
            return fn(self.state, self.clock.now(), *args)
        finally:
            changes = self.state.take_changes()     # (ops, meta, events, ...)
            ops, meta = changes[0], changes[1]
            self.last_ops = ops
            self.absorb(ops, meta)

    def absorb(self, ops, meta):
        if not ops and not meta:
            return
        self.seq += 1
        final = {}
        for kind, section, value in ops:
            cb.apply_record(self.disk, {"seq": self.seq, "ops": [(kind, section, value)]})
            if section != "tasks":
                continue
            if kind == "del":
                if value not in self.deleting:
                    self.fail(f"the bridge deleted task {value}, which the test never deleted")
                self.versions.pop(value, None)
                continue
            value = self.disk.index["tasks"][value["id"]]     # a "set" op holds only what changed
            task_id, who, epoch = value["id"], value["assignedTo"], value["epoch"]
            prev = self.versions.get(task_id)
            if prev is not None:
                if epoch < prev[1]:
                    self.fail(f"task {task_id} was journaled with epoch {epoch} after epoch {prev[1]}")
                if who != prev[0] and epoch <= prev[1]:
                    self.fail(f"task {task_id} moved {prev[0]} -> {who} without a new epoch ({epoch})")
            owner = self.epoch_owner.setdefault((task_id, epoch), who)
            if owner != who:
                self.fail(f"epoch {epoch} of task {task_id} was given to {who} after {owner} had it")
            self.versions[task_id] = (who, epoch)
            final[task_id] = value
        self.disk.meta.update(meta or {})
        for task_id, value in final.items():
            _at, event, by, target = value["history"][-1]
            if event in ("task-assigned", "task-reassigned") and by in AUTO:
                self.check_auto_assignment(task_id, value, target)

    def check_auto_assignment(self, task_id, value, agent_id):
        """Work the bridge hands out by itself goes to an eligible agent with a matching role."""
        agent = self.state.agents.get(agent_id)
        if agent is None or agent.status != "online":
            self.fail(f"the bridge gave task {task_id} to {agent_id}, which is "
                      f"{'unknown' if agent is None else agent.status}")
        instance = self.state.instances.get(agent.instanceId)
        if instance is not None and instance.drained:
            self.fail(f"the bridge gave task {task_id} to {agent_id} on drained instance {agent.instanceId}")
        if agent.instanceId in self.state.hold:
            self.fail(f"the bridge gave task {task_id} to {agent_id} on {agent.instanceId}, still on anti-flap hold")
        roles = value["roles"]
        if roles and not set(roles) & set(self.agents[agent_id].roles):
            self.fail(f"the bridge gave task {task_id} (roles {list(roles)}) to {agent_id} "
                      f"(roles {list(self.agents[agent_id].roles)})")

    def task_ops(self):
        return [op for op in self.last_ops if op[1] == "tasks"]

    def live_agents(self):
        """Agents that run: on an instance that did not crash, registered."""
        return [a for inst in self.instances if not inst.crashed for a in inst.agents
                if not a.retired and a.id in self.state.agents]

    def instance_online(self, instance_id):
        return any(self.state.agents[a].status == "online" for a in self.state.members.get(instance_id, ()))

    def came_back(self, instance_id):
        """The bridge knows the instance and all its agents are offline: the next beat brings it back."""
        return instance_id in self.state.instances and not self.instance_online(instance_id)

    def threshold(self, instance_id):
        """The contract's threshold, from what the agents declared: max(OFFLINE_AFTER, 2 x longest interval)."""
        intervals = [self.agents[a].interval for a in self.state.members.get(instance_id, ())]
        return max(OFFLINE_AFTER, 2 * max(intervals, default=0) / 1000.0)

    def can_take(self, agent):
        """Whether the contract lets this agent get new work now."""
        instance = self.state.instances.get(agent.instanceId)
        return (agent.status == "online" and agent.instanceId not in self.state.hold
                and not (instance is not None and instance.drained)
                and len(self.state.active.get(agent.id, ())) < agent.maxConcurrentTasks)

    def protected(self):
        return self.scenario["tasks"] if self.scenario and not self.scenario["returned"] else {}

    def pick_task(self, lanes):
        protected = self.protected()
        choices = [t for t in self.state.tasks.values() if t.lane in lanes and t.id not in protected]
        return self.rng.choice(choices) if choices else None

    # --- what agents do ---

    def schedule(self, agent):
        agent.heard = self.clock.mono
        agent.next_beat = self.clock.mono + self.rng.uniform(0.8, 1.0) * agent.interval / 1000.0

    def register(self, agent):
        back = self.came_back(agent.instance)
        view, _created = self.call(cb.register_agent, agent.payload())
        self.schedule(agent)
        agent.retired = False
        if view["status"] != "online":
            self.fail(f"{agent.id} registered but is {view['status']}")
        if back and agent.instance not in self.state.hold:
            self.fail(f"instance {agent.instance} came back (registration of {agent.id}) without the anti-flap hold")

    def beat(self, agent, status=None):
        back = self.came_back(agent.instance)
        held = [{"id": t, "epoch": e} for t, e in agent.beliefs.items()]
        payload = {"status": status or self.rng.choice(("idle", "working")), "heartbeatInterval": agent.interval,
                   "tasks": held}
        reply = self.call(cb.record_heartbeat, agent.id, payload)
        self.schedule(agent)
        state = self.state
        stop = []
        for item in held:
            task = state.tasks.get(item["id"])
            if (task is None or task.assignedTo != agent.id or task.lane == "cancelled"
                    or task.epoch != item["epoch"]):
                stop.append(item["id"])
        if sorted(reply["stop"]) != sorted(stop):
            self.fail(f"beat of {agent.id} holding {held}: stop was {reply['stop']}, expected {stop}")
        for task in reply["tasks"]:
            if task["assignedTo"] != agent.id or task["lane"] not in ACTIVE:
                self.fail(f"beat of {agent.id} listed task {task['id']} ({task['lane']}, {task['assignedTo']})")
        if reply["stop"] or self.task_ops():
            self.note(f"beat {agent.id} ({payload['status']}): stop {reply['stop']}, "
                      f"holds {[(t['id'], t['epoch']) for t in reply['tasks']]}")
        for note in reply["notifications"]:
            if note["agentId"] != agent.id or note["read"]:
                self.fail(f"beat of {agent.id} returned {note} among its unread notifications")
            self.call(cb.mark_read, note["id"])
        for task_id in reply["stop"]:
            agent.beliefs.pop(task_id, None)
        for task in reply["tasks"]:
            agent.believe(task["id"], task["epoch"])
        if back and status != "offline" and agent.instance not in state.hold:
            self.fail(f"instance {agent.instance} came back (beat of {agent.id}) without the anti-flap hold")
        return reply

    def instance_beat(self, inst):
        back = self.came_back(inst.id)
        members = sorted(self.state.members.get(inst.id, ()))
        reply = self.call(cb.record_instance_heartbeat, inst.id, {"status": "working"})
        if sorted(reply["agents"]) != members:
            self.fail(f"instance beat of {inst.id} beat {reply['agents']}, its agents are {members}")
        for agent_id in members:
            self.schedule(self.agents[agent_id])
        if back and inst.id not in self.state.hold:
            self.fail(f"instance {inst.id} came back (instance beat) without the anti-flap hold")
        if reply["assigned"]:
            self.note(f"instance beat {inst.id}: assigned {reply['assigned']}")

    def verb(self, agent, task_id, verb, epoch):
        """One agent verb with the epoch the agent believes in, checked against what the contract allows:
        only the current owner at the current epoch is accepted; anyone else gets 409 and changes nothing."""
        state = self.state
        before = state.tasks.get(task_id)
        allowed, target = VERB_LANES[verb]
        claiming = before is not None and verb == "claim" and before.lane == "queued"
        if before is None or agent.id not in state.agents:
            expect = (404, None)
        elif epoch != before.epoch or (before.assignedTo != agent.id and not claiming):
            expect = (409, "stale_owner" if before.assignedTo != agent.id else "stale_epoch")
        elif before.lane not in allowed:
            expect = (409, "invalid_transition")
        elif claiming and not self.can_take(state.agents[agent.id]):
            expect = (409, "agent_full")
        else:
            expect = None
        what = f"{verb} {task_id} by {agent.id} at epoch {epoch} (task was {describe(before)})"
        try:
            reply = self.call(cb.agent_verb, task_id, verb, {"agentId": agent.id, "epoch": epoch})
        except cb.BridgeError as err:
            self.note(f"{what} -> {err.status} {err.code}")
            self.stats[f"verb {err.status} {err.code}"] += 1
            if expect is None:
                self.fail(f"{what} was refused ({err.status} {err.code}: {err.message}) although that agent is "
                          "the current owner at that epoch")
            if err.status != expect[0] or (expect[1] and err.code != expect[1]):
                self.fail(f"{what}: got {err.status} {err.code}, expected {expect[0]} {expect[1]}")
            if err.status == 409:
                if err.code.startswith("stale") and (err.extra.get("currentAssignee"), err.extra.get("currentEpoch")) \
                        != (before.assignedTo, before.epoch):
                    self.fail(f"{what}: the 409 names {err.extra} instead of the current owner and epoch")
                if state.tasks.get(task_id) is not before or self.last_ops:
                    self.fail(f"{what} was refused but changed the state: {describe(state.tasks.get(task_id))}, "
                              f"{len(self.last_ops)} journal ops")
            agent.beliefs.pop(task_id, None)   # told to stop, or gave up
            return False
        self.note(f"{what} -> ok")
        self.stats[f"verb ok {verb}"] += 1
        if expect is not None:
            self.fail(f"{what} was ACCEPTED, expected {expect[0]} {expect[1]}: an agent that is not the owner "
                      "at that epoch changed the task")
        if not claiming:
            owner = self.accepted.setdefault((task_id, epoch), agent.id)
            if owner != agent.id:
                self.fail(f"{what}: updates of both {owner} and {agent.id} were accepted at epoch {epoch}")
        after = state.tasks[task_id]
        if claiming:
            if (after.assignedTo, after.epoch, after.lane) != (agent.id, epoch + 1, "assigned"):
                self.fail(f"{what}: after the claim the task is {describe(after)}")
            agent.believe(task_id, reply["epoch"])
        elif verb == "release":
            if after.assignedTo == agent.id or after.epoch <= epoch:
                self.fail(f"{what}: after the release the task is {describe(after)}")
            agent.beliefs.pop(task_id, None)
        else:
            if (after.assignedTo, after.epoch, after.lane) != (agent.id, epoch, target):
                self.fail(f"{what}: afterwards the task is {describe(after)}, expected {target} {agent.id}@{epoch}")
            if verb == "complete":
                agent.beliefs.pop(task_id, None)
        return True

    # --- time ---

    def run_step(self):
        self.step += 1
        for _ in range(self.rng.randint(1, 4)):
            self.tick()
        for _ in range(self.rng.choice((0, 1, 1, 2, 2, 3))):
            self.event()
        self.check()

    def tick(self):
        """Up to a second of time: the watchdog's sweep, then the beats that are due."""
        self.clock.advance(self.rng.uniform(0.5, 1.0))
        self.sweep()
        scen = self.scenario
        if scen and not scen["returned"] and self.clock.mono >= scen["return_at"]:
            self.note(f"the {len(scen['ids'])} mass-crashed instances come back")
            for instance_id in scen["ids"]:
                self.return_instance(self.by_id[instance_id])
            scen["returned"] = True
        for inst in self.instances:
            if inst.crashed:
                continue
            due = [a for a in inst.agents if not a.retired and a.next_beat <= self.clock.mono]
            if not due:
                continue
            if self.rng.random() < 0.08:
                self.instance_beat(inst)
            else:
                for agent in due:
                    self.beat(agent)

    def sweep(self):
        """The watchdog pass, checked against the contract: an instance is marked offline when, and only when,
        it has been silent longer than its threshold (counted from the latest bridge start or re-baseline),
        except in disruption mode, where nothing is marked or moved. Disruption mode is required when one pass
        would expire most of the fleet (>= 55 %, >= 3), and allowed only while most of it is really silent."""
        state, now = self.state, self.clock.mono
        online, expired = [], []
        for instance_id in state.instances:
            live = [a for a in state.members.get(instance_id, ()) if state.agents[a].status == "online"]
            if not live:
                continue
            online.append(instance_id)
            silence = now - max([self.agents[a].heard for a in live] + [self.baseline])
            threshold = self.threshold(instance_id)
            if silence > threshold:
                expired.append((instance_id, round(silence, 1), threshold))
        paused, self.paused = self.paused, False
        report = self.call(cb.sweep)
        if paused:
            if not report.get("rebaselined") or report["offline"] or self.last_ops:
                self.fail(f"the first sweep after a pause of the bridge did not just re-baseline: {report}")
            self.baseline = now
            self.note("sweep after the pause: re-baselined")
            return
        if report.get("rebaselined"):
            self.fail(f"the sweep re-baselined although the previous sweep ran less than {cb.SWEEP_GAP}s ago")
        offline = sorted(report["offline"])
        crashed = [i for i in online if self.by_id[i].crashed]
        must_hold = len(expired) >= AT_LEAST and len(expired) >= SHARE * len(online)
        if offline or state.disruption or must_hold:
            self.note(f"sweep: offline {offline}, reassigned {report['reassigned']}, queued {report['queued']}, "
                      f"disruption {state.disruption}; silent past threshold {expired} of {len(online)} online")
        for instance_id in offline:
            inst = self.by_id[instance_id]
            if not inst.crashed:
                self.fail(f"instance {instance_id} was marked offline although its agents are beating")
            if now - self.baseline <= self.threshold(instance_id):
                self.fail(f"instance {instance_id} was marked offline {now - self.baseline:.1f}s after the bridge "
                          f"started, before one full threshold ({self.threshold(instance_id)}s)")
            for agent_id in state.members.get(instance_id, ()):
                if state.agents[agent_id].status != "offline" or state.active.get(agent_id):
                    self.fail(f"instance {instance_id} went offline but {agent_id} is "
                              f"{state.agents[agent_id].status} with tasks {list(state.active.get(agent_id, ()))}")
        if state.disruption:
            if offline or self.last_ops:
                self.fail(f"in disruption mode the sweep still marked {offline} offline and journaled "
                          f"{len(self.last_ops)} changes")
            if len(crashed) < AT_LEAST or len(crashed) < SHARE * len(online):
                self.fail(f"disruption mode with only {crashed} of {len(online)} online instances silent")
            self.stats["sweeps in disruption"] += 1
        elif must_hold:
            self.fail(f"{len(expired)} of {len(online)} online instances are silent past their threshold "
                      f"({expired}) in one pass: expected disruption mode (nothing marked, nothing moved), got "
                      f"offline {offline}")
        elif offline != sorted(e[0] for e in expired):
            self.fail(f"instances silent past their threshold: {expired} (of {len(online)} online); the sweep "
                      f"marked offline {offline}")
        self.stats["instances marked offline"] += len(offline)
        self.stats["tasks moved by failover"] += len(report["reassigned"]) + len(report["queued"])
        self.check_scenario(report, expired)

    def check_scenario(self, report, expired):
        scen = self.scenario
        if not scen:
            return
        state = self.state
        if scen["returned"]:
            if state.disruption:
                self.fail("the mass-crashed instances came back but the disruption did not end")
            self.scenario = None
            return
        label = (f"mass crash at t=+{scen['since'] - self.t0:.1f}s of {len(scen['ids'])} of {scen['online']} "
                 f"online instances ({', '.join(scen['ids'])})")
        if report["offline"]:
            silent = {e[0]: e[1] for e in expired}
            self.fail(f"{label}: this sweep marked {sorted(report['offline'])} offline (silent "
                      f"{[silent.get(i) for i in sorted(report['offline'])]}s, threshold "
                      f"{[self.threshold(i) for i in sorted(report['offline'])]}s) instead of suspecting a "
                      f"disruption; nothing may be marked offline while most of the fleet is silent")
        over = [e for e in expired if e[0] in scen["ids"]]
        if over and not state.disruption:
            self.fail(f"{label}: {over} are silent past their threshold but state.disruption is False")
        if state.disruption:
            self.stats["mass-crash sweeps held"] += 1
        for task_id, (who, epoch) in scen["tasks"].items():
            task = state.tasks.get(task_id)
            if task is None or (task.assignedTo, task.epoch) != (who, epoch):
                self.fail(f"{label}: task {task_id} moved from {who}@{epoch} to {describe(task)} during it")

    # --- events ---

    def event(self):
        table = [
            (16, self.ev_create), (30, self.ev_work), (4, self.ev_claim), (6, self.ev_stale),
            (7, self.ev_reassign), (4, self.ev_update), (7, self.ev_delete), (2.2, self.ev_crash),
            (0.5, self.ev_shutdown), (3.0, self.ev_return), (2.0, self.ev_drain), (0.8, self.ev_deregister),
            (1.5, self.ev_reregister), (1.0, self.ev_restart), (0.4, self.ev_pause),
        ]
        if self.mass_crashes:
            table.append((0.8, self.ev_mass_crash))
        if self.edits:
            table.append((6.0, self.ev_edit))
        weights, actions = zip(*table)
        self.rng.choices(actions, weights)[0]()

    def ev_create(self):
        state = self.state
        if sum(len(b) for b in state.queued.values()) >= QUEUE_CAP:
            return
        payload = {"title": f"job {len(self.created) + 1}", "priority": self.rng.choice(PRIORITIES),
                   "roles": self.rng.sample(ROLES, self.rng.choice((0, 1, 1, 1, 2)))}
        if self.rng.random() < 0.1:
            payload["instanceId"] = self.rng.choice(self.instances).id
        target = None
        if self.rng.random() < 0.1 and state.agents:
            target = state.agents[self.rng.choice(list(state.agents))]
            payload["assignedTo"] = target.id
            if self.rng.random() < 0.3:
                payload["force"] = True
        force = payload.get("force", False)
        refused = None
        if target is not None and not force:
            if target.status != "online":
                refused = "agent_offline"
            elif len(state.active.get(target.id, ())) >= target.maxConcurrentTasks:
                refused = "agent_full"
        count = len(state.tasks)
        try:
            task = self.call(cb.create_task, payload)
        except cb.BridgeError as err:
            self.note(f"create {payload} -> {err.status} {err.code}")
            if (err.status, err.code) != (409, refused):
                self.fail(f"create {payload} -> {err.status} {err.code}, expected {refused}")
            if len(state.tasks) != count or self.task_ops():
                self.fail(f"create {payload} was refused but a task was stored")
            return
        self.created.add(task["id"])
        self.note(f"create {task['id']} {payload} -> {task['lane']} {task['assignedTo']}@{task['epoch']}")
        if refused:
            self.fail(f"create {payload} assigned to {target.id} ({target.status}, full?) without force")
        if target is not None:
            if (task["assignedTo"], task["epoch"], task["lane"]) != (target.id, 1, "assigned"):
                self.fail(f"create {payload} -> {describe(state.tasks[task['id']])}")
            if force and (target.status != "online"
                          or len(state.active[target.id]) > target.maxConcurrentTasks):
                self.forced[task["id"]] = (target.id, 1)
        elif task["lane"] == "queued":
            fits = [a.id for a in state.agents.values() if self.can_take(a)
                    and (not payload["roles"] or set(payload["roles"]) & set(self.agents[a.id].roles))]
            if fits:
                self.fail(f"create {payload} left {task['id']} queued although {fits} could take it")

    def ev_work(self):
        busy = [a for a in self.live_agents() if a.beliefs]
        if not busy:
            return self.ev_claim()
        agent = self.rng.choice(busy)
        task_id = self.rng.choice(list(agent.beliefs))
        verb = self.rng.choices(("start", "complete", "block", "release", "claim"), (30, 45, 8, 12, 5))[0]
        self.verb(agent, task_id, verb, agent.beliefs[task_id])

    def ev_claim(self):
        queued = [t for p in PRIORITIES for t in self.state.queued[p]]
        agents = self.live_agents()
        if not queued or not agents:
            return
        task = self.state.tasks[self.rng.choice(queued)]
        epoch = task.epoch - 1 if task.epoch and self.rng.random() < 0.2 else task.epoch
        self.verb(self.rng.choice(agents), task.id, "claim", epoch)

    def ev_stale(self):
        """An agent acts on a task with an epoch that is not its own: one it held once (usually stale), an
        old epoch of a task it holds again at a newer one, or, as an impostor, the current epoch of a task
        someone else holds (read from a listing). Only the owner at the current epoch may change a task."""
        agents = [a for a in self.live_agents() if a.past]
        if not agents:
            return
        agent = self.rng.choice(agents)
        tasks, roll = self.state.tasks, self.rng.random()
        choices = []
        if roll < 0.3:
            choices = [(t.id, t.epoch) for t in tasks.values() if t.assignedTo not in (None, agent.id)]
        elif roll < 0.6:
            choices = [(t, e) for t, e in agent.past if t in tasks and tasks[t].assignedTo == agent.id
                       and tasks[t].epoch != e]
        task_id, epoch = self.rng.choice(choices or agent.past)
        if task_id in self.protected():
            return
        self.verb(agent, task_id, self.rng.choice(list(VERB_LANES)), epoch)

    def ev_reassign(self):
        """The guide's manual balancing: PUT assignedTo, to a full or offline agent only with force."""
        state = self.state
        task = self.pick_task(("queued",) + ACTIVE)
        if task is None or not state.agents:
            return
        full = [a for a in state.agents.values() if a.status == "online" and a.id != task.assignedTo
                and len(state.active.get(a.id, ())) >= a.maxConcurrentTasks]
        if full and self.rng.random() < 0.4:
            target = self.rng.choice(full)
        else:
            target = state.agents[self.rng.choice(list(state.agents))]
        force = self.rng.random() < 0.12
        payload = {"assignedTo": target.id}
        if force or self.rng.random() < 0.5:
            payload["force"] = force
        is_full = len(state.active.get(target.id, ())) >= target.maxConcurrentTasks
        if target.id == task.assignedTo:
            expect = "same"
        elif force:
            expect = "ok"
        elif target.status != "online":
            expect = "agent_offline"
        elif is_full:
            expect = "agent_full"
        else:
            expect = "ok"
        what = f"PUT {task.id} ({describe(task)}) {payload} [{target.id} {target.status}, " \
               f"{len(state.active.get(target.id, ()))}/{target.maxConcurrentTasks}]"
        try:
            self.call(cb.update_task, task.id, payload)
        except cb.BridgeError as err:
            self.note(f"{what} -> {err.status} {err.code}")
            self.stats[f"reassign {err.status} {err.code}"] += 1
            if (err.status, err.code) != (409, expect):
                self.fail(f"{what} -> {err.status} {err.code}, expected {expect}")
            if state.tasks[task.id] is not task or self.task_ops():
                self.fail(f"{what} was refused but the task changed: {describe(state.tasks[task.id])}")
            return
        after = state.tasks[task.id]
        self.note(f"{what} -> {describe(after)}")
        self.stats["reassign ok"] += 1
        if expect.startswith("agent_"):
            self.fail(f"{what} was accepted without force; expected 409 {expect}")
        if expect == "same":
            if (after.assignedTo, after.epoch) != (task.assignedTo, task.epoch):
                self.fail(f"{what}: reassigning to the current assignee changed it to {describe(after)}")
        elif (after.assignedTo, after.epoch, after.lane) != (target.id, task.epoch + 1, "assigned"):
            self.fail(f"{what}: afterwards {describe(after)}, expected assigned {target.id}@{task.epoch + 1}")
        elif force and (target.status != "online" or is_full):
            self.forced[task.id] = (target.id, after.epoch)

    def ev_update(self):
        task = self.pick_task(("queued",) + ACTIVE)
        if task is None:
            return
        kind = self.rng.choice(("requeue", "cancel", "unassign", "priority", "done"))
        payload = {"requeue": {"lane": "queued"}, "cancel": {"lane": "cancelled"}, "unassign": {"assignedTo": None},
                   "priority": {"priority": self.rng.choice(PRIORITIES)}, "done": {"lane": "done"}}[kind]
        self.call(cb.update_task, task.id, payload)
        after = self.state.tasks[task.id]
        self.note(f"PUT {task.id} ({describe(task)}) {payload} -> {describe(after)}")
        if kind in ("requeue", "unassign") and task.assignedTo:
            if after.epoch <= task.epoch or after.lane not in ("queued", "assigned"):
                self.fail(f"PUT {task.id} {payload}: from {describe(task)} to {describe(after)}")
        if kind in ("cancel", "done") and (after.lane, after.epoch) != (payload["lane"], task.epoch):
            self.fail(f"PUT {task.id} {payload}: from {describe(task)} to {describe(after)}")
        if kind == "priority" and (after.priority, after.assignedTo, after.epoch) != (
                payload["priority"], task.assignedTo, task.epoch) and task.lane != "queued":
            self.fail(f"PUT {task.id} {payload}: from {describe(task)} to {describe(after)}")

    def ev_edit(self):
        """A free-form operator PUT: any lane, with or without an assignee, sometimes forced, on any task
        (reopening a finished one too). The bridge may refuse it (400 or 409, changing nothing) or do it;
        either way the invariants must hold afterwards, the forced assignments excepted."""
        state = self.state
        task = self.pick_task(("queued",) + ACTIVE + FINISHED)
        if task is None:
            return
        payload = {"lane": self.rng.choice(("queued",) + ACTIVE + FINISHED)}
        roll = self.rng.random()
        if roll < 0.3:
            payload["assignedTo"] = None
        elif roll < 0.6:
            payload["assignedTo"] = self.rng.choice(list(state.agents))
        if self.rng.random() < 0.15:
            payload["force"] = True
        unfit = {a.id for a in state.agents.values()
                 if a.status != "online" or len(state.active.get(a.id, ())) >= a.maxConcurrentTasks}
        what = f"PUT {task.id} ({describe(task)}) {payload}"
        try:
            self.call(cb.update_task, task.id, payload)
        except cb.BridgeError as err:
            self.note(f"{what} -> {err.status} {err.code}")
            self.stats[f"edit {err.status} {err.code}"] += 1
            if err.status not in (400, 409):
                self.fail(f"{what} -> {err.status} {err.code}: {err.message}")
            if state.tasks[task.id] is not task or self.task_ops():
                self.fail(f"{what} was refused but the task changed: {describe(state.tasks[task.id])}")
            return
        after = state.tasks[task.id]
        self.note(f"{what} -> {describe(after)}")
        self.stats["edit ok"] += 1
        lane = payload["lane"]
        if (lane == "queued" and after.lane not in ("queued", "assigned")) or (lane != "queued" and after.lane != lane):
            self.fail(f"{what} answered 200 but the task is {describe(after)}")
        if payload.get("force") and after.lane in ACTIVE and after.assignedTo in unfit:
            self.forced[task.id] = (after.assignedTo, after.epoch)

    def ev_delete(self):
        state = self.state
        protected = self.protected()
        finished = [t for t in state.tasks if state.tasks[t].lane in FINISHED]
        if finished and self.rng.random() < 0.85:
            task_id = finished[0]       # the operator cleans up the oldest finished task
        else:
            task = self.pick_task(("queued",) + ACTIVE + FINISHED)
            if task is None:
                return
            task_id = task.id
        if task_id in protected:
            return
        before = describe(state.tasks[task_id])
        self.deleting.add(task_id)
        self.call(cb.delete_task, task_id)
        self.deleted.add(task_id)
        self.forced.pop(task_id, None)
        self.note(f"DELETE {task_id} ({before})")
        if task_id in state.tasks:
            self.fail(f"task {task_id} is still there after DELETE")

    def ev_crash(self):
        if self.scenario:
            return
        running = [inst for inst in self.instances if not inst.crashed]
        if len(running) <= 2:
            return
        inst = self.rng.choice(running)
        inst.crashed, inst.crashed_at = True, self.clock.mono
        self.stats["crashes"] += 1
        self.note(f"instance {inst.id} crashes (holding "
                  f"{[t for a in inst.agents for t in self.state.active.get(a.id, ())]})")

    def ev_shutdown(self):
        """A clean stop: every agent says goodbye (status offline) and its work moves at once."""
        if self.scenario:
            return
        running = [inst for inst in self.instances if not inst.crashed]
        if len(running) <= 2:
            return
        inst = self.rng.choice(running)
        self.note(f"instance {inst.id} shuts down cleanly")
        for agent in inst.agents:
            if agent.retired:
                continue
            self.beat(agent, status="offline")
            if self.state.agents[agent.id].status != "offline" or self.state.active.get(agent.id):
                self.fail(f"{agent.id} said goodbye but is {self.state.agents[agent.id].status} holding "
                          f"{list(self.state.active.get(agent.id, ()))}")
        inst.crashed, inst.crashed_at = True, self.clock.mono
        self.stats["clean shutdowns"] += 1

    def ev_return(self):
        if self.scenario:
            return
        down = [inst for inst in self.instances if inst.crashed]
        if down:
            self.return_instance(self.rng.choice(down))

    def return_instance(self, inst):
        """The instance comes back. Its agents still believe what they believed; some act on it before their
        first beat (stale epochs must bounce), then they beat or register again and learn what to stop."""
        self.note(f"instance {inst.id} comes back after {self.clock.mono - inst.crashed_at:.1f}s")
        inst.crashed = False
        self.stats["returns"] += 1
        for agent in inst.agents:
            if agent.retired:
                continue
            if agent.beliefs and self.rng.random() < 0.6:
                for _ in range(self.rng.randint(1, 2)):
                    if not agent.beliefs:
                        break
                    task_id = self.rng.choice(list(agent.beliefs))
                    verb = self.rng.choice(("start", "complete", "block", "release"))
                    self.verb(agent, task_id, verb, agent.beliefs[task_id])
            if self.rng.random() < 0.2:
                self.register(agent)
            else:
                self.beat(agent)

    def ev_drain(self):
        state = self.state
        drained = [i for i, inst in state.instances.items() if inst.drained]
        if drained and self.rng.random() < 0.6:
            instance_id, drain = self.rng.choice(drained), False
        else:
            instance_id, drain = self.rng.choice(list(state.instances)), True
        view = self.call(cb.set_drained, instance_id, drain)
        self.note(f"{'drain' if drain else 'undrain'} {instance_id}")
        if view["drained"] != drain or state.instances[instance_id].drained != drain:
            self.fail(f"{'drain' if drain else 'undrain'} {instance_id} -> drained {view['drained']}")
        if drain and self.task_ops():
            self.fail(f"draining {instance_id} moved tasks: {[op[2]['id'] for op in self.task_ops()]}")

    def ev_deregister(self):
        if self.scenario:
            return
        agents = self.live_agents()
        if len(agents) <= 4:
            return
        agent = self.rng.choice(agents)
        held = list(self.state.active.get(agent.id, ()))
        self.call(cb.deregister_agent, agent.id)
        agent.retired = True
        self.note(f"DELETE agent {agent.id} (held {held})")
        self.stats["deregistrations"] += 1
        if agent.id in self.state.agents:
            self.fail(f"agent {agent.id} is still there after DELETE")
        for task_id in held:
            task = self.state.tasks[task_id]
            if task.assignedTo == agent.id:
                self.fail(f"task {task_id} still names deregistered {agent.id}: {describe(task)}")

    def ev_reregister(self):
        if self.scenario:
            return
        retired = [a for inst in self.instances if not inst.crashed for a in inst.agents if a.retired]
        if retired:
            agent = self.rng.choice(retired)
            self.register(agent)
            self.note(f"agent {agent.id} registers again (still believing {agent.beliefs})")

    def ev_restart(self):
        """The bridge stops and starts again, from its last snapshot (clean stop) or from its journal alone
        (kill -9), and starts as Bridge.__init__ does: offline_after set, then rebaseline."""
        down = self.rng.uniform(0.0, 15.0)      # the bridge is down: no sweeps, no beats heard
        self.clock.advance(down)
        old = self.state
        if self.rng.random() < 0.5:
            how, doc = "snapshot", old.to_doc(self.seq)
        else:
            how = "journal"
            doc = self.disk.freeze(self.seq)
        new = cb.State.from_doc(json.loads(json.dumps(doc)))
        soft = dict(lastHeartbeat=None, currentTask=None, reportedStatus=None)
        for section in ("tasks", "instances", "notifications", "agents"):
            mine, theirs = getattr(old, section), getattr(new, section)
            if section == "agents":
                mine = {k: v._replace(**soft) for k, v in mine.items()}
                theirs = {k: v._replace(**soft) for k, v in theirs.items()}
            if mine != theirs:
                diff = sorted(k for k in mine.keys() | theirs.keys() if mine.get(k) != theirs.get(k))
                self.fail(f"restart from the {how} lost {section} changes: {diff[:5]} "
                          f"(before {[mine.get(k) for k in diff[:1]]}, after {[theirs.get(k) for k in diff[:1]]})")
        if new.meta.get("lastId") != old.meta.get("lastId"):
            self.fail(f"restart from the {how}: lastId {old.meta.get('lastId')} -> {new.meta.get('lastId')}")
        new.offline_after = OFFLINE_AFTER
        cb.rebaseline(new, self.clock.now())
        if new.take_changes()[0]:
            self.fail("starting the bridge journaled changes")
        self.state = new
        self.baseline = self.clock.mono
        self.stats[f"restarts ({how})"] += 1
        self.note(f"bridge restarts from its {how} after {down:.1f}s down")

    def ev_pause(self):
        """The bridge process stalls (suspended VM): no sweeps and no beats for longer than SWEEP_GAP."""
        pause = self.rng.uniform(cb.SWEEP_GAP + 1, 45.0)
        self.clock.advance(pause)
        self.paused = True
        self.stats["pauses"] += 1
        self.note(f"bridge paused for {pause:.1f}s")
        self.sweep()

    def ev_mass_crash(self):
        """At least 55 % (and at least 3) of the online instances crash in the same step."""
        if self.scenario:
            return
        online = [inst for inst in self.instances if self.instance_online(inst.id)]
        if any(inst.crashed for inst in online):
            return      # a crash still unnoticed would blur the count
        low = max(AT_LEAST, math.ceil(SHARE * len(online)))
        if len(online) < low:
            return
        victims = self.rng.sample(online, self.rng.randint(low, len(online)))
        held = {}
        for inst in victims:
            inst.crashed, inst.crashed_at = True, self.clock.mono
            for agent_id in self.state.members.get(inst.id, ()):
                for task_id in self.state.active.get(agent_id, ()):
                    task = self.state.tasks[task_id]
                    held[task_id] = (task.assignedTo, task.epoch)
        longest = max(self.threshold(inst.id) for inst in victims)
        self.scenario = {"ids": sorted(inst.id for inst in victims), "since": self.clock.mono,
                         "online": len(online), "tasks": held, "returned": False,
                         "return_at": self.clock.mono + longest + self.rng.uniform(5.0, 60.0)}
        self.stats["mass crashes"] += 1
        self.note(f"MASS CRASH: {self.scenario['ids']} of {len(online)} online instances, holding {len(held)} tasks")


def run(seed, mass_crashes=False, edits=False, steps=STEPS):
    sim = Sim(seed, mass_crashes, edits)
    for _ in range(steps):
        sim.run_step()
    return sim


@pytest.mark.parametrize("seed", SEEDS)
def test_fleet_simulation_keeps_every_invariant(seed):
    sim = run(seed)
    stats = sim.stats
    hours = sim.t() / 3600
    assert hours > 1.0, f"simulated only {hours:.2f} h"
    assert len(sim.created) > 300, f"only {len(sim.created)} tasks"
    for what in ("crashes", "returns", "instances marked offline", "tasks moved by failover", "verb 409 stale_owner",
                 "verb 409 stale_epoch", "verb ok complete", "reassign 409 agent_full", "deregistrations", "pauses"):
        assert stats[what] > 0, f"seed {seed}: the run never exercised {what!r}: {dict(stats)}"
    assert stats["restarts (snapshot)"] > 0 and stats["restarts (journal)"] > 0, dict(stats)


@pytest.mark.parametrize("seed", SEEDS)
def test_fleet_simulation_with_mass_crashes_holds_in_disruption(seed):
    sim = run(seed, mass_crashes=True, steps=MASS_STEPS)
    assert sim.stats["mass crashes"] > 0 and sim.stats["mass-crash sweeps held"] > 0, dict(sim.stats)


@pytest.mark.parametrize("seed", SEEDS)
def test_fleet_simulation_with_free_form_task_edits(seed):
    sim = run(seed, edits=True, steps=EDIT_STEPS)
    assert sim.stats["edit ok"] > 0, dict(sim.stats)


def test_a_network_cut_of_the_bridge_is_a_disruption_even_with_staggered_beats():
    """The disruption rule in its smallest form: four instances beating every 5 s, a second apart (as a real
    fleet does, never in lockstep), then all silent at once (the bridge's own network is cut). Most of the
    fleet went silent at once, so nothing may be marked offline and nothing moved."""
    clock, state = FakeClock(), cb.State()
    state.offline_after = OFFLINE_AFTER
    cb.rebaseline(state, clock.now())

    def do(fn, *args):
        result = fn(state, clock.now(), *args)
        state.take_changes()
        return result

    for i in range(4):
        do(cb.register_agent, {"id": f"a{i}", "instanceId": f"i{i}", "heartbeatInterval": BEAT_MS})
        clock.advance(1.0)
        do(cb.sweep)
    task = do(cb.create_task, {"title": "work"})
    marked = []
    for _ in range(60):         # 30 s of silence from every instance, one sweep every 0.5 s
        clock.advance(0.5)
        marked += do(cb.sweep)["offline"]
    assert marked == [], f"instances marked offline one by one as each passed its threshold: {marked}"
    assert state.disruption
    assert (state.tasks[task["id"]].assignedTo, state.tasks[task["id"]].epoch) == (task["assignedTo"], 1)
