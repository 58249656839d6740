"""The command line: explain, profile and the rest, with conventional exit codes and JSON
output (the demo has tests/test_demo.py)."""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from fxscale.cli import main as cli
from fxscale.cli.main import main


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "fxscale", *args], capture_output=True,
                          text=True, timeout=600)


def test_explain_json_to_stdout(capsys):
    assert main(["explain", "--model", "gpt2", "--layers", "1", "--json", "-"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["granularity"] == "operator" and len(data["groups"]) >= 3


def test_explain_meta_writes_file(tmp_path, capsys):
    out = tmp_path / "g.json"
    assert main(["explain", "--model", "llama", "--meta", "--hidden", "128", "--json", str(out)]) == 0
    assert "operator groups" in capsys.readouterr().out
    assert json.loads(out.read_text())["groups"]


def test_bad_arguments_exit_2(capsys):
    with pytest.raises(SystemExit) as info:
        main(["demo", "--layers", "0"])
    assert info.value.code == 2
    assert "must be an integer from 1 to 256, got 0" in capsys.readouterr().err
    assert main([]) == 2


def test_profile_prints_fit_and_analytic_tables(tmp_path, capsys):
    out = tmp_path / "p.json"
    code = main(["profile", "--model", "llama", "--layers", "1", "--hidden", "64",
                 "--batches", "1,2", "--lengths", "8,16", "--lowering", "eager",
                 "--repeats", "3", "--min-ms", "0.001", "--json", str(out)])
    assert code == 0
    text = capsys.readouterr().out
    assert "held-out MAPE" in text and "Analytic CPU model" in text
    from fxscale.contracts.profile import Profile

    assert any(g.fit for g in Profile.from_json(out).groups)


@pytest.mark.parametrize("flag,value,message", [("--min-ms", "0", "must be positive"),
                                                ("--phases", "train", "phases are"),
                                                ("--lengths", "8,x", "comma-separated")])
def test_profile_rejects_bad_flags(capsys, flag, value, message):
    with pytest.raises(SystemExit) as info:
        main(["profile", flag, value])
    assert info.value.code == 2 and message in capsys.readouterr().err


def test_explain_preset(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("FXSCALE_CACHE_DIR", str(tmp_path))
    assert main(["explain", "--preset", "llama-2-7b", "--json", "-"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["model"] == "llama-2-7b" and len(data["groups"]) == 3 * 32 + 2
    assert list((tmp_path / "presets").glob("llama-2-7b-prefill-*.json"))


SIMULATE_KEYS = {"gpu_hours", "energy_kwh", "slo_attainment", "ttft_p50", "ttft_p99", "tbt_p50",
                 "tbt_p99", "throughput_tok_s", "max_rate_at_slo", "lower_bound_gpu_hours",
                 "step_bound_gpu_hours", "prefix_reuse", "wall_s"}


def test_simulate_one_policy_writes_the_documented_keys(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("FXSCALE_CACHE_DIR", str(tmp_path / "cache"))
    out = tmp_path / "out.json"
    assert main(["simulate", "--model", "llama-2-7b", "--layers", "2", "--trace", "azure-conv",
                 "--duration", "120", "--rate-scale", "8", "--policy", "operator",
                 "--slo-ttft", "0.5", "--slo-tbt", "0.01", "--headroom", "1.5",
                 "--fixed-gpus", "2", "--policy-interval", "operator=5", "--forecast", "holt",
                 "--warm-pool", "2", "--hold", "20", "--rate-window", "10",
                 "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert SIMULATE_KEYS <= set(data)
    assert data["policy"] == "operator" and data["headroom"] == 1.5
    assert 0 <= data["slo_attainment"] <= 1 and data["max_rate_at_slo"] > 0
    assert data["lower_bound_gpu_hours"] <= data["step_bound_gpu_hours"] <= data["gpu_hours"]
    assert data["timeline"] and {"t", "devices", "rate_rps"} <= set(data["timeline"][0])
    assert data["config"]["slo_tbt"] == 0.01 and data["interval_s"] == 5.0
    assert data["config"]["forecast"] == "holt" and data["config"]["warm_pool"] == 2
    assert data["config"]["hold_s"] == 20 and data["config"]["rate_window_s"] == 10
    assert "operator" in capsys.readouterr().out


def test_simulate_all_policies_table(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("FXSCALE_CACHE_DIR", str(tmp_path / "cache"))
    out = tmp_path / "all.json"
    assert main(["simulate", "--model", "llama-2-7b", "--layers", "2", "--duration", "60",
                 "--rate-scale", "8", "--policy", "all", "--slo-ttft", "0.5",
                 "--slo-tbt", "0.01", "--headroom", "1", "--json", str(out)]) == 0
    table = capsys.readouterr().out
    for policy in ("static", "model", "phase", "operator"):
        assert policy in table
    data = json.loads(out.read_text())
    assert set(data["policies"]) == {"static", "model", "phase", "operator"}
    for run in data["policies"].values():
        assert SIMULATE_KEYS <= set(run) and run["max_rate_at_slo"] is None


def test_simulate_all_reports_a_policy_no_deployment_serves_and_runs_the_others(
        tmp_path, monkeypatch, capsys):
    """When no operator deployment meets the SLO (here: the search finds none), --policy all
    still replays the other policies; the operator row says why, in the table and the JSON;
    asked alone, the policy is a clear error."""
    from fxscale.reporting.run import load_runs
    from fxscale.runtime.planner import search

    monkeypatch.setenv("FXSCALE_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(search, "_candidates_operator", lambda *args: iter(()))
    out = tmp_path / "all.json"
    argv = ["simulate", "--model", "llama-2-7b", "--layers", "2", "--duration", "60",
            "--rate-scale", "8", "--slo-ttft", "0.5", "--slo-tbt", "0.01", "--headroom", "1"]
    assert main(argv + ["--policy", "all", "--json", str(out)]) == 0
    table = " ".join(capsys.readouterr().out.split())
    assert "no deployment meets the SLO" in table and "operator: no operator deployment" in table
    runs = json.loads(out.read_text())["policies"]
    assert "no operator deployment of llama-2-7b" in runs["operator"]["infeasible"]
    assert "one engine of at most 16 dense replicas" in runs["operator"]["infeasible"]
    assert "gpu_hours" not in runs["operator"]
    for policy in ("static", "model", "phase"):
        assert SIMULATE_KEYS <= set(runs[policy]) and "infeasible" not in runs[policy]
    reported = load_runs(json.loads(out.read_text()))  # what `fxscale report --run` reads
    assert [run.label for run in reported] == ["static", "model", "phase"]
    assert main(argv + ["--policy", "operator"]) == 2
    assert "no operator deployment" in capsys.readouterr().err


def test_simulate_enforces_the_context_and_scales_ttft_with_the_prompt(tmp_path, monkeypatch,
                                                                       capsys):
    """Llama-2-7B takes 4,096 tokens: a trace with longer prompts has them rejected or cut,
    counted in the caption and the JSON; --slo-ttft-per-token reaches the SLO."""
    monkeypatch.setenv("FXSCALE_CACHE_DIR", str(tmp_path / "cache"))
    trace = tmp_path / "long.csv"
    trace.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n" + "".join(
        f"2023-11-16 18:{i // 60:02d}:{i % 60:02d}.0,{6000 if i % 4 == 0 else 300},20\n"
        for i in range(0, 120, 2)))
    for mode, done in (("reject", "rejected"), ("truncate", "truncated")):
        out = tmp_path / f"{mode}.json"
        assert main(["simulate", "--model", "llama-2-7b", "--layers", "2", "--trace",
                     str(trace), "--policy", "model", "--slo-ttft", "0.5", "--slo-tbt", "0.05",
                     "--slo-ttft-per-token", "0.0001", "--headroom", "1",
                     "--over-context", mode, "--json", str(out)]) == 0
        caption = " ".join(capsys.readouterr().out.split())
        assert f"30 prompts that do not fit the model's 4096-token context {done}" in caption
        assert "+ 0.1 ms per prompt token" in caption
        data = json.loads(out.read_text())
        assert data["context"]["rejected" if mode == "reject" else "truncated_prompts"] == 30
        assert data["config"]["slo_ttft_per_token"] == 0.0001
        assert data["requests"] == (30 if mode == "reject" else 60)


def test_simulate_bad_input_is_a_clear_error(tmp_path, capsys):
    bad = tmp_path / "bad.csv"
    bad.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:15:46.6805900,x,3\n")
    assert main(["simulate", "--trace", str(bad), "--layers", "1"]) == 2
    err = capsys.readouterr().err
    assert "bad.csv:2: field 'ContextTokens'" in err
    assert main(["simulate", "--trace", "no-such-trace", "--layers", "1"]) == 2
    assert "no trace 'no-such-trace'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:
        main(["simulate", "--attainment", "1.5", "--layers", "1"])
    assert info.value.code == 2
    assert "--attainment: must be between 0 and 1" in capsys.readouterr().err
    for flag, value, message in (("--policy-interval", "fast=1", "expected POLICY=SECONDS"),
                                 ("--policy-interval", "operator=0", "must be"),
                                 ("--warm-pool", "-1", "must be an integer from 0"),
                                 ("--hold", "-5", "must be"),
                                 ("--rate-window", "0", "must be")):
        with pytest.raises(SystemExit) as info:
            main(["simulate", flag, value, "--layers", "1"])
        assert info.value.code == 2 and message in capsys.readouterr().err


def test_sigterm_inside_a_finalizer_still_stops_the_command(monkeypatch, capsys):
    """A signal handler can run inside a `__del__` (torch's exporter drops many objects),
    where Python prints the KeyboardInterrupt and goes on: the command must stop anyway."""
    done = []

    class Dropped:
        def __del__(self):
            os.kill(os.getpid(), signal.SIGTERM)  # handled at the next bytecode: in here
            for _ in range(1000):
                pass

    def work(args):
        Dropped()
        for _ in range(200):  # two seconds of work to interrupt
            time.sleep(0.01)
        done.append("finished")
        return 0

    def parser():
        top = argparse.ArgumentParser(prog="fxscale")
        top.add_subparsers(dest="command").add_parser("work").set_defaults(run=work)
        return top

    monkeypatch.setattr(cli, "_parser", parser)
    handler, hook = signal.getsignal(signal.SIGTERM), sys.unraisablehook
    assert cli.main(["work"]) == 130 and not done
    assert "interrupted; nothing was left half-written" in capsys.readouterr().err
    assert (signal.getsignal(signal.SIGTERM), sys.unraisablehook) == (handler, hook)
