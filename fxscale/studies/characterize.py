"""The characterization report: does the paper's operator heterogeneity hold on our models?

For a decoder (Llama), a mixture-of-experts (Mixtral) and an encoder-decoder (Whisper), and
for each operator class: compute (FLOPs) and memory (bytes) footprints and their growth with
batch and with length, in prefill and decode, from
- the H100 device model applied to the published dimensions (one layer, bf16, meta device);
- measurement on this machine of small fp32 versions (every operator timed alone).
Five published findings are checked against both; disagreements are reported as such.
"""
from __future__ import annotations

import importlib.util
import math
import statistics
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from fxscale.contracts.jsonio import output_folder, replace_folder
from fxscale.profiling.analytic import group_graphs_over
from fxscale.profiling.cpu_calibration import device_model
from fxscale.profiling.measure import Grid, profile
from fxscale.runtime.devices import DeviceModel, load_device

LIGHT = ("data-movement", "scalar")
# (phase, batch, length) -> class -> metric
ClassTable = dict[tuple[str, int, int], dict[str, dict[str, float]]]


@dataclass(frozen=True)
class Family:
    """One model family: what it stands for, a small model to measure, a published-size one."""

    description: str
    small: Callable[[], torch.nn.Module]
    large: Callable[[], torch.nn.Module]


def _llama(hidden, ffn, heads, kv, vocab, meta):
    import transformers as tf

    return _build(tf.LlamaForCausalLM, tf.LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=1,
        num_attention_heads=heads, num_key_value_heads=kv, max_position_embeddings=16384), meta)


def _mixtral(hidden, ffn, heads, kv, vocab, meta):
    import transformers as tf

    return _build(tf.MixtralForCausalLM, tf.MixtralConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=1,
        num_attention_heads=heads, num_key_value_heads=kv, num_local_experts=8,
        num_experts_per_tok=2, max_position_embeddings=16384), meta)


def _whisper(d_model, ffn, heads, mels, frames, vocab, meta):
    import transformers as tf

    return _build(tf.WhisperForConditionalGeneration, tf.WhisperConfig(
        vocab_size=vocab, d_model=d_model, encoder_layers=1, decoder_layers=1,
        encoder_attention_heads=heads, decoder_attention_heads=heads, encoder_ffn_dim=ffn,
        decoder_ffn_dim=ffn, num_mel_bins=mels, max_source_positions=frames,
        max_target_positions=16384, decoder_start_token_id=0, pad_token_id=0), meta)


def _build(cls, config, meta: bool) -> torch.nn.Module:
    """A model with random weights: fp32 on CPU, or bf16 on the meta device."""
    torch.manual_seed(0)
    if not meta:
        return cls(config).eval()
    with torch.device("meta"):
        return cls(config).to(torch.bfloat16).eval()


FAMILIES = {
    "llama": Family("decoder, Llama-2-7B dimensions (hidden 4096, MLP 11008, 32 heads)",
                    lambda: _llama(256, 688, 4, 4, 1024, False),
                    lambda: _llama(4096, 11008, 32, 32, 32000, True)),
    "mixtral": Family("mixture of experts, Mixtral-8x7B dimensions (hidden 4096, 8 experts of "
                      "14336, top-2, 8 KV heads)",
                      lambda: _mixtral(256, 896, 4, 2, 1024, False),
                      lambda: _mixtral(4096, 14336, 32, 8, 32000, True)),
    "whisper": Family("encoder-decoder, Whisper-large dimensions (d_model 1280, 20 heads, "
                      "1500 encoder frames)",
                      lambda: _whisper(256, 1024, 4, 32, 64, 1024, False),
                      lambda: _whisper(1280, 5120, 20, 128, 1500, 51866, True)),
}
ENCODER_DECODER = frozenset({"whisper"})
CPU_GRID = Grid(batches=(1, 4, 16), lengths=(32, 128, 512))
H100_GRID = Grid(batches=(1, 8, 64, 256), lengths=(128, 512, 2048, 8192))


def analytic_classes(model: torch.nn.Module, grid: Grid, device: DeviceModel,
                     dtype: str) -> ClassTable:
    """Per grid point and operator class: FLOPs, bytes and modelled seconds (sum over ops)."""
    table: ClassTable = {}
    for point, graph in group_graphs_over(model, grid, "node"):
        classes: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
        for group in graph.groups:
            flops, moved = graph.cost(group, "flops"), graph.bytes_moved(group)
            entry = classes[group.classes[0]]
            entry["flops"] += flops
            entry["bytes"] += moved
            entry["seconds"] += device.latency(flops, moved, dtype) if flops or moved else 0.0
        table[point] = {k: dict(v) for k, v in classes.items()}
    return table


def measured_classes(model: torch.nn.Module, grid: Grid, repeats: int) -> ClassTable:
    """Per grid point and operator class: measured seconds (every operator timed alone)."""
    measured = profile(model, grid, granularity="node", lowering="eager", repeats=repeats,
                       warmup=1, rotations=2, progress=False)
    table: ClassTable = defaultdict(lambda: defaultdict(lambda: {"seconds": 0.0}))
    for group in measured.groups:
        op_class = group.name.rsplit("/", 1)[-1]
        for p in group.points:
            table[(p.phase, p.batch, p.length)][op_class]["seconds"] += p.median_s
    return table


def slope(table: ClassTable, op_class: str, metric: str, phase: str, axis: str,
          grid: Grid) -> float | None:
    """Growth exponent: least-squares slope of log(metric) vs log(batch or length), the other
    held at its largest grid value."""
    xs, ys = [], []
    for b in grid.batches:
        for n in grid.lengths:
            if (axis == "batch" and n != grid.lengths[-1]) or (axis == "length" and
                                                                b != grid.batches[-1]):
                continue
            value = table.get((phase, b, n), {}).get(op_class, {}).get(metric, 0.0)
            if value > 0:
                xs.append(math.log(b if axis == "batch" else n))
                ys.append(math.log(value))
    if len(xs) < 2:
        return None
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)


def characterize(out_dir: str | Path, models: tuple[str, ...] = tuple(FAMILIES),
                 cpu_grid: Grid = CPU_GRID, h100_grid: Grid = H100_GRID, repeats: int = 5,
                 progress: Callable[[str], None] = lambda message: None) -> Path:
    """Write report.md and plots (PNG and SVG) into out_dir; return the report's path."""
    unknown = [m for m in models if m not in FAMILIES]
    if unknown:
        raise ValueError(f"unknown report model(s) {unknown}; choose from {sorted(FAMILIES)}")
    if importlib.util.find_spec("matplotlib") is None:  # fail before minutes of measuring
        raise ValueError("the characterization report plots with matplotlib: "
                         "pip install matplotlib")

    target = output_folder(out_dir, _report_file, "characterization report")
    start = time.perf_counter()
    h100 = load_device("h100")
    cpu = device_model("cpu")
    sections, findings = [], []
    # the report and its plots replace the folder's earlier ones together, when all are done
    with replace_folder(target, _report_file, "characterization report") as out:
        for name in models:
            family = FAMILIES[name]
            progress(f"{name}: H100 model at published dimensions")
            analytic = analytic_classes(family.large(), h100_grid, h100, "bf16")
            progress(f"{name}: measuring every operator on this CPU")
            small = family.small()
            cpu_costs = analytic_classes(small, cpu_grid, cpu, "fp32")
            measured = measured_classes(small, cpu_grid, repeats)
            sections.append(_model_section(name, family, analytic, measured, h100, h100_grid,
                                           cpu_grid))
            findings.extend(_findings(name, analytic, measured, cpu_costs, h100, cpu,
                                      h100_grid, cpu_grid))
            _plots(out, name, analytic, measured, h100, h100_grid, cpu_grid)
        (out / "report.md").write_text(_report(sections, findings, time.perf_counter() - start,
                                               cpu, h100_grid, cpu_grid))
    return target / "report.md"


def _report_file(name: str) -> bool:
    """Whether a file is part of a characterization report: report.md and its plots."""
    return name == "report.md" or name.endswith((".png", ".svg"))


def _classes(table: ClassTable) -> list[str]:
    """Operator classes present in a table, heavy ones first."""
    seen: dict[str, float] = defaultdict(float)
    for classes in table.values():
        for k, v in classes.items():
            if k not in LIGHT:
                seen[k] += v.get("flops", 0.0) + v.get("seconds", 0.0)
    return sorted(seen, key=seen.get, reverse=True)


def _fmt(value: float | None, digits: int = 2) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def _model_section(name, family, analytic, measured, h100, h100_grid, cpu_grid) -> str:
    """The per-class table of one model."""
    b, n = h100_grid.batches[-1], h100_grid.lengths[-1]
    lines = [f"## {name}: {family.description}", "",
             f"Footprints at batch {b}, length {n} (H100 model, bf16). Slopes are growth "
             "exponents (log-log): FLOPs/bytes/latency vs batch (length fixed at its largest) "
             "and vs length (batch at its largest); *CPU* columns are measured latency.", "",
             "| class | phase | GFLOPs | GB moved | FLOP/B | H100 bound | FLOPs~b | FLOPs~len | "
             "bytes~b | bytes~len | H100 t~len | CPU t~b | CPU t~len |",
             "|" + "---|" * 13]
    for phase in ("prefill", "decode"):
        for cls in _classes(analytic):
            entry = analytic.get((phase, b, n), {}).get(cls)
            if not entry:
                continue
            intensity = entry["flops"] / entry["bytes"] if entry["bytes"] else 0.0
            bound = h100.bound(entry["flops"], entry["bytes"], "bf16")
            row = [cls, phase, f"{entry['flops'] / 1e9:,.1f}", f"{entry['bytes'] / 1e9:,.3f}",
                   f"{intensity:,.1f}", bound,
                   _fmt(slope(analytic, cls, "flops", phase, "batch", h100_grid)),
                   _fmt(slope(analytic, cls, "flops", phase, "length", h100_grid)),
                   _fmt(slope(analytic, cls, "bytes", phase, "batch", h100_grid)),
                   _fmt(slope(analytic, cls, "bytes", phase, "length", h100_grid)),
                   _fmt(slope(analytic, cls, "seconds", phase, "length", h100_grid)),
                   _fmt(slope(measured, cls, "seconds", phase, "batch", cpu_grid)),
                   _fmt(slope(measured, cls, "seconds", phase, "length", cpu_grid))]
            lines.append("| " + " | ".join(row) + " |")
    lines += ["", f"![{name} prefill vs length]({name}-prefill-length.png) "
              f"![{name} decode vs batch]({name}-decode-batch.png) "
              f"![{name} roofline]({name}-roofline.png)", ""]
    return "\n".join(lines)


def _findings(name, analytic, measured, cpu_costs, h100, cpu, h100_grid, cpu_grid) -> list[dict]:
    """The five published findings, checked on one model from both sources."""
    rows = []
    big_n = h100_grid.lengths[-1]
    f_len = slope(analytic, "attention", "flops", "prefill", "length", h100_grid)
    t_len = slope(measured, "attention", "seconds", "prefill", "length", cpu_grid)
    note = (" (the class also holds encoder attention over fixed audio frames and cross-attention, "
            "linear in the decoder length)" if name in ENCODER_DECODER else "")
    rows.append({"finding": "prefill attention grows quadratically with length", "model": name,
                 "h100": f"FLOPs ~ length^{_fmt(f_len)}{note}",
                 "cpu": f"latency ~ length^{_fmt(t_len)}",
                 "holds": f_len is not None and f_len > 1.8 and t_len is not None and t_len > 1.5})

    def bound_at(table, device, dtype, cls, phase, b, n):
        entry = table.get((phase, b, n), {}).get(cls)
        return device.bound(entry["flops"], entry["bytes"], dtype) if entry and entry["bytes"] \
            else None

    decode_h100 = [bound_at(analytic, h100, "bf16", "attention", "decode", b, n)
                   for b in h100_grid.batches for n in h100_grid.lengths]
    decode_cpu = [bound_at(cpu_costs, cpu, "fp32", "attention", "decode", b, n)
                  for b in cpu_grid.batches for n in cpu_grid.lengths]
    rows.append({"finding": "decode attention is memory-bound", "model": name,
                 "h100": f"{decode_h100.count('memory')}/{len(decode_h100)} grid points memory-bound",
                 "cpu": f"{decode_cpu.count('memory')}/{len(decode_cpu)} (calibrated CPU roofline)",
                 "holds": decode_h100.count("memory") == len(decode_h100)})
    gemm = "gemm"
    crossover = next((b for b in h100_grid.batches
                      if bound_at(analytic, h100, "bf16", gemm, "decode", b, big_n) == "compute"),
                     None)
    first = bound_at(analytic, h100, "bf16", gemm, "decode", h100_grid.batches[0], big_n)
    cpu_cross = next((b for b in cpu_grid.batches if bound_at(
        cpu_costs, cpu, "fp32", gemm, "decode", b, cpu_grid.lengths[-1]) == "compute"), None)
    rows.append({"finding": "linear layers turn compute-bound only at large batch", "model": name,
                 "h100": f"decode GEMMs {first}-bound at batch {h100_grid.batches[0]}; "
                         f"compute-bound from batch {crossover or f'> {h100_grid.batches[-1]}'}",
                 "cpu": f"compute-bound from batch {cpu_cross or f'> {cpu_grid.batches[-1]}'}",
                 "holds": first == "memory" and (crossover is None or crossover > 1)})
    light = [c for c in ("norm", "pointwise", "softmax") if any(
        c in v for v in analytic.values())]

    def light_bounds(table, device, dtype, grid):
        found = [bound_at(table, device, dtype, c, p, b, n) for c in light
                 for p in ("prefill", "decode") for b in grid.batches for n in grid.lengths]
        return [x for x in found if x]

    bounds = light_bounds(analytic, h100, "bf16", h100_grid)
    cpu_bounds = light_bounds(cpu_costs, cpu, "fp32", cpu_grid)
    rows.append({"finding": "norms and activations are memory-bound", "model": name,
                 "h100": f"{bounds.count('memory')}/{len(bounds)} class-points memory-bound "
                         f"({', '.join(light)})",
                 "cpu": f"{cpu_bounds.count('memory')}/{len(cpu_bounds)} (calibrated CPU roofline)",
                 "holds": bool(bounds) and bounds.count("memory") == len(bounds)})
    r, cases = _sensitivity_correlation(analytic, h100_grid)
    r_cpu, _ = _sensitivity_correlation(measured, cpu_grid, cpu_costs)
    rows.append({"finding": "compute and memory sensitivity are uncorrelated", "model": name,
                 "h100": f"Pearson r = {_fmt(r)} between FLOPs and bytes growth exponents over "
                         f"{cases} (class, phase, axis) cases",
                 "cpu": f"r = {_fmt(r_cpu)} between measured-latency and bytes growth exponents",
                 "holds": r is not None and abs(r) < 0.5})
    return rows


def _sensitivity_correlation(table: ClassTable, grid: Grid, costs: ClassTable | None = None
                             ) -> tuple[float | None, int]:
    """Correlation of compute growth (FLOPs, or measured seconds) with bytes growth."""
    costs = costs or table
    metric = "seconds" if costs is not table else "flops"
    xs, ys = [], []
    for cls in _classes(costs):
        for phase in ("prefill", "decode"):
            for axis in ("batch", "length"):
                fs = slope(table, cls, metric, phase, axis, grid)
                bs = slope(costs, cls, "bytes", phase, axis, grid)
                if fs is not None and bs is not None:
                    xs.append(fs)
                    ys.append(bs)
    return _pearson(xs, ys), len(xs)


def _pearson(xs: list[float], ys: list[float]) -> float | None:
    """Pearson correlation, None when undefined."""
    if len(xs) < 3 or statistics.pstdev(xs) == 0 or statistics.pstdev(ys) == 0:
        return None
    return statistics.correlation(xs, ys)


def _plots(out, name, analytic, measured, h100, h100_grid, cpu_grid) -> None:
    """Latency vs length (prefill), vs batch (decode), and the H100 roofline; PNG and SVG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    classes = [c for c in _classes(analytic)][:7]
    for kind, phase, axis in (("prefill-length", "prefill", "length"),
                              ("decode-batch", "decode", "batch")):
        fig, axes = plt.subplots(1, 2, figsize=(11, 4))
        for ax, table, grid, title in ((axes[0], analytic, h100_grid, "H100 model (published dims)"),
                                       (axes[1], measured, cpu_grid, "measured, this CPU (small)")):
            for cls in classes:
                xs, ys = [], []
                for b in grid.batches:
                    for n in grid.lengths:
                        if (axis == "length" and b == grid.batches[-1]) or (
                                axis == "batch" and n == grid.lengths[-1]):
                            value = table.get((phase, b, n), {}).get(cls, {}).get("seconds", 0)
                            if value > 0:
                                xs.append(n if axis == "length" else b)
                                ys.append(value * 1e3)
                if xs:
                    ax.plot(xs, ys, marker="o", label=cls)
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("sequence length" if axis == "length" else "batch size")
            ax.set_ylabel("latency (ms)")
            ax.set_title(f"{name} {phase}: {title}", fontsize=9)
            ax.grid(True, which="both", alpha=0.3)
        axes[1].legend(fontsize=7)
        fig.tight_layout()
        for ext in ("png", "svg"):
            fig.savefig(out / f"{name}-{kind}.{ext}")
        plt.close(fig)
    fig, ax = plt.subplots(figsize=(6, 4.5))
    ridge = h100.ridge_point("bf16")
    xs = [10 ** (k / 10) for k in range(-20, 50)]
    peak = h100.peak("bf16") * h100.compute_efficiency
    ax.plot(xs, [min(peak, x * h100.memory_bandwidth * h100.memory_efficiency) / 1e12
                 for x in xs], color="black", label=f"roofline (ridge {ridge:.0f} FLOP/B)")
    for marker, phase in (("o", "prefill"), ("^", "decode")):
        for i, cls in enumerate(classes):
            pts = [(v[cls]["flops"] / v[cls]["bytes"], v[cls]["flops"] / v[cls]["seconds"] / 1e12)
                   for (p, _, _), v in analytic.items()
                   if p == phase and cls in v and v[cls]["bytes"] and v[cls]["flops"]
                   and v[cls]["seconds"]]
            if pts:
                ax.scatter(*zip(*pts), marker=marker, color=f"C{i}", s=14,
                           label=f"{cls} ({phase})")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("arithmetic intensity (FLOP/B)")
    ax.set_ylabel("attained TFLOP/s (H100 model)")
    ax.set_title(f"{name}: operator classes on the H100 roofline", fontsize=9)
    ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    for ext in ("png", "svg"):
        fig.savefig(out / f"{name}-roofline.{ext}")
    plt.close(fig)


def _report(sections, findings, seconds, cpu, h100_grid, cpu_grid) -> str:
    """The whole Markdown report."""
    lines = ["# Operator characterization", "",
             "Generated by `fxscale profile --report DIR` "
             f"in {seconds:.0f} s on {cpu.description}. H100 model: published dimensions, one "
             f"layer, bf16, batches {list(h100_grid.batches)} x lengths {list(h100_grid.lengths)} "
             "(decode: KV-cache length). Measurement: small fp32 versions of each family, every "
             f"operator timed alone (eager), batches {list(cpu_grid.batches)} x lengths "
             f"{list(cpu_grid.lengths)}.", "",
             "## The paper's findings", "",
             "| finding | model | H100 model | measured (CPU) | verdict |", "|---|---|---|---|---|"]
    for f in findings:
        lines.append(f"| {f['finding']} | {f['model']} | {f['h100']} | {f['cpu']} | "
                     f"{'holds' if f['holds'] else '**does not hold here**'} |")
    lines += ["", "Where a verdict says *does not hold here*, our numbers disagree with the "
              "paper for that model and source; the rows above give the evidence. The last "
              "finding is checked with a proxy: the paper varies the compute and memory "
              "bandwidth allotted to an operator, we correlate how each class's FLOPs and bytes "
              "grow with batch and length. Growth in FLOPs and in bytes go together for most "
              "classes (both scale with the tokens processed); they part ways where weights "
              "dominate the bytes (decode GEMMs) or where attention FLOPs grow with length "
              "squared, which is where operator-level scaling pays.", ""]
    return "\n".join(lines + sections) + "\n"
