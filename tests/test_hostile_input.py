"""Input a user (or an attacker) may hand fxscale: nothing in a file is executed, nothing hangs,
every bad value is a one-line error naming file, field and value (exit 2), and nothing is
written but the requested output. The fuzz tests mutate valid files of every contract."""
from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fxscale
from fxscale import GroupGraph
from fxscale.cli.main import main
from fxscale.contracts.errors import InputError
from fxscale.contracts.exprs import parse_expr
from fxscale.contracts.group_graph import kind_name
from fxscale.contracts.jsonio import read_json
from fxscale.contracts.plan import Plan
from fxscale.contracts.profile import GroupProfile, Profile, ProfilePoint
from fxscale.models import zoo
from fxscale.reporting.report import report
from fxscale.reporting.run import load_runs
from fxscale.runtime.traces.loaders import load_trace

PAYLOAD = "__import__('os').system('touch {mark}') or 1"


@pytest.fixture(scope="module")
def graph():
    entry = zoo.build("llama", layers=1)
    return fxscale.explain(entry.model, *entry.args)


def fails(capsys, argv, message):
    """`fxscale argv` exits 2 with a one-line error containing `message` (no traceback)."""
    try:
        code = main(argv)
    except SystemExit as exit_:  # argparse rejects the argument itself
        code = exit_.code
    err = capsys.readouterr().err
    assert code == 2, err
    assert message in err, err
    assert "Traceback" not in err
    return err


# ---- 1: no code runs from a cost expression ------------------------------------------------
def test_a_poisoned_group_graph_runs_nothing_and_names_the_field(graph, tmp_path):
    mark = tmp_path / "pwned"
    data = graph.to_dict()
    data["groups"][1]["flops"] = PAYLOAD.format(mark=mark)
    poisoned = tmp_path / "g.json"
    poisoned.write_text(json.dumps(data))
    out = tmp_path / "x.html"
    result = subprocess.run([sys.executable, "-m", "fxscale", "report", str(poisoned), "-o",
                             str(out)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr
    assert f"{poisoned}: field 'groups[1].flops' is not a cost expression" in result.stderr
    assert not mark.exists() and not out.exists()


def test_a_poisoned_preset_cache_entry_runs_nothing(tmp_path, monkeypatch, capsys):
    from fxscale.models.presets import cache_dir, preset_graph

    monkeypatch.setenv("FXSCALE_CACHE_DIR", str(tmp_path / "cache"))
    preset_graph("llama-2-7b", layers=1)
    preset_graph("llama-2-7b", layers=1, phase="decode")
    mark = tmp_path / "pwned"
    for path in cache_dir().iterdir():  # every cached analysis now carries the payload
        data = json.loads(path.read_text())
        data["groups"][0]["flops"] = PAYLOAD.format(mark=mark)
        path.write_text(json.dumps(data))
    assert main(["simulate", "--model", "llama-2-7b", "--layers", "1", "--duration", "60",
                 "--policy", "model"]) == 0
    capsys.readouterr()
    assert not mark.exists()  # the entries were refused and analysed again
    for path in cache_dir().iterdir():
        GroupGraph.from_json(path)


@pytest.mark.parametrize("text", ["2**(2**(2**s81))", "s81**(10**10)", "((s81**8)**8)**8",
                                  "9" * 4001, "(" * 300 + "s81" + ")" * 300])
def test_expressions_that_would_grow_without_bound_are_refused(text):
    with pytest.raises(InputError):
        parse_expr(text)


# ---- 4 and 9: traces and simulator arguments -----------------------------------------------
def _jsonl(path, *records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def test_trace_spans_and_rates_past_any_workload_are_refused(tmp_path, capsys):
    far = _jsonl(tmp_path / "far.jsonl", {"timestamp": 0, "input_length": 10, "output_length": 5},
                 {"timestamp": 1e308, "input_length": 10, "output_length": 5})
    fails(capsys, ["simulate", "--trace", far], "the requests span")
    fails(capsys, ["simulate", "--rate-scale", "1e-9"], "check the timestamps' unit, or the rate")
    fails(capsys, ["simulate", "--layers", "100000"], "llama-2-70b has 80 layers")


@pytest.mark.parametrize("make,argv,message", [
    (lambda d: str(d), ["--trace", "{}"], "is a directory; give a trace file"),
    (lambda d: _jsonl(d / "t.jsonl", {"timestamp": 0, "input_length": 1e300, "output_length": 1}),
     ["--trace", "{}"], "field 'input_length' must be from 1 to 10000000 tokens, got 1e+300"),
    (lambda d: None, ["--start", "1e9"], "no requests arrive in the window from 1e+09 s"),
    (lambda d: str(d), ["--json", "{}"], "is a directory; give a file name"),
])
def test_simulate_bad_inputs_exit_2_with_a_message(tmp_path, capsys, make, argv, message):
    value = make(tmp_path)
    fails(capsys, ["simulate", *[a.format(value) for a in argv]], message)


def test_trace_text_problems_name_the_file(tmp_path):
    latin = tmp_path / "latin.csv"
    latin.write_bytes("TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:15:46,\xe9,1\n"
                      .encode("latin-1"))
    with pytest.raises(InputError, match=f"{latin}: not UTF-8 text"):
        load_trace(latin)
    bom = tmp_path / "bom.csv"
    bom.write_bytes("\ufeffTIMESTAMP,ContextTokens,GeneratedTokens\n"
                    "2023-11-16 18:15:46.6,374,44\n2023-11-16 18:15:50.9,396,109\n"
                    .encode("utf-8"))
    assert [r.prompt_tokens for r in load_trace(bom).requests] == [374, 396]


@pytest.mark.parametrize("argv,message", [
    (["explain", "--hidden", "7"], "must be an integer from 16 to 16384"),
    (["explain", "--hidden", "1000000"], "must be an integer from 16 to 16384"),
    (["explain", "--hidden", "72"], "must be a multiple of 16"),
    (["explain", "--layers", "200", "--hidden", "4096"], "more than 8 GiB; build it on the meta"),
    (["report", "llama-2-7b", "--layers", "-1", "-o", "r.html"], "must be a positive integer"),
    (["report", "llama", "--batch", "-5", "-o", "r.html"], "must be a positive integer"),
    (["report", "llama", "--length", "0", "-o", "r.html"], "must be a positive integer"),
    (["report", "llama-2-7b", "--layers", "81", "-o", "r.html"], "has 32 layers"),
    (["simulate", "--attainment", "1.5"], "must be between 0 and 1"),
    (["simulate", "--interval", "nan"], "expected a finite number"),
])
def test_bad_arguments_exit_2_with_a_message(tmp_path, monkeypatch, capsys, argv, message):
    monkeypatch.chdir(tmp_path)
    fails(capsys, argv, message)
    assert list(tmp_path.iterdir()) == []  # nothing written, not even a cache entry here


def test_outputs_that_are_folders_or_files_in_the_wrong_place(tmp_path, capsys, graph):
    source = tmp_path / "g.json"
    graph.to_json(source)
    fails(capsys, ["report", str(source), "-o", str(tmp_path)], "is a directory")
    fails(capsys, ["report", str(tmp_path), "-o", str(tmp_path / "r.html")], "is a directory")
    afile = tmp_path / "afile"
    afile.write_text("keep me")
    fails(capsys, ["bench", "-o", str(afile)], "is a file; give a directory")
    assert afile.read_text() == "keep me"
    fails(capsys, ["explain", "--json", str(tmp_path)], "is a directory")


def test_outputs_get_the_permissions_a_plain_write_gives(tmp_path):
    """Atomic writes go through a temporary name: the result must still follow the umask
    (tempfile would make it 0600, a folder 0700)."""
    from fxscale.contracts.jsonio import replace_folder, write_atomic

    (tmp_path / "plain.json").write_text("{}")
    (tmp_path / "plain").mkdir()
    write_atomic(tmp_path / "atomic.json", "{}")
    with replace_folder(tmp_path / "folder", lambda name: True, "test output") as out:
        (out / "f").write_text("1")
    mode = lambda p: (tmp_path / p).stat().st_mode & 0o777  # noqa: E731
    assert mode("atomic.json") == mode("plain.json") and mode("folder") == mode("plain")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["atomic.json", "folder", "plain",
                                                          "plain.json"]


def test_a_plan_or_profile_of_another_model_is_refused(graph, tmp_path):
    point = ProfilePoint("prefill", 1, 16, 1e-3, 9e-4, 1.2e-3, 5)
    other = Profile("m", "operator", "cpu", "measured", "float32", 1, {},
                    [GroupProfile("g99", "elsewhere#0/gemm", [point])])
    with pytest.raises(InputError, match=r"field 'groups\[0\]' \(g99 'elsewhere#0/gemm'\) "
                                         "matches no group of this graph"):
        report(graph, tmp_path / "r.html", profile=other.to_dict())
    plan = {"policy": "operator", "model": "m", "device": "h100", "rate": 1.0, "engines": [],
            "devices": 1, "power_w": 1.0, "ttft_p50": 0.1, "ttft_p99": 0.1, "tbt_p50": 0.1,
            "tbt_p99": 0.1, "chunk": 512,
            "groups": [{"group": "g99", "kind": "x", "role": "operator", "replicas": 1}]}
    with pytest.raises(InputError, match=r"'groups\[0\].group' is 'g99', a group this graph "
                                         "does not have"):
        report(graph, tmp_path / "r.html", plan=plan)
    assert list(tmp_path.iterdir()) == []


# ---- the fuzz tests ---------------------------------------------------------------------------
HOSTILE = [None, True, -1, 0, 1e308, -1e308, 2 ** 70, "", "x", "NaN", "-1", [], {}, [[[]]],
           {"a": {"b": []}}, "__import__('os').system('id')", "2**(2**(2**s81))", "s81**9",
           "1/0", "s81 - 10**6", "Max(s81)", "floor(s81, 2)"]


def _paths(value, prefix=()):
    """Every (container, key) path inside a JSON value."""
    out = []
    if isinstance(value, dict):
        for key, item in value.items():
            out.append(prefix + (key,))
            out.extend(_paths(item, prefix + (key,)))
    elif isinstance(value, list):
        for i, item in enumerate(value):
            out.append(prefix + (i,))
            out.extend(_paths(item, prefix + (i,)))
    return out


@st.composite
def mutated(draw, document):
    """A copy of `document` with a few fields replaced by hostile values, deleted or added."""
    data = copy.deepcopy(document)
    paths = _paths(data)
    for _ in range(draw(st.integers(1, 4))):
        path = draw(st.sampled_from(paths))
        parent = data
        try:
            for key in path[:-1]:
                parent = parent[key]
            action = draw(st.sampled_from(("replace", "delete", "add")))
            if action == "replace":
                parent[path[-1]] = copy.deepcopy(draw(st.sampled_from(HOSTILE)))
            elif action == "delete":
                del parent[path[-1]]
            elif isinstance(parent, dict):
                parent[draw(st.sampled_from(("extra", "__class__", "eval")))] = 1
            else:
                parent.append(copy.deepcopy(draw(st.sampled_from(HOSTILE))))
        except (KeyError, IndexError, TypeError, AttributeError):
            continue  # an earlier mutation removed or replaced this path's parent
    return data


def _documents(graph):
    """A valid file of every JSON contract, with its loader."""
    point = ProfilePoint("prefill", 1, 16, 1e-3, 9e-4, 1.2e-3, 5)
    profile = Profile("m", "operator", "cpu", "measured", "float32", 1, {"torch": "x"},
                      [GroupProfile(graph.groups[0].id, graph.groups[0].name, [point])])
    plan = {"policy": "operator", "model": "m", "device": "h100", "rate": 1.0,
            "engines": [{"engine": {"type": "operator", "attention": 1, "dense_shards": 1,
                                    "dense_replicas": 1}, "count": 1}],
            "devices": 2, "power_w": 1400.0, "ttft_p50": 0.1, "ttft_p99": 0.2, "tbt_p50": 0.01,
            "tbt_p99": 0.02, "chunk": 512,
            "groups": [{"group": g.id, "kind": kind_name(g.name), "role": "operator",
                        "replicas": 1, "devices": [0]} for g in graph.groups]}
    run = {"policy": "operator", "timeline": [
        {"t": 0, "rate_rps": 1.0, "attainment": 0.5, "replicas": {graph.groups[0].name: 2}},
        {"t": 30, "rate_rps": 2.0, "attainment": None, "devices": 3}],
        "decisions": [{"t": 30, "action": "hold", "reason": "r"}]}
    return {"graph": (graph.to_dict(), lambda p: GroupGraph.from_json(p)),
            "profile": (profile.to_dict(), lambda p: Profile.from_json(p)),
            "plan": (plan, lambda p: Plan.from_dict(*read_json(p))),
            "run": (run, lambda p: load_runs(*read_json(p)))}


def _check_one(tmp_path, load, text, render=None):
    """Write `text`, load it: it loads (and renders) or raises InputError naming the file;
    nothing but the requested output appears."""
    folder = tmp_path / f"case{len(list(tmp_path.iterdir()))}"
    folder.mkdir()
    path = folder / "input.json"
    path.write_text(text)
    try:
        loaded = load(path)
    except InputError as err:
        assert str(path) in str(err) and "\n" not in str(err), str(err)
        loaded = None
    if loaded is not None and render is not None:
        render(loaded, folder / "out.html")
    assert sorted(p.name for p in folder.iterdir()) <= ["input.json", "out.html"]


def _render(graph, out):
    """Draw a loaded GroupGraph as the report command does (a valid graph must render)."""
    try:
        report(graph, out)
    except InputError:
        pass  # e.g. costs that overflow at the shown shape: refused, with a message


@pytest.mark.parametrize("contract", ["graph", "profile", "plan", "run"])
def test_mutated_json_files_load_or_raise_a_named_error(graph, tmp_path_factory, contract):
    document, load = _documents(graph)[contract]
    tmp_path = tmp_path_factory.mktemp(contract)
    render = _render if contract == "graph" else None

    @settings(max_examples=80, deadline=5000, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(mutated(document))
    def check(data):
        _check_one(tmp_path, load, json.dumps(data), render)

    check()


TRACE_CSV = ("TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:15:46.6,374,44\n"
             "2023-11-16 18:15:50.9,396,109\n2023-11-16 18:16:01.0,879,11\n")
TRACE_JSONL = ('{"timestamp": 0, "input_length": 10, "output_length": 4}\n'
               '{"timestamp": 1500, "input_length": 700, "output_length": 2}\n')
PIECES = ["", ",", "\n", "-", "1e308", "NaN", "9" * 30, "null", '"', "{", "}", "\ufeff",
          "\x00", "2023-13-45 99:99:99", "__import__('os')", "0.5"]


@pytest.mark.parametrize("name,text", [("t.csv", TRACE_CSV), ("t.jsonl", TRACE_JSONL)])
def test_mutated_trace_files_load_or_raise_a_named_error(tmp_path_factory, name, text):
    tmp_path = tmp_path_factory.mktemp("traces")

    @settings(max_examples=150, deadline=5000, database=None)
    @given(st.lists(st.tuples(st.integers(0, len(text)), st.integers(0, 8),
                              st.sampled_from(PIECES)), min_size=1, max_size=4))
    def check(edits):
        mutated_text = text
        for at, cut, piece in edits:
            at = min(at, len(mutated_text))
            mutated_text = mutated_text[:at] + piece + mutated_text[at + cut:]
        folder = tmp_path / f"case{len(list(tmp_path.iterdir()))}"
        folder.mkdir()
        path = folder / name
        path.write_text(mutated_text, encoding="utf-8")
        try:
            trace = load_trace(path)
        except InputError as err:
            assert str(path) in str(err) and "\n" not in str(err), str(err)
        else:
            assert trace.requests and all(r.prompt_tokens >= 1 for r in trace.requests)
        assert os.listdir(folder) == [name]

    check()


def test_nothing_is_written_outside_the_output_while_reading(graph, tmp_path, monkeypatch):
    """The readers never write: with the working folder and the cache pointed at empty
    folders, loading every contract leaves both empty."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("FXSCALE_CACHE_DIR", str(tmp_path / "cache"))
    source = Path(os.environ["FXSCALE_CACHE_DIR"]).parent / "in"
    source.mkdir()
    for contract, (document, load) in _documents(graph).items():
        path = source / f"{contract}.json"
        path.write_text(json.dumps(document))
        load(path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in"]
