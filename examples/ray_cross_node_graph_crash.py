"""Why fxscale builds Ray Compiled Graphs only among actors on the server's node: a reduced
reproducer of the Ray 2.60 raylet crash behind that rule (docs/ray.md; the same check
failure as ray-project/ray#63229, open, where a reproducer was asked for).

Two Ray nodes on this machine (loopback only, one CPU each), an actor on each, a graph of
three calls across them (A -> B -> A). Each round compiles the graph, runs 20 steps, kills
one of the actors (alternately), runs a step that fails, tears the graph down and starts a
new actor. Within a few dozen rounds a raylet dies:

    experimental_mutable_object_provider.cc:154 Check failed: WriteAcquire(...)
    Status not OK: ChannelError: Channel closed

On this machine (Ray 2.60.0) a raylet died in rounds 24, 13 and 7 of three runs (also in
a variant that skipped the teardown after a kill); the same rounds without the kill ran
60 rounds clean. The script prints each round and exits 1 when a raylet died, 0 when
every round ran, 2 when a round failed otherwise.

    python examples/ray_cross_node_graph_crash.py [--rounds 60] [--no-kill]
"""
from __future__ import annotations

import argparse
import sys

import ray
import torch
from ray.cluster_utils import Cluster
from ray.dag import InputNode, MultiOutputNode

from fxscale.runtime.executors.ray_executor import loopback_only


@ray.remote(num_cpus=0)
class Stage:
    """An actor standing for a group replica."""

    def step(self, x: torch.Tensor) -> torch.Tensor:
        return x + 1


def stage_on(node: str):
    """A Stage actor on the node that has the resource `node`."""
    return Stage.options(resources={node: 0.01}).remote()


def one_round(actors: dict, x: torch.Tensor, round_: int, kill: bool) -> None:
    """Compile A -> B -> A, run 20 steps, kill an actor (alternately) and run a step, tear
    the graph down, replace the killed actor."""
    with InputNode() as step_input:
        first = actors["node_a"].step.bind(step_input)
        second = actors["node_b"].step.bind(first)
        graph = MultiOutputNode(
            [first, second, actors["node_a"].step.bind(second)]).experimental_compile()
    for _ in range(20):
        ray.get(graph.execute(x))
    victim = ("node_a", "node_b")[round_ % 2]
    if kill:
        ray.kill(actors[victim])
        try:
            ray.get(graph.execute(x), timeout=30)
        except ray.exceptions.RayError:  # the kill: expected
            pass
    graph.teardown()
    if kill:
        actors[victim] = stage_on(victim)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=60)
    parser.add_argument("--no-kill", action="store_true", help="tear down without a kill")
    args = parser.parse_args()
    node = {"num_cpus": 1, "object_store_memory": 256 << 20, "node_ip_address": "127.0.0.1"}
    with loopback_only():
        cluster = Cluster(initialize_head=True, connect=True,
                          head_node_args={**node, "resources": {"node_a": 1},
                                          "include_dashboard": False})
        cluster.add_node(**node, resources={"node_b": 1})
        cluster.wait_for_nodes()
    try:
        actors = {"node_a": stage_on("node_a"), "node_b": stage_on("node_b")}
        x = torch.zeros(16, 512)
        for round_ in range(args.rounds):
            failed = None
            try:
                one_round(actors, x, round_, kill=not args.no_kill)
            except ray.exceptions.RayError as error:  # the graph's node went with the raylet?
                failed = f"{type(error).__name__}: {error}".splitlines()[0]
            try:
                alive = all(node["Alive"] for node in ray.nodes())
            except Exception:  # noqa: BLE001 - the head's raylet is gone: no answer
                alive = False
            if not alive:
                print(f"round {round_}: a raylet died (its check failure is above)", flush=True)
                return 1
            if failed:
                print(f"round {round_}: Ray failed, every node alive: {failed}", flush=True)
                return 2
            print(f"round {round_}: every node alive", flush=True)
        print(f"{args.rounds} rounds, no node died")
        return 0
    finally:
        ray.shutdown()
        cluster.shutdown()


if __name__ == "__main__":
    sys.exit(main())
