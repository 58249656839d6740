"""ONNX export of every operator group (fxscale.export_onnx): onnx.checker, onnxruntime
against eager per group and chained through the manifest, on fresh inputs of another batch
and length than the export example (so the axes must be dynamic), and skipped groups."""
from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
import time

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from fxscale.cli.export import add_export_command
from fxscale.export import write as onnx_export
from fxscale.export.run import run_groups
from fxscale.export.write import export_onnx
from fxscale.models import zoo

FRESH = (3, 9)  # batch, length of the checks; the export example is (2, 16)
TOLERANCE = 1e-4


@torch.library.custom_op("fxscale_onnx_test::opaque", mutates_args=())
def opaque(x: torch.Tensor) -> torch.Tensor:
    """An op with no ONNX translation."""
    return x * 2


@opaque.register_fake
def _(x):
    return torch.empty_like(x)


class Opaque(torch.nn.Module):
    """Linear, an op ONNX cannot express, linear."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = torch.nn.Linear(16, 16), torch.nn.Linear(16, 16)

    def forward(self, x):
        return self.b(opaque(torch.relu(self.a(x))))


class Flatten(torch.nn.Module):
    """Flattens (batch, length) and back: at node granularity groups pass sizes to each other
    and some group sees only batch*length, so it gets batch and length as scalar inputs."""

    def __init__(self) -> None:
        super().__init__()
        self.a = torch.nn.Linear(16, 16)
        self.scale = torch.nn.Parameter(torch.tensor(0.5))  # a 0-d weight

    def forward(self, x):
        b, n, h = x.shape
        return (self.a(x.reshape(b * n, h)).view(b, n, h) * self.scale).softmax(-1)


def _tokens(shape=FRESH):
    """Fresh random token ids."""
    return torch.randint(0, 256, shape, generator=torch.Generator().manual_seed(7))


def _assert_close(actual: np.ndarray, expected) -> None:
    """ONNX output equals the eager one within TOLERANCE (exactly for ints and bools)."""
    want = expected.numpy() if isinstance(expected, torch.Tensor) else np.asarray(expected)
    assert actual.shape == want.shape
    if np.issubdtype(want.dtype, np.floating):
        np.testing.assert_allclose(actual, want, rtol=TOLERANCE, atol=TOLERANCE)
    else:
        np.testing.assert_array_equal(actual, want)


def _manifest(result) -> dict:
    return json.loads(result.manifest.read_text())


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def exported(request, tmp_path_factory):
    """A zoo model and its export (example batch 2, length 16)."""
    entry = zoo.build(request.param, layers=2, hidden=64)
    return entry, export_onnx(entry.model, tmp_path_factory.mktemp(request.param), *entry.args)


def test_every_group_is_a_checked_onnx_model_with_its_metadata(exported):
    entry, result = exported
    manifest = _manifest(result)
    assert result.skipped == {} and manifest["skipped"] == []
    assert result.groups == [g["id"] for g in manifest["groups"]] == \
        [g.id for g in result.capture.graph.groups]
    assert manifest["inputs"] == [{"name": "input_ids", "dtype": "int64",
                                   "shape": ["batch", "length"]}]
    for group in manifest["groups"]:
        model = onnx.load(result.directory / group["file"])
        onnx.checker.check_model(model, full_check=True)
        assert {o.domain: o.version for o in model.opset_import}[""] >= 18
        props = {p.key: p.value for p in model.metadata_props}
        assert props["fxscale.group.id"] == group["id"]
        assert json.loads(props["fxscale.group.classes"]) == group["classes"]
        assert props["fxscale.group.flops"] == group["costs"]["flops"]
        assert "s" not in props["fxscale.group.flops"].replace("batch", "")  # over dim names
        fed = [e["name"] for e in group["inputs"] if e["kind"] == "input"]
        shapes = {e["name"]: e["shape"] for e in group["inputs"] if e["kind"] == "input"}
        assert [i.name for i in model.graph.input] == fed  # weights are not inputs...
        stored = {e["initializer"] for e in group["inputs"] if e["kind"] == "initializer"}
        assert stored <= {t.name for t in model.graph.initializer}  # ...but initializers
        for inp, name in zip(model.graph.input, fed):
            dims = [d.dim_param or d.dim_value for d in inp.type.tensor_type.shape.dim]
            assert dims == shapes[name]  # named dynamic axes: batch, length
    first = _manifest(result)["groups"][1]["inputs"][0]
    assert first["kind"] == "input" and first["shape"][:2] == ["batch", "length"]


def test_each_group_matches_its_eager_run_on_fresh_shapes(exported):
    _, result = exported
    run = result.capture.run(_tokens())
    for group in _manifest(result)["groups"]:
        args = run.args[group["id"]]
        feeds = {e["name"]: np.asarray(a.contiguous() if isinstance(a, torch.Tensor) else a)
                 for e, a in zip(group["inputs"], args) if e["kind"] == "input"}
        session = ort.InferenceSession(str(result.directory / group["file"]))
        outputs = session.run(None, feeds)
        assert len(outputs) == len(run.outputs[group["id"]])
        for actual, expected in zip(outputs, run.outputs[group["id"]]):
            _assert_close(actual, expected)


@pytest.mark.parametrize("shape", [FRESH, (1, 1)])
def test_groups_chained_by_the_manifest_give_the_eager_logits(exported, shape):
    entry, result = exported
    ids = _tokens(shape)
    with torch.no_grad():
        expected = entry.model(ids, use_cache=False).logits
    assert _manifest(result)["outputs"] == [{"name": "logits", "from": {
        "group": result.groups[-1], "output": 0}}]
    _assert_close(run_groups(result.directory, {"input_ids": ids.numpy()})["logits"], expected)


def test_combined_model_shows_the_groups_and_gives_the_eager_logits(exported):
    entry, result = exported
    model = onnx.load(result.combined)
    onnx.checker.check_model(model, full_check=True)
    groups = set(result.groups)
    seen = set()
    for node in model.graph.node:
        if node.name.startswith("output/"):
            continue
        group = {p.key: p.value for p in node.metadata_props}["fxscale.group"]
        assert node.name.startswith(f"{group}/") and node.doc_string == f"fxscale.group={group}"
        seen.add(group)
    assert seen == groups
    names = [t.name for t in model.graph.initializer]
    assert len(names) == len(set(names))
    if entry.name == "gpt2":  # the tied embedding is stored once
        assert names.count("transformer.wte.weight") == 1
    ids = _tokens((4, 5))
    with torch.no_grad():
        expected = entry.model(ids, use_cache=False).logits
    logits = ort.InferenceSession(str(result.combined)).run(None, {"input_ids": ids.numpy()})[0]
    _assert_close(logits, expected)


def test_a_group_onnx_cannot_express_is_skipped_with_the_reason(tmp_path):
    x = torch.randn(2, 5, 16)
    result = export_onnx(Opaque(), tmp_path, x, granularity="node")
    manifest = _manifest(result)
    [(skipped, reason)] = result.skipped.items()
    assert "fxscale_onnx_test.opaque" in reason
    name = manifest["groups"][int(skipped[1:])]["name"]
    assert manifest["skipped"] == [{"id": skipped, "name": name, "reason": reason}]
    assert result.groups and skipped not in result.groups
    for group in manifest["groups"]:
        assert (group["file"] is None) == (group["id"] == skipped)
        assert (tmp_path / f"{group['id']}.onnx").exists() == (group["id"] != skipped)
    assert result.combined is None and manifest["combined"] is None
    assert not (tmp_path / "model.onnx").exists()
    with pytest.raises(ValueError, match=f"not exported.*{skipped}"):
        run_groups(tmp_path, {"x": x.numpy()})


def test_sizes_pass_between_groups_and_derived_dims_stay_dynamic(tmp_path):
    model = Flatten().eval()
    result = export_onnx(model, tmp_path, torch.randn(2, 5, 16), granularity="node")
    manifest = _manifest(result)
    assert result.skipped == {}
    entries = [e for g in manifest["groups"] for e in g["inputs"]]
    assert any(e["kind"] == "input" and "size" in e["from"] for e in entries)  # a scalar input
    assert any(e["kind"] == "shape" for e in entries)  # a size read from an input's shape
    assert any(e["kind"] == "input" and "group" in e["from"] and e["shape"] == [] for e in entries)
    assert any("batch*length" in e.get("shape", []) for e in entries)
    assert {"initializer": "scale"}.items() <= next(
        e for e in entries if e["from"] == {"weight": "scale"}).items()
    x = torch.randn(3, 7, 16)
    with torch.no_grad():
        expected = model(x)
    _assert_close(run_groups(tmp_path, {"x": x.numpy()})["output"], expected)
    combined = ort.InferenceSession(str(result.combined)).run(None, {"x": x.numpy()})[0]
    _assert_close(combined, expected)


def test_reexport_removes_stale_files_and_big_weights_go_to_external_data(tmp_path, monkeypatch):
    model = Flatten().eval()
    x = torch.randn(2, 5, 16)
    assert len(export_onnx(model, tmp_path, x, granularity="node").groups) > 1
    monkeypatch.setattr(onnx_export, "EXTERNAL_DATA_BYTES", 0)
    result = export_onnx(model, tmp_path, x, granularity="model")
    assert result.groups == ["g0"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "g0.onnx", "g0.onnx.data", "manifest.json", "model.onnx", "model.onnx.data"]
    _assert_close(run_groups(tmp_path, {"x": x.numpy()})["output"], model(x).detach())


def test_bad_arguments_say_what_to_do(tmp_path):
    model, x = Flatten(), torch.randn(2, 5, 16)
    afile = tmp_path / "afile"
    afile.write_text("")
    with pytest.raises(ValueError, match="is a file; give a directory"):
        export_onnx(model, afile, x)
    with pytest.raises(TypeError, match="must be a torch.nn.Module"):
        export_onnx(lambda t: t, tmp_path, x)
    with pytest.raises(ValueError, match="give example inputs"):
        export_onnx(model, tmp_path)
    with pytest.raises(ValueError, match="opset 17 is too old"):
        export_onnx(model, tmp_path, x, opset=17)
    with pytest.raises(ValueError, match="meta device"):
        export_onnx(Flatten().to("meta"), tmp_path, x)
    with pytest.raises(ValueError, match=r"holds files that are not part of an earlier ONNX "
                                         r"export \(afile\)"):
        export_onnx(model, tmp_path, x)
    assert afile.exists()  # a folder with other files is never replaced
    export_onnx(model, tmp_path / "out", x)
    with pytest.raises(ValueError, match="missing model input.*'x'"):
        run_groups(tmp_path / "out", {"y": x.numpy()})


def _complete(directory):
    """Every file the manifest names exists, and the groups run."""
    manifest = json.loads((directory / "manifest.json").read_text())
    files = [g["file"] for g in manifest["groups"]] + [manifest["combined"]]
    assert files and all((directory / f).is_file() for f in files)
    return manifest


def test_an_interrupted_reexport_leaves_the_previous_export_whole(tmp_path, monkeypatch):
    model, x = Flatten().eval(), torch.randn(2, 5, 16)
    out = tmp_path / "out"
    export_onnx(model, out, x, granularity="model")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    calls = []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt  # as SIGTERM does through the command line
        return real(*args, **kwargs)

    real = onnx_export.export_group
    monkeypatch.setattr(onnx_export, "export_group", interrupted)
    with pytest.raises(KeyboardInterrupt):
        export_onnx(model, out, x, granularity="node")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no partial folder left
    _complete(out)
    _assert_close(run_groups(out, {"x": x.numpy()})["output"], model(x).detach())


def test_sigterm_during_the_export_command_keeps_the_old_export(tmp_path):
    out = tmp_path / "out"
    command = [sys.executable, "-m", "fxscale", "export-onnx", str(out), "--layers", "1"]
    subprocess.run(command, check=True, capture_output=True, timeout=600)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    process = subprocess.Popen(command + ["--granularity", "node"], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while not list(tmp_path.glob(".out.*.new")) and process.poll() is None:
        assert time.monotonic() < deadline, "the export never started writing"
        time.sleep(0.05)
    time.sleep(0.5)  # well into writing the new files
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 130, err
    assert "nothing was left half-written" in err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    _complete(out)


def test_export_command_writes_the_files(tmp_path, capsys):
    parser = argparse.ArgumentParser()
    add_export_command(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["export-onnx", str(tmp_path / "out"), "--model", "gpt2",
                              "--layers", "1", "--granularity", "model"])
    assert args.run(args) == 0
    assert "exported 1 of 1 groups" in capsys.readouterr().out
    assert (tmp_path / "out" / "model.onnx").exists()
