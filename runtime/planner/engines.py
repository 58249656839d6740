"""Serving engines: how a set of devices runs the model's kinds, and what one iteration costs.

Two shapes cover every policy:
- `LockstepEngine`: one model replica tensor-parallel over `shards` devices that runs every
  kind in turn (role "model": prefill and decode with chunked prefill; "prefill" or "decode":
  one phase only, for the phase-split policy).
- `OperatorEngine`: operator groups disaggregated into pools. Stateful attention kinds run on
  `attention` devices that hold the KV caches (requests spread over sets of
  `attention_shards` devices, each set splitting its requests' KV and attention by heads, as
  a tensor-parallel replica does, so a deep prompt chunk need not attend on one device
  alone); the dense kinds run
  on `dense_replicas` replicas, each sharded over `dense_shards` devices. Two micro-batches
  alternate between the pools (ping-pong), so one decode step takes
  max(traversal of a micro-batch, 2 x the busier pool's time per micro-batch).
  With `attention == 0` every kind shares the dense devices (co-located): each replica then
  holds its own requests, their KV and their tokens (nothing crosses between replicas
  unpriced), and a step lasts as long as the busiest replica's share.
Memory: a device keeps MEMORY_HEADROOM of its capacity free for activations and fragmentation.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields

from fxscale.contracts.plan import LockstepShape, OperatorShape
from fxscale.runtime.devices.model import UNMEASURED_ALL_REDUCE_LATENCY_S
from fxscale.runtime.planner.service import Batch, ServiceModel

MEMORY_HEADROOM = 0.10
NODE_DEVICES = 8  # devices one node links by NVLink (an HGX H100 / A100 board)


@dataclass(frozen=True)
class Mechanisms:
    """Which of operator-level scaling's mechanisms an operator deployment uses (all, unless
    an attribution switches some off): attention on devices of its own, sized apart from the
    dense pool; a prompt's chunk spread over the dense replicas (pooled prefill); attention
    devices that start without loading weights (with the policy's own decision interval,
    which the simulator's caller sets); copies of a one-replica engine sharing the arrivals
    beside one engine (model-level's replication, which the operator policy may also use)."""

    disaggregation: bool = True
    pooled_prefill: bool = True
    fast_start: bool = True
    copies: bool = True

    @property
    def names(self) -> tuple[str, ...]:
        """The mechanisms switched on."""
        return tuple(f.name for f in fields(self) if getattr(self, f.name))


ALL_MECHANISMS = Mechanisms()


@dataclass(frozen=True)
class LockstepEngine(LockstepShape):
    """A model replica (or a phase replica) tensor-parallel over `shards` devices: the Plan's
    shape with what one iteration costs."""

    prefill_lanes = 1  # one chunk of prompt tokens per step
    kv_holders = 1  # the replica's KV cache is one (sharded by heads)

    @staticmethod
    def prompt_lane(chunk: int) -> int:
        """Tokens one prompt may advance per step."""
        return chunk

    @staticmethod
    def prefill_unit(chunk: int) -> int:
        """Prompt tokens whose chunk sets a step's time: the replica's chunk."""
        return chunk

    def step(self, service: ServiceModel, batch: Batch) -> tuple[float, float]:
        """(seconds, busy device-seconds) of one iteration."""
        seconds = self.seconds(service, batch)
        return seconds, seconds * self.shards

    def seconds(self, service: ServiceModel, batch: Batch) -> float:
        """Seconds of one iteration: `step` without the busy accounting (what searches ask)."""
        return service.iteration_time(batch, self.shards)

    def kv_capacity_tokens(self, service: ServiceModel) -> float:
        """Tokens of KV cache that fit next to the weights (0 when the weights do not fit)."""
        free = self.shards * service.device.memory_bytes * (1 - MEMORY_HEADROOM) \
            - service.weight_bytes
        return max(0.0, free / service.kv_bytes_per_token)

    def load_bytes_per_device(self, service: ServiceModel) -> float:
        """Weight bytes each new device must load before it serves."""
        return service.weight_bytes / self.shards



@dataclass(frozen=True)
class OperatorEngine(OperatorShape):
    """Operator groups in pools, attention devices with the KV and dense replicas with
    weights: the Plan's shape with what one iteration costs."""

    @property
    def prefill_lanes(self) -> int:
        """Dense replicas each take a chunk of prompt tokens per step."""
        return self.dense_replicas

    @property
    def kv_holders(self) -> int:
        """Separate KV caches: one per set of attention devices, or per co-located replica."""
        return self.attention // self.attention_shards or self.dense_replicas

    def prompt_lane(self, chunk: int) -> int:
        """Tokens one prompt may advance per step: a disaggregated dense pool splits a
        prompt's tokens over its replicas (the hops to the attention devices are charged);
        co-located replicas each hold their own requests, so a prompt takes one chunk."""
        return chunk * self.dense_replicas if self.attention and self.pooled_prefill \
            else chunk

    def prefill_unit(self, chunk: int) -> int:
        """Prompt tokens whose chunk sets a step's time: one replica's chunk where each
        co-located replica steps its own prompts (the busiest sets the step), else every
        replica's, which a disaggregated dense pool shares."""
        return chunk * self.dense_replicas if self.attention else chunk

    def pool_times(self, service: ServiceModel, batch: Batch, accounting: bool = True
                   ) -> tuple[float, float, float, float]:
        """(attention pool s, dense pool s, communication s, busy device-seconds) for one
        micro-batch of a disaggregated engine; a pool's devices count as busy only while
        they hold work (0 without `accounting`, which searches skip)."""
        attention = dense = comm = busy = 0.0
        for kind in service.kinds:
            if kind.stateful:  # requests spread over the sets of attention devices
                # a request's attention runs where its KV lives: the busiest set, with a
                # whole prompt chunk and its share of the decodes, sets the pool's time
                holders, ways = self.kv_holders, self.attention_shards
                attention += service.kind_time(kind, busiest_share(batch, holders), ways)
                if accounting:
                    even = service.kind_time(kind, batch, ways, holders)
                    busy += even * ways * service.busy_replicas(kind, batch, holders)
                comm += kind.count * 2 * self._hop(service, batch, kind.out_bytes_per_token)
            else:
                seconds = service.kind_time(kind, batch, self.dense_shards, self.dense_replicas)
                dense += seconds
                if accounting:
                    busy += seconds * self.dense_shards * service.busy_replicas(
                        kind, batch, self.dense_replicas)
        return attention, dense, comm, busy

    def _hop(self, service: ServiceModel, batch: Batch, bytes_per_token: float) -> float:
        """Seconds to move one micro-batch's activations between pools, over as many links
        as the smaller pool has devices: within a node (an engine of at most NODE_DEVICES,
        which a plan numbers within one: group_placement), what a measured 2-device
        all-reduce of those bytes takes (one exchange over NVLink); beyond, the network."""
        links = max(1, min(self.attention, self.dense_replicas))
        nbytes = batch.tokens * max(bytes_per_token, 1.0) / links
        if self.devices <= NODE_DEVICES:
            return service.device.all_reduce_time(nbytes, 2)
        return UNMEASURED_ALL_REDUCE_LATENCY_S + nbytes / service.device.interconnect["network"]

    def step(self, service: ServiceModel, batch: Batch) -> tuple[float, float]:
        """(seconds, busy device-seconds) of one iteration over the whole batch."""
        if not self.attention:
            return self._colocated_step(service, batch)
        attention, dense, comm, busy = self.pool_times(service, batch.split(2))
        return ping_pong(attention, dense, comm), 2 * busy

    def seconds(self, service: ServiceModel, batch: Batch) -> float:
        """Seconds of one iteration: `step` without the busy accounting (what searches ask)."""
        if not self.attention:
            return self._busiest_seconds(service, batch)
        return ping_pong(*self.pool_times(service, batch.split(2), accounting=False)[:3])

    def _colocated_step(self, service: ServiceModel, batch: Batch) -> tuple[float, float]:
        """(seconds, busy device-seconds) of co-located replicas that each run their own
        requests, tensor parallel `dense_shards` ways: every busy replica holds an even
        part of the batch."""
        busy = min(float(self.dense_replicas), max(1.0, batch.prefill_n + batch.decode_n))
        even = service.iteration_time(batch.split(busy), self.dense_shards)
        return self._busiest_seconds(service, batch), even * busy * self.dense_shards

    def _busiest_seconds(self, service: ServiceModel, batch: Batch) -> float:
        """Seconds of co-located replicas' iteration: the busiest replica holds its even part
        of the prompts and of the decodes, but at least one whole request of each."""
        return service.iteration_time(busiest_share(batch, self.dense_replicas),
                                      self.dense_shards)

    def kv_capacity_tokens(self, service: ServiceModel) -> float:
        """Tokens of KV cache: the attention devices' memory, or what the weights leave free."""
        usable = service.device.memory_bytes * (1 - MEMORY_HEADROOM)
        if self.attention:
            return self.attention * usable / service.kv_bytes_per_token
        free = self.dense_shards * self.dense_replicas * usable \
            - self.dense_replicas * service.weight_bytes
        return max(0.0, free / service.kv_bytes_per_token)

    def dense_fits(self, service: ServiceModel) -> bool:
        """Whether one dense shard's weights fit a device (the KV check is the planner's)."""
        usable = service.device.memory_bytes * (1 - MEMORY_HEADROOM)
        return service.weight_bytes / self.dense_shards <= usable

    def load_bytes_per_device(self, service: ServiceModel) -> float:
        """Weight bytes a new dense device loads; attention devices load no weights."""
        return service.weight_bytes / self.dense_shards


def ping_pong(attention: float, dense: float, comm: float) -> float:
    """Seconds of a disaggregated step whose two micro-batches alternate between the pools,
    given one micro-batch's pool and hop times: its traversal, or twice the busier pool."""
    return max(attention + dense + comm, 2 * max(attention, dense))


def busiest_share(batch: Batch, replicas: int) -> Batch:
    """The part of a batch the busiest of `replicas` replicas holds, each request on one
    replica: an even part of the prompts and of the decodes, but at least one whole request
    of each."""
    def busiest(n: float) -> float:
        return 1.0 if n <= 1 else max(1 / replicas, 1 / n)

    p, d = busiest(batch.prefill_n), busiest(batch.decode_n)
    return Batch(batch.prefill_n * p, batch.prefill_s1 * p, batch.prefill_s2 * p,
                 batch.decode_n * d, batch.decode_s1 * d)


def engine_for(shape: LockstepShape | OperatorShape,
               mechanisms: Mechanisms = ALL_MECHANISMS) -> LockstepEngine | OperatorEngine:
    """The engine (with its costs) of a Plan's engine shape, an operator engine with the
    given mechanisms."""
    if isinstance(shape, LockstepShape):
        return shape if isinstance(shape, LockstepEngine) else LockstepEngine(**asdict(shape))
    return OperatorEngine(**{**asdict(shape_of(shape)), "pooled_prefill": shape.pooled_prefill
                             and mechanisms.pooled_prefill})


def shape_of(engine: LockstepShape | OperatorShape) -> LockstepShape | OperatorShape:
    """The Plan's shape of an engine (what a Plan holds and JSON carries)."""
    shape = LockstepShape if isinstance(engine, LockstepShape) else OperatorShape
    return shape(**{f.name: getattr(engine, f.name) for f in fields(shape)})
