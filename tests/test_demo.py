"""`fxscale demo`, short: both policies on the same devices, every device within its memory
throughout, model-level replicas only ever as whole copies of the weights, outputs equal to
Hugging Face greedy, and what it prints is what its JSON holds (live and predicted)."""
from __future__ import annotations

import json
import subprocess
import sys

from fxscale.studies.demo import FIGURES, POLICIES, format_figure


def test_a_short_demo_serves_both_policies_within_the_devices_and_prints_its_json(tmp_path):
    out, page = tmp_path / "demo.json", tmp_path / "demo.html"
    result = subprocess.run(
        [sys.executable, "-m", "fxscale", "demo", "--lowering", "eager", "--serve-seconds",
         "8", "--json", str(out), "--html", str(page)],
        capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "operator groups" in result.stdout and "-> OK" in result.stdout
    data = json.loads(out.read_text())
    memory = data["config"]["devices"]["memory"]
    replica = data["policies"]["model"]["groups"][0]  # the whole model as one group
    assert replica["stateful"] and replica["weight_bytes"] >= data["weight_bytes"] > 0
    assert list(data["policies"]) == list(POLICIES)
    for policy, run in data["policies"].items():
        summary = run["live"]["summary"]
        assert summary["completed"] == summary["requests"] == data["requests"] > 10, policy
        assert run["correct"]["checked"] >= 1
        assert run["correct"]["equal"] == run["correct"]["checked"], f"{policy}: not HF greedy"
        for side in ("live", "predicted"):
            timeline = run[side]["timeline"]
            assert len(timeline) > 10  # sampled throughout
            for row in timeline:
                held = [w + kv for w, kv in zip(row["device_weight_bytes"],
                                                row["device_kv_bytes"])]
                assert max(held) <= memory, (policy, side, row)
                if policy == "model":  # whole copies of the weights, never a part of one
                    copies = [w / replica["weight_bytes"] for w in row["device_weight_bytes"]]
                    assert all(c == int(c) for c in copies) and sum(copies) >= 1, row
    for key, label in FIGURES:  # each printed figure is the JSON's, live and predicted
        line = next(text for text in result.stdout.splitlines() if f" {label} " in text)
        cells = [cell.strip() for cell in line.split("│")[2:-1]]
        assert cells == [format_figure(key, run["figures"][side][key])
                         for run in data["policies"].values()
                         for side in ("live", "predicted")], (label, line)
    assert data["verdict"] in result.stdout.splitlines()
    html = page.read_text()
    assert html.startswith("<!DOCTYPE html>") and "device 0 KV MiB" in html


def test_the_sweep_page_is_labelled_predicted_and_names_the_demo_point_by_its_rule():
    from fxscale.studies.demo import DemoConfig
    from fxscale.studies.demo_sweep import chosen_point, sweep_markdown

    def row(count, memory, model, operator):
        figures = {"tokens_per_s": 100.0, "peak_kv_replicas": 1}
        return {"devices": count, "memory_mib": memory, "start_s": 0.0, "speedup": 2.0,
                "requests": 10, "model": {**figures, "slo_attainment": model},
                "operator": {**figures, "slo_attainment": operator},
                "difference": operator - model}

    rows = [row(1, 32, 0.20, 0.45),   # the largest gain, but operator-level under 50%
            row(1, 64, 0.90, 0.98),   # the demo's point
            row(2, 64, 1.00, 0.30),   # model-level far ahead
            {**row(1, 16, 0, 0), "model": {"error": "no room"}, "difference": None}]
    result = {"config": DemoConfig().to_dict(), "rows": rows, "seconds": 1.0}
    assert chosen_point(result) is rows[1]
    page = sweep_markdown(result, "fxscale demo --sweep x.md")
    assert "**predicted**" in page and "fxscale demo --sweep x.md" in page
    assert "does not fit" in page and "operator-level ahead at 2, model-level at 1" in page
    assert "1 device(s) of 64 MiB" in page


def test_the_verdict_names_a_winner_only_past_the_tie_margins():
    from fxscale.studies.demo import verdict

    def results(operator, model, operator_tokens=100.0):
        def run(attainment, tokens):
            figures = {"slo_attainment": attainment, "tokens_per_s": tokens,
                       "peak_kv_replicas": 1, "peak_kv_blocks": 10}
            return {"figures": {"live": figures}, "kv_blocks_per_replica": 4,
                    "groups": [{"stateful": True, "kv_bytes": 4096}]}
        return {"weight_bytes": 1 << 20, "policies": {"model": run(model, 100.0),
                                                      "operator": run(operator,
                                                                      operator_tokens)}}

    assert verdict(results(0.91, 0.90, 50.0)).startswith("Model-level did better")
    assert verdict(results(0.91, 0.90)).startswith("A tie")
    assert verdict(results(0.99, 0.50)).startswith("Operator-level did better")
    assert verdict(results(None, None)).startswith("A tie")  # no requests: no crash
