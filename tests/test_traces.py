"""Request traces: shipped copies load with their published statistics; bad files say where."""
from __future__ import annotations

import pytest

from fxscale.contracts.trace import TraceError
from fxscale.runtime.traces.loaders import load_trace


@pytest.mark.parametrize("name,count,minutes,prompt_mean,output_mean", [
    ("azure-conv", 19366, 58.4, 1155, 211),
    ("azure-code", 8819, 57.3, 2048, 28),
    ("mooncake-conversation", 12031, 3537 / 60, 12035, 343),
    ("mooncake-synthetic", 3993, 1022 / 60, 15325, 149),
])
def test_shipped_traces_match_their_published_statistics(name, count, minutes, prompt_mean,
                                                          output_mean):
    trace = load_trace(name)
    summary = trace.summary()
    assert summary["requests"] == count
    assert summary["duration_s"] / 60 == pytest.approx(minutes, abs=0.1)
    assert summary["prompt_mean"] == pytest.approx(prompt_mean, abs=1)
    assert summary["output_mean"] == pytest.approx(output_mean, abs=1)
    arrivals = [r.arrival_s for r in trace.requests]
    assert arrivals[0] == 0 and arrivals == sorted(arrivals)
    assert ("Apache" in trace.source) != ("CC-BY" in trace.source)  # its licence is named


def test_window_and_rate_scaling():
    trace = load_trace("azure-conv")
    window = trace.window(600, 60)
    assert window.requests and all(0 <= r.arrival_s < 60 for r in window.requests)
    expected = [r for r in trace.requests if 600 <= r.arrival_s < 660]
    assert [(r.arrival_s + 600, r.prompt_tokens, r.output_tokens) for r in window.requests] == [
        (pytest.approx(r.arrival_s), r.prompt_tokens, r.output_tokens) for r in expected]
    fast = window.scaled(4)
    assert fast.duration_s() == pytest.approx(window.duration_s() / 4)
    assert fast.rate() == pytest.approx(window.rate() * 4)
    same = load_trace("azure-conv", start_s=600, duration_s=60, rate_scale=4)
    assert same.requests == fast.requests
    with pytest.raises(ValueError, match="rate factor must be positive"):
        trace.scaled(0)


def test_mixed_timestamp_styles_blank_lines_and_bad_numbers(tmp_path):
    path = tmp_path / "mixed.csv"
    path.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n"
                    "2024-05-10 00:00:02,10,1\n\n"
                    "2024-05-10 00:00:00.5+00:00,20,2\n\n"
                    "2024-05-10 00:00:03.1234567,30,x\n")
    with pytest.raises(TraceError, match=r"mixed.csv:6: field 'GeneratedTokens'"):
        load_trace(path)  # the physical line, blank lines counted
    path.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n"
                    "2024-05-10 00:00:02,10,1\n2024-05-10 00:00:00.5+00:00,20,2\n")
    assert [r.arrival_s for r in load_trace(path).requests] == [0.0, 1.5]
    nan = tmp_path / "nan.jsonl"
    nan.write_text('{"timestamp": NaN, "input_length": 5, "output_length": 1}\n')
    with pytest.raises(TraceError, match="nan.jsonl:1: field 'timestamp'"):
        load_trace(nan)
    frac = tmp_path / "frac.jsonl"
    frac.write_text('{"timestamp": 0, "input_length": 5.5, "output_length": 1}\n')
    with pytest.raises(TraceError, match="frac.jsonl:1: field 'input_length' is not an integer"):
        load_trace(frac)


def test_files_in_both_formats(tmp_path):
    csv_path = tmp_path / "week.csv"
    csv_path.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n"
                        "2024-05-10 00:00:01.500000+00:00,100,7\n"
                        "2024-05-10 00:00:00.009930+00:00,50,3\n")
    trace = load_trace(csv_path)
    assert [(r.arrival_s, r.prompt_tokens) for r in trace.requests] == [
        (0.0, 50), (pytest.approx(1.49007), 100)]
    jsonl = tmp_path / "t.jsonl"
    jsonl.write_text('{"timestamp": 1000, "input_length": 5, "output_length": 2}\n\n'
                     '{"timestamp": 3500, "input_length": 9, "output_length": 1}\n')
    assert [r.arrival_s for r in load_trace(jsonl).requests] == [0.0, 2.5]


@pytest.mark.parametrize("filename,content,message", [
    ("a.csv", "TIMESTAMP,ContextTokens\n2023-11-16 18:00:00,5\n", r"a.csv:1: missing column\(s\) \['GeneratedTokens'\]"),
    ("a.csv", "TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:00:00,5,1\nyesterday,5,1\n", r"a.csv:3: field 'TIMESTAMP' is not a timestamp"),
    ("a.csv", "TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:00:00,-5,1\n", r"a.csv:2: field 'ContextTokens' must be from 1 to 10000000 tokens"),
    ("a.csv", "TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:00:00,5,many\n", r"a.csv:2: field 'GeneratedTokens' is not an integer"),
    ("b.jsonl", '{"timestamp": 0, "input_length": 5}\n', r"b.jsonl:1: missing field 'output_length'"),
    ("b.jsonl", '{"timestamp": 0, "input_length": 5, "output_length": 1}\n{oops\n', r"b.jsonl:2: not valid JSON"),
    ("b.jsonl", '{"timestamp": -1, "input_length": 5, "output_length": 1}\n', r"b.jsonl:1: field 'timestamp' must be milliseconds"),
    ("c.txt", "anything", r"c.txt: unknown trace format"),
    ("d.csv", "TIMESTAMP,ContextTokens,GeneratedTokens\n", r"d.csv: the trace has no requests"),
])
def test_malformed_files_name_file_line_and_field(tmp_path, filename, content, message):
    path = tmp_path / filename
    path.write_text(content)
    with pytest.raises(TraceError, match=message):
        load_trace(path)


def test_unknown_name_lists_the_shipped_traces():
    with pytest.raises(FileNotFoundError, match="azure-conv"):
        load_trace("azure-conversation")


def test_servegen_sample_follows_the_published_rates_and_sizes():
    import csv

    from fxscale.runtime.traces import servegen

    trace = load_trace("servegen-mm-image", start_s=43200, duration_s=1800)
    again = load_trace("servegen-mm-image", start_s=43200, duration_s=1800)
    assert trace.requests == again.requests  # seeded
    assert trace.requests and all(0 <= r.arrival_s < 1800 for r in trace.requests)
    expected = 0.0
    folder = servegen._files()
    for client in servegen.clients():
        rows = csv.reader(folder.joinpath(f"chunk-{client}-trace.csv").read_text().splitlines())
        expected += sum(float(r[1]) * 600 for r in rows
                        if r[3] and 43200 <= float(r[0]) < 45000)
    assert len(trace.requests) == pytest.approx(expected, rel=0.1)
    assert all(r.prompt_tokens >= 1 and r.output_tokens >= 0 for r in trace.requests)


def test_servegen_gaps_have_the_published_burstiness_and_sizes_follow_the_pmf():
    import ast
    import csv
    import json
    import statistics

    from fxscale.runtime.traces import servegen

    folder = servegen._files()
    client, window = max(
        ((c, r) for c in servegen.clients() for r in csv.reader(
            folder.joinpath(f"chunk-{c}-trace.csv").read_text().splitlines())
         if r[3] == "Gamma" and float(r[2]) < 1.5),
        key=lambda item: float(item[1][1]))  # the busiest Gamma window of moderate burstiness
    start = float(window[0])
    trace = servegen.servegen_trace(start, 600, seed=1, client_ids=[client])
    gaps = [b.arrival_s - a.arrival_s for a, b in zip(trace.requests, trace.requests[1:])]
    assert statistics.pstdev(gaps) / statistics.fmean(gaps) == pytest.approx(
        float(window[2]), rel=0.15)  # the cv column: shape and scale were read the right way
    assert len(trace.requests) / 600 == pytest.approx(float(window[1]), rel=0.1)
    dataset = json.loads(folder.joinpath(f"chunk-{client}-dataset.json").read_text())
    period = max(p for p in map(int, dataset) if p <= start)
    pmf = ast.literal_eval(dataset[str(period)]["output_tokens"])
    mean = sum(v * p for v, p in pmf.items()) / sum(pmf.values())
    assert statistics.fmean(r.output_tokens for r in trace.requests) == pytest.approx(mean, rel=0.1)


def test_servegen_bad_inputs():
    import random

    from fxscale.runtime.traces import servegen

    with pytest.raises(TraceError, match="unknown inter-arrival distribution 'Pareto'"):
        servegen._gap_sampler("Pareto", 1.0, 1.0, 1.0, random.Random(0), "x.csv:3")
    with pytest.raises(TraceError, match="not a PMF"):
        servegen._pmf("{1: oops", "x.json")
    with pytest.raises(ValueError, match="duration > 0"):
        servegen.servegen_trace(duration_s=0)
    with pytest.raises(ValueError, match="covers one day"):
        servegen.servegen_trace(start_s=90000)
    with pytest.raises(TraceError, match="must be finite and positive"):
        servegen._gap_sampler("Weibull", 0.0, 1.0, 1.0, random.Random(0), "x.csv:3")
    with pytest.raises(TraceError, match="weights must be >= 0"):
        servegen._pmf("{1: -0.5, 2: 0.5}", "x.json")


def test_poisson_resample_keeps_the_length_mix_at_a_steady_rate():
    from fxscale.runtime.traces.loaders import poisson_resample

    base = load_trace("azure-conv")
    steady = poisson_resample(base, 4.0, 600, seed=3)
    assert abs(len(steady.requests) / 600 - 4.0) < 0.4
    pairs = {(r.prompt_tokens, r.output_tokens) for r in base.requests}
    assert all((r.prompt_tokens, r.output_tokens) in pairs for r in steady.requests)
    assert steady.requests == poisson_resample(base, 4.0, 600, seed=3).requests


def test_mooncake_prefix_hashes_are_kept_through_windows_and_cut_with_the_prompt(tmp_path):
    trace = load_trace("mooncake-conversation")
    assert trace.prefix_block_tokens == 512
    first = trace.requests[0]
    assert first.prefix[:3] == (0, 1, 2) and len(first.prefix) == -(-first.prompt_tokens // 512)
    window = trace.window(10, 60).scaled(2)
    assert window.prefix_block_tokens == 512 and all(r.prefix for r in window.requests)
    fitted, counts = trace.within_context(8192, "truncate")
    cut = [r for r, o in zip(fitted.requests, trace.requests) if r.prompt_tokens < o.prompt_tokens]
    assert cut and counts["truncated_prompts"] == len(cut) and not any(r.prefix for r in cut)
    assert not any(r.prefix for r in trace.without_prefixes().requests)
    assert load_trace("azure-conv").prefix_block_tokens == 0
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"timestamp": 0, "input_length": 5, "output_length": 1, '
                   '"hash_ids": [1, "x"]}\n')
    with pytest.raises(TraceError, match="bad.jsonl:1: field 'hash_ids'"):
        load_trace(bad)
