"""Choosing a request's next token from its logits row (contracts/sampling.py)."""
from __future__ import annotations

from collections import Counter

import torch

from fxscale.contracts.sampling import Sampling


def next_token(logits: torch.Tensor, sampling: Sampling, generator: torch.Generator | None,
               generated: list[int]) -> tuple[int, dict | None]:
    """The next token of one request, and (when asked) its logprob with the top-n others
    (of the model's distribution, before sampling's transformations)."""
    row = logits.float()
    report = None
    if sampling.logprobs is not None:
        logprobs = torch.log_softmax(row, dim=-1)
    if sampling.presence_penalty or sampling.frequency_penalty:
        counts = Counter(generated)
        if counts:
            ids = torch.tensor(list(counts), device=row.device)
            times = torch.tensor(list(counts.values()), device=row.device, dtype=row.dtype)
            row = row.clone()
            row[ids] -= sampling.presence_penalty + sampling.frequency_penalty * times
    if sampling.greedy:
        token = int(row.argmax())
    else:
        row = row / sampling.temperature
        if sampling.top_k:
            kept = torch.topk(row, min(sampling.top_k, row.numel())).values[-1]
            row = row.masked_fill(row < kept, float("-inf"))
        probs = torch.softmax(row, dim=-1)
        if sampling.top_p < 1:
            ordered, order = probs.sort(descending=True)
            beyond = ordered.cumsum(0) - ordered > sampling.top_p  # mass before each token
            probs = probs.scatter(0, order, ordered.masked_fill(beyond, 0.0))
        token = int(torch.multinomial(probs, 1, generator=generator))
    if sampling.logprobs is not None:
        top = torch.topk(logprobs, sampling.logprobs) if sampling.logprobs else None
        report = {"token": token, "logprob": float(logprobs[token]),
                  "top": [] if top is None else
                  [(int(i), float(v)) for v, i in zip(top.values, top.indices)]}
    return token, report


def generator_for(sampling: Sampling, device: torch.device | str = "cpu"
                  ) -> torch.Generator | None:
    """A request's own random stream: seeded when it has a seed (reproducible whatever the
    engine serves beside it), else fresh."""
    if sampling.greedy:
        return None
    generator = torch.Generator(device=device)
    if sampling.seed is not None:
        generator.manual_seed(sampling.seed)
    else:
        generator.seed()
    return generator
