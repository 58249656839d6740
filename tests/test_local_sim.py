"""The discrete-event model of the local runtime, on scenarios with known answers."""
from __future__ import annotations

import time

import pytest

from fxscale.contracts.profile import GroupProfile, ProfilePoint
from fxscale.contracts.trace import Request
from fxscale.runtime.devices.fit import fit_group
from fxscale.runtime.simulator.local import LocalSimulation, SimGroup, profile_latency


def group(name, latency, batches=False, stateful=False):
    return SimGroup(name, batches=batches, stateful=stateful, context_keyed=False,
                    latency=latency)


def one_each(_t):
    return {}


def test_budget_of_one_serialises_calls():
    g = group("g", lambda phase, b, n: 0.010)
    requests = [Request(0.0, 4, 1), Request(0.0, 4, 1)]
    times = LocalSimulation([g], requests, budget=1, replicas=one_each).run()
    assert sorted(t[0] for t in times) == pytest.approx([0.010, 0.020])


def test_row_wise_calls_arriving_together_run_as_one_batch():
    g = group("g", lambda phase, b, n: 0.005 + 0.001 * b, batches=True)
    requests = [Request(at, 4, 1) for at in (0.0, 0.1) for _ in range(4)]
    times = LocalSimulation([g], requests, budget=1, replicas=one_each).run()
    # gathered until arrivals pause (0.5 ms), then one execution of 4 calls (9 ms); the
    # signature's first batch is also run one by one (4 x 6 ms), as the server checks it
    assert [t[0] for t in times[:4]] == pytest.approx([0.0335] * 4)
    # the second batch is not checked; it gathers for a quarter of the mean execution so
    # far (33 ms over 5 executions)
    assert [t[0] for t in times[4:]] == pytest.approx([0.1 + 0.25 * 0.0066 + 0.009] * 4)


def test_prefill_of_different_lengths_does_not_batch():
    g = group("g", lambda phase, b, n: 0.001 * n, batches=True)
    requests = [Request(0.0, 4, 1), Request(0.0, 8, 1)]
    times = LocalSimulation([g], requests, budget=2, replicas=one_each).run()
    assert sorted(t[0] for t in times) == pytest.approx([0.0005 + 0.004, 0.0005 + 0.004 + 0.008])


def test_a_request_passes_every_group_once_per_token_with_the_hop_cost():
    a = group("a", lambda phase, b, n: 0.002 if phase == "prefill" else 0.001)
    s = group("s", lambda phase, b, n: 0.003, stateful=True)
    times = LocalSimulation([a, s], [Request(1.0, 4, 3)], budget=2, replicas=one_each,
                            hop_s={"prefill": 0.0002, "decode": 0.0001}).run()[0]
    prefill = 0.0002 + 0.002 + 0.0002 + 0.003
    decode = 0.0001 + 0.001 + 0.0001 + 0.003
    assert times == pytest.approx([1.0 + prefill, 1.0 + prefill + decode,
                                   1.0 + prefill + 2 * decode])


def test_more_replicas_from_the_timeline_run_calls_side_by_side():
    g = group("g", lambda phase, b, n: 0.010)
    requests = [Request(0.0, 4, 1), Request(0.0, 4, 1)]
    times = LocalSimulation([g], requests, budget=2, replicas=lambda t: {"g": 2}).run()
    assert [t[0] for t in times] == pytest.approx([0.010, 0.010])


def test_profile_latency_is_measured_where_measured_and_fitted_elsewhere():
    points = [ProfilePoint("decode", b, n, 0.002 + 0.0005 * b, 0, 0, 3)
              for b in (1, 2, 4, 8) for n in (16, 32)]
    points[0] = ProfilePoint("decode", 1, 16, 0.004, 0, 0, 3)  # a quirk off the line
    profile = GroupProfile("g1", "gemm", points)
    profile.fit = fit_group(profile, stateful=False)
    latency = profile_latency(profile)
    assert latency("decode", 1, 16) == 0.004
    assert latency("decode", 4, 16) == 0.004  # measured, on the line
    fitted = latency("decode", 3, 24)  # not measured: the fit, close to the line
    assert fitted == pytest.approx(0.0035, rel=0.1) and fitted != 0.0035
    with pytest.raises(ValueError, match="no prefill points"):
        latency("prefill", 1, 16)
    with pytest.raises(ValueError, match="no fit"):
        profile_latency(GroupProfile("g2", "x", points))


def test_executions_share_the_machine_as_its_capacity_says():
    g = group("g", lambda phase, b, n: 0.010)
    requests = [Request(0.0, 4, 1), Request(0.0, 4, 1)]

    def first_tokens(capacity):
        return [t[0] for t in LocalSimulation([g], requests, budget=2,
                                              replicas=lambda t: {"g": 2},
                                              capacity=capacity).run()]

    assert first_tokens((1.0,)) == pytest.approx([0.020, 0.020])  # one core: half speed each
    assert first_tokens((1.0, 2.0)) == pytest.approx([0.010, 0.010])
    # two cores that give 1.6x together (shared memory bandwidth): 0.8 speed each
    assert first_tokens((1.0, 1.6)) == pytest.approx([0.0125, 0.0125])


def synthetic_measurement(live_tbt_s=0.011, two_jobs=(2.0, 2.0)):
    """A measurement of one non-batching group of 10 ms per call, whose live run measured
    TTFT 12 ms (what the model must predict for a lone request) and the given TBT, on a
    machine whose two-job capacity was `two_jobs` before and after it."""
    from fxscale.contracts.profile import Profile
    from fxscale.runtime.devices.fit import fit_profile
    from fxscale.studies.demo import DemoConfig

    points = [ProfilePoint(phase, b, n, 0.010, 0.010, 0.010, 3)
              for phase in ("prefill", "decode") for b in (1, 2, 4) for n in (8, 16, 32)]
    profile = fit_profile(Profile("m", "model", "cpu", "measured", "fp32", 1, {},
                                  [GroupProfile("g0", "model", points, stateful=True)]))
    config = DemoConfig(seconds=0.5, speedup=1.0, max_new=4)
    requests = config.requests()
    assert requests, "the first half second of the trace has requests"
    live_rows = [{"arrival_s": r.arrival_s, "outcome": "ok", "ttft_s": 0.012,
                  "tbt_s": live_tbt_s} for r in requests]
    return {"policy": "model", "config": vars(config), "profile": profile.to_dict(),
            "groups": [{"name": "model", "batches": False, "stateful": True,
                        "context_keyed": True}],
            "capacity": [1.0, 2.0],
            "capacity_before_after": [[1.0, two_jobs[0]], [1.0, two_jobs[1]]],
            "alone": {"ttft_s": 0.012, "tbt_s": 0.011,    # 2 ms and 1 ms of Python
                      "thread_cpu_s": 0.001, "replica_python_s": 0.001,
                      "execution_s": {"model": 0.040}},  # as profiled: 4 calls of 10 ms
            "live": {"requests": live_rows, "timeline": [{"t": 0.0, "replicas": {"model": 2}}],
                     "summary": {}}}


def test_token_timings_are_first_token_latency_and_the_mean_gap_after_it():
    """The one TTFT/TBT definition the server and the model share: tokens at 1.5, 2.0, 2.1
    and 2.7 s of a request that arrived at 1.0 s; a single token has no TBT."""
    from fxscale.contracts.metrics import token_timings

    assert token_timings(1.0, [1.5, 2.0, 2.1, 2.7]) == pytest.approx({"ttft_s": 0.5,
                                                                      "tbt_s": 0.4})
    assert token_timings(1.0, [1.25]) == {"ttft_s": 0.25}


def test_concurrent_rates_run_the_jobs_side_by_side_and_count_their_calls():
    """Two jobs that sleep 10 ms per call for 0.3 s: both run all the time (about 30 calls
    each; taking turns, they would make 15), and each rate is its calls over the same elapsed
    time."""
    from fxscale.studies.fidelity import concurrent_rates

    calls = {"a": 0, "b": 0}

    def job(name):
        def call():
            calls[name] += 1
            time.sleep(0.01)
        return call

    rates = concurrent_rates({"a": job("a"), "b": job("b")}, seconds=0.3)
    assert min(calls.values()) >= 20
    elapsed = [calls[name] / rates[name] for name in calls]
    assert elapsed[0] == pytest.approx(elapsed[1]) and elapsed[0] >= 0.3


def test_fidelity_compares_the_model_with_the_live_run_it_is_given():
    """compare() on a synthetic measurement: the model's lone-request timings against a live
    run that measured them, then against one whose TBT is twice the model's."""
    from fxscale.studies.fidelity import compare

    report = compare(synthetic_measurement())
    assert report["predicted"]["ttft_p50_s"] == pytest.approx(0.012, rel=0.05)
    assert report["relative_error"]["tbt_p50_s"] < 0.05
    report = compare(synthetic_measurement(live_tbt_s=0.022))
    assert report["relative_error"]["tbt_p50_s"] == pytest.approx(0.5, rel=0.05)


def test_fidelity_over_runs_compares_the_medians_of_each_side(monkeypatch):
    """Three runs whose live TBT was 11, 22 and 44 ms against a model that predicts 11 ms
    each time: the live median (22 ms) is 50% off, the range spans the runs, and each run's
    own report is kept."""
    import fxscale.studies.fidelity as fidelity

    live = iter([0.011, 0.044, 0.022])
    monkeypatch.setattr(fidelity, "measure",
                        lambda config, policy: synthetic_measurement(next(live)))
    seen = []
    report = fidelity.fidelity(None, "model", runs=3,
                               progress=lambda done, total: seen.append((done, total)))
    assert seen == [(1, 3), (2, 3), (3, 3)]  # runs finished
    assert [r["measured"]["tbt_p50_s"] for r in report["runs"]] == \
        pytest.approx([0.011, 0.044, 0.022])
    assert report["measured"]["tbt_p50_s"] == pytest.approx(0.022)
    assert report["measured_range"]["tbt_p50_s"] == pytest.approx([0.011, 0.044])
    assert report["predicted"]["tbt_p50_s"] == pytest.approx(0.011, rel=0.05)
    assert report["relative_error"]["tbt_p50_s"] == pytest.approx(0.5, rel=0.05)
    assert report["machine"] == {"capacity_2_jobs": [2.0, 2.0], "changed_runs": 0}
    with pytest.raises(ValueError, match="runs=0"):
        fidelity.fidelity(None, "model", runs=0)


def test_fidelity_counts_the_runs_in_which_the_machine_changed():
    """Two-job capacities of 1.5 then 2.0 (a third more) within a run count as a change,
    1.9 then 2.0 (5%) do not; the range spans every measurement; runs saved without
    capacities give no machine summary."""
    from fxscale.studies.fidelity import compare, compare_runs, machine_stability

    runs = [{"capacity_before_after": [[1.0, a], [1.0, b]]} for a, b in
            ((1.5, 2.0), (1.9, 2.0), (2.0, 2.0), (2.1, 1.6))]
    assert machine_stability(runs) == {"capacity_2_jobs": [1.5, 2.1], "changed_runs": 2}
    assert machine_stability(runs + [{"capacity_before_after": None}]) is None
    report = compare_runs([compare(synthetic_measurement(two_jobs=(1.5, 2.0)))])
    assert report["machine"] == {"capacity_2_jobs": [1.5, 2.0], "changed_runs": 1}


def test_calibration_takes_hops_from_the_lone_request_and_their_locked_share_from_cpu():
    """A lone request timed by the model itself with known hop costs: calibrate() recovers
    them, and the share of them under the interpreter lock is the measured Python CPU over
    the hop seconds (capped at all of them)."""
    from fxscale.studies.demo import DemoConfig
    from fxscale.studies.fidelity import ALONE_PROMPT, _timings, calibrate

    config = DemoConfig(max_new=6)
    groups = [group(f"g{i}", lambda phase, b, n: 0.002 + 0.0005 * b, batches=True)
              for i in range(4)]
    hops, capacity = {"prefill": 0.003, "decode": 0.001}, (1.0, 1.6, 1.5)
    lone = [Request(0.0, ALONE_PROMPT, config.max_new)]
    alone = _timings(lone, LocalSimulation(groups, lone, config.budget, lambda t: {},
                                           hop_s=hops, capacity=capacity).run())[0]
    hop_seconds = 4 * (0.003 + 5 * 0.001)  # 4 groups, a prefill and 5 decodes
    as_profiled = {g.name: 6 * 0.0025 for g in groups}
    measured = {"capacity": list(capacity), "live": {"timeline": []},
                "alone": dict(alone, thread_cpu_s=0.25 * hop_seconds,
                              replica_python_s=0.15 * hop_seconds, execution_s=as_profiled)}
    calibration = calibrate(groups, measured, config)
    assert calibration["execution_extra_s"] == pytest.approx({g.name: 0.0 for g in groups})
    assert calibration["hop_s"] == pytest.approx(hops, rel=0.02)
    assert calibration["hop_locked"] == pytest.approx(0.4, rel=0.03)
    assert calibration["capacity"] == capacity
    measured["alone"]["thread_cpu_s"] = 2 * hop_seconds
    assert calibrate(groups, measured, config)["hop_locked"] == 1.0


def test_executions_slower_on_the_server_than_profiled_take_their_extra_from_the_hops():
    """A lone request whose executions each took 1 ms beyond the profile: calibrate() books
    that 1 ms on every execution (where it holds a slot) and no longer in the hops."""
    from fxscale.studies.demo import DemoConfig
    from fxscale.studies.fidelity import ALONE_PROMPT, _timings, calibrate, with_extra

    config = DemoConfig(max_new=6)
    groups = [group(f"g{i}", lambda phase, b, n: 0.002, stateful=True) for i in range(3)]
    slower = with_extra(groups, {g.name: 0.001 for g in groups})
    assert slower[0].latency("decode", 1, 20) == pytest.approx(0.003)
    hops = {"prefill": 0.002, "decode": 0.0005}
    lone = [Request(0.0, ALONE_PROMPT, config.max_new)]
    alone = _timings(lone, LocalSimulation(slower, lone, config.budget, lambda t: {},
                                           hop_s=hops).run())[0]
    measured = {"capacity": [1.0, 2.0], "live": {"timeline": []},
                "alone": dict(alone, thread_cpu_s=0.001, replica_python_s=0.001,
                              execution_s={g.name: 6 * 0.003 for g in groups})}
    calibration = calibrate(groups, measured, config)
    assert calibration["execution_extra_s"] == pytest.approx({g.name: 0.001 for g in groups})
    assert calibration["hop_s"] == pytest.approx(hops, rel=0.02)
    del measured["alone"]["execution_s"]  # a measurement saved before they were recorded
    with pytest.raises(ValueError, match="take it again"):
        calibrate(groups, measured, config)


def test_an_execution_waits_for_the_interpreter_lock_the_hops_hold():
    """Two requests whose first hop (5 ms) is all Python take turns at the lock, and the
    replica threads wait for it too; with none of it under the lock, they run side by side
    on the two cores."""
    g = group("g", lambda phase, b, n: 0.001, stateful=True)
    requests = [Request(0.0, 4, 1), Request(0.0, 4, 1)]

    def first_tokens(share):
        return sorted(t[0] for t in LocalSimulation(
            [g], requests, budget=2, replicas=lambda t: {"g": 2},
            hop_s={"prefill": 0.005, "decode": 0.0}, capacity=(1.0, 2.0, 2.0),
            hop_locked=share).run())

    assert first_tokens(0.0) == pytest.approx([0.006, 0.006])
    # one core for both: the hops and then the executions share it
    assert sorted(t[0] for t in LocalSimulation(
        [g], requests, budget=2, replicas=lambda t: {"g": 2},
        hop_s={"prefill": 0.005, "decode": 0.0}, capacity=(1.0,), hop_locked=0.0).run()
    ) == pytest.approx([0.012, 0.012])
    # the second hop queued for the lock first: both executions start after it (FIFO)
    assert first_tokens(1.0) == pytest.approx([0.011, 0.011])


def test_fidelity_command_prints_the_medians_and_writes_every_run(monkeypatch, tmp_path,
                                                                   capsys):
    """`fxscale fidelity` over two synthetic runs whose live TBT is twice the model's: a
    table with the medians and how many runs met the goal, and JSON with every run."""
    import json

    import fxscale.studies.fidelity as fidelity
    from fxscale.cli.main import main

    monkeypatch.setattr(fidelity, "measure",
                        lambda config, policy: synthetic_measurement(live_tbt_s=0.022))
    out = tmp_path / "fidelity.json"
    assert main(["fidelity", "--policy", "model", "--runs", "2", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "TBT p50" in printed and "0 of 2 live runs within 15%" in printed
    assert "2.00-2.00x one job's throughput, changing within 0 of the runs" in \
        " ".join(printed.split())
    data = json.loads(out.read_text())
    assert data["config"]["speedup"] == 2.0 and list(data["policies"]) == ["model"]
    report = data["policies"]["model"]
    assert len(report["runs"]) == 2
    assert report["relative_error"]["tbt_p50_s"] == pytest.approx(0.5, rel=0.05)
    with pytest.raises(SystemExit):  # argparse refuses it before anything runs
        main(["fidelity", "--runs", "0"])


def test_fidelity_command_keeps_a_finished_policy_when_a_later_one_fails(monkeypatch,
                                                                         tmp_path):
    """The operator policy's runs are on disk before the model policy's first run fails."""
    import json

    import fxscale.studies.fidelity as fidelity
    from fxscale.cli.main import main

    def measure(config, policy):
        if policy == "model":
            raise RuntimeError("the machine went away")
        return synthetic_measurement()

    monkeypatch.setattr(fidelity, "measure", measure)
    out = tmp_path / "fidelity.json"
    with pytest.raises(RuntimeError, match="went away"):
        main(["fidelity", "--runs", "1", "--json", str(out)])
    assert list(json.loads(out.read_text())["policies"]) == ["operator"]
