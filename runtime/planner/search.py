"""The planner: engines, replica counts, batch sizes and placement that meet TTFT/TBT SLOs.

Pure Python. For one policy it searches the engine shapes (tensor-parallel degree, chunked-
prefill budget, pool sizes) and, for each, the fewest replicas whose predicted TTFT and TBT
meet the SLO at the given arrival rate; the cheapest deployment wins (devices, then power).
The prediction for one engine at arrival rate lam (docs/simulator.md has the derivation):
- decode step T is the fixed point of T = step(batch), with B = lam * output_mean * T requests
  decoding (Little's law) and lam * prompt_mean * T prefill tokens per step (at most a chunk);
- TBT p99 is the step at the 99th percentile of B (Poisson: M/G/inf concurrency) with the
  prompt chunk at the percentile the prefilling steps leave (`worst_chunks`: a chunk deep in
  a long prompt attends over all of it); TBT p50 the step at the mean;
- TTFT: Erlang C over the engines that admit prompts (M/M/c, service rate = prefill tokens per
  second / mean prompt) plus the prompt's own prefill steps; the percentile wait uses the
  M/M/c tail. Service is closer to deterministic than exponential, so waits err high.
"""
from __future__ import annotations

import bisect
import itertools
import math
import statistics
from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import cached_property, lru_cache, partial

from fxscale.contracts.errors import NoDeploymentError
from fxscale.contracts.plan import (
    POLICIES,
    SLO,
    EngineCount,
    GroupPlacement,
    OperatorShape,
    Plan,
)
from fxscale.runtime.planner.engines import (
    ALL_MECHANISMS,
    LockstepEngine,
    Mechanisms,
    OperatorEngine,
    busiest_share,
    engine_for,
    shape_of,
)
from fxscale.runtime.planner.queueing import erlang_c, erlang_c_wait
from fxscale.runtime.planner.service import Batch, ServiceModel

CHUNKS = (512, 1024, 2048)
PREFILL_CHUNKS = (1024, 2048, 4096, 8192)  # prefill-only replicas: no decode to protect
SHARDS = (1, 2, 4, 8)
MAX_LOOP_GAIN = 0.8
MAX_DENSE_REPLICAS = 16  # dense replicas one operator engine pools its prompts over
MAX_OPERATOR_ENGINES = 64  # copies of a one-replica engine
QUANTILES = 20      # equally likely prompt lengths below the tail
TAIL = 0.05         # the longest prompts, planned in finer steps up to the longest
TAIL_STEPS = 20
PACKING_LEVELS = 20  # prompt loads a step's chunks are costed at, rounded up to 1/20ths


# Default SLOs by model size (parameters): (TTFT s, mean time between tokens s). Smaller
# models answer faster; the 70B class gets the 2 s / 100 ms targets common in serving papers.
DEFAULT_SLOS = ((20e9, (1.0, 0.05)), (50e9, (1.5, 0.075)), (math.inf, (2.0, 0.1)))


def default_slo(parameters: float) -> tuple[float, float]:
    """(TTFT, TBT) defaults for a model with this many parameters."""
    return next(slo for limit, slo in DEFAULT_SLOS if parameters < limit)


@dataclass(frozen=True)
class Workload:
    """Arrival rate and token statistics the planner sizes for."""

    rate: float
    prompt_mean: float
    prompt_sq_mean: float
    prompt_points: tuple[tuple[float, float], ...]  # (prompt length, probability)
    output_mean: float
    context_mean: float  # mean KV length over decode steps (token-weighted)
    size_sq_mean: float  # mean of (prompt + output)^2: the spread of KV reservations
    # share of each prompt's leading tokens a prefix cache holds: their KV is reused and their
    # prefill skipped (the rest attends over them); the KV is held and moved whole
    reuse: float = 0.0

    def __post_init__(self) -> None:
        if not 0 <= self.reuse < 1:
            raise ValueError(f"prefix reuse must be in [0, 1), got {self.reuse}")

    @property
    def prefill_mean(self) -> float:
        """Prompt tokens a mean prompt prefills (those past its cached prefix)."""
        return self.prompt_mean * (1 - self.reuse)

    @property
    def prefill_sq_mean(self) -> float:
        """The attention sum of squares of a mean prompt's prefill: its tokens past the
        cached prefix attend over the whole prompt, p^2 - (reuse p)^2."""
        return self.prompt_sq_mean * (1 - self.reuse * self.reuse)

    @classmethod
    def from_requests(cls, requests: list, rate: float) -> Workload:
        """Statistics of a list of trace requests, at the given arrival rate."""
        if not requests:
            raise ValueError("no requests to take workload statistics from")
        prompts = sorted(r.prompt_tokens for r in requests)
        outputs = [max(1, r.output_tokens) for r in requests]
        weighted = sum(o * (p + o / 2) for p, o in zip((r.prompt_tokens for r in requests),
                                                        outputs))
        return cls(rate=rate, prompt_mean=statistics.fmean(prompts),
                   prompt_sq_mean=statistics.fmean(p * p for p in prompts),
                   prompt_points=prompt_points(prompts),
                   output_mean=statistics.fmean(outputs), context_mean=weighted / sum(outputs),
                   size_sq_mean=statistics.fmean((r.prompt_tokens + o) ** 2
                                                 for r, o in zip(requests, outputs)))

    def at(self, rate: float, reuse: float | None = None) -> Workload:
        """The same token statistics at another arrival rate (and prefix reuse)."""
        return replace(self, rate=rate, reuse=self.reuse if reuse is None else reuse)


def prompt_points(prompts: list[int]) -> tuple[tuple[float, float], ...]:
    """Sorted prompt lengths as (length, probability): the middle of each of QUANTILES - 1
    equal bins below the top TAIL, then of each of TAIL_STEPS bins of the tail, the last
    one taken at the longest prompt (so the planner sees the tail it must serve)."""
    n = len(prompts)
    body = QUANTILES - 1
    points = [(float(prompts[int((k + 0.5) * (1 - TAIL) / body * n)]), (1 - TAIL) / body)
              for k in range(body)]
    for j in range(TAIL_STEPS):
        middle = int((1 - TAIL + TAIL * (j + 0.5) / TAIL_STEPS) * n)
        rank = n - 1 if j == TAIL_STEPS - 1 else middle
        points.append((float(prompts[rank]), TAIL / TAIL_STEPS))
    return tuple(points)


@dataclass
class Prediction:
    """What the model predicts for one pool of identical engines."""

    step_s: float
    tbt_p50: float
    tbt_p99: float
    batch_p99: float
    busy_fraction: float
    # predicted share of requests past their TTFT target: which side of the SLO's allowance
    # it falls is exact, its value a bound (the search costs only the prompts that decide it)
    ttft_miss: float = 0.0
    # (p50, percentile at the SLO's attainment) of TTFT, computed on first use: the search
    # decides by ttft_miss, and only the plans it keeps report percentiles
    ttft_percentiles: Callable[[], tuple[float, float]] = lambda: (0.0, 0.0)

    @cached_property
    def _ttft_pair(self) -> tuple[float, float]:
        return self.ttft_percentiles()

    @property
    def ttft_p50(self) -> float:
        return self._ttft_pair[0]

    @property
    def ttft_p99(self) -> float:
        return self._ttft_pair[1]


def poisson_quantile(mean: float, q: float) -> float:
    """Smallest k with P(Poisson(mean) <= k) >= q (the normal approximation past mean 200)."""
    if mean <= 0:
        return 0.0
    if mean > 200:
        return mean + statistics.NormalDist().inv_cdf(q) * math.sqrt(mean)
    term = cumulative = math.exp(-mean)
    k = 0
    while cumulative < q:
        k += 1
        term *= mean / k
        cumulative += term
    return float(k)


def _decode_fixed_point(service: ServiceModel, engine, lam: float, work: Workload,
                        prefill: bool, floor: float = 0.0
                        ) -> tuple[float, float, float, float] | None:
    """(the step time at its fixed point for per-engine rate `lam`, the highest step the
    iteration visited, the loop gain at the fixed point, the busy device-seconds of the mean
    step), or None when the step passes a minute. The step map is increasing, so the
    iteration approaches from one side; the highest visited step is what the chunk check
    needs (no chunk enters the iteration: one fixed point serves every chunk). `floor`: the
    fixed point of an engine no slower at every batch (e.g. more attention devices), below
    this one's, so the iteration may start there instead of at a lone decode."""
    step = max(floor, engine.seconds(service, Batch(decode_n=1, decode_s1=work.context_mean)))
    highest = step
    for _ in range(40):
        new = engine.seconds(service, _mean_batch(lam, step, work, prefill))
        highest = max(highest, step)
        converged = abs(new - step) <= 1e-4 * step
        step = new
        if converged:
            break
        if step > 60:
            return None
    nudged = step * 1.01  # d(step map)/d(step) at the fixed point
    mean_step, busy = engine.step(service, _mean_batch(lam, step, work, prefill))
    gain = (engine.seconds(service, _mean_batch(lam, nudged, work, prefill))
            - mean_step) / (nudged - step)
    return step, highest, gain, busy


def _mean_batch(lam: float, step: float, work: Workload, prefill: bool) -> Batch:
    """The mean iteration at step time `step`: Little's-law decode batch and the prompt
    tokens arriving during one step."""
    decoding = lam * work.output_mean * step
    arrivals = lam * step if prefill else 0.0
    return Batch(arrivals, arrivals * work.prefill_mean, arrivals * work.prefill_sq_mean,
                 decoding, decoding * work.context_mean)


def predict(service: ServiceModel, engine, count: int, work: Workload, slo: SLO, chunk: int,
            decode: bool = True, prefill: bool = True,
            fixed_points: dict | None = None, floor: float = 0.0) -> Prediction | None:
    """Predicted latencies of `count` engines sharing the load (None when overloaded).

    Feedback: a slower step keeps requests decoding longer and lets more prompt tokens
    arrive per step, which slows the step again; with loop gain g (the derivative of the
    step map at its fixed point) the batch's variance grows as 1 / (1 - g), so engines with
    g > MAX_LOOP_GAIN are refused as too close to instability. `fixed_points` keeps the
    decode fixed points one search computes (the same for every chunk) for its other calls
    of the same workload; `floor` is a step time known to lie below this engine's fixed
    point (_decode_fixed_point)."""
    lam = work.rate / count
    lanes = engine.prefill_lanes  # replicas that each take a chunk per step
    lane = engine.prompt_lane(chunk)  # tokens one prompt may advance per step
    step = tbt99 = batch99 = busy_fraction = 0.0
    mean_batch = 0.0
    if decode:
        fixed_points = {} if fixed_points is None else fixed_points
        key = (engine, lam, prefill)
        if key not in fixed_points:
            fixed_points[key] = _decode_fixed_point(service, engine, lam, work, prefill, floor)
        if fixed_points[key] is None:
            return None
        step, highest, gain, busy = fixed_points[key]
        if prefill and lam * highest * work.prefill_mean > chunk * lanes:
            return None  # the prompt backlog grows
        here = _mean_batch(lam, step, work, prefill)
        mean_batch = here.decode_n
        if gain >= MAX_LOOP_GAIN:
            return None
        z = statistics.NormalDist().inv_cdf(slo.attainment)
        batch99 = max(poisson_quantile(mean_batch, slo.attainment),
                      mean_batch + z * math.sqrt(mean_batch / (1 - gain)))
        holders = mean_batch + lam * step  # requests holding a KV reservation
        reserved = holders * (work.prompt_mean + work.output_mean) + z * math.sqrt(
            holders * work.size_sq_mean / (1 - gain))
        if reserved > engine.kv_capacity_tokens(service):
            return None
        prompts, tokens, squares = worst_chunks(
            work, lane, chunk * lanes, engine.prefill_unit(chunk),
            lam * step if prefill else 0.0, slo.attainment, service.squares_per_token)
        tbt99 = engine.seconds(service, Batch(prompts, tokens, squares, batch99,
                                              batch99 * work.context_mean))
        busy_fraction = min(1.0, busy / (step * engine.devices))
    if not prefill:
        return Prediction(step, step, tbt99, batch99, busy_fraction)
    ttft = _ttft(service, engine, count, work, slo, chunk * lanes, lane, step, mean_batch)
    if ttft is None:
        return None
    percentiles, utilisation, miss = ttft
    return Prediction(step, step, tbt99, batch99, busy_fraction if decode else utilisation,
                      miss, percentiles)


def mean_chunk(prompt: float, lane: int, reuse: float = 0.0) -> tuple[int, float, float]:
    """(chunks, tokens, sum of squares) of a prompt prefilled `lane` tokens a step, as its
    mean chunk: a chunk at offset o of t tokens attends over o + t, so its sum of squares is
    (o + t)^2 - o^2 and the chunks' sums add up to prompt^2 (costing each chunk as a prompt
    of its own, t^2, made a long prompt's prefill look `chunks` times cheaper). With a
    `reuse` share of the prompt cached, only the rest is prefilled: prompt^2 - cached^2."""
    tokens = prompt * (1 - reuse)
    chunks = max(1, math.ceil(tokens / lane))
    return chunks, tokens / chunks, prompt * prompt * (1 - reuse * reuse) / chunks


@lru_cache(maxsize=512)
def _chunk_ladder(points: tuple[tuple[float, float], ...], prefill_mean: float,
                  prefill_sq_mean: float, lane: int, load: float, squares_per_token: float,
                  reuse: float) -> tuple[float, tuple[float, ...], tuple]:
    """The chunks of at most `lane` tokens the prompt lengths cut past the `reuse` share a
    prefix cache holds, each in a step whose lane the prompts behind it fill in proportion
    to the prompt `load` (a lane's share of tokens the arriving prompts bring, 0..1), sorted
    by what they cost (tokens + sum of squares / `squares_per_token`): (steps per prompt
    that carry its chunks, cumulative share of those steps, ((prompts, tokens, sum of
    squares), ...)). A chunk of t tokens has a step of its own when prompts are rare and
    t / lane of one when they fill every step: 1 - load (1 - t / lane) in between."""
    density = prefill_sq_mean / prefill_mean  # sum of squares a mean prompt's token brings
    chunks = []
    for length, weight in points:
        cached = length * reuse
        for offset in range(0, max(1, math.ceil(length - cached)), lane):
            start = cached + offset
            tokens = min(lane, length - start)
            rest = (lane - tokens) * load
            squares = (start + tokens) ** 2 - start ** 2 + rest * density
            chunks.append((tokens + rest + squares / squares_per_token, squares,
                           weight * (1 - load * (1 - tokens / lane)),
                           1 + rest / prefill_mean, tokens + rest))
    chunks.sort()
    steps = sum(c[2] for c in chunks)
    shares = tuple(itertools.accumulate(c[2] / steps for c in chunks))
    return steps, shares, tuple((n, tokens, squares) for _, squares, _, n, tokens in chunks)


def worst_chunks(work: Workload, lane: int, budget: int, unit: int, arrivals: float,
                 attainment: float, squares_per_token: float) -> tuple[float, float, float]:
    """(prompts, tokens, sum of squares) of the prompt chunks in the step at the attainment
    percentile of time between tokens. A step takes `budget` prompt tokens, at most `lane`
    of them from one prompt; `arrivals` prompts arrive per step; `unit` is the prompt
    tokens whose chunk sets a step's time (the budget, or one replica's chunk where the
    busiest co-located replica sets it). A chunk of t tokens at offset o attends over
    o + t, so its attention costs (o + t)^2 - o^2 and the chunks of long prompts' tails make
    the longest steps; with the percentile past the steps that carry prompt tokens, the
    step has none. `squares_per_token` (ServiceModel.squares_per_token) ranks the chunks."""
    if arrivals <= 0:
        return 0.0, 0.0, 0.0
    load = math.ceil(min(1.0, arrivals * work.prefill_mean / budget) * PACKING_LEVELS)
    steps, shares, chunks = _chunk_ladder(work.prompt_points, work.prefill_mean,
                                          work.prefill_sq_mean, lane, load / PACKING_LEVELS,
                                          squares_per_token, work.reuse)
    carrying = min(1.0, arrivals * steps * lane / unit)  # share of steps with prompt tokens
    depth = 1 - (1 - attainment) / carrying
    if depth <= 0:
        return 0.0, 0.0, 0.0
    prompts, tokens, squares = chunks[min(len(chunks) - 1, bisect.bisect_left(shares, depth))]
    lanes = budget / lane  # chunks in one step (co-located replicas each take one)
    return lanes * prompts, lanes * tokens, lanes * squares


def _ttft(service: ServiceModel, engine, count: int, work: Workload, slo: SLO, chunk: int,
          lane: int, step: float, decoding: float
          ) -> tuple[Callable[[], tuple[float, float]], float, float] | None:
    """(a function giving TTFT p50 and TTFT at the attainment percentile, prefill
    utilisation, share of requests past their own TTFT target), or None.

    Prompts queue for prefill tokens: an M/G/c queue whose service time is a prompt's tokens
    over a server's prefill rate (an engine takes `chunk` tokens per full step, at most
    `lane` of them from one prompt, so it is chunk / lane servers: co-located replicas each
    prefill their own prompts, a pooled dense pool prefills one prompt with all of them).
    Wait: Erlang C scaled by (1 + Cs^2) / 2 (Allen-Cunneen), exponential given that it waits.
    TTFT = wait + the prompt's own chunks (+ half a step on a mixed engine; on a prefill-only
    one, shared with the prompts that arrived while it waited, and alone when it did not
    wait); its percentile mixes the wait over the weighted prompt lengths (prompt_points)."""
    ctx = work.context_mean

    steps: dict[tuple[int, float, float], float] = {}  # (chunks, tokens, others) -> step

    def own(p: float, joining: float = 0.0) -> float:
        chunks, tokens, squares = mean_chunk(p, lane, work.reuse)
        # prompts queued behind it share its steps while its chunks leave room
        others = min(joining, chunks * max(0.0, (lane - tokens) / work.prefill_mean)) / chunks
        if (chunks, tokens, others) not in steps:
            steps[chunks, tokens, others] = engine.seconds(service, Batch(
                1 + others, tokens + others * work.prefill_mean,
                squares + others * work.prefill_sq_mean, decoding, decoding * ctx))
        return chunks * steps[chunks, tokens, others]

    servers = count * round(chunk / lane)
    per_step = chunk / work.prefill_mean
    full = engine.seconds(service, Batch(per_step, chunk, per_step * work.prefill_sq_mean,
                                         decoding, decoding * ctx))
    service_rate = lane / (full * work.prefill_mean)  # one server's prompts per second
    load = work.rate / service_rate
    if load >= servers:
        return None
    variation = work.prompt_sq_mean / work.prompt_mean ** 2 - 1
    waiting = erlang_c(servers, load)
    mean_wait = erlang_c_wait(servers, work.rate, service_rate) * (1 + variation) / 2
    if step:
        def pair(p: float) -> tuple[float, float]:
            o = own(p) + step / 2  # on a mixed engine every arrival first waits half a step
            return o, o
    else:
        # a prefill-only replica found idle starts the prompt at once; one found busy takes,
        # with it, every prompt that arrived meanwhile: lam x (a mean prefill + the mean
        # wait of those that wait) more
        joining = work.rate / servers * (own(work.prompt_mean) + (
            mean_wait / waiting if waiting > 0 else 0.0))

        def pair(p: float) -> tuple[float, float]:
            return own(p), own(p, joining)

    def late(t: float, alone: float, queued: float) -> float:
        """P(TTFT > t) of a prompt whose prefill takes `alone` when it starts at once, and
        `queued` (after an exponential wait) when it waits."""
        left = t - queued
        waited = 1.0 if left < 0 else (
            math.exp(-left * waiting / mean_wait) if mean_wait > 0 else 0.0)
        return (1 - waiting) * (t < alone) + waiting * waited

    points = work.prompt_points  # ascending lengths
    pairs: dict[int, tuple[float, float]] = {}  # point index -> (alone, queued)

    def lateness(i: int) -> float:
        p = points[i][0]
        if i not in pairs:
            pairs[i] = pair(p)
        return late(slo.ttft_for(p), *pairs[i])

    # the search needs only which side of the allowance the miss falls: with one target for
    # every prompt a mixed engine's lateness grows with the prompt, so bounds between costed
    # points decide it; otherwise the longest prompts first, until past the allowance
    allowance = 1 - slo.attainment
    if step and not slo.ttft_per_token:
        miss = bracketed_sum(lateness, [w for _, w in points], allowance)
    else:
        miss = 0.0
        for i in reversed(range(len(points))):
            miss += points[i][1] * lateness(i)
            if miss > allowance:
                break

    def percentiles() -> tuple[float, float]:
        owns = [(*(pairs[i] if i in pairs else pair(p)), w) for i, (p, w) in enumerate(points)]

        def tail(t: float) -> float:
            return sum(w * late(t, a, o) for a, o, w in owns)

        def percentile(q: float) -> float:
            low, high = 0.0, max(o for _, o, _ in owns) + 50 * mean_wait + 1.0
            for _ in range(30):
                mid = (low + high) / 2
                low, high = (mid, high) if tail(mid) > 1 - q else (low, mid)
            return high

        return percentile(0.5), percentile(slo.attainment)

    return percentiles, load / servers, miss


def bracketed_sum(value: Callable[[int], float], weights: list[float], limit: float) -> float:
    """sum(weights[i] * value(i)) for a value nondecreasing in i, costing only the i needed
    to tell whether it exceeds `limit`: between two costed points every value lies between
    theirs, so the sum has bounds; the widest bracket is split until they fall on one side.
    Returns the sum when every point was costed, else an upper bound <= limit or a lower
    bound > limit."""
    last = len(weights) - 1
    known = {0: value(0), last: value(last)}
    while True:
        costed = sorted(known)
        low = high = sum(weights[i] * known[i] for i in costed)
        widest, gap = None, 0.0
        for a, b in zip(costed, costed[1:]):
            inner = sum(weights[a + 1:b])
            low += inner * known[a]
            high += inner * known[b]
            if b - a > 1 and inner * (known[b] - known[a]) > gap:
                widest, gap = (a, b), inner * (known[b] - known[a])
        if high <= limit or widest is None:
            return high
        if low > limit:
            return low
        known[(widest[0] + widest[1]) // 2] = value((widest[0] + widest[1]) // 2)


def _power(service: ServiceModel, devices: int, busy: float) -> float:
    """Mean power of `devices` busy for fraction `busy` of the time (max power when busy)."""
    d = service.device
    return devices * (d.idle_power_w + (d.max_power_w - d.idle_power_w) * busy)


def _fewest(probe, low: int = 1, high: int = 4096) -> tuple[int, object] | tuple[None, None]:
    """Smallest n in [low, high] whose probe(n) is truthy, with that value ((None, None) if
    none), assuming the probe is monotone: doubling from `low`, then bisection, so small
    answers cost few calls."""
    step, bad = low, low - 1
    while not (found := probe(step)):
        if step >= high:
            return None, None
        bad, step = step, min(high, step * 2)
    while step - bad > 1:
        mid = (bad + step) // 2
        if value := probe(mid):
            step, found = mid, value
        else:
            bad = mid
    return step, found


def _meets(p: Prediction | None, slo: SLO) -> bool:
    """Whether a prediction meets the SLO."""
    return p is not None and p.tbt_p99 <= slo.tbt and p.ttft_miss <= 1 - slo.attainment


def _meeting(p: Prediction | None, slo: SLO) -> Prediction | None:
    """The prediction when it meets the SLO, else None (a probe for `_fewest`)."""
    return p if _meets(p, slo) else None


def _candidates_model(service, work, slo):
    """(devices, power, engines, predictions, chunk) for model-level replicas."""
    fixed: dict = {}
    for shards in SHARDS:
        engine = LockstepEngine("model", shards)
        if engine.kv_capacity_tokens(service) <= work.prompt_mean + work.output_mean:
            continue
        for chunk in CHUNKS:
            count, p = _fewest(lambda n: _meeting(predict(service, engine, n, work, slo, chunk,
                                                          fixed_points=fixed), slo))
            if count is None:
                continue
            yield (count * shards, _power(service, count * shards, p.busy_fraction),
                   [(engine, count, p)], chunk)


def _prefill_meeting(service, engine, count: int, work: Workload, slo: SLO,
                     chunk: int) -> Prediction | None:
    """A prefill-only pool's prediction when its TTFT meets the SLO, else None."""
    p = predict(service, engine, count, work, slo, chunk, decode=False)
    return p if p is not None and p.ttft_miss <= 1 - slo.attainment else None


def _decode_budget(service: ServiceModel, work: Workload, slo: SLO, prefill_shards: int,
                   decode_shards: int) -> SLO | None:
    """A decode pool's SLO: the TBT less the KV transfer spread over the output tokens (the
    cache crosses min(prefill, decode) network links); None when nothing is left."""
    transfer = kv_transfer_s(service, work.prompt_mean, min(prefill_shards, decode_shards))
    budget = replace(slo, tbt=slo.tbt - transfer / work.output_mean)
    return budget if budget.tbt > 0 else None


def _decode_meeting(service, engine, count: int, work: Workload,
                    budget: SLO) -> Prediction | None:
    """A decode-only pool's prediction when its TBT meets the budget, else None."""
    p = predict(service, engine, count, work, budget, 0, prefill=False)
    return p if p is not None and p.tbt_p99 <= budget.tbt else None


def _candidates_phase(service, work, slo):
    """Prefill and decode pools sized independently; the KV transfer joins them."""
    best_prefill = best_decode = None
    for shards, chunk in itertools.product(SHARDS, PREFILL_CHUNKS):
        engine = LockstepEngine("prefill", shards)
        if engine.kv_capacity_tokens(service) <= 0:
            continue
        count, p = _fewest(lambda n: _prefill_meeting(service, engine, n, work, slo, chunk))
        if count is not None:
            cand = (count * shards, _power(service, count * shards, p.busy_fraction),
                    engine, count, p, chunk)
            best_prefill = min(best_prefill or cand, cand, key=lambda c: c[:2])
    for shards in SHARDS:
        engine = LockstepEngine("decode", shards)
        if engine.kv_capacity_tokens(service) <= work.prompt_mean + work.output_mean:
            continue
        budget = _decode_budget(service, work, slo,
                                best_prefill[2].shards if best_prefill else shards, shards)
        if budget is None:
            continue
        count, p = _fewest(lambda n: _decode_meeting(service, engine, n, work, budget))
        if count is not None:
            cand = (count * shards, _power(service, count * shards, p.busy_fraction),
                    engine, count, p)
            best_decode = min(best_decode or cand, cand, key=lambda c: c[:2])
    if best_prefill and best_decode:
        yield (best_prefill[0] + best_decode[0], best_prefill[1] + best_decode[1],
               [best_prefill[2:5], best_decode[2:]], best_prefill[5])


def kv_transfer_s(service: ServiceModel, prompt_tokens: float, shards: int) -> float:
    """Seconds to move a prompt's KV cache from a prefill to a decode replica (network)."""
    bandwidth = service.device.interconnect["network"] * shards
    return prompt_tokens * service.kv_bytes_per_token / bandwidth


def _candidates_operator(service, work, slo, mechanisms: Mechanisms = ALL_MECHANISMS,
                         copies: int = 1, within: float = math.inf,
                         most_replicas: int = MAX_DENSE_REPLICAS):
    """Operator pools: attention devices (KV) and up to `most_replicas` dense replicas sized
    separately (or co-located only, without disaggregation), in `copies` engines that share
    the arrivals, of at most `within` devices in all; a shape whose dense pool alone has
    more devices than the best found is skipped."""
    best = within / copies  # per engine
    fixed: dict = {}
    # a disaggregated dense pool may spread a prompt over its replicas (pooled prefill) or
    # not: deep in a long prompt, a pooled chunk attends too long on its one attention set
    poolings = (True, False) if mechanisms.pooled_prefill else (False,)
    # co-located, then attention devices in sets of 8, 4, 2 or 1 (split by heads)
    layouts = [(0, mechanisms.pooled_prefill)] + [
        (ways, pooled) for pooled in poolings for ways in sorted(SHARDS, reverse=True)
        if mechanisms.disaggregation]
    for shards in SHARDS:
        for chunk in CHUNKS:
            for replicas in range(1, most_replicas + 1):
                probe = OperatorEngine(0, shards, replicas)
                if not probe.dense_fits(service) or probe.devices > best:
                    break
                # narrower sets of as many devices attend no faster (each holds a whole
                # chunk): per pooling, attention devices too few for wider sets are too few
                too_few: dict[bool, int] = {}
                for ways, pooled in layouts:
                    if replicas == 1 and ways and not pooled:
                        continue  # one replica pools nothing: its prompt lane is a chunk
                    if ways:  # as few sets of attention devices as meet, if any does
                        room = int(min(256, best - probe.devices)) if best < math.inf else 256
                        limit, low = room // ways, too_few.get(pooled, 0) // ways + 1
                        if limit < low:
                            continue

                        def meeting(sets: int, floor: float = 0.0) -> Prediction | None:
                            return _meeting(predict(service, OperatorEngine(
                                sets * ways, shards, replicas, ways, pooled), copies, work,
                                slo, chunk, fixed_points=fixed, floor=floor), slo)
                        # most shapes fail even at the limit: one probe says so; its step,
                        # the fastest, starts the fewer devices' fixed points
                        if not (at_limit := meeting(limit)):
                            too_few[pooled] = max(too_few.get(pooled, 0), limit * ways)
                            continue
                        meeting = partial(meeting, floor=at_limit.step_s)
                        sets, p = _fewest(meeting, low, limit - 1) if limit > low \
                            else (None, None)
                        if sets is None:
                            sets, p = limit, at_limit
                        too_few[pooled] = max(too_few.get(pooled, 0), (sets - 1) * ways)
                    else:
                        sets = 0
                        p = _meeting(predict(service, OperatorEngine(
                            0, shards, replicas, pooled_prefill=pooled), copies, work, slo,
                            chunk, fixed_points=fixed), slo)
                    if p:
                        engine = OperatorEngine(sets * ways, shards, replicas, max(ways, 1),
                                                pooled)
                        best = min(best, engine.devices)
                        devices = copies * engine.devices
                        yield (devices, _power(service, devices, p.busy_fraction),
                               [(engine, copies, p)], chunk)


def _candidates_operator_copies(service, work, slo, mechanisms: Mechanisms = ALL_MECHANISMS):
    """One operator engine of up to MAX_DENSE_REPLICAS dense replicas, or copies of a
    one-replica engine sharing the arrivals as model-level replicas do (a co-located one is
    a model-level replica, so this contains model-level's search). The copies go first: the
    fewest that meet the SLO, then more while more could need fewer devices; their best
    bounds the one engine's search, which prunes most of it. Without the `copies`
    mechanism, one engine only."""
    if not mechanisms.copies:
        yield from _candidates_operator(service, work, slo, mechanisms)
        return
    smallest = min((shards for shards in SHARDS
                    if OperatorEngine(0, shards, 1).dense_fits(service)), default=None)
    if smallest is None:
        return  # the weights fit no engine: nothing to copy

    def one_replica(copies: int, within: float = math.inf) -> list:
        """Candidates of `copies` one-replica engines, of at most `within` devices in all."""
        return list(_candidates_operator(service, work, slo, mechanisms, copies, within, 1))

    copies, found = _fewest(one_replica, 2, MAX_OPERATOR_ENGINES)
    best = math.inf
    while found is not None:
        yield from found
        best = min([best] + [cand[0] for cand in found])
        copies += 1
        found = one_replica(copies, best) \
            if copies <= MAX_OPERATOR_ENGINES and copies * smallest <= best else None
    yield from _candidates_operator(service, work, slo, mechanisms, 1, best)


def deployment_layout(engines) -> tuple:
    """What a deployment cannot change without new replicas or a re-shard: each engine's
    shape less what changes in place (replica, copy and attention-set counts, pooling); an
    operator engine of several dense replicas and copies of one-replica engines differ."""
    return tuple(
        (e.dense_shards, e.attention_shards, e.attention > 0, e.dense_replicas > 1)
        if isinstance(e, OperatorShape) else shape_of(e) for e in engines)


def plan(service: ServiceModel, work: Workload, slo: SLO, policy: str,
         max_devices: int | None = None, mechanisms: Mechanisms = ALL_MECHANISMS,
         keep_layout: tuple | None = None) -> Plan:
    """The cheapest deployment of a policy that meets the SLO at the workload's rate (an
    operator deployment using only the given mechanisms); among the cheapest in devices,
    one of `keep_layout` (the deployment's own) wins, so a re-shard always saves a device."""
    if policy not in POLICIES:
        raise ValueError(f"unknown policy {policy!r}; choose one of {list(POLICIES)}")
    search = {"static": _candidates_model, "model": _candidates_model,
              "phase": _candidates_phase, "operator": _candidates_operator_copies}[policy]
    arguments = (mechanisms,) if policy == "operator" else ()
    best, best_key = None, None
    for cand in search(service, work.at(max(work.rate, 1e-6)), slo, *arguments):
        if max_devices is not None and cand[0] > max_devices:
            continue
        moved = keep_layout is not None and \
            deployment_layout(e for e, _, _ in cand[2]) != keep_layout
        key = (cand[0], moved, cand[1])
        if best is None or key < best_key:
            best, best_key = cand, key
    if best is None:
        limit = f" within {max_devices} devices" if max_devices else ""
        if policy == "operator":  # not more devices: the search's own bound
            limit += (f" (one engine of at most {MAX_DENSE_REPLICAS} dense replicas and their "
                      f"attention devices, or up to {MAX_OPERATOR_ENGINES} one-replica engines)")
        per_token = f" + {slo.ttft_per_token:g} s per prompt token" if slo.ttft_per_token \
            else ""
        raise NoDeploymentError(
            f"no {policy} deployment of {service.model} on {service.device.name} meets TTFT "
            f"{slo.ttft} s{per_token} and TBT {slo.tbt} s at {work.rate:.3g} req/s{limit}"
            f"{too_long_for_ttft(service, work, slo)}; relax the SLO (SLO.ttft_per_token, "
            "`fxscale simulate --slo-ttft-per-token`, allows long prompts more)"
            + (" or allow more devices" if max_devices or policy != "operator" else ""))
    devices, power, pools, chunk = best
    decode_pred = pools[-1][2]
    prefill_pred = pools[0][2]
    return Plan(policy=policy, model=service.model, device=service.device.name, rate=work.rate,
                engines=tuple(EngineCount(shape_of(e), n) for e, n, _ in pools),
                devices=devices, power_w=power,
                ttft_p50=prefill_pred.ttft_p50, ttft_p99=prefill_pred.ttft_p99,
                tbt_p50=decode_pred.tbt_p50, tbt_p99=decode_pred.tbt_p99, chunk=chunk,
                groups=tuple(group_placement(service, pools, slo, work, chunk)))


def plan_meets(service: ServiceModel, p: Plan, work: Workload, slo: SLO,
               mechanisms: Mechanisms = ALL_MECHANISMS) -> bool:
    """Whether a plan's engines, as they are, meet the SLO at a workload's rate (the
    predictions the search makes of each candidate)."""
    work = work.at(max(work.rate, 1e-6))
    engines = [(engine_for(e.engine, mechanisms), e.count) for e in p.engines]
    if p.policy != "phase":
        (engine, count), = engines
        return _meets(predict(service, engine, count, work, slo, p.chunk), slo)
    (prefill, prefills), (decode, decodes) = engines
    if _prefill_meeting(service, prefill, prefills, work, slo, p.chunk) is None:
        return False
    budget = _decode_budget(service, work, slo, prefill.shards, decode.shards)
    return budget is not None and \
        _decode_meeting(service, decode, decodes, work, budget) is not None


def prefill_alone_s(service: ServiceModel, prompt: float, reuse: float = 0.0) -> float:
    """Seconds one prompt's prefill (past a `reuse` share cached) takes alone on the fastest
    shape (the widest tensor parallelism, the largest chunk): no deployment gives it a
    shorter TTFT."""
    engine, chunk = LockstepEngine("prefill", max(SHARDS)), max(PREFILL_CHUNKS)
    chunks, tokens, squares = mean_chunk(prompt, chunk, reuse)
    return chunks * engine.seconds(service, Batch(1, tokens, squares))


def too_long_for_ttft(service: ServiceModel, work: Workload, slo: SLO) -> str:
    """Which prompts miss their TTFT target even alone on the fastest shape, as a clause
    for an error message ('' when every prompt can meet it)."""
    late = [(p, w, t) for p, w in work.prompt_points
            if (t := prefill_alone_s(service, p, work.reuse)) > slo.ttft_for(p)]
    if not late:
        return ""
    share = sum(w for _, w, _ in late)
    longest, _, seconds = max(late)
    verdict = "more than" if share > 1 - slo.attainment else "within"
    return (f" (about {share:.1%} of requests, {verdict} the {1 - slo.attainment:.1%} the "
            f"attainment target allows to miss, have prompts of {min(p for p, _, _ in late):.0f}"
            f" tokens or more, which no deployment prefills within their TTFT: the longest, "
            f"{longest:.0f} tokens, takes {seconds:.2f} s alone on {max(SHARDS)} devices)")


def group_placement(service: ServiceModel, pools, slo: SLO, work: Workload,
                    chunk: int) -> list[GroupPlacement]:
    """Per group: replicas, shards, max batch (requests per step), devices, and its share of
    the TBT budget along the critical path (its time over the traversal time). Devices are
    numbered the largest engines first, so that an engine of 1, 2, 4 or 8 devices never
    spans two nodes of NODE_DEVICES (devices 0-7, 8-15, ...; `fxscale.Devices(per_node=8)`
    on Ray), as the planner prices it."""
    rows = []
    first = {}  # pool -> its first device
    for i in sorted(range(len(pools)), key=lambda i: -pools[i][0].devices):
        first[i] = sum(pools[j][0].devices * pools[j][1] for j in first)
    for i, (engine, count, pred) in enumerate(pools):
        decoding = max(1.0, pred.batch_p99)
        prompts = chunk / work.prefill_mean
        batch = Batch(decode_n=decoding, decode_s1=decoding * work.context_mean) \
            if pred.batch_p99 else Batch(prompts, chunk, prompts * work.prefill_sq_mean)
        max_batch = math.ceil(pred.batch_p99) if pred.batch_p99 else \
            max(1, math.ceil(chunk / work.prefill_mean))
        devices = list(range(first[i], first[i] + engine.devices * count))
        if isinstance(engine, OperatorEngine) and engine.attention:
            attention, dense, _, _ = engine.pool_times(service, batch, accounting=False)
            total = attention + dense
            # each copy's attention devices, then its dense replicas'
            copies = [devices[c * engine.devices:(c + 1) * engine.devices]
                      for c in range(count)]
            places = {True: ([d for c in copies for d in c[:engine.attention]],
                             engine.kv_holders * count, engine.attention_shards, 1,
                             busiest_share(batch, engine.kv_holders)),  # as pool_times
                      False: ([d for c in copies for d in c[engine.attention:]],
                              engine.dense_replicas * count, engine.dense_shards,
                              engine.dense_replicas, batch)}
            role = "operator"
        else:  # replicas that each run their own requests: time at one replica's batch
            if isinstance(engine, OperatorEngine):  # co-located: r replicas in each engine
                replicas, shards, role = (engine.dense_replicas * count, engine.dense_shards,
                                          "operator")
                batch = batch.split(engine.dense_replicas)
            else:
                replicas, shards, role = count, engine.shards, engine.role
            total = service.iteration_time(batch, shards)
            places = {flag: (devices, replicas, shards, 1, batch) for flag in (True, False)}
        for kind in service.kinds:
            where, replicas, shards, split, part = places[kind.stateful]
            share = service.kind_time(kind, part, shards, split) / max(total, 1e-12)
            for gid in kind.group_ids:
                rows.append(GroupPlacement(gid, kind.name, role, replicas, shards, max_batch,
                                           tuple(where), share / kind.count,
                                           slo.tbt * share / kind.count))
    return rows
