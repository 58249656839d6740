"""`fxscale serve`: the OpenAI-compatible HTTP server, started as a command on a model
directory this test writes (a random-weight Llama saved with save_pretrained, a BPE tokenizer
trained here with a chat template), driven by the official `openai` client."""
from __future__ import annotations

import importlib
import json
import math
import os
import random
import signal
import string
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from helpers import failing


def require(module: str):
    """Import a module the server tests need: skipped without it, a failure under CI."""
    try:
        return importlib.import_module(module)
    except ImportError:
        if os.environ.get("CI"):
            pytest.fail(f"{module} is not installed: .ci/run must install the server's "
                        "dependencies", pytrace=False)
        pytest.skip(f"{module} is not installed", allow_module_level=True)


openai = require("openai")
httpx = require("httpx")
require("fastapi")
require("uvicorn")

from fxscale.models.loading import check_model_dir, load_model  # noqa: E402
from fxscale.serving.tokenizer import train_tokenizer  # noqa: E402
from fxscale.studies.http_bench import start_serve, stop_serve  # noqa: E402

KEY = "test-key-123"
WORDS = ("operator", "group", "attention", "cache", "token", "scale", "model", "replica",
         "the", "a", "of", "and", "to", "GPU", "step", "batch", "prefill", "decode")
# every printable character (the chat template's too), so nothing encodes to <unk>
CORPUS = [string.printable] + [" ".join(random.Random(i).choices(WORDS, k=40))
                               for i in range(200)]


def text_prompt(seed: int) -> str:
    rng = random.Random(seed)
    return " ".join(rng.choices(WORDS, k=rng.randint(2, 8)))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    path = tmp_path_factory.mktemp("tiny-llama")
    tokenizer = train_tokenizer(CORPUS, 300)
    torch.manual_seed(1)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        pad_token_id=0, bos_token_id=1, eos_token_id=2))
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def hf(model_dir):
    """The Hugging Face reference: the same directory through from_pretrained."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    return model, AutoTokenizer.from_pretrained(model_dir)


@pytest.fixture(scope="module")
def served(model_dir):
    proc, base = start_serve(model_dir, "--api-key", KEY, "--max-pending", "40",
                              "--kv-cache-tokens", "4096")
    yield proc, base
    stop_serve(proc, grace_s=10)


@pytest.fixture(scope="module")
def client(served, model_dir):
    return openai.OpenAI(base_url=f"{served[1]}/v1", api_key=KEY, max_retries=0, timeout=120)


def hf_greedy(hf, ids: list[int], new: int) -> list[int]:
    model, _ = hf
    with torch.no_grad():  # the mask given: generate() would mask the pad id (<unk>) out
        out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids)),
                             max_new_tokens=new, do_sample=False)
    return out[0, len(ids):].tolist()


def decode(hf, tokens: list[int]) -> str:
    return hf[1].decode(tokens, skip_special_tokens=True, clean_up_tokenization_spaces=False)


def metric(base: str, name: str, **labels: str) -> float:
    """One sample of the server's /metrics."""
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"{base}/metrics", headers={"Authorization": f"Bearer {KEY}"}).text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    raise AssertionError(f"no {name}{labels} in /metrics")


def test_models_and_greedy_completions_equal_hf_greedy(client, hf, model_dir):
    (card,) = client.models.list().data
    assert card.id == model_dir.name and card.max_model_len == 256
    tokenizer = hf[1]
    for seed in range(4):
        prompt = text_prompt(seed)
        ids = tokenizer(prompt)["input_ids"]
        expected = hf_greedy(hf, ids, 12)
        answer = client.completions.create(model=model_dir.name, prompt=prompt, max_tokens=12,
                                           temperature=0)
        (choice,) = answer.choices
        assert choice.text == decode(hf, expected)
        stopped = tokenizer.eos_token_id in expected
        assert choice.finish_reason == ("stop" if stopped else "length")
        assert answer.usage.prompt_tokens == len(ids)
        assert answer.usage.completion_tokens == len(expected)
    # several prompts in one request, as text and as token ids
    prompts = [text_prompt(10), text_prompt(11)]
    ids = [tokenizer(p)["input_ids"] for p in prompts]
    for prompt in (prompts, ids):
        answer = client.completions.create(model=model_dir.name, prompt=prompt, max_tokens=8,
                                           temperature=0)
        assert [c.index for c in answer.choices] == [0, 1]
        assert [c.text for c in answer.choices] == [decode(hf, hf_greedy(hf, i, 8)) for i in ids]


def test_chat_greedy_equals_hf_and_streaming_equals_the_whole_answer(client, hf, model_dir):
    tokenizer = hf[1]
    messages = [{"role": "system", "content": "You are terse."},
                {"role": "user", "content": text_prompt(20)}]
    ids = tokenizer(tokenizer.apply_chat_template(messages, tokenize=False,
                                                  add_generation_prompt=True),
                    add_special_tokens=False)["input_ids"]
    expected = decode(hf, hf_greedy(hf, ids, 10))
    whole = client.chat.completions.create(model=model_dir.name, messages=messages,
                                           max_tokens=10, temperature=0)
    assert whole.object == "chat.completion"
    assert whole.choices[0].message.role == "assistant"
    assert whole.choices[0].message.content == expected
    assert whole.usage.prompt_tokens == len(ids)
    chunks = list(client.chat.completions.create(
        model=model_dir.name, messages=messages, max_tokens=10, temperature=0, stream=True,
        stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == expected
    finals = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finals[-1] == whole.choices[0].finish_reason and set(finals[:-1]) == {None}
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == \
        whole.usage.completion_tokens
    completion = list(client.completions.create(model=model_dir.name, prompt=text_prompt(21),
                                                max_tokens=9, temperature=0, stream=True))
    assert "".join(c.choices[0].text for c in completion) == client.completions.create(
        model=model_dir.name, prompt=text_prompt(21), max_tokens=9, temperature=0
    ).choices[0].text


def test_thirty_two_streams_at_once_greedy_equal_hf_and_seeded_sampling_is_reproducible(
        client, hf, model_dir):
    tokenizer = hf[1]
    seeded = dict(model=model_dir.name, prompt=text_prompt(99), max_tokens=24, temperature=1.0,
                  top_p=0.9, seed=1234, extra_body={"ignore_eos": True})

    def stream(**request) -> str:
        return "".join(c.choices[0].text for c in client.completions.create(stream=True,
                                                                            **request))

    alone = stream(**seeded)
    prompts = [text_prompt(100 + i) for i in range(31)]
    with ThreadPoolExecutor(32) as pool:
        greedy = [pool.submit(stream, model=model_dir.name, prompt=p, max_tokens=16,
                              temperature=0) for p in prompts]
        among = pool.submit(stream, **seeded)
        texts = [g.result() for g in greedy]
    assert among.result() == alone
    for prompt, text in zip(prompts, texts):
        assert text == decode(hf, hf_greedy(hf, tokenizer(prompt)["input_ids"], 16))
    others = {stream(**{**seeded, "seed": seed}) for seed in (1, 2, 3)}
    assert len(others | {alone}) == 4  # 24 sampled tokens: different seeds do not collide


def test_stop_strings_end_the_text_before_them(client, hf, model_dir):
    prompt = text_prompt(30)
    full = client.completions.create(model=model_dir.name, prompt=prompt, max_tokens=30,
                                     temperature=0, extra_body={"ignore_eos": True})
    text = full.choices[0].text
    assert len(text) > 12
    stop = text[8:11]
    cut = text[:text.index(stop)]
    answer = client.completions.create(model=model_dir.name, prompt=prompt, max_tokens=30,
                                       temperature=0, stop=[stop, "\x00never"],
                                       extra_body={"ignore_eos": True})
    assert answer.choices[0].text == cut and answer.choices[0].finish_reason == "stop"
    streamed = list(client.completions.create(model=model_dir.name, prompt=prompt,
                                              max_tokens=30, temperature=0, stop=stop,
                                              stream=True, extra_body={"ignore_eos": True}))
    assert "".join(c.choices[0].text for c in streamed) == cut
    assert streamed[-1].choices[0].finish_reason == "stop"


def test_logprobs_are_the_models_log_softmax(client, hf, model_dir):
    model, tokenizer = hf
    prompt = text_prompt(40)
    ids = tokenizer(prompt)["input_ids"]
    answer = client.completions.create(model=model_dir.name, prompt=prompt, max_tokens=5,
                                       temperature=0, logprobs=3,
                                       extra_body={"ignore_eos": True})
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids)),
                             max_new_tokens=5, do_sample=False,
                             output_logits=True, return_dict_in_generate=True,
                             eos_token_id=None)
    exact = [torch.log_softmax(step[0].double(), -1) for step in out.logits]
    chosen = out.sequences[0, len(ids):].tolist()
    logprobs = answer.choices[0].logprobs
    assert logprobs.token_logprobs == pytest.approx([float(e[t]) for e, t in zip(exact, chosen)],
                                                    abs=1e-4)
    for step, top in zip(exact, logprobs.top_logprobs):
        assert sorted(top.values(), reverse=True) == pytest.approx(
            step.topk(3).values.tolist(), abs=1e-4)
    chat = client.chat.completions.create(model=model_dir.name, max_tokens=3, temperature=0,
                                          messages=[{"role": "user", "content": prompt}],
                                          logprobs=True, top_logprobs=2)
    entries = chat.choices[0].logprobs.content
    assert len(entries) == chat.usage.completion_tokens and all(
        len(e.top_logprobs) == 2 and e.logprob == pytest.approx(e.top_logprobs[0].logprob)
        for e in entries)  # greedy: the chosen token is the most likely


def test_a_client_that_disconnects_frees_its_kv_blocks(served, model_dir):
    base = served[1]
    aborted = metric(base, "fxscale:request_success_total", finished_reason="abort")
    body = {"model": model_dir.name, "prompt": text_prompt(50), "max_tokens": 200,
            "stream": True, "ignore_eos": True}
    with httpx.stream("POST", f"{base}/v1/completions", json=body, timeout=60,
                      headers={"Authorization": f"Bearer {KEY}"}) as response:
        lines = response.iter_lines()
        assert next(line for line in lines if line.startswith("data:"))
        assert metric(base, "fxscale:num_requests_running") == 1
        assert metric(base, "fxscale:kv_cache_usage_perc") > 0
    deadline = time.monotonic() + 30
    while metric(base, "fxscale:kv_cache_usage_perc") > 0 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert metric(base, "fxscale:kv_cache_usage_perc") == 0
    assert metric(base, "fxscale:num_requests_running") == 0
    assert metric(base, "fxscale:request_success_total", finished_reason="abort") == aborted + 1


def error_of(response) -> dict:
    """The OpenAI-shaped error body of a response (and nothing that looks like a traceback)."""
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    assert "Traceback" not in response.text and ".py" not in response.text
    return body["error"]


def test_each_error_has_its_status_and_an_openai_body(served, client, model_dir):
    base, name = served[1], model_dir.name
    auth = {"Authorization": f"Bearer {KEY}"}
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=name, prompt="a", temperature=3)
    assert info.value.body["param"] == "temperature"
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=name, prompt="a", max_tokens=1000)
    assert info.value.body["code"] == "context_length_exceeded"
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="no-such-model", prompt="a")
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{base}/v1", api_key="wrong", max_retries=0).models.list()
    cases = [({"model": name, "prompt": {"x": 1}}, 400, "prompt"),
             ({"model": name, "prompt": "a", "max_tokens": 0}, 400, "max_tokens"),
             ({"model": name, "prompt": "a", "stop": [""]}, 400, "stop"),
             ({"model": name, "prompt": [10 ** 6]}, 400, "prompt"),
             ({"model": name, "prompt": "a", "top_k": -1}, 400, "top_k"),
             ({"model": name, "messages": []}, 400, "messages")]
    for body, status, param in cases:
        path = "chat/completions" if "messages" in body else "completions"
        response = httpx.post(f"{base}/v1/{path}", json=body, headers=auth)
        assert response.status_code == status, (body, response.text)
        assert error_of(response)["param"] == param, body
    response = httpx.post(f"{base}/v1/completions", content=b"{not json", headers=auth)
    assert response.status_code == 400 and error_of(response)
    response = httpx.get(f"{base}/v1/models")
    assert response.status_code == 401 and error_of(response)["code"] == "invalid_api_key"
    assert httpx.get(f"{base}/health").json() == {"status": "ok"}  # probes need no key
    response = httpx.get(f"{base}/v1/nothing-here", headers=auth)
    assert response.status_code == 404 and error_of(response)


def test_a_full_engine_answers_429_with_retry_after_and_serves_the_rest(served, model_dir):
    base = served[1]
    body = {"model": model_dir.name, "prompt": text_prompt(60), "max_tokens": 48,
            "ignore_eos": True}

    def post(_):
        return httpx.post(f"{base}/v1/completions", json=body, timeout=120,
                          headers={"Authorization": f"Bearer {KEY}"})

    with ThreadPoolExecutor(64) as pool:
        responses = list(pool.map(post, range(64)))  # 64 at once, 40 admitted at most
    statuses = [r.status_code for r in responses]
    assert set(statuses) == {200, 429} and statuses.count(429) >= 64 - 40
    for response in responses:
        if response.status_code == 429:
            assert response.headers["retry-after"] == "1"
            assert error_of(response)["code"] == "engine_full"
        else:
            assert response.json()["usage"]["completion_tokens"] == 48


def test_refused_models_and_addresses_are_clear_errors(tmp_path, model_dir):
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text((model_dir / "config.json").read_text())
    (pickled / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(ValueError, match="pickle checkpoint"):
        check_model_dir(pickled)
    remote = tmp_path / "remote"
    remote.mkdir()
    config = json.loads((model_dir / "config.json").read_text())
    (remote / "config.json").write_text(json.dumps({**config, "auto_map": {"AutoModel": "x.Y"}}))
    with pytest.raises(ValueError, match="its own Python code"):
        check_model_dir(remote)
    no_tokenizer = tmp_path / "no-tokenizer"
    no_tokenizer.mkdir()
    for name in ("config.json", "model.safetensors"):
        (no_tokenizer / name).write_bytes((model_dir / name).read_bytes())
    with pytest.raises(ValueError, match="no tokenizer file"):
        check_model_dir(no_tokenizer)
    for argv, message in ((["llama", "--host", "0.0.0.0"], "set --api-key"),
                          ([str(pickled)], "pickle checkpoint"),
                          (["no-such-model"], "neither a model directory nor a zoo name"),
                          (["llama", "--autoscale"], "--autoscale needs an SLO"),
                          (["llama", "--compiled-graph"], "goes with --backend ray")):
        run = subprocess.run([sys.executable, "-m", "fxscale", "serve", *argv],
                             capture_output=True, text=True, timeout=120,
                             env={**os.environ, "FXSCALE_API_KEY": ""})
        assert run.returncode == 2 and message in run.stderr, (argv, run.stderr)


def test_a_real_fault_is_a_500_without_internals(monkeypatch):
    """In process (the fault is a replica made to fail): a zoo model with the built-in
    tokenizer, served through the ASGI app."""
    from fastapi.testclient import TestClient

    from fxscale.serving.api import ServeSettings, build_app

    app = build_app(ServeSettings(lambda: load_model("llama"), options={"budget": 1}))
    with TestClient(app, raise_server_exceptions=False) as http:
        deadline = time.monotonic() + 120
        while http.get("/ready").status_code != 200:
            assert time.monotonic() < deadline
            time.sleep(0.2)
        body = {"model": "llama", "prompt": "Hello", "max_tokens": 4, "temperature": 0}
        assert http.post("/v1/completions", json=body).status_code == 200
        pool = app.state.front.server.pools["top#1/gemm"]
        broken = [failing(r, math.inf) for r in pool.replicas.values()]
        response = http.post("/v1/completions", json=body)
        assert response.status_code == 500
        assert "GroupError" in error_of(response)["message"]
        with http.stream("POST", "/v1/completions", json={**body, "stream": True}) as stream:
            events = [line for line in stream.iter_lines() if line.startswith("data:")]
        assert json.loads(events[-2][5:])["error"]["type"] == "internal_error"
        assert events[-1] == "data: [DONE]"
        for left in broken:
            left[0] = 0
        assert http.post("/v1/completions", json=body).status_code == 200


def test_sigterm_finishes_what_is_in_flight_and_exits_zero(served, model_dir):
    proc, base = served
    body = {"model": model_dir.name, "prompt": text_prompt(70), "max_tokens": 64,
            "stream": True, "ignore_eos": True}
    events: list[str] = []

    def read() -> None:
        with httpx.stream("POST", f"{base}/v1/completions", json=body, timeout=120,
                          headers={"Authorization": f"Bearer {KEY}"}) as response:
            events.extend(line for line in response.iter_lines() if line.startswith("data:"))

    reader = threading.Thread(target=read)
    reader.start()
    deadline = time.monotonic() + 30
    while metric(base, "fxscale:num_requests_running") < 1:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    reader.join(120)
    assert proc.wait(60) == 0
    assert events[-1] == "data: [DONE]"
    assert json.loads(events[-2][5:])["choices"][0]["finish_reason"] == "length"
    assert "stopped" in proc.stdout.read()
