"""fxscale.report: every group drawn once, repeated layers folded, plan / profile / run sections,
DOT and SVG output, errors that name the field, and the page opened in headless Chromium (no
JS errors, not blank, one element per group, open in <= 2 s for an 80-layer Llama)."""
from __future__ import annotations

import argparse
import base64
import io
import json
import os
import re
import select
import shutil
import signal
import subprocess
import time

import pytest
import torch

import fxscale
from fxscale.cli.report import add_report_command
from fxscale.contracts.group_graph import kind_name
from fxscale.reporting.dot import to_dot
from fxscale.reporting.layout import layout
from fxscale.reporting.report import report
from fxscale.reporting.svg import RESOURCE_COLOURS
from fxscale.runtime.simulator.replay import Result

CHROMIUM = next(filter(None, map(shutil.which, ("chromium", "chromium-browser",
                                                "google-chrome"))), None)
needs_chromium = pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed "
                                    "(Debian: apt-get install chromium)")


def llama(layers: int) -> torch.nn.Module:
    """A Llama with `layers` layers and a tiny hidden size on the meta device (no weights)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(num_hidden_layers=layers, hidden_size=64, intermediate_size=128,
                         num_attention_heads=4, num_key_value_heads=2, vocab_size=128,
                         max_position_embeddings=256)
    with torch.device("meta"):
        return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def graph80():
    """The operator groups of an 80-layer Llama analysed on the meta device (about 20 s)."""
    return fxscale.explain(llama(80), torch.zeros(2, 16, dtype=torch.long, device="meta"))


def plan_dict(graph) -> dict:
    """A Plan as JSON: 2 replicas of every stateful group, 1 of the others."""
    return {"policy": "operator", "model": graph.model, "device": "h100", "rate": 3.0,
            "engines": [{"engine": {"type": "operator", "attention": 2, "dense_shards": 1,
                                    "dense_replicas": 1}, "count": 1}], "devices": 4,
            "power_w": 2000.0, "ttft_p50": 0.2, "ttft_p99": 0.9, "tbt_p50": 0.02,
            "tbt_p99": 0.05, "chunk": 512,
            "groups": [{"group": g.id, "kind": kind_name(g.name), "role": "operator",
                        "replicas": 2 if g.stateful else 1, "shards": 1, "max_batch": 17}
                       for g in graph.groups]}


def serving_run(graph) -> dict:
    """A serving run's stats: rate, attainment and replicas per group name over time."""
    attention = [g.name for g in graph.groups if g.stateful]
    return {"policy": "serving", "timeline": [
        {"t": t, "rate": 1.0 + t / 10, "attainment": 0.9 + t / 1000,
         "replicas": {name: 1 + t // 30 for name in attention}} for t in (0, 30, 60, 90)]}


def profile_dict(graph) -> dict:
    """A Profile as JSON with latency points for the first group."""
    points = [{"phase": "prefill", "batch": b, "length": n, "median_s": 1e-4 * b * n,
               "p10_s": 1e-4 * b * n, "p90_s": 1e-4 * b * n, "repeats": 3}
              for b in (1, 2, 4) for n in (16, 64)]
    g = graph.groups[0]
    return {"version": 1, "model": graph.model, "granularity": "operator", "device": "cpu",
            "source": "measured", "dtype": "float32", "threads": 2, "versions": {},
            "groups": [{"group": g.id, "name": g.name, "points": points}]}


# ---- the HTML, without a browser -----------------------------------------------------------
def test_every_group_appears_once_and_layers_fold(graph80, tmp_path):
    html = report(graph80, tmp_path / "r.html").read_text()
    for g in graph80.groups:
        assert html.count(f'data-group-id="{g.id}"') == 1, g.id
    kinds = re.findall(r'data-kind="([^"]+)" data-count="(\d+)"', html)
    assert sorted(kinds) == [(f"model.layers.*#{i}/{k}", "80")
                             for i, k in enumerate(("gemm", "attention", "gemm"))]
    assert "http://" not in html.replace("http://www.w3.org/2000/svg", "")  # nothing fetched
    assert "https://" not in html


def test_layout_ranks_the_folded_layers(graph80):
    lay = layout(graph80)
    assert [[b.name for b in row] for row in lay.rows] == [
        ["top#0/embedding"], ["model.layers.*#0/gemm"], ["model.layers.*#1/attention"],
        ["model.layers.*#2/gemm"], ["top#1/gemm"]]
    names = {b.id: b.name for b in lay.blocks}
    back = [(names[e.src], names[e.dst]) for e in lay.edges if e.back]
    assert back == [("model.layers.*#2/gemm", "model.layers.*#0/gemm")]  # into the next layer


def test_dot_names_every_group_and_svg_needs_graphviz(graph80, tmp_path, monkeypatch):
    dot = to_dot(graph80)
    for g in graph80.groups:
        assert re.search(rf'^\s*"{g.id}" \[label="{g.id}: ', dot, re.M), g.id
    assert dot.count("subgraph cluster_") == 80
    if shutil.which("dot"):
        svg = report(graph80, tmp_path / "g.svg", format="svg").read_text()
        assert svg.count('class="node"') == len(graph80.groups)
    monkeypatch.setenv("PATH", str(tmp_path))  # no `dot` here
    with pytest.raises(FileNotFoundError, match="install Graphviz"):
        report(graph80, tmp_path / "g.svg", format="svg")
    assert report(graph80, tmp_path / "g.dot", format="dot").read_text() == dot


def test_plan_profile_and_runs_add_their_sections(graph80, tmp_path):
    bare = report(graph80, tmp_path / "bare.html").read_text()
    simulated = {"policies": {"operator": {"policy": "operator", "gpu_hours": 1.5, "timeline": [
        {"t": t, "devices": 3, "rate_rps": 2.0, "attention_replicas": 1,
         "group_devices": {"model.layers.*#1/attention": 1 + t // 60}} for t in (0, 30, 60)],
        "decisions": [{"t": 30, "action": "hold", "reason": "steady"}]}}}
    for name, data in (("plan", plan_dict(graph80)), ("profile", profile_dict(graph80))):
        (tmp_path / f"{name}.json").write_text(json.dumps(data))
    html = report(graph80, tmp_path / "full.html", plan=tmp_path / "plan.json",
                  profile=str(tmp_path / "profile.json"), run=serving_run(graph80)).read_text()
    for text in ("<section id='plan'>", "Placement per kind", "operator 2&times; batch 17",
                 "latency vs batch", "latency vs length", "Run: serving", "SLO attainment",
                 "request rate", "replicas of this group"):
        assert text in html and text not in bare, text
    sim = report(graph80, tmp_path / "sim.html", run=simulated).read_text()
    assert "Run: operator" in sim and "devices per group" in sim and "1 scaling decisions" in sim
    result = Result("model", [], [], [], 0.0, 0.0, 0, 60.0, serving_run(graph80)["timeline"], [])
    assert "Run: model" in report(graph80, tmp_path / "res.html", run=result).read_text()


@pytest.mark.parametrize("change, error, message", [
    (lambda a: a.update(model_or_graph="nowhere.json"), FileNotFoundError, "graph: no such file"),
    (lambda a: a.update(plan="nowhere.json"), FileNotFoundError, "plan: no such file"),
    (lambda a: a.update(run={"policy": "x"}), ValueError, "field 'timeline' must be a non-empty"),
    (lambda a: a.update(run={"timeline": [{"t": 0}, {"rate": 1}]}), ValueError,
     r"field 'timeline\[1\].t' is missing"),
    (lambda a: a.update(run={"timeline": [{"t": 0, "attainment": 1.5}]}), ValueError,
     r"'timeline\[0\].attainment' must be a fraction"),
    (lambda a: a.update(run={"timeline": [{"t": 0, "replicas": {"g2": "two"}}]}), ValueError,
     r"'timeline\[0\].replicas.g2' must be a finite number"),
    (lambda a: a["plan"].pop("devices"), ValueError, r"missing \['devices'\]"),
    (lambda a: a.update(format="png"), ValueError, "format must be one of"),
    (lambda a: a.update(format="dot"), ValueError, "plan: shown in format 'html' only"),
    (lambda a: a.update(model_or_graph=llama(1)), ValueError, "needs example inputs"),
])
def test_bad_input_names_the_field(graph80, tmp_path, change, error, message):
    args = {"model_or_graph": graph80, "plan": plan_dict(graph80), "format": "html"}
    change(args)
    with pytest.raises(error, match=message):
        report(args.pop("model_or_graph"), tmp_path / "r.html", **args)
    assert not (tmp_path / "r.html").exists()


def test_model_input_and_command_line(tmp_path):
    ids = torch.zeros(1, 8, dtype=torch.long, device="meta")
    html = report(llama(2), tmp_path / "m.html", ids).read_text()
    assert html.count("data-group-id=") == 8  # embedding, 3 per layer, head
    parser = argparse.ArgumentParser()
    add_report_command(parser.add_subparsers(dest="command"))
    graph_json = tmp_path / "g.json"
    fxscale.explain(llama(2), ids).to_json(graph_json)
    args = parser.parse_args(["report", str(graph_json), "-o", str(tmp_path / "c.dot"),
                              "--format", "dot"])
    assert args.run(args) == 0 and "digraph" in (tmp_path / "c.dot").read_text()


# ---- the page in headless Chromium ---------------------------------------------------------
class Browser:
    """Headless Chromium driven over the DevTools protocol on a pipe (no extra packages):
    messages are JSON separated by NUL bytes, written to its fd 3 and read from its fd 4."""

    def __init__(self, profile_dir, size=(1400, 1000)) -> None:
        command_r, self.command_w = os.pipe()
        self.answer_r, answer_w = os.pipe()
        self.proc = subprocess.Popen(
            # bash, not sh: dash's redirections take single-digit fds only
            ["bash", "-c", f'exec "$@" 3<&{command_r} 4>&{answer_w}', "bash", CHROMIUM,
             "--headless", "--no-sandbox", "--disable-gpu", "--remote-debugging-pipe",
             f"--user-data-dir={profile_dir}", f"--window-size={size[0]},{size[1]}",
             "about:blank"], pass_fds=(command_r, answer_w), start_new_session=True,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        os.close(command_r)
        os.close(answer_w)
        self.buffer, self.last_id, self.events = b"", 0, []
        target = self.call("Target.createTarget", url="about:blank")["targetId"]
        self.session = self.call("Target.attachToTarget", targetId=target,
                                 flatten=True)["sessionId"]
        for domain in ("Page", "Runtime", "Log"):
            self.call(f"{domain}.enable", session=True)

    def _message(self, timeout: float) -> dict:
        """The next message from the browser."""
        end = time.monotonic() + timeout
        while b"\0" not in self.buffer:
            if not select.select([self.answer_r], [], [], max(0.0, end - time.monotonic()))[0]:
                raise TimeoutError("chromium did not answer in time")
            chunk = os.read(self.answer_r, 1 << 20)
            if not chunk:
                raise RuntimeError("chromium exited")
            self.buffer += chunk
        message, self.buffer = self.buffer.split(b"\0", 1)
        return json.loads(message)

    def call(self, method: str, session: bool = False, timeout: float = 30, **params) -> dict:
        """Send a command (to the page's session if `session`) and return its result."""
        self.last_id += 1
        message = {"id": self.last_id, "method": method, "params": params}
        if session:
            message["sessionId"] = self.session
        os.write(self.command_w, json.dumps(message).encode() + b"\0")
        while (answer := self._message(timeout)).get("id") != self.last_id:
            self.events.append(answer)
        if "error" in answer:
            raise RuntimeError(f"{method}: {answer['error']}")
        return answer["result"]

    def open(self, path) -> float:
        """Load a file and wait for its load event; return the wall seconds it took."""
        self.events.clear()
        start = time.perf_counter()
        self.call("Page.navigate", session=True, url=path.resolve().as_uri())
        while not any(e.get("method") == "Page.loadEventFired" for e in self.events):
            self.events.append(self._message(30))
        return time.perf_counter() - start

    def js(self, expression: str):
        """The value of a JavaScript expression in the page."""
        return self.call("Runtime.evaluate", session=True, expression=expression,
                         returnByValue=True)["result"].get("value")

    def errors(self) -> list[str]:
        """Uncaught exceptions, console errors and error log entries since the last open."""
        self.js("0")  # flush events the page emitted up to now
        found = []
        for e in self.events:
            method, params = e.get("method"), e.get("params", {})
            if method == "Runtime.exceptionThrown":
                details = params["exceptionDetails"]
                found.append(details.get("exception", {}).get("description", details["text"]))
            elif method == "Runtime.consoleAPICalled" and params["type"] in ("error", "assert"):
                found.append(" ".join(str(a.get("value")) for a in params["args"]))
            elif method == "Log.entryAdded" and params["entry"]["level"] == "error":
                found.append(params["entry"]["text"])
        return found

    def screenshot(self):
        """The viewport as an RGB array (floats in [0, 1])."""
        from matplotlib.image import imread

        png = base64.b64decode(self.call("Page.captureScreenshot", session=True,
                                         format="png")["data"])
        return imread(io.BytesIO(png), format="png")[..., :3]

    def close(self) -> None:
        """Close the browser; kill its process group if it does not exit."""
        try:
            self.call("Browser.close", timeout=5)
        except (RuntimeError, TimeoutError, OSError):
            pass
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        os.close(self.command_w)
        os.close(self.answer_r)


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    """One headless Chromium for the module's tests."""
    chromium = Browser(tmp_path_factory.mktemp("chromium-profile"))
    yield chromium
    chromium.close()


def pixels_near(image, hex_colour: str, tolerance: float = 0.03) -> int:
    """How many pixels of the image have (about) this colour."""
    rgb = [int(hex_colour[i:i + 2], 16) / 255 for i in (1, 3, 5)]
    return int((abs(image - rgb).max(axis=-1) < tolerance).sum())


@needs_chromium
def test_checker_sees_js_errors_and_blank_pages(browser, tmp_path):
    broken = tmp_path / "broken.html"
    broken.write_text("<!DOCTYPE html><body><p>x</p><script>console.error('bad');"
                      "missingFunction();</script></body>")
    browser.open(broken)
    errors = browser.errors()
    assert any("bad" in e for e in errors) and any("missingFunction" in e for e in errors)
    blank = tmp_path / "blank.html"
    blank.write_text("<!DOCTYPE html><body></body>")
    browser.open(blank)
    assert browser.errors() == [] and len({tuple(p) for p in browser.screenshot()[::50, ::50]
                                           .reshape(-1, 3)}) == 1


@needs_chromium
def test_report_opens_in_chromium(graph80, browser, tmp_path):
    path = report(graph80, tmp_path / "llama80.html", plan=plan_dict(graph80),
                  run=serving_run(graph80), profile=profile_dict(graph80))
    wall_s = browser.open(path)
    ready_ms = float(browser.js("document.body.dataset.readyMs"))
    print(f"80-layer report ({path.stat().st_size / 1e6:.2f} MB): ready {ready_ms:.0f} ms after "
          f"navigation start; navigate -> load event {wall_s * 1e3:.0f} ms")
    assert browser.errors() == []
    assert ready_ms <= 2000 and wall_s <= 2.0
    ids = browser.js("[...document.querySelectorAll('[data-group-id]')]"
                     ".map(e => e.dataset.groupId)")
    assert sorted(ids) == sorted(g.id for g in graph80.groups)
    assert browser.js("document.querySelectorAll('#edges path.edge').length") == \
        len(layout(graph80).edges)
    image = browser.screenshot()
    assert len({tuple(p) for p in (image[::4, ::4] * 255).round().reshape(-1, 3)}) > 50
    for resource in ("compute", "memory", "stateful"):  # every block colour is on screen
        assert pixels_near(image, RESOURCE_COLOURS[resource][0]) > 2000, resource
    # a folded kind expands on click; a layer's cell shows its details in the panel
    assert browser.js("getComputedStyle(document.querySelector('.kind .members')).display") \
        == "none"
    browser.js("document.querySelector('.kind .toggle').click()")
    assert browser.js("getComputedStyle(document.querySelector('.kind .members')).display") \
        == "grid"
    member = graph80.groups[5]
    browser.js(f"document.querySelector('[data-group-id={member.id}]').click()")
    assert browser.js("document.querySelector('#panel-body h3').textContent") == member.name
    assert browser.errors() == []


def test_a_serving_run_window_with_no_finished_request_is_not_plotted():
    from fxscale.reporting.run import load_runs

    rows = [{"t": 1.0, "rate": 2.0, "attainment": None, "replicas": {"top#1/gemm": 1}},
            {"t": 2.0, "rate": 3.0, "attainment": 0.5, "replicas": {"top#1/gemm": 2}}]
    (run,) = load_runs({"policy": "operator", "timeline": rows})
    assert run.attainment == [(2.0, 0.5)] and run.replicas["top#1/gemm"] == [(1.0, 1), (2.0, 2)]
