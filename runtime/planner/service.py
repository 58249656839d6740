"""Service model: the operator groups of a model, folded into kinds, with fast cost functions.

Layers repeat, so the groups of an 80-layer model fold into a handful of *kinds* (groups whose
name differs only in the layer index and whose cost expressions are equal), each with a count.
On a device calibrated per kernel class (runtime/devices: GEMMs, norms, embeddings, rotary,
activation and residual-add kernels fitted to measured times), a row-wise kind's time is the
sum of its parts: each fitted class by its fit, the other classes together by the roofline;
elsewhere, and for attention, one roofline over the kind's whole work.
A kind's FLOPs and bytes are polynomials in (batch, x), x being the prompt length in prefill
and the cached context in decode; they are split into a per-request part (terms with batch)
and a shared part (terms without: parameter reads, broadcast tensors), so the cost of one
iteration that mixes requests of different lengths is exact for costs linear in batch:
shared + sum over requests. Built once from the prefill and decode GroupGraphs and a device
model; evaluating it is plain arithmetic, so the planner and simulator never touch sympy.

A mixture-of-experts kind reads the weights of the experts its tokens reach, not all of them:
with T tokens on a replica, each going to k of E experts, expert e (chosen by a token with
probability q_e = k p_e, at most 1, the q_e summing to k) is reached by at least one with
probability 1 - (1 - q_e)^T (tokens routed independently). The routing shares p_e are
uniform, or skewed (`expert_skew` s > 0: the expert of rank r gets a share proportional to
r^-s, a Zipf law); the same for every policy.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import cached_property

import sympy

from fxscale.contracts.exprs import parse_expr
from fxscale.contracts.group_graph import Experts, Group, GroupGraph, kind_name
from fxscale.runtime.devices.model import DeviceModel

_B, _X = sympy.symbols("b x")
# Operator classes and pointwise kernels (passes/classify.py) and the device kernel fit that
# times them
KERNEL_OF = {"gemm": "gemm", "moe-expert": "gemm", "norm": "norm", "embedding": "embedding",
             "rotary": "rotary", "activation": "activation", "residual": "residual"}
# Kernels every tensor-parallel shard runs whole (norms and the residual stream's adds see the
# full hidden state)
REPLICATED_KERNELS = frozenset({"norm", "residual"})
# Beyond this Zipf exponent the hottest expert takes every token and the shares of the
# coldest underflow toward zero: no routing a model is trained to is that skewed
MAX_EXPERT_SKEW = 10.0


@dataclass(frozen=True)
class Poly:
    """A cost in one phase: shared terms c0 + c1 x + c2 x^2, per-request terms likewise."""

    shared: tuple[float, float, float]
    per_request: tuple[float, float, float]


@dataclass(frozen=True)
class Part:
    """The work of one kernel class in a kind (`kernel` None: the classes no fit covers),
    per phase."""

    kernel: str | None
    prefill_flops: Poly
    prefill_bytes: Poly
    decode_flops: Poly
    decode_bytes: Poly


@dataclass(frozen=True)
class Kind:
    """Groups that repeat across layers with equal costs, run `count` times per forward."""

    name: str
    count: int
    group_ids: tuple[str, ...]
    classes: tuple[str, ...]
    stateful: bool
    param_bytes: int
    kv_bytes_per_token: float
    out_bytes_per_token: float
    prefill_flops: Poly
    prefill_bytes: Poly
    decode_flops: Poly
    decode_bytes: Poly
    parts: tuple[Part, ...] = ()  # by kernel class, when the graph carries class costs
    experts: Experts | None = None  # a mixture-of-experts kind's routed experts

    @property
    def sharded_comm(self) -> bool:
        """Whether tensor-parallel shards of this kind all-reduce their output (it has weights)."""
        return self.param_bytes > 0


@dataclass(frozen=True)
class Batch:
    """The work of one iteration: prefill prompts and decode requests, as moments."""

    prefill_n: int = 0
    prefill_s1: float = 0.0
    prefill_s2: float = 0.0
    decode_n: int = 0
    decode_s1: float = 0.0

    @property
    def tokens(self) -> float:
        """Tokens that flow through the row-wise groups in this iteration."""
        return self.prefill_s1 + self.decode_n

    def split(self, parts: float) -> Batch:
        """The share of this batch one of `parts` equal replicas receives."""
        if parts == 1:
            return self
        return Batch(self.prefill_n / parts, self.prefill_s1 / parts, self.prefill_s2 / parts,
                     self.decode_n / parts, self.decode_s1 / parts)


def _coefficients(item: Kind | Part) -> tuple[float, ...]:
    """A kind's (or part's) four polynomials as one flat tuple, for `_flat_work` (kind_time
    keeps it per kind: the planner and simulator cost every part of every step)."""
    return (*item.prefill_flops.shared, *item.prefill_flops.per_request,
            *item.prefill_bytes.shared, *item.prefill_bytes.per_request,
            *item.decode_flops.shared, *item.decode_flops.per_request,
            *item.decode_bytes.shared, *item.decode_bytes.per_request)


def _flat_work(c: tuple[float, ...], pn: float, ps1: float, ps2: float, dn: float,
               ds1: float) -> tuple[float, float, float]:
    """(FLOPs, shared bytes, per-request bytes) from flat coefficients: each phase's
    polynomials at its requests' mean x plus their per-request sums; weights shared by both
    phases are read once."""
    (f0, f1, f2, g0, g1, g2, b0, b1, b2, h0, h1, h2,
     F0, F1, F2, G0, G1, _, B0, B1, B2, H0, H1, _) = c
    prefill_flops = prefill_bytes = decode_flops = decode_bytes = 0.0
    if pn:
        m = ps1 / pn
        prefill_flops = f0 + f1 * m + f2 * m * m + g0 * pn + g1 * ps1 + g2 * ps2
        prefill_bytes = b0 + b1 * m + b2 * m * m + h0 * pn + h1 * ps1 + h2 * ps2
    if dn:  # decode tracks context sums: per request linear in x (service_model checks)
        m = ds1 / dn
        decode_flops = F0 + F1 * m + F2 * m * m + G0 * dn + G1 * ds1
        decode_bytes = B0 + B1 * m + B2 * m * m + H0 * dn + H1 * ds1
    shared = max(b0 if pn else 0.0, B0 if dn else 0.0)
    total = prefill_bytes + decode_bytes
    if pn and dn:
        total -= min(b0, B0)
    return prefill_flops + decode_flops, shared, total - shared


@dataclass
class ServiceModel:
    """Kinds of one model on one device type, with iteration costs and latencies."""

    model: str
    device: DeviceModel
    kinds: list[Kind]
    dtype: str = "bf16"
    context_limit: int | None = None  # longest prompt + output the model takes (tokens)
    expert_skew: float = 0.0  # routing over experts: 0 uniform, s > 0 Zipf (module doc)
    # id(kind) -> (kind, its parts as (timer, replicated, holds the expert weights, flat
    # coefficients))
    _timing: dict[int, tuple] = field(default_factory=dict, init=False, repr=False,
                                      compare=False)
    # (experts, per token, tokens) -> experts reached
    _reached: dict[tuple, float] = field(default_factory=dict, init=False, repr=False,
                                         compare=False)

    def __post_init__(self) -> None:
        if isinstance(self.expert_skew, bool) or not isinstance(self.expert_skew, (int, float)) \
                or not 0 <= self.expert_skew <= MAX_EXPERT_SKEW:
            raise ValueError(f"expert_skew must be a number from 0 (uniform routing) to "
                             f"{MAX_EXPERT_SKEW:g}, got {self.expert_skew!r}")

    def experts_reached(self, experts: Experts, tokens: float) -> float:
        """Expected experts that at least one of `tokens` tokens goes to (module doc)."""
        if tokens <= 0:
            return 0.0
        key = (experts.count, experts.per_token, tokens)
        reached = self._reached.get(key)
        if reached is None:
            if len(self._reached) > 100_000:  # tokens per step repeat: a bounded memo
                self._reached.clear()
            reached = self._reached[key] = sum(
                1.0 - (1.0 - q) ** tokens for q in self.routing(experts))
        return reached

    def routing(self, experts: Experts) -> list[float]:
        """Per expert, the probability a token goes to it: k p_e, an expert whose share
        would exceed 1 taking every token and the rest of the k spread over the others in
        proportion (so they sum to k: one token reaches exactly k experts)."""
        shares = [(rank + 1) ** -self.expert_skew for rank in range(experts.count)]
        certain, left = 0, float(experts.per_token)  # the hottest go to every token
        while True:
            rest = sum(shares[certain:])
            if certain == len(shares) or shares[certain] * left / rest <= 1.0:
                break
            certain, left = certain + 1, left - 1.0
        return [1.0] * certain + [share * left / rest for share in shares[certain:]]

    def unread_expert_bytes(self, kind: Kind, tokens: float) -> float:
        """Bytes of a kind's expert weights that a step of `tokens` tokens on one replica does
        not read (the experts no token reaches); 0 for kinds without experts."""
        experts = kind.experts
        if experts is None or not experts.weight_bytes:
            return 0.0
        idle = 1.0 - self.experts_reached(experts, tokens) / experts.count
        return experts.weight_bytes * max(0.0, idle)

    def weight_bytes_read(self, tokens: float) -> float:
        """Weight bytes one step of `tokens` tokens reads on one replica: every weight, less
        the experts no token reaches."""
        return sum(k.count * (k.param_bytes - self.unread_expert_bytes(k, tokens))
                   for k in self.kinds)

    @property
    def weight_bytes(self) -> float:
        """Parameter bytes of the whole model."""
        return sum(k.param_bytes * k.count for k in self.kinds)

    @property
    def kv_bytes_per_token(self) -> float:
        """KV-cache bytes one token of context holds across all layers."""
        return sum(k.kv_bytes_per_token * k.count for k in self.kinds)

    @staticmethod
    def work(kind: Kind | Part, batch: Batch) -> tuple[float, float, float]:
        """(FLOPs, shared bytes, per-request bytes) of one instance of a kind (or of a part
        of it) on a batch."""
        return _flat_work(_coefficients(kind), batch.prefill_n, batch.prefill_s1,
                          batch.prefill_s2, batch.decode_n, batch.decode_s1)

    @staticmethod
    def busy_replicas(kind: Kind, batch: Batch, replicas: int) -> float:
        """Replicas a batch can keep busy: requests for stateful kinds (a request's KV lives
        on one replica), tokens for row-wise kinds."""
        units = batch.prefill_n + batch.decode_n if kind.stateful else batch.tokens
        return max(1.0, min(float(replicas), units))

    def kind_time(self, kind: Kind, batch: Batch, shards: int = 1, replicas: int = 1) -> float:
        """Seconds for all instances of a kind on a batch split over up to `replicas`
        data-parallel replicas, each sharded `shards` ways (tensor parallel, all-reduce)."""
        pn, ps1, ps2 = batch.prefill_n, batch.prefill_s1, batch.prefill_s2
        dn, ds1 = batch.decode_n, batch.decode_s1
        if pn == 0 and dn == 0:
            return 0.0
        replicas = self.busy_replicas(kind, batch, replicas)
        cached = self._timing.get(id(kind))
        timing = cached[1] if cached and cached[0] is kind else self._time_parts(kind)
        unread = self.unread_expert_bytes(kind, batch.tokens / replicas)
        one = 0.0
        for seconds, replicated, experts, coefficients in timing:
            flops, shared, variable = _flat_work(coefficients, pn, ps1, ps2, dn, ds1)
            if experts:
                shared = max(0.0, shared - unread)
            ways = 1 if replicated else shards
            one += seconds(flops / (ways * replicas), shared / ways + variable / (ways * replicas))
        if shards > 1 and kind.sharded_comm:
            one += self.device.all_reduce_time(
                batch.tokens * kind.out_bytes_per_token / replicas, shards)
        return one * kind.count

    def _time_parts(self, kind: Kind) -> tuple:
        """How kind_time costs a kind on this device, worked out once: each part by its
        kernel fit (or the roofline), on a device calibrated per kernel class; else the
        whole kind by the roofline. The same arithmetic as `work` and `kernel_time`."""
        device = self.device
        parts = kind.parts if device.kernels and not kind.stateful else ()
        timing = tuple((device.timer(p.kernel, self.dtype), p.kernel in REPLICATED_KERNELS,
                        p.kernel == KERNEL_OF["moe-expert"], _coefficients(p)) for p in parts) \
            or ((device.timer(None, self.dtype), False, True, _coefficients(kind)),)
        self._timing[id(kind)] = (kind, timing)  # held, so its id is not reused
        return timing

    def iteration_time(self, batch: Batch, shards: int = 1) -> float:
        """Seconds of one lock-step iteration of the whole model, tensor parallel `shards` ways."""
        return sum(self.kind_time(k, batch, shards) for k in self.kinds)

    @cached_property
    def squares_per_token(self) -> float:
        """The prompt attention's sum of squares that costs, at the efficient rates, what
        one more prompt token costs (inf when attention's cost does not grow with it): a
        chunk of t tokens and sum of squares q costs about t + q / this, how the planner
        orders prompt chunks by the step they make."""
        tokens, squares = 1024, 1024 * 16384  # a chunk deep in a 16k-token prompt
        base = self.peak_work_time(Batch(1, tokens, squares))
        per_token = (self.peak_work_time(Batch(1, 2 * tokens, squares)) - base) / tokens
        per_square = (self.peak_work_time(Batch(1, tokens, 2 * squares)) - base) / squares
        return per_token / per_square if per_square > 0 else math.inf

    def peak_work_time(self, batch: Batch, kinds: list[Kind] | None = None) -> float:
        """Device-seconds of a batch (on all kinds, or the given ones) at the efficient rates,
        without weight reads, launch or ramp overheads (what perfectly divisible devices need:
        the fluid bound)."""
        device = self.device
        rate, bandwidth = device.efficient_compute(self.dtype), device.efficient_bandwidth()
        seconds = 0.0
        for k in self.kinds if kinds is None else kinds:
            flops, _, variable = self.work(k, batch)
            if k.parts:  # the parts' bytes count what fused kernels move: fewer
                variable = min(variable, sum(self.work(p, batch)[2] for p in k.parts))
            seconds += k.count * max(flops / rate, variable / bandwidth)
        return seconds


def _poly(text: str, roles: dict[str, str], where: str) -> Poly:
    """Fold a cost expression into shared and per-request coefficients of 1, x, x^2."""
    expr = parse_expr(text)
    subs = {}
    for symbol in expr.free_symbols:
        role = roles.get(symbol.name)
        if role == "batch":
            subs[symbol] = _B
        elif role in ("length", "context"):
            subs[symbol] = _X
        else:
            raise ValueError(f"{where}: cost depends on symbol {symbol.name} with role {role!r};"
                             " the service model needs costs in batch and length/context only")
    poly = sympy.Poly(sympy.expand(expr.xreplace(subs)), _B, _X)
    shared, per_request = [0.0, 0.0, 0.0], [0.0, 0.0, 0.0]
    for (i, j), coeff in poly.terms():
        if j > 2 or i > 1:
            raise ValueError(f"{where}: cost term b^{i} x^{j} is outside the service model "
                             "(at most linear in batch and quadratic in length)")
        (per_request if i else shared)[j] += float(coeff)
    return Poly(tuple(shared), tuple(per_request))


def paged_decode_bytes(captured: Poly, kv_bytes_per_token: float) -> Poly:
    """A stateful group's decode bytes as the paged engine moves them: each cached token's K
    and V read once. The capture's concatenating cache reads the old cache, writes it again
    with the new token and reads that copy (about three reads, more with GQA's repeated
    heads); the terms that do not grow with the context are kept."""
    p0, _, _ = captured.per_request
    return Poly(captured.shared, (p0, kv_bytes_per_token, 0.0))


def service_model(prefill: GroupGraph, decode: GroupGraph, device: DeviceModel,
                  dtype: str = "bf16", context_limit: int | None = None,
                  expert_skew: float = 0.0) -> ServiceModel:
    """Fold a model's prefill and decode GroupGraphs into kinds on a device (experts routed
    with `expert_skew`: module doc)."""
    decode_by_name = {g.name: g for g in decode.groups}
    missing = [g.name for g in prefill.groups if g.name not in decode_by_name]
    if missing:
        raise ValueError(f"prefill and decode captures of {prefill.model} group differently: "
                         f"{missing[:3]} have no decode counterpart")
    roles_p = {n: s["role"] for n, s in prefill.symbols.items()}
    roles_d = {n: s["role"] for n, s in decode.symbols.items()}
    out_bytes = {}
    for edge in prefill.edges:  # activation bytes per token leaving each group
        out_bytes[edge.src] = out_bytes.get(edge.src, 0.0) + _poly(
            edge.bytes, roles_p, f"edge {edge.src}->{edge.dst}").per_request[1]
    folded: dict[tuple, dict] = {}
    for g in prefill.groups:
        d = decode_by_name[g.name]
        costs = tuple(_poly(text, roles, f"{phase} group {g0.id} {what}")
                      for g0, roles, phase in ((g, roles_p, "prefill"), (d, roles_d, "decode"))
                      for what, text in (("flops", g0.flops),
                                         ("bytes", f"({g0.bytes_read}) + ({g0.bytes_written})")))
        if costs[2].per_request[2] or costs[3].per_request[2]:
            raise ValueError(f"decode group {d.id}: a cost quadratic in the context is outside "
                             "the service model (decode iterations track context sums only)")
        kv = parse_expr(d.kv_bytes_per_token)  # decode holds the real cache (no GQA repeat)
        if g.stateful and float(kv):
            costs = (*costs[:3], paged_decode_bytes(costs[3], float(kv)))
        parts = () if g.stateful else _parts(g, d, roles_p, roles_d)
        key = (kind_name(g.name), costs, g.param_bytes, str(kv), g.stateful, parts, g.experts)
        entry = folded.setdefault(key, {"ids": [], "group": g, "costs": costs, "kv": float(kv),
                                        "parts": parts})
        entry["ids"].append(g.id)
    kinds = [Kind(name=key[0], count=len(e["ids"]), group_ids=tuple(e["ids"]),
                  classes=tuple(e["group"].classes), stateful=e["group"].stateful,
                  param_bytes=e["group"].param_bytes, kv_bytes_per_token=e["kv"],
                  out_bytes_per_token=out_bytes.get(e["group"].id, 0.0),
                  prefill_flops=e["costs"][0], prefill_bytes=e["costs"][1],
                  decode_flops=e["costs"][2], decode_bytes=e["costs"][3], parts=e["parts"],
                  experts=e["group"].experts)
             for key, e in folded.items()]
    return ServiceModel(prefill.model, device, kinds, dtype, context_limit, expert_skew)


def _parts(prefill: Group, decode: Group, roles_p: dict[str, str],
           roles_d: dict[str, str]) -> tuple[Part, ...]:
    """A group's work by device kernel class (KERNEL_OF; the other classes summed as one
    part), in both phases; () when either capture carries no class costs."""
    if not prefill.class_costs or not decode.class_costs:
        return ()
    texts: dict[str | None, list[list[str]]] = {}
    for phase, group in enumerate((prefill, decode)):
        for name, cost in group.class_costs.items():
            entry = texts.setdefault(KERNEL_OF.get(name), [[], [], [], []])
            entry[2 * phase].append(f"({cost['flops']})")
            entry[2 * phase + 1].append(f"({cost['bytes']})")
    parts = []
    for kernel, (pf, pb, df, db) in sorted(texts.items(), key=lambda kv: kv[0] or ""):
        polys = [_poly(" + ".join(t) or "0", roles, f"{phase} group {g.id} {kernel} part")
                 for t, roles, phase, g in ((pf, roles_p, "prefill", prefill),
                                            (pb, roles_p, "prefill", prefill),
                                            (df, roles_d, "decode", decode),
                                            (db, roles_d, "decode", decode))]
        parts.append(Part(kernel, *polys))
    return tuple(parts)
