"""The engine's benchmark on a GPU in one call.

    python examples/engine_gpu.py OUT_DIR [--dtype bfloat16] [--hidden 1024 2048]
                                          [--requests 16 64] [--rounds 5]
    python examples/engine_gpu.py OUT_DIR --smoke      # tiny, on the CPU: checks the script

Generated tokens per second (prefill included) of fxscale's engine (both policies; paged
attention and RMSNorm on fxscale's Triton kernels) against Hugging Face's `generate_batch`
and a static left-padded batch, on one Llama and one set of prompts, interleaved rounds
(fxscale/studies/engine_bench.py). Writes OUT_DIR/engine.json and OUT_DIR/engine.md; copy the
table into docs/runtime.md with the GPU's name. Decode steps are not captured as CUDA graphs
yet: every step launches its kernels from Python (see docs/runtime.md, "Not built yet").
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from pathlib import Path

import torch

from fxscale.contracts.jsonio import write_atomic
from fxscale.studies.engine_bench import GENERATORS, EngineBench, compare_generators


def table(results: list[dict], title: str) -> str:
    """The Markdown table of the runs."""
    head = ("| hidden | requests | dtype | " + " | ".join(GENERATORS)
            + " | operator / hf_batch | operator / hf_static |\n"
            + "|---" * (5 + len(GENERATORS)) + "|\n")
    rows = []
    for r in results:
        c, rates, ratios = r["config"], r["tokens_per_s"], r["ratios"]
        rows.append(f"| {c['hidden']} | {c['requests']} | {c['dtype']} | "
                    + " | ".join(f"{rates[g]['median']:.0f} ({rates[g]['min']:.0f}-"
                                 f"{rates[g]['max']:.0f})" for g in GENERATORS)
                    + " | " + " | ".join(f"{ratios[k]['median']:.2f}x" for k in
                                         ("operator/hf_batch", "operator/hf_static")) + " |")
    return f"{title}\n\n{head}" + "\n".join(rows) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", help="folder for engine.json and engine.md")
    parser.add_argument("--dtype", default="bfloat16",
                        choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--hidden", type=int, nargs="+", default=[1024, 2048])
    parser.add_argument("--requests", type=int, nargs="+", default=[16, 64])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--smoke", action="store_true",
                        help="tiny sizes on the CPU (checks the script, times mean nothing)")
    args = parser.parse_args(argv)
    if not args.smoke and not torch.cuda.is_available():
        print("engine_gpu.py: no CUDA device here; run it on a GPU (or --smoke on the CPU "
              "to check the script)", file=sys.stderr)
        return 2
    if args.smoke:
        benches = [EngineBench(hidden=128, requests=4, longest=24, new_tokens=4,
                               dtype="float32")]
        rounds = 1
    else:
        benches = [EngineBench(hidden=h, requests=n, dtype=args.dtype, device="cuda")
                   for h in args.hidden for n in args.requests]
        rounds = args.rounds
    results = []
    for bench in benches:
        results.append(compare_generators(bench, rounds=rounds,
                                          progress=lambda msg: print(msg, flush=True)))
    name = torch.cuda.get_device_name() if torch.cuda.is_available() and not args.smoke \
        else "CPU (smoke)"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(out / "engine.json", json.dumps({"device": name, "torch": torch.__version__,
                                                  "benches": [asdict(b) for b in benches],
                                                  "results": results}, indent=1))
    text = table(results, f"Engine on {name}, torch {torch.__version__}: generated tokens/s, "
                          f"median (min-max) of {rounds} interleaved rounds")
    write_atomic(out / "engine.md", text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
