"""The device models against Vidur's measured GPU profiles (runtime/devices/vidur): the
all-reduce constants are a fit that predicts held-out message sizes within 10%, and the
catalogue holds that fit."""
from __future__ import annotations

import json
from dataclasses import asdict, replace

import numpy as np
import pytest

from fxscale.models.presets import preset_service
from fxscale.runtime.devices import load_device
from fxscale.runtime.devices.calibrate import (
    COMPUTE_FILES,
    GEMMS,
    KERNEL_CLASSES,
    _rows,
    all_reduce_report,
    dense_report,
    fit_ring,
    kernel_fits,
    load_all_reduce,
    main,
)
from fxscale.runtime.devices.model import ring_all_reduce_time
from fxscale.runtime.planner.service import Batch


def test_the_ring_fit_recovers_known_constants_from_noisy_times():
    rng = np.random.default_rng(0)
    sizes = np.linspace(2048, 64 << 20, 300)
    times = ring_all_reduce_time(sizes, 4, 25e-6, 300e9) * rng.uniform(0.97, 1.03, sizes.size)
    latency, bandwidth = fit_ring(sizes, times, 4)
    assert latency == pytest.approx(25e-6, rel=0.1) and bandwidth == pytest.approx(300e9, rel=0.03)


@pytest.mark.parametrize("device", ["h100", "a100"])
def test_all_reduce_is_calibrated_and_predicts_held_out_sizes_within_10_percent(device):
    rows = all_reduce_report(device)
    assert [r["workers"] for r in rows] == [2, 4, 8]
    model = load_device(device)
    for r in rows:
        assert r["sizes"] > 900  # 2 KB to 64 MB
        assert r["heldout_error"] <= 0.10, r
        assert r["catalogued_error"] <= 0.10, r  # the catalogue holds the calibrated model
        latency, bandwidth = model.all_reduce[r["workers"]]
        assert latency == pytest.approx(r["latency_s"], rel=0.01)
        assert bandwidth == pytest.approx(r["bandwidth"], rel=0.01)
    # NVLink's datasheet figure (900 / 600 GB/s, both directions) is not what a ring reaches:
    # the datasheet model was 2.5x or more too fast
    assert all(r["bandwidth"] < 0.5 * model.interconnect["nvlink"] for r in rows)
    assert all(r["datasheet_error"] > 0.5 for r in rows)


@pytest.mark.parametrize("device", ["h100", "a100"])
def test_measured_sizes_are_within_one_node_and_sorted(device):
    measured = load_all_reduce(device)
    assert sorted(measured) == [2, 4, 8]  # the A100 file's rows across nodes are left out
    for sizes, times in measured.values():
        assert np.all(np.diff(sizes) > 0) and np.all(times > 0)


def test_a_device_without_measurements_keeps_the_stated_ring_over_its_links():
    l4 = load_device("l4")
    assert l4.all_reduce == {}
    assert l4.all_reduce_time(1e6, 2) == pytest.approx(
        ring_all_reduce_time(1e6, 2, 10e-6, l4.interconnect["pcie"]))
    assert l4.all_reduce_time(1e6, 1) == 0.0
    h100 = load_device("h100")  # an unmeasured worker count takes the next measured one
    assert h100.all_reduce_time(1e6, 3) == pytest.approx(
        ring_all_reduce_time(1e6, 3, *h100.all_reduce[4]))


@pytest.mark.parametrize("device", ["h100", "a100"])
def test_dense_kernel_classes_are_fitted_and_predict_held_out_degrees(device):
    rows = {r["op"]: r for r in dense_report(device)}
    assert {r["kernel"] for r in rows.values()} == {"gemm", "norm", "embedding", "rotary",
                                                    "activation", "residual"}
    for r in rows.values():
        assert r["catalogued_error"] <= 0.10, r  # the catalogue holds the fit on every degree
        # fitted on TP 1-2, scored on 4-8; H100's down projection runs 10-19% faster at 4-8
        # than its shape predicts from 1-2 (docs/devices.md): it misses, and is bounded here
        limit = 0.16 if (device, r["op"]) == ("h100", "mlp_down_proj") else 0.101
        assert r["error_tp_4_8"] <= limit, r
    for op in ("input_layernorm", "post_attention_layernorm", "emb", "attn_rope", "add"):
        assert rows[op]["roofline_error_tp_4_8"] > 0.3  # one bandwidth does not fit them
    catalogued = load_device(device).kernels
    for kernel, fit in kernel_fits(device).items():
        for name, value in asdict(fit).items():
            held = getattr(catalogued[kernel], name)
            assert held == (value if value is None else pytest.approx(value, rel=1e-3)), name
    assert load_device("h200").kernels == {}  # unmeasured: the roofline, stated


@pytest.mark.parametrize("device", ["h100", "a100"])
def test_a_70b_layer_costs_what_vidur_measured_for_each_kernel_class(device, tmp_path,
                                                                      monkeypatch):
    """Review finding 4: the service model's dense work, from the graph's per-class costs and
    the device's kernel fits, against the measured operators at tensor parallelism 4 and 8
    (the roofline was 6-10% off on the GEMMs, 67-71% on the norms and 21-98% on the rotary,
    activation and residual-add kernels, which one pointwise class could not tell apart)."""
    monkeypatch.setenv("FXSCALE_CACHE_DIR", str(tmp_path))
    service = preset_service("llama-2-70b", device, layers=2)
    layer = [k for k in service.kinds if k.name.startswith("model.layers") and not k.stateful]
    rows = [r for r in _rows(COMPUTE_FILES[device])
            if int(r["num_tensor_parallel_workers"]) >= 4]
    # per layer: the GEMMs and norms of both dense groups, one rotation, one activation, two
    # residual adds (each measured alone)
    measured_ops = {"gemm": (GEMMS, 2), "norm": (KERNEL_CLASSES["norm"], 2),
                    "rotary": (("attn_rope",), 1), "activation": (("mlp_act",), 1),
                    "residual": (("add", "add"), 1)}
    errors = {kernel: [] for kernel in measured_ops}
    for row in rows:
        tokens, tp = float(row["num_tokens"]), int(row["num_tensor_parallel_workers"])
        batch = Batch(1, tokens, tokens * tokens)
        for kernel, (ops, groups) in measured_ops.items():
            measured = sum(float(row[f"time_stats.{op}.median"]) * 1e-3 for op in ops)
            parts = [p for k in layer for p in k.parts if p.kernel == kernel]
            assert len(parts) == groups  # e.g. QKV and its norm; the rest and its norm
            kinds = [replace(k, parts=(p,), count=1) for k in layer for p in k.parts
                     if p.kernel == kernel]
            predicted = sum(service.kind_time(k, batch, tp) - service.device.all_reduce_time(
                tokens * k.out_bytes_per_token, tp) for k in kinds)
            errors[kernel].append(abs(predicted / measured - 1))
    medians = {kernel: float(np.median(e)) for kernel, e in errors.items()}
    assert max(medians.values()) <= 0.10, medians
    assert medians["gemm"] <= 0.07 and medians["norm"] <= 0.08, medians


def test_the_calibration_report_runs(capsys):
    rows = dense_report("h100")
    assert main([]) == 0
    out = capsys.readouterr().out
    assert out.count("| h100 |") == 3 + len(rows) + len(KERNEL_CLASSES)  # all-reduce, ops, fits
    assert main(["--json", "-"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert len(data["all_reduce"]) == 6 and len(data["dense"]) == 2 * len(rows)
