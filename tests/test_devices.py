"""Devices in the engine: every replica placed on a device whose memory holds its weights and
KV caches, refused when none has room (nothing changed), its calls on that device's slots;
the same devices bind a model-level deployment (each replica a whole copy of the weights)
sooner than an operator-level one (a new attention replica holds KV blocks only)."""
from __future__ import annotations

import threading

import pytest
import torch

import fxscale
from fxscale.contracts.devices import Devices, PlacementError, format_bytes, parse_bytes
from fxscale.contracts.errors import InputError
from fxscale.contracts.placement import Demand, Placement
from fxscale.models import zoo


def test_devices_are_read_from_text_and_bad_shapes_are_named():
    assert Devices.parse("4x512MiB") == Devices(4, 512 << 20, 1)
    assert Devices.parse("2x1.5GiBx2") == Devices(2, 3 << 29, 2)
    assert parse_bytes("2e9") == 2_000_000_000 and format_bytes(3 << 29) == "1.5 GiB"
    for bad, says in (("4", "COUNTxMEMORY"), ("4x12parsecs", "unit"), ("0x1GiB", "count"),
                      ("2x1GiBxtwo", "slots")):
        with pytest.raises(InputError, match=says):
            Devices.parse(bad)
    with pytest.raises(ValueError, match="memory must be a positive"):
        Devices(2, 0)
    with pytest.raises(ValueError, match=r"per_node must be an integer from 1 to the count \(2\)"):
        Devices(2, per_node=3)
    assert Devices(4, per_node=2).describe().endswith("2 per node")


def test_placement_keeps_attention_layers_together_and_spreads_copies_of_a_group():
    placement = Placement(Devices(2, 1000, 1))
    assert placement.place(Demand("a", 0, 100, 0)) == 0
    assert placement.place(Demand("b", 0, 100, 0)) == 1        # fewest replicas
    assert placement.place(Demand("a", 1, 100, 0)) == 1        # a second copy: elsewhere
    first = placement.place(Demand("layer0/attention", 7, 0, 300, affinity=7))
    assert placement.place(Demand("layer1/attention", 7, 0, 300, affinity=7)) == first
    with pytest.raises(PlacementError, match="room for a replica of big .*most free"):
        placement.place(Demand("big", 0, 900, 0))
    before = placement.stats()
    with pytest.raises(PlacementError):       # each would fit alone, not both
        placement.check([Demand("c", 0, 350, 0), Demand("c", 1, 350, 0),
                         Demand("c", 2, 350, 0)])
    assert placement.stats()["devices"] == before["devices"]   # a check places nothing
    with pytest.raises(PlacementError):  # 800 B free at most: "big" fits only once "a"
        placement.check([Demand("big", 0, 900, 0)])          # and "b" stop in the change
    placement.check([Demand("big", 0, 900, 0)], releases=[("b", 0), ("a", 1)])
    assert placement.stats()["devices"] == before["devices"]   # nor frees anything
    placement.release("layer0/attention", 7)
    rows = placement.stats()["devices"]
    assert sum(r["kv_bytes"] for r in rows) == 300 and rows[first]["peak_bytes"] >= 700
    placement.reset_peaks()  # a fresh measurement starts from what is held now
    assert placement.stats()["devices"][first]["peak_bytes"] == 400


def test_a_pinned_group_lands_only_on_its_devices_and_says_so_when_they_are_full():
    placement = Placement(Devices(3, 1000, 1))
    assert placement.place(Demand("a", 0, 600, 0)) == 0
    placement.pin("a", (1, 2))
    assert placement.misplaced("a") == [0]                  # it stays until replaced
    assert {placement.place(Demand("a", k, 600, 0)) for k in (1, 2)} == {1, 2}
    assert placement.place(Demand("b", 0, 100, 0)) == 0     # unpinned: the emptiest device
    with pytest.raises(PlacementError, match=r"devices \[1, 2\] it is pinned to .* 400 B"):
        placement.place(Demand("a", 3, 600, 0))             # device 0 has room, not allowed
    with pytest.raises(ValueError, match="devices are 0 to 2"):
        placement.pin("a", (3,))
    assert placement.stats()["pins"] == {"a": [1, 2]}
    placement.pin("a", ())
    assert placement.misplaced("a") == [] and placement.stats()["pins"] == {}


@pytest.fixture(scope="module")
def llama():
    return zoo.build("llama", layers=2, hidden=64).model.eval()


def eager_tokens(model, ids, new):
    """Hugging Face greedy generate: the reference."""
    with torch.no_grad():
        return model.generate(ids, max_new_tokens=new, do_sample=False)[0, ids.shape[1]:].tolist()


def within_memory(server, memory):
    """Each device's bytes, measured from the tensors its replicas hold, fit its memory."""
    held = server.device_bytes()
    assert all(d["weight_bytes"] + d["kv_bytes"] <= memory for d in held), held
    return held


def test_the_same_devices_hold_two_model_replicas_or_three_attention_replicas(llama):
    """Devices of 1.5x a model replica each: model-level stops at one replica per device
    (each a whole copy of the weights); operator-level places the weights once and fits a
    third attention replica's KV blocks. Refusals change nothing; tokens stay HF greedy's."""
    weights = sum(p.numel() * p.element_size() for p in llama.parameters())
    with fxscale.serve(llama, policy="model", budget=1, kv_cache_tokens=1024) as probe:
        kv = probe.stats()["devices"]["devices"][0]["kv_bytes"]
    memory = weights + kv + kv // 2
    devices = Devices(2, memory, 1)
    reached = {}
    for policy, group in (("model", "*"), ("operator", "*attention*")):
        with fxscale.serve(llama, policy=policy, devices=devices, kv_cache_tokens=1024) as s:
            count = 1
            while True:
                try:
                    s.scale(group, count + 1)
                except PlacementError as err:
                    assert "no device has room" in str(err)
                    break
                count += 1
            reached[policy] = count
            before = (s.device_bytes(), s.stats()["engine"]["attention_replicas"])
            with pytest.raises(PlacementError):
                s.scale(group, count + 1)
            assert (s.device_bytes(), s.stats()["engine"]["attention_replicas"]) == before
            held = within_memory(s, memory)
            if policy == "model":  # every model replica: the whole weights on its device
                rows = s.stats()["devices"]["devices"]
                for row, used in zip(rows, held):
                    assert used["weight_bytes"] >= weights * len(row["replicas"])
                    assert all(r.startswith("model#") for r in row["replicas"])
            ids = [torch.randint(3, 256, (1, n)) for n in (3, 9, 5, 12, 7, 4, 11, 6)]
            futures = [s.generate(i, max_new_tokens=6, ignore_eos=True) for i in ids]
            for i, future in zip(ids, futures):
                assert future.result(timeout=120) == eager_tokens(llama, i, 6)
            within_memory(s, memory)
    assert reached == {"model": 2, "operator": 3}, reached


def test_a_model_too_large_for_one_device_is_refused_at_start(llama):
    with pytest.raises(PlacementError, match="no device has room"):
        fxscale.serve(llama, policy="model", devices="2x300KiB", kv_cache_tokens=1024)


def test_a_replica_runs_on_its_own_device_slots(llama):
    """Holding device 0's only slot stops the replicas placed there and no others."""
    with fxscale.serve(llama, policy="model", devices=Devices(2, None, 1),
                       kv_cache_tokens=1024, replicas=2) as server:
        slot = server.placement.slots[0]
        rows = server.stats()["devices"]["devices"]
        assert [len(r["replicas"]) for r in rows] == [1, 1]
        with slot:
            done = threading.Event()
            engine = next(e for e in server.engines
                          if server.placement.device_of("model", min(e.scheduler.pools)) == 1)
            record = engine.add([5, 6, 7], 3, ignore_eos=True)
            record.future.add_done_callback(lambda _: done.set())
            assert done.wait(60), "a replica on device 1 waited for device 0's slot"


def test_budget_and_devices_must_agree(llama):
    with pytest.raises(ValueError, match="disagrees with devices"):
        fxscale.serve(llama, budget=3, devices=Devices(2, None, 1))
