"""Discrete-event simulator: replays a trace on a policy's engines, iteration by iteration.

Each engine runs continuous batching: every iteration admits waiting prompts while their KV
cache (prompt + output tokens, reserved on admission) fits, spends up to a chunk of prefill
tokens, and advances every decoding request by one token; its duration is the engine's step
time from the service model. With a trace's prefix hashes, a prompt skips the prefill of the
leading blocks its KV holder already caches, and goes to the engine and holder with the least
prefill left once its cached prefix is counted (runtime/simulator/prefix.py). Phase-split
deployments prefill on one pool and move the KV cache over the network to a decode replica.
An autoscaler re-plans every interval from the rate it forecasts (runtime/simulator/
forecast.py); new capacity serves only after its start-up (skipped for devices of a warm pool,
billed while idle) and weight-loading delay, and scale-down waits until the plans were lower
for `hold_s` seconds in a row, then drains. Devices are counted
from the moment they are requested until they are released; a device draws max power while
its engine computes and idle power otherwise. Deterministic: no randomness in the replay.
"""
from __future__ import annotations

import heapq
import itertools
import math
from collections import deque
from dataclasses import dataclass, field, replace

from fxscale.contracts.plan import SLO, Plan
from fxscale.contracts.scaling import Decision, Hysteresis, action
from fxscale.contracts.trace import Request, Trace
from fxscale.runtime.planner.engines import ALL_MECHANISMS, Mechanisms, engine_for
from fxscale.runtime.planner.search import (
    Workload,
    deployment_layout,
    kv_transfer_s,
    plan,
    plan_meets,
)
from fxscale.runtime.planner.service import Batch, ServiceModel
from fxscale.runtime.simulator.forecast import FORECASTS, RateForecast
from fxscale.runtime.simulator.prefix import PrefixCache, prefill_left, reused_tokens

# The simulator skips autoscaler ticks that would change nothing (an idle deployment, at its
# smallest, with no arrival before them), so its run time follows the requests, not the time
# a trace spans. A planned rate below SETTLED_RATE (req/s) plans as zero does.
SKIP_IDLE_TICKS = True
SETTLED_RATE = 1e-6
# With prefix caching the autoscaler plans for the share of prompt tokens the caches served so
# far, rounded down to 5% steps (each step planned once per rate, as the rate grid is).
REUSE_STEP = 0.05
# The autoscaler plans for rates rounded up to a grid 1% apart, each planned once per replay:
# a 1-s decision interval then costs a few hundred plans an hour, not 3,600.
PLAN_RATE_STEP = 0.01


@dataclass(frozen=True)
class ScalingConfig:
    """How the autoscaler acts: decision interval, the window it measures the arrival rate
    over, how long a shrink waits, headroom, cold start, the rate it plans for, and a warm
    pool; every policy alike. The window and the hold are seconds, not decisions, so a
    policy deciding every second sees the same rate and waits as long before shrinking as
    one deciding every 30 s (as Kubernetes' autoscaler keeps its metrics window and its
    scale-down stabilisation window apart from its sync period)."""

    interval_s: float = 30.0
    hold_s: float = 90.0             # a shrink waits this long of lower plans in a row
    window_s: float = 30.0           # the arrival rate is counted over this many seconds
    headroom: float = 1.0
    startup_s: float = 10.0          # assumption: container, runtime and CUDA context start
    load_bandwidth: float = 5e9      # assumption: bytes/s a new device reads weights from storage
    ewma: float = 0.5
    forecast: str = "reactive"       # or "holt": plan for the rate a start-up ahead
    warm_pool: int = 0  # devices kept started (billed while idle): they skip `startup_s`

    def __post_init__(self) -> None:
        if self.interval_s <= 0 or self.hold_s < 0 or self.window_s <= 0 \
                or self.headroom <= 0 or self.startup_s < 0 or self.load_bandwidth <= 0 \
                or self.warm_pool < 0:
            raise ValueError(f"scaling config needs interval_s > 0, hold_s >= 0, "
                             f"window_s > 0, headroom > 0, startup_s >= 0, "
                             f"load_bandwidth > 0 and warm_pool >= 0, got {self}")
        if self.forecast not in FORECASTS:
            raise ValueError(f"forecast must be one of {FORECASTS}, got {self.forecast!r}")

    @property
    def down_after(self) -> int:
        """Decisions in a row a shrink waits: `hold_s` rounded up to whole intervals."""
        return max(1, math.ceil(self.hold_s / self.interval_s - 1e-9))

    @property
    def window_ticks(self) -> int:
        """Intervals the rate is counted over: `window_s` rounded up to whole intervals."""
        return max(1, math.ceil(self.window_s / self.interval_s - 1e-9))


class EngineState:
    """One running engine: its queues, decoding set, KV reservation and accounting."""

    def __init__(self, spec, role: str, ready_at: float, requested_at: float, chunk: int,
                 cache_blocks: int, down_after: int) -> None:
        self.spec, self.role = spec, role
        self.shrink = Hysteresis(down_after)  # an operator engine's own smaller shapes
        self.caches: list[PrefixCache] = []  # one per KV holder, with prefix caching
        self.next_holder = 0
        self.shape(spec, chunk, cache_blocks)
        self.ready_at, self.requested_at = ready_at, requested_at
        self.retired_at: float | None = None
        self.draining = False
        self.superseded = False  # its shape left the plan: it drains once successors serve
        self.waiting: deque[int] = deque()
        self.prefilling: list[list[int]] = []  # [request, tokens done, KV holder]
        self.joining: deque[int] = deque()     # prefilled elsewhere, waiting for a decode slot
        self.decoding: list[tuple[int, int]] = []  # heap of (finish iteration, request)
        self.decode_n = 0
        self.ctx_sum = 0.0
        self.kv_reserved = 0.0
        self.backlog = 0.0  # prompt tokens routed here and not yet prefilled
        self.incoming = 0.0  # KV tokens on their way here from prefill replicas
        self.iteration = 0
        self.running = False
        self.busy_device_s = 0.0
        self.pending: tuple | None = None
        # device-seconds held: banked at each resize, plus (now - since) x current devices
        self.since, self.banked, self.extra_devices = requested_at, 0.0, 0
        self.pending_spec = None
        self.first_step_at: float | None = None  # when it first served (tests: >= ready_at)

    def shape(self, spec, chunk: int, cache_blocks: int) -> None:
        """Take a (new) shape: prompt tokens per step, per prompt per step, and a prefix
        cache of `cache_blocks` blocks per KV holder (none when 0 or decoding only)."""
        self.spec = spec
        self.chunk, self.lane = chunk * spec.prefill_lanes, spec.prompt_lane(chunk)
        holders = spec.kv_holders if cache_blocks and self.role != "decode" else 0
        self.caches = self.caches[:holders] + [
            PrefixCache(cache_blocks) for _ in range(holders - len(self.caches))]
        for cache in self.caches:
            cache.resize(cache_blocks)

    def cache_of(self, holder: int) -> PrefixCache:
        """The prefix cache of a KV holder (an operator engine that shrank while the prompt
        prefilled moved its KV to the holders left: one of those)."""
        return self.caches[holder % len(self.caches)]

    def load(self, service: ServiceModel, request: Request | None = None,
             block_tokens: int = 0) -> tuple[bool, float, float]:
        """Routing key, fewer first: KV nearly full, prompt tokens still to prefill (with a
        `request` and prefix caching: less what the best of its holders would save it,
        prefill_left), KV held."""
        capacity = self.spec.kv_capacity_tokens(service)
        left = self.backlog
        if request is not None and self.caches and request.prefix:
            left = min(prefill_left(self.backlog, cache, request.prefix, block_tokens,
                                    request.prompt_tokens) for cache in self.caches)
        return self.kv_reserved > 0.9 * capacity, left, self.kv_reserved

    def has_work(self) -> bool:
        """Whether an iteration would do anything."""
        return bool(self.waiting or self.prefilling or self.joining or self.decode_n)


@dataclass
class Result:
    """Per-request latencies and per-run totals of one simulated replay."""

    policy: str
    ttft: list[float]
    tpot: list[float]
    gaps: list[tuple[float, int]]
    device_seconds: float
    energy_j: float
    output_tokens: int
    duration_s: float
    timeline: list[dict] = field(default_factory=list)
    decisions: list[Decision] = field(default_factory=list)
    prompts: list[int] = field(default_factory=list)  # per request, for length-scaled SLOs
    context: dict | None = None  # requests rejected or cut at the model's context
    prefix: dict | None = None  # prefix-cache reuse, when the trace has prefix hashes


def _layout(p: Plan) -> tuple:
    """What changing a plan's engines restarts or re-shards (deployment_layout)."""
    return deployment_layout(e.engine for e in p.engines)


class Simulation:
    """The replay of one trace under one policy."""

    def __init__(self, service: ServiceModel, trace: Trace, policy: str, slo: SLO,
                 workload: Workload, scaling: ScalingConfig, fixed: Plan | None = None,
                 floor_rate: float = 0.0, mechanisms: Mechanisms = ALL_MECHANISMS) -> None:
        self.service, self.trace, self.policy, self.slo = service, trace, policy, slo
        self.mechanisms = mechanisms  # of an operator deployment (the attribution's switch)
        self.workload, self.scaling, self.fixed = workload, scaling, fixed
        self.floor_rate = floor_rate
        self.requests = trace.requests
        n = len(self.requests)
        self.first_token = [math.nan] * n
        self.finish = [math.nan] * n
        self.engines: list[EngineState] = []
        self.events: list = []
        self.seq = itertools.count()
        self.gaps: list[tuple[float, int]] = []
        self.decisions: list[Decision] = []
        self.timeline: list[dict] = []
        self.resizes: list[tuple[float, float]] = []  # operator growth: (asked, serving)
        self.arrivals_seen = 0  # since the last decision
        # arrivals per decision over the rate window (the oldest leaves as a new one comes)
        self.recent_arrivals: deque[int] = deque(maxlen=scaling.window_ticks)
        self.rate_estimate = 0.0
        self.forecast: RateForecast | None = None  # set when the run starts
        # by the rate they were sized for, the prefix reuse counted on, the layout to keep
        self.plans: dict[tuple[float, float, tuple | None], Plan] = {}
        self.applied: Plan | None = None  # the plan last applied (its layout is kept)
        self.sized_rate = 0.0  # the rate the last plan was made for
        self.planned_reuse = 0.0  # ... and the prefix reuse it counted on
        self.relayout = Hysteresis(scaling.down_after)  # a cheaper plan of another layout
        # when each warm-pool device is (again) started and free to take
        self.warm_free_at = [0.0] * scaling.warm_pool
        self.planned_rate = 0.0
        self.shrink = Hysteresis(scaling.down_after)  # the deployment's devices
        self.quiet_ticks = 0  # consecutive ticks with nothing to do (see _idle_ticks)
        self.last_deployment: tuple | None = None
        self.block_tokens = trace.prefix_block_tokens  # 0: no prefix caching
        self.prompt_tokens = self.reused_tokens = 0  # prefix-cache accounting

    # ---- deployment ---------------------------------------------------------------------
    def _plan(self, rate: float) -> Plan:
        """The policy's plan for an observed rate (with the headroom, never below the floor)."""
        if self.fixed is not None:
            return self.fixed
        self.planned_rate = max(self.floor_rate, rate * self.scaling.headroom)
        sized = self.planned_rate
        if sized >= SETTLED_RATE:  # up to the next point of the rate grid
            sized = (1 + PLAN_RATE_STEP) ** math.ceil(math.log(sized) /
                                                       math.log1p(PLAN_RATE_STEP) - 1e-9)
        self.sized_rate = sized
        self.planned_reuse = self._observed_reuse()
        # the deployment's layout wins ties: a re-shard must save a device
        key = (sized, self.planned_reuse, self.layout)
        if key not in self.plans:
            self.plans[key] = plan(self.service, self._work(), self.slo, self.policy,
                                   mechanisms=self.mechanisms, keep_layout=self.layout)
        return self._relayout(self.plans[key])

    def _observed_reuse(self) -> float:
        """The share of prompt tokens the prefix caches have served so far, rounded down to
        REUSE_STEP (0 without prefix caching)."""
        if not self.prompt_tokens:
            return 0.0
        steps = math.floor(self.reused_tokens / self.prompt_tokens / REUSE_STEP + 1e-9)
        return min(steps * REUSE_STEP, 1 - REUSE_STEP)

    def _work(self) -> Workload:
        """The workload the autoscaler plans for: the sized rate, the observed reuse."""
        return self.workload.at(self.sized_rate, self.planned_reuse)

    def _relayout(self, p: Plan) -> Plan:
        """The plan to apply: one of another layout (a restart or re-shard) waits the shrink
        hysteresis while the running plan still meets the SLO at the rate planned for, as
        any shrink does; one the running plan cannot serve is taken at once."""
        held = self.applied
        if held is not None and _layout(p) != _layout(held) and plan_meets(
                self.service, held, self._work(), self.slo, self.mechanisms):
            self.relayout.ask(held.devices, p.devices)
            if not self.relayout.due:
                return held
        self.relayout.done()
        self.applied = p
        return p

    @property
    def layout(self) -> tuple | None:
        """The layout of the plan last applied (None before the first)."""
        return _layout(self.applied) if self.applied is not None else None

    def _targets(self, p: Plan) -> list[tuple[object, str, int]]:
        """(engine spec, role, count) of a plan."""
        return [(engine_for(e.engine, self.mechanisms), getattr(e.engine, "role", "operator"),
                 e.count)
                for e in p.engines]

    def _add(self, spec, role: str, now: float, warm: bool, chunk: int) -> None:
        """Request a new engine (ready at once when warm, else after its cold start)."""
        delay = 0.0 if warm else self._start_delay(
            spec.devices, spec.load_bytes_per_device(self.service), now)
        engine = EngineState(spec, role, now + delay, now, chunk, self._cache_blocks(spec),
                             self.scaling.down_after)
        self.engines.append(engine)
        if delay:
            self._push(now + delay, "ready", engine)

    def _apply(self, p: Plan, now: float, warm: bool = False) -> None:
        """Move the deployment towards a plan: add now, remove after hysteresis."""
        live = [e for e in self.engines if not e.draining and e.retired_at is None]
        if self.policy == "operator":
            self._apply_operator(p, live, now, warm)
            return
        target = self._targets(p)
        current = sum(e.spec.devices for e in live)
        wanted = sum(spec.devices * count for spec, _, count in target)
        self.shrink.ask(current, wanted)
        for spec, role, count in target:
            have = [e for e in live if e.spec == spec]
            for _ in range(count - len(have)):
                self._add(spec, role, now, warm, p.chunk)
        shapes = {spec for spec, _, _ in target}
        replacing = wanted >= current or self.shrink.due or warm  # shrinking waits, as ever
        for engine in live:  # a changed tensor-parallel degree replaces these replicas
            # (for good: their successors, still starting, count as held in later decisions)
            engine.superseded = engine.spec not in shapes and (replacing or engine.superseded)
        self._retire_superseded(now)
        settled = all(e.ready_at <= now for e in live)
        if (self.shrink.due and settled) or warm:
            keep = {spec: count for spec, _, count in target}
            for engine in sorted(live, key=lambda e: e.load(self.service)):
                if keep.get(engine.spec, 0) > 0:
                    keep[engine.spec] -= 1
                    continue
                if any(e is not engine and e.role == engine.role and not e.draining
                       and e.retired_at is None and e.ready_at <= now for e in self.engines):
                    engine.draining = True
                    self._retire_if_idle(engine, now)
            self.shrink.done()

    def _retire_superseded(self, now: float) -> None:
        """Drain the replicas of a shape the plan dropped once every replica of their role
        in the plan's shapes is ready: replaced at the successor's readiness, as an operator
        re-shard swaps its dense pool, rather than after the shrink hysteresis."""
        for engine in self.engines:
            if not engine.superseded or engine.draining or engine.retired_at is not None:
                continue
            successors = [e for e in self.engines if e.role == engine.role and not e.superseded
                          and not e.draining and e.retired_at is None]
            if successors and all(e.ready_at <= now and e.pending_spec is None
                                  for e in successors):
                engine.draining = True
                self._retire_if_idle(engine, now)

    def _apply_operator(self, p: Plan, live: list[EngineState], now: float, warm: bool) -> None:
        """Copies of the operator engine: a missing copy starts as a model replica does; a
        surplus one drains once the copies kept are resized, after hysteresis if that
        leaves fewer devices (the kept copies hold their shape until then); each copy
        resizes on its own (_resize_operator)."""
        spec, _, count = self._targets(p)[0]
        live = [e for e in live if not e.superseded]  # copies on their way out
        for _ in range(count - len(live)):
            self._add(spec, "operator", now, warm, p.chunk)
        if warm or not live:
            return
        if len(live) > count:  # the surplus, least loaded, drains once the rest is resized
            current = sum((e.pending_spec or e.spec).devices for e in live)
            self.shrink.ask(current, count * spec.devices)  # fewer devices: after hysteresis
            if count * spec.devices < current and not self.shrink.due:
                return
            surplus = sorted(live, key=lambda e: e.load(self.service))[:len(live) - count]
            for engine in surplus:
                engine.superseded = True
            live = [e for e in live if not e.superseded]
        self.shrink.done()
        for engine in live:
            self._resize_operator(engine, spec, p.chunk, now)
        self._retire_superseded(now)

    def _resize_operator(self, engine: EngineState, spec, chunk: int, now: float) -> None:
        """Resize one operator engine: a larger shape serves once its added devices have
        started and loaded their weights; one of fewer devices than the engine holds or is
        growing to (cancelling a growth on its way too) after hysteresis, as a lock-step
        deployment's, and a smaller one once the KV fits."""
        shrink = engine.shrink
        current = engine.pending_spec or engine.spec
        old = engine.spec
        reshard = spec.dense_shards != old.dense_shards
        # KV laid out by other head splits: the new sets start beside the old ones
        reshard_attention = spec.attention_shards != old.attention_shards
        spec = self._holding(spec, engine.kv_reserved)
        pending = engine.pending_spec
        if pending is not None and pending.attention >= spec.attention and (
                pending.dense_shards, pending.dense_replicas, pending.attention_shards) == (
                spec.dense_shards, spec.dense_replicas, spec.attention_shards):
            spec = pending  # already growing to this, with attention enough for the KV
        if spec == current:
            shrink.done()
            return
        if spec.devices < current.devices:  # fewer devices: after hysteresis
            shrink.ask(current.devices, spec.devices)
            if not shrink.due:
                return
        if spec.devices >= old.devices or reshard or reshard_attention:
            # each pool's new devices start (a re-sharded dense pool loads entirely on new
            # devices) while the old shape serves; all are held until the switch
            dense, old_dense = (e.dense_shards * e.dense_replicas for e in (spec, old))
            added = (spec.attention if reshard_attention else
                     max(0, spec.attention - old.attention)) + (
                dense if reshard else max(0, dense - old_dense))
            # without fast start, added attention devices load weights as dense ones do
            reload = reshard or spec.dense_replicas > old.dense_replicas or (
                added and not self.mechanisms.fast_start)
            delay = self._start_delay(added, reload * spec.load_bytes_per_device(self.service),
                                      now)
            self._close_account(engine, now)
            engine.pending_spec = spec
            engine.extra_devices = added
            self._push(now + delay, "resize", (engine, spec, chunk, now))
            shrink.done()
        else:  # fewer dense replicas or attention devices, same sharding: once the
            # remaining devices hold every reserved KV token
            if engine.pending_spec is None and \
                    spec.kv_capacity_tokens(self.service) >= engine.kv_reserved:
                self._close_account(engine, now)
                engine.shape(spec, chunk, self._cache_blocks(spec))
                shrink.done()

    def _holding(self, spec, reserved: float):
        """A disaggregated shape with attention devices enough for the KV already reserved:
        a load the engine fell behind on holds more KV than the plan's steady state needs,
        and the grown engine must take it over to switch at all."""
        if not spec.attention or spec.kv_capacity_tokens(self.service) >= reserved:
            return spec
        per_set = spec.kv_capacity_tokens(self.service) / spec.kv_holders
        return replace(spec, attention=math.ceil(reserved / per_set) * spec.attention_shards)

    def _cache_blocks(self, spec) -> int:
        """Prefix-cache blocks per KV holder of a shape: its KV memory, in blocks."""
        if not self.block_tokens:
            return 0
        return int(spec.kv_capacity_tokens(self.service) / spec.kv_holders / self.block_tokens)

    def _reuse(self, engine: EngineState, i: int) -> list[int]:
        """A prompt admitted for prefill: [request, tokens its KV holder's prefix cache
        already has, holder]."""
        prompt = self.requests[i].prompt_tokens
        self.prompt_tokens += prompt
        if not engine.caches:
            return [i, 0, 0]
        holder = self._holder(engine, self.requests[i])
        done = reused_tokens(engine.caches[holder].reuse(self.requests[i].prefix),
                             self.block_tokens, prompt)
        engine.backlog -= done
        self.reused_tokens += done
        return [i, done, holder]

    def _holder(self, engine: EngineState, request: Request) -> int:
        """The KV holder a prompt joins: the least prefill left on it (the prompt tokens it
        is prefilling, less what its cache saves this prompt); in turn without prefix
        hashes, and among equals."""
        count = len(engine.caches)
        first = engine.next_holder % count
        order = [(first + k) % count for k in range(count)]
        if request.prefix:
            queued = [0.0] * count
            for i, done, holder in engine.prefilling:
                queued[holder % count] += self.requests[i].prompt_tokens - done
            order.sort(key=lambda h: prefill_left(queued[h], engine.caches[h], request.prefix,
                                                  self.block_tokens, request.prompt_tokens))
        engine.next_holder = order[0] + 1
        return order[0]

    def _start_delay(self, devices: int, load_bytes: float, now: float) -> float:
        """Seconds until `devices` new devices serve: start-up (skipped when the warm pool
        has them all started, their replacements starting now, or when no device is new: a
        shape that only pools prompts otherwise or goes back to the devices it has) plus
        loading `load_bytes`."""
        free = [i for i, t in enumerate(self.warm_free_at) if t <= now]
        startup = self.scaling.startup_s if devices else 0.0
        if devices and len(free) >= devices:
            for i in free[:devices]:
                self.warm_free_at[i] = now + startup
            startup = 0.0
        return startup + load_bytes / self.scaling.load_bandwidth

    def _close_account(self, engine: EngineState, now: float) -> None:
        """Bank the device-seconds of an operator engine's current size before resizing."""
        engine.banked += (now - engine.since) * (engine.spec.devices + engine.extra_devices)
        engine.since = now

    # ---- events -------------------------------------------------------------------------
    def _push(self, when: float, what: str, payload) -> None:
        heapq.heappush(self.events, (when, next(self.seq), what, payload))

    def run(self) -> Result:
        """Replay the trace to the last request's last token."""
        if not self.requests:
            raise ValueError(f"trace {self.trace.name} has no requests")
        first = self._first_rate()
        scaling = self.scaling  # a forecast looks as far ahead as a new device takes to serve
        startup = 0.0 if scaling.warm_pool else scaling.startup_s
        lead = (startup + self.service.weight_bytes / scaling.load_bandwidth) / scaling.interval_s
        self.forecast = RateForecast(scaling.forecast, scaling.ewma, lead, self.rate_estimate)
        self._apply(self._plan(first), 0.0, warm=True)
        self._record(0.0, first)
        for i, r in enumerate(self.requests):
            self._push(r.arrival_s, "arrive", i)
        self._push(self.scaling.interval_s, "tick", None)
        now = 0.0
        remaining = len(self.requests)
        while self.events and remaining > 0:
            now, _, what, payload = heapq.heappop(self.events)
            if what == "arrive":
                self.arrivals_seen += 1
                self._route(payload, now)
            elif what == "step":
                remaining -= self._complete(payload, now)
            elif what == "ready":
                self._wake(payload, now)
                self._retire_superseded(now)
            elif what == "tick":
                self._tick(now)
            elif what == "transfer":
                self._join(payload, now)
            elif what == "resize":
                engine, grown, chunk, asked = payload
                if engine.pending_spec == grown and \
                        grown.kv_capacity_tokens(self.service) < engine.kv_reserved:
                    self._push(now + 1.0, "resize", payload)  # wait until the KV fits
                elif engine.pending_spec == grown:  # a newer decision may have replaced it
                    self.resizes.append((asked, now))
                    self._close_account(engine, now)
                    engine.extra_devices, engine.pending_spec = 0, None
                    engine.shape(grown, chunk, self._cache_blocks(grown))
                    self._wake(engine, now)
                    self._retire_superseded(now)
        lost = [i for i, f in enumerate(self.finish) if f != f]
        if remaining != 0 or lost:
            raise RuntimeError(f"simulator bug: {len(lost)} requests unfinished, "
                               f"{remaining} not accounted for (first: {lost[:3]})")
        return self._result(now)

    def _first_rate(self) -> float:
        """Arrival rate over the first window (what a warm deployment was sized for)."""
        if self.fixed is not None:
            return self.fixed.rate
        window = self.scaling.window_ticks * self.scaling.interval_s
        horizon = self.requests[0].arrival_s + window
        count = sum(1 for r in self.requests if r.arrival_s < horizon)
        self.rate_estimate = count / window
        return self.rate_estimate

    def _tick(self, now: float) -> None:
        """Autoscaler decision: observed rate -> plan -> scale, logged with its reason."""
        skipped = self._idle_ticks(now)
        if skipped:
            self._skip(now, skipped)
            return
        self.recent_arrivals.append(self.arrivals_seen)
        observed = sum(self.recent_arrivals) / (len(self.recent_arrivals) *
                                                self.scaling.interval_s)
        idle = self.arrivals_seen == 0 and self._idle(now)
        self.arrivals_seen = 0
        self._push(now + self.scaling.interval_s, "tick", None)
        if self.fixed is not None:  # a fixed deployment: record, never scale
            self.quiet_ticks = self.quiet_ticks + 1 if idle else 0
            self._record(now, observed)
            return
        self.rate_estimate = self.forecast.observe(observed)
        p = self._plan(self.rate_estimate)
        before = self._devices_now()
        self._apply(p, now)
        after = self._devices_now()
        # settled: nothing to serve, the same deployment, and a rate that no longer moves the
        # plan (the floor, or next to nothing): later idle ticks would change nothing
        deployment = (repr(p.engines), p.chunk)
        settled = idle and after == before and deployment == self.last_deployment and (
            self.planned_rate == self.floor_rate or self.planned_rate < SETTLED_RATE)
        self.quiet_ticks = self.quiet_ticks + 1 if settled else 0
        self.last_deployment = deployment
        basis = " (the floor)" if self.planned_rate == self.floor_rate else ""
        if self.planned_reuse:
            basis += f" with {self.planned_reuse:.0%} of prompt tokens cached"
        what = action(before, after)
        if what == "hold" and p.devices < before:
            below = max([self.shrink.below] + [e.shrink.below for e in self.engines
                                               if e.retired_at is None])
            what = f"hold (lower for {below}/{self.scaling.down_after})"
        self.decisions.append(Decision(
            now, "deployment", before, after, what,
            f"observed {observed:.2f} req/s, estimate {self.rate_estimate:.2f}; the plan for "
            f"{self.planned_rate:.2f} req/s{basis} wants {p.devices} devices, {before} held",
            observed_rps=observed, estimate_rps=self.rate_estimate,
            planned_rps=self.planned_rate))
        self._record(now, observed)

    def _idle(self, now: float) -> bool:
        """Whether no engine has anything to do or is still starting or resizing."""
        return all(not e.running and not e.has_work() and e.kv_reserved <= 0 and not e.incoming
                   and e.ready_at <= now and e.pending_spec is None for e in self.engines
                   if e.retired_at is None)

    def _idle_ticks(self, now: float) -> int:
        """How many ticks from `now` on can be skipped: the deployment has been settled for
        a whole hysteresis cycle and a whole rate window (so each would observe no
        arrival) and no request arrives before them. A multiple of `down_after`, so the
        hysteresis counter ends where stepping would leave it; 0 when this tick must run."""
        cycle = self.scaling.down_after
        if not SKIP_IDLE_TICKS or self.quiet_ticks <= max(cycle, self.scaling.window_ticks) \
                or self.arrivals_seen \
                or not self.events or not self._idle(now):
            return 0
        gap = (self.events[0][0] - now) / self.scaling.interval_s  # next event: an arrival
        return cycle * int(gap // cycle)

    def _skip(self, now: float, ticks: int) -> None:
        """Jump over `ticks` idle ticks: each would have seen no arrivals and held."""
        interval = self.scaling.interval_s
        self.recent_arrivals.extend([0] * min(ticks, self.scaling.window_ticks))
        if self.fixed is None:
            self.rate_estimate = self.forecast.idle(ticks)
        last = now + (ticks - 1) * interval
        devices = self._devices_now()
        self.decisions.append(Decision(
            now, "deployment", devices, devices, "hold",
            f"no requests from {now:g} s to {last:g} s: {ticks} idle decisions skipped, each "
            "a hold", observed_rps=0.0, estimate_rps=self.rate_estimate,
            planned_rps=self.planned_rate))
        self._record(last, 0.0)
        self._push(now + ticks * interval, "tick", None)

    def _record(self, now: float, rate: float) -> None:
        """One point of the timeline: devices held, observed rate, replicas per pool."""
        self.timeline.append({"t": now, "devices": self._devices_now(), "rate_rps": rate,
                              **self._pools()})

    def _devices_now(self) -> int:
        """Devices held now (requested and not yet released)."""
        return sum(e.spec.devices + e.extra_devices for e in self.engines
                   if e.retired_at is None)

    def _pools(self) -> dict:
        """Replicas per pool and devices per operator-group kind right now."""
        live = [e for e in self.engines if e.retired_at is None]
        kinds = self.service.kinds
        if self.policy == "operator" and live:  # summed over the copies of the engine
            shapes = [e.spec for e in live]
            dense = sum(s.dense_shards * s.dense_replicas for s in shapes)
            attention = sum(s.attention for s in shapes)
            return {"engines": len(shapes),
                    "attention_replicas": sum(s.attention and s.kv_holders for s in shapes),
                    "attention_shards": shapes[-1].attention_shards,
                    "dense_replicas": sum(s.dense_replicas for s in shapes),
                    "dense_shards": shapes[-1].dense_shards,
                    "group_devices": {k.name: (attention or dense) if k.stateful else dense
                                      for k in kinds}}
        pools: dict[str, int] = {}
        for e in live:
            pools[f"{e.role}_replicas"] = pools.get(f"{e.role}_replicas", 0) + 1
        held = sum(e.spec.devices for e in live)  # every lock-step replica runs every kind
        return {**pools, "group_devices": {k.name: held for k in kinds}}

    def _route(self, i: int, now: float) -> None:
        """Send an arriving request to the least-loaded engine that admits prompts (with
        prefix caching, the prefill its cached prefix saves there counted off)."""
        role = "prefill" if self.policy == "phase" else None
        candidates = [e for e in self.engines if e.retired_at is None and not e.draining
                      and (role is None or e.role == role)]
        ready = [e for e in candidates if e.ready_at <= now] or candidates
        request = self.requests[i]
        engine = min(ready, key=lambda e: (e.ready_at > now,
                                           e.load(self.service, request, self.block_tokens)))
        engine.waiting.append(i)
        engine.backlog += request.prompt_tokens
        self._wake(engine, now)

    def _send(self, i: int, source: EngineState, now: float) -> None:
        """A prompt is prefilled: move its KV cache to the decode replica with most room
        (counting caches already on their way), over min(prefill, decode) network links."""
        r = self.requests[i]
        candidates = [e for e in self.engines if e.retired_at is None and not e.draining
                      and e.role == "decode"]
        ready = [e for e in candidates if e.ready_at <= now] or candidates
        target = min(ready, key=lambda e: (e.ready_at > now, e.kv_reserved + e.incoming))
        target.incoming += r.prompt_tokens + r.output_tokens
        links = min(source.spec.shards, target.spec.shards)
        self._push(now + kv_transfer_s(self.service, r.prompt_tokens, links), "transfer",
                   (i, source, target))

    def _join(self, payload, now: float) -> None:
        """A KV cache has arrived: the prefill replica frees it, the decode replica takes it."""
        i, source, target = payload
        r = self.requests[i]
        source.kv_reserved -= r.prompt_tokens
        target.incoming -= r.prompt_tokens + r.output_tokens
        target.joining.append(i)
        self._wake(target, now)
        self._retire_if_idle(source, now)

    def _wake(self, engine: EngineState, now: float) -> None:
        """Start an iteration on an idle, ready engine that has work."""
        if engine.running or engine.ready_at > now or engine.retired_at is not None:
            return
        if engine.has_work():
            self._start(engine, now)
        else:
            self._retire_if_idle(engine, now)

    def _start(self, engine: EngineState, now: float) -> None:
        """Admit, batch, and schedule the end of one iteration."""
        service, spec = self.service, engine.spec
        capacity = spec.kv_capacity_tokens(service)
        requests = self.requests
        if engine.role == "decode":
            while engine.joining:
                i = engine.joining[0]
                need = requests[i].prompt_tokens + requests[i].output_tokens
                if engine.kv_reserved + need > capacity and engine.decode_n:
                    break
                engine.joining.popleft()
                engine.kv_reserved += need
                self._begin_decode(engine, i)
        else:
            while engine.waiting:
                i = engine.waiting[0]
                need = requests[i].prompt_tokens + (
                    0 if engine.role == "prefill" else requests[i].output_tokens)
                if engine.kv_reserved + need > capacity and (engine.prefilling or engine.decode_n):
                    break
                engine.waiting.popleft()
                engine.kv_reserved += need
                engine.prefilling.append(self._reuse(engine, i))
        budget = engine.chunk
        chunks = []
        n = s1 = s2 = 0.0
        for entry in engine.prefilling:
            if budget <= 0:
                break
            i, done = entry[0], entry[1]
            take = min(requests[i].prompt_tokens - done, budget, engine.lane)
            budget -= take
            engine.backlog -= take
            chunks.append((entry, take))
            n += 1
            s1 += take
            s2 += (done + take) ** 2 - done ** 2
        batch = Batch(int(n), s1, s2, engine.decode_n, engine.ctx_sum)
        if not chunks and not engine.decode_n:
            return
        seconds, busy = spec.step(service, batch)
        if engine.first_step_at is None:
            engine.first_step_at = now
        engine.running = True
        engine.busy_device_s += busy
        engine.pending = (chunks, engine.decode_n, seconds)
        self._push(now + seconds, "step", engine)

    def _begin_decode(self, engine: EngineState, i: int) -> None:
        """Add a request whose first token exists to the decoding set."""
        r = self.requests[i]
        if r.output_tokens <= 1:
            self.finish[i] = self.first_token[i]
            engine.kv_reserved -= r.prompt_tokens + r.output_tokens
            return
        engine.decode_n += 1
        engine.ctx_sum += r.prompt_tokens + 1
        heapq.heappush(engine.decoding, (engine.iteration + r.output_tokens - 1, i))

    def _complete(self, engine: EngineState, now: float) -> int:
        """End of an iteration: emit tokens, finish requests, hand over prefills."""
        chunks, decoded, seconds = engine.pending
        engine.running = False
        engine.iteration += 1
        finished = 0
        if decoded:
            self.gaps.append((seconds, decoded))
            engine.ctx_sum += decoded
            while engine.decoding and engine.decoding[0][0] <= engine.iteration:
                _, i = heapq.heappop(engine.decoding)
                r = self.requests[i]
                self.finish[i] = now
                engine.decode_n -= 1
                engine.ctx_sum -= r.prompt_tokens + r.output_tokens
                engine.kv_reserved -= r.prompt_tokens + r.output_tokens
                finished += 1
        for entry, take in chunks:
            entry[1] += take
            i = entry[0]
            r = self.requests[i]
            if entry[1] < r.prompt_tokens:
                continue
            engine.prefilling.remove(entry)
            if engine.caches:
                engine.cache_of(entry[2]).store(r.prefix)
            self.first_token[i] = now
            if engine.role == "prefill":
                if r.output_tokens <= 1:
                    engine.kv_reserved -= r.prompt_tokens
                    self.finish[i] = now
                    finished += 1
                else:  # the cache stays reserved here until it has been sent
                    self._send(i, engine, now)
            else:
                self._begin_decode(engine, i)
                finished += r.output_tokens <= 1
        self._wake(engine, now)
        return finished

    def _retire_if_idle(self, engine: EngineState, now: float) -> None:
        """Release a draining engine once it has nothing left to do."""
        if engine.draining and not engine.running and not engine.has_work() \
                and engine.kv_reserved <= 0 and engine.retired_at is None:
            engine.retired_at = now

    def _result(self, end: float) -> Result:
        """Totals of the run."""
        device = self.service.device
        device_s = self.scaling.warm_pool * end  # the warm pool, held and idle throughout
        energy = device_s * device.idle_power_w
        for e in self.engines:
            stop = e.retired_at if e.retired_at is not None else end
            held = e.banked + (stop - e.since) * (e.spec.devices + e.extra_devices)
            device_s += held
            energy += held * device.idle_power_w + e.busy_device_s * (
                device.max_power_w - device.idle_power_w)
        ttft = [f - r.arrival_s for f, r in zip(self.first_token, self.requests)]
        tpot = [(fin - ft) / (r.output_tokens - 1) if r.output_tokens > 1 else 0.0
                for fin, ft, r in zip(self.finish, self.first_token, self.requests)]
        return Result(self.policy, ttft, tpot, self.gaps, device_s, energy,
                      sum(r.output_tokens for r in self.requests),
                      end - self.requests[0].arrival_s, self.timeline, self.decisions,
                      [r.prompt_tokens for r in self.requests],
                      prefix={"block_tokens": self.block_tokens,
                              "prompt_tokens": self.prompt_tokens,
                              "reused_tokens": self.reused_tokens,
                              "reuse": self.reused_tokens / max(1, self.prompt_tokens)}
                      if self.block_tokens else None)


def simulate(service: ServiceModel, trace: Trace, policy: str, slo: SLO,
             scaling: ScalingConfig | None = None, fixed: Plan | None = None,
             workload: Workload | None = None, over_context: str = "reject",
             prefix_caching: bool = False) -> Result:
    """Replay `trace` under `policy` (autoscaled, or held at a `fixed` plan); requests beyond
    the model's context are rejected or truncated first (counted in `Result.context`); with
    `prefix_caching`, prompts reuse the KV of prefixes their holder has (the trace's prefix
    hashes; counted in `Result.prefix`)."""
    trace, context = trace.within_context(service.context_limit, over_context)
    if not prefix_caching:
        trace = trace.without_prefixes()
    work = workload or Workload.from_requests(trace.requests, trace.rate())
    result = Simulation(service, trace, policy, slo, work, scaling or ScalingConfig(),
                        fixed).run()
    result.context = context
    return result
