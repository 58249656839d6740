"""Per-request sampling: the token chooser against exact distributions, and seeded sampling on
the engine (reproducible whatever else it serves, different across seeds)."""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

import fxscale
from fxscale.models import zoo
from fxscale.runtime.engine.sampling import generator_for, next_token


def draws(logits: torch.Tensor, sampling: fxscale.Sampling, n: int,
          generated: list[int] = ()) -> torch.Tensor:
    """How often each token is chosen in n draws, as frequencies."""
    generator = generator_for(sampling)
    counts = torch.zeros(logits.numel(), dtype=torch.float64)
    for _ in range(n):
        counts[next_token(logits, sampling, generator, list(generated))[0]] += 1
    return counts / n


def reference(logits: torch.Tensor, temperature: float, top_k: int = 0,
              top_p: float = 1.0) -> torch.Tensor:
    """The distribution sampling should follow, in float64, written the long way."""
    probs = torch.softmax(logits.double() / temperature, -1)
    order = sorted(range(probs.numel()), key=lambda i: -float(probs[i]))
    kept, mass = [], 0.0
    for rank, i in enumerate(order):
        if (top_k and rank >= top_k) or mass > top_p:
            break
        kept.append(i)
        mass += float(probs[i])
    out = torch.zeros_like(probs)
    out[kept] = probs[kept]
    return out / out.sum()


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 0, 1.0), (0.5, 0, 1.0),
                                                     (1.3, 3, 1.0), (1.0, 0, 0.6)])
def test_sampled_frequencies_follow_the_exact_distribution(temperature, top_k, top_p):
    logits = torch.randn(8, generator=torch.Generator().manual_seed(7)) * 1.5
    sampling = fxscale.Sampling(temperature=temperature, top_k=top_k, top_p=top_p, seed=3)
    expected = reference(logits, temperature, top_k, top_p)
    seen = draws(logits, sampling, 4000)
    # 4000 draws: a frequency's standard deviation is at most 0.008
    assert (seen - expected).abs().max() < 0.035, (seen, expected)
    assert (seen[expected == 0] == 0).all()  # nothing outside top_k / top_p is ever chosen


def test_greedy_and_top_k_one_take_the_most_likely_token():
    logits = torch.randn(50, generator=torch.Generator().manual_seed(1))
    best = int(logits.argmax())
    assert next_token(logits, fxscale.Sampling(), None, [])[0] == best
    one = fxscale.Sampling(temperature=1.5, top_k=1, seed=0)
    assert draws(logits, one, 50)[best] == 1.0


def test_penalties_lower_the_generated_tokens_by_their_counts():
    logits = torch.tensor([2.0, 1.9, 0.0, -1.0])
    assert next_token(logits, fxscale.Sampling(), None, [0])[0] == 0
    # presence 0.06 + frequency 0.06 x 1 lowers token 0 below token 1
    penalised = fxscale.Sampling(presence_penalty=0.06, frequency_penalty=0.06)
    assert next_token(logits, penalised, None, [0])[0] == 1
    frequency = fxscale.Sampling(frequency_penalty=0.04)
    assert next_token(logits, frequency, None, [0])[0] == 0      # 2.0 - 0.04 > 1.9
    assert next_token(logits, frequency, None, [0, 0, 0])[0] == 1  # 2.0 - 0.12 < 1.9
    sampled = fxscale.Sampling(temperature=1.0, presence_penalty=2.0, seed=5)
    expected = torch.softmax(logits.double() - torch.tensor([2.0, 2.0, 0, 0]).double(), -1)
    assert (draws(logits, sampled, 4000, [0, 1]) - expected).abs().max() < 0.035


def test_logprobs_report_the_models_distribution_in_float64():
    logits = torch.randn(40, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    exact = torch.log_softmax(logits, -1)
    sampling = fxscale.Sampling(temperature=0.7, seed=9, logprobs=5)
    token, report = next_token(logits.float(), sampling, generator_for(sampling), [])
    assert report["token"] == token
    assert report["logprob"] == pytest.approx(float(exact[token]), abs=1e-5)
    top = exact.topk(5)
    assert [i for i, _ in report["top"]] == top.indices.tolist()
    assert [v for _, v in report["top"]] == pytest.approx(top.values.tolist(), abs=1e-5)
    assert next_token(logits.float(), fxscale.Sampling(logprobs=0), None, [])[1]["top"] == []
    assert next_token(logits.float(), fxscale.Sampling(), None, [])[1] is None


@pytest.mark.parametrize("field,value,message", [
    ("temperature", -0.1, "temperature must be between 0 and 2"),
    ("temperature", float("nan"), "temperature must be a finite number"),
    ("top_p", 0.0, r"top_p must be in \(0, 1\]"),
    ("top_k", -1, "top_k must be an integer >= 0"),
    ("top_k", 1.5, "top_k must be an integer >= 0"),
    ("seed", "1", "seed must be an integer or None"),
    ("presence_penalty", 3, "presence_penalty must be between -2 and 2"),
    ("logprobs", 21, "logprobs must be an integer from 0 to 20"),
])
def test_bad_sampling_parameters_name_the_field(field, value, message):
    with pytest.raises(ValueError, match=message):
        fxscale.Sampling(**{field: value})


@pytest.fixture(scope="module")
def llama():
    return zoo.build("llama", layers=2, hidden=64).model.eval()


@pytest.fixture(scope="module")
def server(llama):
    with fxscale.serve(llama, policy="operator", budget=2) as s:
        yield s


def prompt(seed: int) -> torch.Tensor:
    return torch.randint(3, 256, (1, 6), generator=torch.Generator().manual_seed(seed))


def test_seeded_sampling_is_reproducible_alone_and_among_others(server, llama):
    sampling = fxscale.Sampling(temperature=1.0, top_p=0.95, seed=1234)
    ids = prompt(0)
    alone = server.generate(ids, 24, ignore_eos=True, sampling=sampling).result()
    again = server.generate(ids, 24, ignore_eos=True, sampling=sampling).result()
    others = fxscale.Sampling(temperature=1.0)
    with ThreadPoolExecutor(8) as pool:
        noise = [pool.submit(lambda i=i: server.generate(prompt(100 + i), 20, ignore_eos=True,
                                                         sampling=others).result())
                 for i in range(15)]
        among = server.generate(ids, 24, ignore_eos=True, sampling=sampling).result()
        [n.result() for n in noise]
    assert alone == again == among
    seeds = {tuple(server.generate(ids, 24, ignore_eos=True, sampling=fxscale.Sampling(
        temperature=1.0, seed=s)).result()) for s in range(4)}
    assert len(seeds) == 4  # 24 tokens from a 256-token vocabulary: seeds do not collide
    greedy = server.generate(ids, 12, ignore_eos=True,
                             sampling=fxscale.Sampling(temperature=0.0, seed=5)).result()
    with torch.no_grad():
        hf = llama.generate(ids, max_new_tokens=12, do_sample=False)[0, 6:].tolist()
    assert greedy == hf


def test_logprobs_from_the_engine_match_the_models_prompt_logits(server):
    ids = prompt(3)
    record = server.start_generation(ids, 1, sampling=fxscale.Sampling(logprobs=3))
    token = record.future.result()[0]
    logits = server.submit(ids).result()[0, -1].double()
    exact = torch.log_softmax(logits, -1)
    (report,) = record.logprobs
    assert report["token"] == token == int(exact.argmax())
    assert report["logprob"] == pytest.approx(float(exact[token]), abs=1e-4)
    assert [i for i, _ in report["top"]] == exact.topk(3).indices.tolist()
