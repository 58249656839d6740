"""`fxscale.export_onnx`: every operator group as its own ONNX model, a manifest that wires
the groups into the whole model, and one combined model for viewing the grouping.

    result = fxscale.export_onnx(model, "out/", input_ids)
    outputs = fxscale.onnx_run.run_groups("out/", {"input_ids": ids.numpy()})
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import onnx
import torch

from fxscale.contracts.group_graph import COST_FIELDS, Group
from fxscale.contracts.jsonio import (
    output_folder,
    read_json,
    replace_folder,
    write_atomic,
)
from fxscale.export.capture import GroupCapture, capture_groups
from fxscale.export.combine import combine
from fxscale.export.group import (
    dtype_name,
    export_group,
    group_inputs,
    output_nodes,
    rename_symbols,
    shape_names,
)
from fxscale.export.verify import eager_mismatch
from fxscale.passes.node_facts import node_value

MANIFEST = "manifest.json"
COMBINED = "model.onnx"
FORMAT = "fxscale-onnx-groups"
VERSION = 1
MIN_OPSET = 18
TOLERANCE = 1e-4  # largest ONNX-vs-eager error on the example inputs, relative to max(1, |eager|)
EXTERNAL_DATA_BYTES = 1 << 30  # protobuf files stop at 2 GiB: bigger weights go to a side file


@dataclass
class OnnxExport:
    """What export_onnx wrote: exported group ids, skipped groups with the reason, and paths."""

    directory: Path
    groups: list[str]
    skipped: dict[str, str]
    manifest: Path
    combined: Path | None
    capture: GroupCapture | None = field(default=None, repr=False, compare=False)


def export_onnx(model: torch.nn.Module, directory: str | Path, *example_inputs: Any,
                granularity: str = "operator", opset: int = MIN_OPSET,
                **model_kwargs: Any) -> OnnxExport:
    """Export every operator group of `model(*example_inputs, **model_kwargs)` to
    `directory`: g<k>.onnx per group, manifest.json, and model.onnx (all groups in one).

    Batch and length stay dynamic. A group that ONNX cannot express, or whose ONNX result
    differs from eager on the example inputs, is skipped with the reason (no model.onnx then).
    """
    module = _module(model)
    if not example_inputs and not model_kwargs:
        raise ValueError("export_onnx: give example inputs, e.g. "
                         "export_onnx(model, 'out', input_ids)")
    if opset < MIN_OPSET:
        raise ValueError(f"export_onnx: opset {opset} is too old; use {MIN_OPSET} or newer")
    target = output_folder(directory, _previous_export(Path(directory)), "ONNX export")
    capture = capture_groups(module, example_inputs, model_kwargs, granularity)
    manifest = _manifest(capture, opset, granularity)
    models, skipped = {}, {}
    # everything is written into a new folder that replaces the old export only when done:
    # an interrupted export leaves the previous one whole
    with replace_folder(target, _previous_export(target), "ONNX export") as out:
        for group in capture.graph.groups:
            entries = group_inputs(capture, group.id)
            path = out / f"{group.id}.onnx"
            try:
                models[group.id] = export_group(capture, group, entries, opset)
                save_model(models[group.id], path)
                onnx.checker.check_model(str(path), full_check=True)
                mismatch = eager_mismatch(str(path), entries, capture.example.args[group.id],
                                          capture.example.outputs[group.id], TOLERANCE)
                if mismatch:
                    raise ValueError(f"on the example inputs, ONNX {mismatch}")
            except Exception as err:  # noqa: BLE001 - any failure means: this group is not exported
                skipped[group.id] = _reason(err)
                models.pop(group.id, None)
                _remove(path)
            manifest["groups"].append(_group_entry(capture, group, entries,
                                                   models.get(group.id), path.name))
        manifest["skipped"] = [{"id": g, "name": capture.graph.group(g).name, "reason": r}
                               for g, r in skipped.items()]
        if skipped:
            manifest["notes"].append("no combined model: not every group was exported")
        else:
            save_model(combine(manifest, models), out / COMBINED)
            onnx.checker.check_model(str(out / COMBINED))
            manifest["combined"] = COMBINED
        write_atomic(out / MANIFEST, json.dumps(manifest, indent=1))
    return OnnxExport(target, list(models), skipped, target / MANIFEST,
                      None if skipped else target / COMBINED, capture)


def _module(model: Any) -> torch.nn.Module:
    """The module to export (the original of a torch.compile result), with real weights."""
    module = getattr(model, "_orig_mod", model)
    if not isinstance(module, torch.nn.Module):
        raise TypeError(f"export_onnx: model must be a torch.nn.Module (or torch.compile of one), "
                        f"got {type(model).__name__}")
    if any(p.is_meta for p in module.parameters()):
        raise ValueError("export_onnx: the model's weights are on the meta device, and ONNX files "
                         "store weights; build the model on the cpu")
    return module


def _previous_export(directory: Path) -> Callable[[str], bool]:
    """Which names in `directory` an export may replace: the files its manifest lists (with
    their external weights) and the manifest; nothing when there is no readable manifest."""
    names: set[str] = set()
    try:
        old, _ = read_json(directory / MANIFEST)
    except (OSError, ValueError):
        return names.__contains__
    old = old if isinstance(old, dict) else {}
    groups = old.get("groups") if isinstance(old.get("groups"), list) else []
    for name in [g.get("file") for g in groups if isinstance(g, dict)] + [old.get("combined")]:
        if isinstance(name, str) and name.endswith(".onnx") and Path(name).name == name:
            names |= {name, f"{name}.data"}
    return (names | {MANIFEST}).__contains__


def _remove(path: Path) -> None:
    """Delete an ONNX file and its external weights, if there."""
    path.unlink(missing_ok=True)
    path.with_name(f"{path.name}.data").unlink(missing_ok=True)


def save_model(model: onnx.ModelProto, path: Path) -> None:
    """Save an ONNX model; weights go to `<file>.data` beside it past EXTERNAL_DATA_BYTES."""
    if sum(t.ByteSize() for t in model.graph.initializer) <= EXTERNAL_DATA_BYTES:
        onnx.save_model(model, str(path))
        return
    copy = onnx.ModelProto()  # saving with external data rewrites the tensors it is given
    copy.CopyFrom(model)
    onnx.save_model(copy, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=f"{path.name}.data")


def _reason(err: Exception) -> str:
    """One line saying why a group was not exported (the exporter's own summary when it has one)."""
    text = str(err)
    match = re.search(r"<class '(?:[\w.]+\.)?(\w+)'>: (.+)", text)
    if match:
        return f"{match.group(1)}: {match.group(2)}"[:500]
    first = text.strip().splitlines()[0] if text.strip() else ""
    return f"{type(err).__name__}: {first}"[:500]


def _manifest(capture: GroupCapture, opset: int, granularity: str) -> dict[str, Any]:
    """The manifest without its groups: format, model inputs and outputs, dims."""
    placeholders = {n.name: n for n in capture.split.graph.nodes if n.op == "placeholder"}
    inputs = []
    for name, source in capture.sources.items():
        if "input" in source and source["input"] not in [i["name"] for i in inputs]:
            value = node_value(placeholders[name])
            inputs.append({"name": source["input"], "dtype": dtype_name(value.dtype),
                           "shape": shape_names(value.shape, capture.dims)})
    fixed = {k: v if isinstance(v, (bool, int, float, str, type(None))) else repr(v)
             for k, v in capture.kwargs.items() if not isinstance(v, torch.Tensor)}
    return {"format": FORMAT, "version": VERSION, "model": capture.model,
            "granularity": granularity, "opset": opset,
            "dims": {capture.dims[s]: {"symbol": s, **info}
                     for s, info in capture.graph.symbols.items()},
            "inputs": inputs, "fixed_kwargs": fixed, "groups": [],
            "outputs": [{"name": n, "from": s} for n, s in capture.outputs.items()],
            "skipped": [], "combined": None, "notes": list(capture.notes)}


def _group_entry(capture: GroupCapture, group: Group, entries: list[dict],
                 model: onnx.ModelProto | None, file: str) -> dict:
    """A group in the manifest: file (None if skipped), costs over dim names, inputs with
    sources, outputs (named as in the ONNX file)."""
    nodes = output_nodes(capture.submodule(group.id))
    names = [o.name for o in model.graph.output] if model else [n.name for n in nodes]
    outputs = []
    for name, node, value in zip(names, nodes, capture.example.outputs[group.id]):
        if isinstance(value, torch.Tensor):
            outputs.append({"name": name, "dtype": dtype_name(value.dtype),
                            "shape": shape_names(node_value(node).shape, capture.dims)})
        else:  # a size computed by the group: an int64 scalar in ONNX
            outputs.append({"name": name, "dtype": "int64", "shape": []})
    return {"id": group.id, "name": group.name, "file": file if model else None,
            "classes": group.classes,
            "resource": group.resource, "param_bytes": group.param_bytes,
            "costs": {f: rename_symbols(getattr(group, f), capture.dims) for f in COST_FIELDS},
            "inputs": entries, "outputs": outputs}
