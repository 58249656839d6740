"""Profiles: measurement, the Profile JSON contract, device models, the latency fit."""
from __future__ import annotations

import math

import pytest
import torch
from helpers import assert_bad_file_names_the_field

import fxscale
from fxscale.contracts.profile import GroupProfile, Profile, ProfilePoint
from fxscale.models import zoo
from fxscale.profiling import cpu_calibration
from fxscale.profiling.cpu_calibration import device_model
from fxscale.profiling.measure import Grid, profile
from fxscale.runtime.devices import device_names, load_device
from fxscale.runtime.devices.fit import fit_group, fit_points, predict


@pytest.fixture(scope="module")
def measured():
    torch._dynamo.reset()
    entry = zoo.build("llama", layers=1, hidden=128)
    result = profile(entry.model, Grid(batches=(1, 8), lengths=(8, 128)), lowering="eager",
                     repeats=15, progress=False)
    torch._dynamo.reset()
    return result


def test_profile_covers_every_group_and_point(measured):
    names = [g.name for g in measured.groups]
    assert len(names) == 5 and any("attention" in n for n in names)
    for g in measured.groups:
        assert len(g.points) == 2 * 2 * 2
        for p in g.points:
            assert 0 < p.p10_s <= p.median_s <= p.p90_s and p.repeats == 15
    assert measured.source == "measured" and measured.threads == torch.get_num_threads()
    assert {"torch", "fxscale", "transformers"} <= set(measured.versions)


def test_stateful_groups_are_marked(measured):
    assert [g.stateful for g in measured.groups] == ["attention" in g.name for g in measured.groups]


def test_grid_is_sorted_and_checked():
    grid = Grid(batches=(4, 1, 4), lengths=(64, 16))
    assert grid.batches == (1, 4) and grid.lengths == (16, 64)
    with pytest.raises(ValueError, match="grid phases"):
        Grid(phases=("training",))
    entry = zoo.build("gpt2", layers=1)  # 512 positions
    with pytest.raises(ValueError, match="grid lengths go up to 512.*lower the lengths"):
        profile(entry.model, Grid(batches=(1,), lengths=(512,)), lowering="eager",
                progress=False)


def test_profile_json_round_trip(measured, tmp_path):
    path = tmp_path / "profile.json"
    measured.to_json(path)
    assert Profile.from_json(path) == measured


def test_latency_grows_with_batch_and_length_where_cost_does(measured):
    # compared by the 10th percentile of 15 repeats: the least disturbed when another test
    # runs beside this one (the suite runs in two workers; a median of 5 once read 7.7 ms
    # for a 0.1 ms call)
    for g in measured.groups:
        small, large = g.at("prefill", 1, 8), g.at("prefill", 8, 128)
        if "gemm" in g.name or "attention" in g.name:
            # 128x the tokens; at hidden 128 the small call is mostly fixed overhead, so the
            # growth is ~3x here (2.96x on one CI run): 2x is clear of that noise
            assert large.p10_s > 2 * small.p10_s, g.name
    attention = next(g for g in measured.groups if "attention" in g.name)
    # decode attention reads a longer KV cache at a longer context
    assert attention.at("decode", 8, 128).p10_s > attention.at("decode", 8, 8).p10_s


def good_profile():
    point = ProfilePoint("prefill", 1, 16, 1e-3, 9e-4, 1.2e-3, 5)
    return Profile(model="m", granularity="operator", device="cpu", source="measured",
                   dtype="float32", threads=2, versions={"torch": "x"},
                   groups=[GroupProfile("g0", "top#0/gemm", [point])])


@pytest.mark.parametrize("mutate,message", [
    (lambda d: d.update(version=7), "field 'version' is 7"),
    (lambda d: d.pop("device"), "missing field 'device'"),
    (lambda d: d["groups"][0]["points"][0].pop("median_s"), "missing field 'groups\\[0\\].points\\[0\\].median_s'"),
    (lambda d: d["groups"][0]["points"][0].update(median_s=-1.0), "'groups\\[0\\].points\\[0\\].median_s' must be >= 0"),
    (lambda d: d["groups"][0]["points"][0].update(phase="warmup"), "'groups\\[0\\].points\\[0\\].phase' must be one of"),
    (lambda d: d["groups"][0]["points"][0].update(batch=0), "'groups\\[0\\].points\\[0\\].batch' must be >= 1"),
    (lambda d: d.update(threads="two"), "field 'threads' must be an integer"),
    (lambda d: d.update(groups={"g0": 1}), "field 'groups' must be a JSON array, got an object"),
    (lambda d: d["groups"][0]["points"][0].update(p90_s=float("inf")),
     "Infinity is not a JSON number"),
])
def test_bad_profile_file_names_the_field(tmp_path, mutate, message):
    assert_bad_file_names_the_field(Profile.from_json, good_profile().to_dict(), mutate,
                                    message, tmp_path)


def test_device_constants_load_with_sources():
    assert {"h100", "h200", "a100", "l4", "cpu"} <= set(device_names())
    h100 = load_device("h100")
    assert h100.peak("bf16") == pytest.approx(989.4e12) and h100.memory_bandwidth == 3.35e12
    assert h100.memory_bytes == 81559 * 2 ** 20 and h100.interconnect["nvlink"] == 900e9
    for name in ("h100", "h200", "a100", "l4"):
        device = load_device(name)
        for key in ("peak_flops", "memory_bandwidth", "memory_bytes", "max_power_w",
                    "idle_power_w", "efficiency"):
            assert device.sources.get(key), (name, key)
        assert device.idle_power_w < device.max_power_w
    assert load_device("h200").memory_bandwidth > h100.memory_bandwidth
    with pytest.raises(ValueError, match="unknown device 'tpu'"):
        load_device("tpu")
    with pytest.raises(ValueError, match="no peak rate for dtype 'fp8'"):
        load_device("a100").peak("fp8")


def test_analytic_model_on_closed_form_gemm_and_attention():
    """Costs from the cost pass fed to the H100 roofline equal the closed forms."""
    m, k, n = 4096, 8192, 8192

    class Gemm(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(k, n, bias=False, device="meta")

        def forward(self, x):
            return self.lin(x)

    graph = fxscale.explain(Gemm(), torch.randn(1, m, k, device="meta"), granularity="model")
    flops, moved = graph.total("flops"), graph.total("bytes_read") + graph.total("bytes_written")
    assert flops == 2 * m * k * n and moved == 4 * (m * k + k * n + m * n)
    h100 = load_device("h100")
    expected = h100.launch_overhead_s + max(flops / (989.4e12 * 0.75) + 5e-6,
                                            moved / (3.35e12 * 0.85) + 5e-6)
    assert h100.latency(flops, moved, "bf16") == pytest.approx(expected)
    assert h100.bound(flops, moved, "bf16") == "compute"
    one_row = graph.total("flops", batch=1, length=1)
    assert h100.bound(one_row, graph.total("bytes_read", 1, 1), "bf16") == "memory"

    heads, dim, length = 32, 128, 4096

    def attention(q, k, v):
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)

    q = torch.randn(1, heads, length, dim, device="meta")
    graph = fxscale.explain(attention, q, q.clone(), q.clone(), dynamic=False)
    assert graph.total("flops") == 4 * heads * length * length * dim
    assert graph.total("kv_bytes_per_token") == 2 * heads * dim * 4


def test_cpu_calibration_is_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("FXSCALE_CACHE_DIR", str(tmp_path))
    first = cpu_calibration.cpu_device()
    assert (tmp_path / "cpu-calibration.json").exists()
    assert first.peak("fp32") > 1e8 and first.memory_bandwidth > 1e8

    def fail():
        raise AssertionError("calibration should come from the cache")

    monkeypatch.setattr(cpu_calibration, "measure", fail)
    assert device_model("cpu") == first


def test_fit_recovers_an_exact_model():
    points = [ProfilePoint("prefill", b, n, 2e-5 + 1e-7 * b * n + 3e-10 * b * n * n,
                           0, 0, 1) for b in (1, 2, 4) for n in (16, 64, 256)]
    coef, knot = fit_points(points, stateful=True)
    assert [coef[0], coef[1] + (coef[2] if knot < 16 else 0), coef[3]] == pytest.approx(
        [2e-5, 1e-7, 3e-10], rel=1e-4)
    fit = fit_group(GroupProfile("g", "attention", points, stateful=True), stateful=True)
    assert fit["phases"]["prefill"]["heldout_mape"] < 1e-4
    assert predict(coef, knot, points[0], True) == pytest.approx(points[0].median_s)
    assert not math.isnan(fit["phases"]["prefill"]["median_latency_s"])


def test_fit_follows_a_gemm_that_turns_compute_bound():
    """Flat while weights dominate, then linear in tokens: the hinge finds the turn."""
    def gemm(tokens):
        return 1e-5 + max(1.28e-4, 1e-6 * tokens)  # turns at 128 tokens, a grid count

    points = [ProfilePoint("prefill", b, n, gemm(b * n), 0, 0, 1)
              for b in (1, 2, 4, 8) for n in (16, 32, 64, 128)]
    fit = fit_group(GroupProfile("g", "gemm", points), stateful=False)["phases"]["prefill"]
    assert fit["heldout_mape"] < 0.02 and fit["knot_tokens"] == 128
