"""Greedy generate() with the fxscale-compiled forward on many of transformers' decoders: the
same tokens as eager, and as many Dynamo graphs as backend="eager" makes.

    python examples/decoder_parity.py                        # eager lowering, every decoder
    python examples/decoder_parity.py --lowering inductor qwen2 phi3

Prints one line per decoder and exits 1 if any differs or any group fell back to eager
(docs/grouping.md has a run).
"""
from __future__ import annotations

import argparse
import sys
import warnings

import torch
from torch._dynamo.testing import CompileCounterWithBackend

from fxscale.compiler.backend import fxscale_backend
from fxscale.models import zoo

SHAPES = {"default": ((2, 3), (2, 7), (2, 12)),  # (batch, prompt length) per generate call
          "mixed": ((1, 3), (1, 7), (2, 5), (3, 12), (1, 1), (4, 2))}


def generation(model: torch.nn.Module, backend, shapes) -> tuple[bool, int]:
    """Whether every prompt generates eager's tokens, and how many graphs were compiled."""
    torch._dynamo.reset()
    counter = CompileCounterWithBackend(backend)
    compiled = torch.compile(model.forward, backend=counter)
    g = torch.Generator().manual_seed(3)
    same = True
    with torch.no_grad():
        for batch, length in shapes:
            prompt = torch.randint(2, 256, (batch, length), generator=g)
            same &= torch.equal(_greedy(model, model.forward, prompt),
                                _greedy(model, compiled, prompt))
    return same, counter.frame_count


def _greedy(model: torch.nn.Module, forward, prompt: torch.Tensor) -> torch.Tensor:
    """Six greedy tokens with `forward` standing in for model.forward."""
    original, model.forward = model.forward, forward
    try:
        return model.generate(prompt, max_new_tokens=6, do_sample=False, pad_token_id=0,
                              attention_mask=torch.ones_like(prompt))
    finally:
        model.forward = original


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", help="decoders (default: all)")
    parser.add_argument("--lowering", choices=("eager", "inductor"), default="eager")
    parser.add_argument("--shapes", choices=tuple(SHAPES), default="default")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    names = args.names or [*zoo.ZOO_DECODERS, *zoo.LIBRARY_DECODERS]
    failed = 0
    for name in names:
        model = zoo.decoder(name)
        lowerings: list[str] = []

        def backend(gm, example_inputs):
            lowered = fxscale_backend(gm, example_inputs, {"lowering": args.lowering})
            lowerings.extend(g.lowering for g in lowered.group_graph.groups)
            return lowered

        same, graphs = generation(model, backend, SHAPES[args.shapes])
        _, eager = generation(model, "eager", SHAPES[args.shapes])
        fallbacks = sum(not s.startswith(args.lowering) for s in lowerings)
        ok = same and graphs == eager and not fallbacks
        failed += not ok
        print(f"{name:12s} tokens {'equal' if same else 'DIFFER'}, graphs fxscale {graphs} / "
              f"eager {eager}, {len(lowerings) - fallbacks} of {len(lowerings)} group "
              f"compiles {args.lowering}{'' if ok else '  <- MISMATCH'}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
