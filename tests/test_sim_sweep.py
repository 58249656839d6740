"""The simulator's map: slices through a base point, every cell both policies on the same
requests, written as JSON, Markdown and heatmaps."""
from __future__ import annotations

import json

import pytest

from fxscale.cli.main import main
from fxscale.runtime.simulator import sweep as sweep_module
from fxscale.runtime.simulator.sweep import SweepPoint, run_point, sweep_plan
from fxscale.runtime.traces.loaders import load_trace, renewal_resample


def test_burstier_arrivals_have_the_asked_gap_variation_at_the_same_rate():
    base = load_trace("azure-conv")
    for cv in (0.5, 1.0, 4.0):
        trace = renewal_resample(base, 5.0, 4000.0, 1, cv)
        gaps = [b.arrival_s - a.arrival_s for a, b in zip(trace.requests, trace.requests[1:])]
        mean = sum(gaps) / len(gaps)
        spread = (sum((g - mean) ** 2 for g in gaps) / len(gaps)) ** 0.5
        assert mean == pytest.approx(1 / 5.0, rel=0.05)
        assert spread / mean == pytest.approx(cv, rel=0.1)
    with pytest.raises(ValueError, match="cv > 0"):
        renewal_resample(base, 5.0, 10.0, 1, 0.0)


def test_a_point_replays_both_policies_on_the_same_requests(tmp_path, monkeypatch):
    from fxscale.models.presets import preset_service

    monkeypatch.setenv("FXSCALE_CACHE_DIR", str(tmp_path))
    point = SweepPoint(model="llama-2-7b", layers=2, rate_rps=4.0, seconds=20.0)
    service = preset_service(point.model, point.device, point.layers)
    cell = run_point(point, service)
    assert cell["requests"] > 40
    assert cell["gpu_hours_ratio"] == pytest.approx(
        cell["gpu_hours"]["operator"] / cell["gpu_hours"]["model"])
    assert cell["energy_ratio"] == pytest.approx(
        cell["energy_kwh"]["operator"] / cell["energy_kwh"]["model"])
    assert set(cell["met"]) == {"model", "operator"}
    plan = sweep_plan("full")
    assert plan.points == 4 * 4 + 2 * 3 + 3 * 4 + 4 * 4
    base = plan.base
    for (x, xs), (y, ys) in plan.slices:  # every slice passes through the base point
        assert getattr(base, x) in xs and getattr(base, y) in ys
    with pytest.raises(ValueError, match="sweep set must be one of"):
        sweep_plan("huge")


def test_the_quick_sweep_writes_json_markdown_and_heatmaps(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("FXSCALE_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(sweep_module, "QUICK_SECONDS", 15.0)
    monkeypatch.setattr(sweep_module, "QUICK_AXES", {"rate_rps": (2.0, 4.0),
                                                     "burstiness": (1.0, 3.0)})
    out = tmp_path / "map"
    assert main(["simulate", "--sweep", "quick", "--model", "llama-2-7b", "--layers", "2",
                 "--sweep-dir", str(out)]) == 0
    data = json.loads((out / "sweep.json").read_text())
    grid = data["slices"][0]["grid"]
    assert [len(row) for row in grid] == [2, 2]
    assert [[c["point"]["rate_rps"] for c in row] for row in grid] == [[2.0, 4.0]] * 2
    assert [row[0]["point"]["burstiness"] for row in grid] == [1.0, 3.0]
    assert data["base"]["seconds"] == 15.0 and data["wall_s"] > 0
    assert (out / "rate_rps-burstiness.png").read_bytes()[:4] == b"\x89PNG"
    assert b"<svg" in (out / "rate_rps-burstiness.svg").read_bytes()[:400]
    page = (out / "sweep.md").read_text()
    assert "rate_rps-burstiness.svg" in page and page.count("req/s") >= 2
    assert "fxscale simulate --sweep quick --model llama-2-7b --layers 2" in page
    assert str(out / "sweep.json") in capsys.readouterr().out


def test_a_point_where_no_operator_deployment_serves_is_a_dash_not_a_crash(tmp_path,
                                                                          monkeypatch):
    """A cell where the planner finds no operator deployment that meets the SLO keeps the
    model-level numbers, has no ratio (a dash in the page, blank in the heatmap) and says
    why in the JSON."""
    from fxscale.runtime.planner import search

    monkeypatch.setenv("FXSCALE_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(sweep_module, "QUICK_SECONDS", 15.0)
    monkeypatch.setattr(sweep_module, "QUICK_AXES", {"rate_rps": (2.0, 4.0),
                                                     "burstiness": (1.0,)})
    monkeypatch.setattr(search, "_candidates_operator", lambda *args: iter(()))
    out = tmp_path / "map"
    assert main(["simulate", "--sweep", "quick", "--model", "llama-2-7b", "--layers", "2",
                 "--sweep-dir", str(out)]) == 0
    cells = json.loads((out / "sweep.json").read_text())["slices"][0]["grid"][0]
    for cell in cells:
        assert cell["gpu_hours_ratio"] is None and cell["gpu_hours"]["operator"] is None
        assert cell["gpu_hours"]["model"] > 0 and not cell["met"]["operator"]
        assert "no operator deployment" in cell["infeasible"]["operator"]
    assert "| — / — (" in (out / "sweep.md").read_text()
    assert (out / "rate_rps-burstiness.png").read_bytes()[:4] == b"\x89PNG"


def test_a_skewed_routing_is_not_silently_dropped_by_the_sweep(tmp_path, capsys):
    """--expert-skew is not a sweep axis: asking for both is a clear error, nothing runs."""
    out = tmp_path / "map"
    assert main(["simulate", "--sweep", "quick", "--expert-skew", "1.0",
                 "--sweep-dir", str(out)]) != 0
    assert "--expert-skew is not an axis of --sweep" in capsys.readouterr().err
    assert not out.exists()
