"""`fxscale bench`: the files it writes (schema, not numbers) and the README section rewrite.

The command runs once for the module, `--quick` with the quick matrix shrunk further (one
1-layer Llama, eager-lowered profiles, a 1-minute trace window, 2 s of serving) so the
test stays under about a minute on 2 cores; the real `--quick` matrix is the same code
with bigger numbers.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json

import pytest

from fxscale.cli.bench import MARKERS, add_bench_command, splice
from fxscale.studies import bench
from fxscale.studies.bench_families import (
    CompileConfig,
    EngineConfig,
    HttpConfig,
    ProfileConfig,
    RayConfig,
    RuntimeConfig,
    SimulatorConfig,
)

TINY = bench.BenchConfig(
    compile=CompileConfig(sizes=((1, 32),), batches=(1,), length=8, warmup=1, repeats=3,
                          fresh_process=False),
    profiles=ProfileConfig(layers=1, hidden=32, batches=(1,), lengths=(8,), lowering="eager",
                           repeats=2),
    simulator=SimulatorConfig(models=("llama-2-7b",), layers=1, traces=("azure-conv",),
                              duration_s=60.0, slo_scales=(1.0,)),
    runtime=RuntimeConfig(seconds=2.0, hidden=64),
    engine=EngineConfig(hidden=(128,), requests=(4,), longest=24, new_tokens=4, rounds=1),
    http=HttpConfig(hidden=64, rates=(4.0,), seconds=2.0, rounds=1, policies=("operator",)),
    ray=RayConfig(hidden=64, layers=1, requests=4, longest=16, new_tokens=4, rounds=1,
                  hop_tokens=(1,), hop_calls=5, ready_repeats=1, cold_starts=1,
                  process_layers=(), fused_layers=(2,), compiled_layers=(1,)))
README = "# Project\n\nintro\n\n## Results\n\n{start}\nstale table\n{end}\n\nfooter\n"
ROW_KEYS = {
    "compile": {"model": str, "layers": int, "hidden": int, "batch": int, "length": int,
                "backend": str, "first_call_s": float, "latency_ms_median": float,
                "latency_ms_min": float, "latency_ms_max": float, "repeats": int,
                "max_abs_diff": float, "matches_eager": bool, "threads": int},
    "profiles": {"group": str, "name": str, "stateful": bool, "phase": str, "batch": int,
                 "length": int, "median_ms": float, "p10_ms": float, "p90_ms": float,
                 "repeats": int},
    "simulator": {"model": str, "layers": int, "device": str, "trace": str, "requests": int,
                  "rejected_over_context": int,
                  "duration_s": float, "slo_scale": float, "slo_ttft_s": float,
                  "slo_tbt_s": float, "policy": str, "gpu_hours": float,
                  "lower_bound_gpu_hours": float, "step_bound_gpu_hours": float,
                  "energy_kwh": float,
                  "slo_attainment": float, "meets_target": bool, "ttft_p50": float,
                  "ttft_p99": float, "tbt_p50": float, "tbt_p99": float,
                  "throughput_tok_s": float, "headroom": float, "floor": float,
                  "wall_s": float, "x_bound": float, "infeasible": (str, type(None))},
    "runtime": {"policy": str, "trace": str, "layers": int, "hidden": int, "budget": int,
                "slo_ttft_s": float, "slo_tbt_s": float, "requests": int, "completed": int,
                "rejected": int, "failed": int, "slo_attainment": float,
                "tokens_per_s": float, "requests_per_s": float, "seconds": float,
                "ttft_p50_s": float, "ttft_p90_s": float, "ttft_p99_s": float,
                "tbt_p50_s": float, "tbt_p90_s": float, "tbt_p99_s": float,
                "ready_s": float, "scale_decisions": int},
    "engine": {"hidden": int, "requests": int, "dtype": str, "generator": str,
               "tokens_per_s": float, "min_tokens_per_s": float, "max_tokens_per_s": float,
               "x_hf_batch": float},
    "http": {"hidden": int, "layers": int, "trace": str, "policy": str, "rate_rps": float,
             "requests": int, "http_completed": int, "in_process_completed": int,
             **{f"{path}_{figure}": float for path in ("http", "in_process")
                for figure in ("ttft_p50_s", "ttft_p99_s", "tbt_p50_s", "tbt_p99_s",
                               "tokens_per_s", "slo_attainment")},
             **{f"{name}{stat}{unit}": float
                for name, unit in (("ttft_p50_overhead", "_s"), ("tbt_p50_overhead", "_s"),
                                   ("tokens_per_s_ratio", ""))
                for stat in ("", "_min", "_max")}},
    "ray": {"measure": str, "case": str, "backend": str, "unit": str, "value": float,
            "min": float, "max": float},
}
PLOTS = {f"{stem}.{ext}" for stem in ("compile", "profiles", "simulator", "runtime", "engine",
                                      "http", "ray") for ext in ("png", "svg")}


def run_command(*argv: str) -> tuple[int, str]:
    """Run `fxscale bench ARGV` through its own subparser; (exit code, stdout)."""
    parser = argparse.ArgumentParser(prog="fxscale")
    add_bench_command(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["bench", *argv])
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = args.run(args)
    return code, out.getvalue()


@pytest.fixture(scope="module")
def bench_run(tmp_path_factory):
    """One `fxscale bench --quick --readme` run on the TINY matrix: its directory, stdout,
    README and every progress call."""
    root = tmp_path_factory.mktemp("bench")
    readme = root / "README.md"
    readme.write_text(README.format(start=MARKERS[0], end=MARKERS[1]))
    calls = []
    original = bench.run_bench

    def recording(out_dir, quick=False, progress=None, families=None):
        def both(message, done, total):
            calls.append((message, done, total))
            progress(message, done, total)
        return original(out_dir, quick=quick, progress=both, config=TINY if quick else None,
                        families=families)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(bench, "run_bench", recording)
        code, stdout = run_command("--quick", "-o", str(root / "out"), "--readme", str(readme))
    assert code == 0
    return root / "out", stdout, readme.read_text(), calls


def no_nan(text: str):
    """Reject NaN and Infinity, which json.loads would otherwise accept."""
    raise ValueError(f"results.json holds {text}: not JSON")


def test_results_json_schema(bench_run):
    out, stdout, _, _ = bench_run
    assert "results.json" in stdout
    data = json.loads((out / "results.json").read_text(), parse_constant=no_nan)
    assert data["schema_version"] == bench.SCHEMA_VERSION == 1
    assert set(data) == {"schema_version", "generated", "quick", "wall_s", "machine", "config",
                         "families", "plots"}
    assert data["quick"] is True and data["wall_s"] > 0 and isinstance(data["generated"], str)
    assert set(data["machine"]) == {"device", "threads", "platform", "versions",
                                    "load_average_at_start"}
    assert len(data["machine"]["load_average_at_start"]) == 3
    assert {"torch", "fxscale", "transformers", "python"} <= set(data["machine"]["versions"])
    assert set(data["config"]) == set(data["families"]) == set(ROW_KEYS)
    assert data["config"]["compile"]["sizes"] == [[1, 32]]  # the matrix that actually ran
    for family, keys in ROW_KEYS.items():
        entry = data["families"][family]
        assert set(entry) == {"wall_s", "rows"} and entry["wall_s"] > 0
        assert entry["rows"], f"{family}: no rows"
        for row in entry["rows"]:
            assert set(row) == set(keys), f"{family}: keys {sorted(set(row) ^ set(keys))}"
            for key, kind in keys.items():
                value = row[key]
                if kind is float:  # ints are valid JSON numbers too; bools are not
                    assert isinstance(value, (int, float)) and not isinstance(value, bool), \
                        f"{family}.{key} = {value!r}"
                else:
                    assert isinstance(value, kind), f"{family}.{key} = {value!r}"
    rows = data["families"]
    assert [r["backend"] for r in rows["compile"]["rows"]] == ["eager", "inductor", "fxscale"]
    assert all(r["matches_eager"] for r in rows["compile"]["rows"])
    assert {r["phase"] for r in rows["profiles"]["rows"]} == {"prefill", "decode"}
    assert {r["policy"] for r in rows["simulator"]["rows"]} == set(bench.FULL.simulator.policies)
    assert [r["policy"] for r in rows["runtime"]["rows"]] == ["operator", "model"]
    assert [r["generator"] for r in rows["engine"]["rows"]] == [
        "operator", "model", "hf_batch", "hf_static"]
    http = rows["http"]["rows"]
    assert [(r["policy"], r["rate_rps"]) for r in http] == [("operator", 4.0)]
    assert http[0]["http_completed"] == http[0]["in_process_completed"] == http[0]["requests"]
    ray_rows = rows["ray"]["rows"]
    assert {r["measure"] for r in ray_rows} >= {"tokens_per_s", "tokens_per_s_ratio",
                                                 "call_s", "ready_s"}
    assert {r["backend"] for r in ray_rows if r["measure"] == "tokens_per_s_ratio"} == {
        "ray/local", "ray via server/local", "ray, in the actor/local", "ray, through Ray/local",
        "ray, one task per call/ray, one task per run",
        "ray, compiled graph/ray, plain calls"}
    assert all(r["min"] <= r["value"] <= r["max"] and r["value"] > 0 for r in ray_rows)
    assert set(data["plots"]) == PLOTS


def test_markdown_has_one_table_per_family(bench_run):
    out, _, _, _ = bench_run
    text = (out / "results.md").read_text()
    data = json.loads((out / "results.json").read_text())
    headings = [line for line in text.splitlines() if line.startswith("## ")]
    assert [h.split(":")[0] for h in headings] == [
        "## Compile path", "## Per-group profiles", "## Simulator", "## Local runtime",
        "## Engine", "## HTTP server", "## Ray executor", "## Plots"]
    sections = text.split("\n## ")[1:8]
    expected = {"compile": len(data["families"]["compile"]["rows"]),
                "profiles": len({(r["name"], r["phase"])
                                 for r in data["families"]["profiles"]["rows"]}),
                "simulator": len(data["families"]["simulator"]["rows"]),
                "runtime": len(data["families"]["runtime"]["rows"]),
                "engine": len(data["families"]["engine"]["rows"]),
                "http": len(data["families"]["http"]["rows"]),
                "ray": len(data["families"]["ray"]["rows"])}
    for section, (family, count) in zip(sections, expected.items()):
        table = [line for line in section.splitlines() if line.startswith("|")]
        assert table[1].startswith("|---"), family
        widths = {line.count("|") for line in table}
        assert len(widths) == 1, f"{family}: ragged table"
        assert len(table) == 2 + count, family
    for name in PLOTS:
        if name.endswith(".png"):
            assert f"]({name})" in text


def test_plots_are_images(bench_run):
    out, _, _, _ = bench_run
    for name in PLOTS:
        data = (out / name).read_bytes()
        if name.endswith(".png"):
            assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 1000, name
        else:
            assert b"<svg" in data[:1000] and data.rstrip().endswith(b"</svg>"), name


def test_progress_covers_every_unit(bench_run):
    _, _, _, calls = bench_run
    total = sum(getattr(TINY, name).units() for name in bench.FAMILIES)
    assert {t for _, _, t in calls} == {total}
    assert [d for _, d, _ in calls] == list(range(total + 1))
    assert calls[-1][0] == "writing results"


def test_readme_section_is_rewritten_between_the_markers(bench_run):
    _, _, readme, _ = bench_run
    head, rest = readme.split(MARKERS[0])
    block, tail = rest.split(MARKERS[1])
    assert head == "# Project\n\nintro\n\n## Results\n\n"
    assert tail == "\n\nfooter\n"
    assert "stale table" not in block
    assert block.startswith("\nGenerated by `fxscale bench --quick`")
    assert "### Compile path" in block and "### Local runtime" in block
    assert "## Plots" not in block  # the plots live in the output directory


def test_readme_without_markers_fails_before_running(tmp_path, monkeypatch):
    readme = tmp_path / "README.md"
    readme.write_text("# Project\n\nno markers here\n")
    monkeypatch.setattr(bench, "run_bench", lambda *a, **k: pytest.fail("bench ran anyway"))
    with pytest.raises(ValueError, match=r"README\.md: expected one line <!-- bench:start -->"):
        run_command("--quick", "-o", str(tmp_path / "out"), "--readme", str(readme))
    assert readme.read_text() == "# Project\n\nno markers here\n"
    with pytest.raises(FileNotFoundError):
        run_command("--quick", "-o", str(tmp_path / "out"), "--readme", str(tmp_path / "none"))


def test_one_family_writes_only_its_results(tmp_path, monkeypatch):
    original = bench.run_bench
    monkeypatch.setattr(bench, "run_bench", lambda out, quick=False, progress=None,
                        families=None: original(out, quick, progress, TINY, families))
    code, _ = run_command("--family", "simulator", "-o", str(tmp_path / "out"))
    assert code == 0
    data = json.loads((tmp_path / "out" / "results.json").read_text(), parse_constant=no_nan)
    assert set(data["families"]) == set(data["config"]) == {"simulator"}
    assert sorted(data["plots"]) == ["simulator.png", "simulator.svg"]
    text = (tmp_path / "out" / "results.md").read_text()
    assert [line.split(":")[0] for line in text.splitlines() if line.startswith("## ")] == [
        "## Simulator", "## Plots"]
    with pytest.raises(ValueError, match="--readme rewrites every results table"):
        run_command("--family", "http", "-o", str(tmp_path / "x"), "--readme", "README.md")
    with pytest.raises(SystemExit):  # argparse: not a family
        run_command("--family", "nope")
    with pytest.raises(ValueError, match="unknown benchmark families"):
        original(tmp_path / "y", families=("nope",))


@pytest.mark.parametrize("text", [f"{MARKERS[1]}\nx\n{MARKERS[0]}\n",
                                  f"{MARKERS[0]}\n{MARKERS[0]}\n{MARKERS[1]}\n",
                                  f"{MARKERS[0]}\nonly the start\n"])
def test_splice_rejects_misplaced_markers(text):
    with pytest.raises(ValueError, match="found"):
        splice(text, "new\n", "R.md")


def test_splice_keeps_everything_outside_the_markers():
    text = f"a\n{MARKERS[0]}\nold\n{MARKERS[1]}\nb\n"
    assert splice(text, "new\n", "R.md") == f"a\n{MARKERS[0]}\nnew\n{MARKERS[1]}\nb\n"
    assert splice(splice(text, "new\n", "R.md"), "new\n", "R.md") == \
        splice(text, "new\n", "R.md")  # regenerating is idempotent
