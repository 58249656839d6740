"""The wheel is complete: built from the tree, installed in a fresh virtual environment, its
CLI and public imports work and find their data files (an editable install would hide a
sub-package or a data file missing from pyproject's lists)."""
from __future__ import annotations

import json
import shutil
import site
import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PUBLIC = """
import json, sys
import fxscale
from fxscale.runtime.planner import plan
from fxscale.runtime.simulator import simulate
from fxscale.runtime.traces import load_trace
from fxscale.runtime.devices import load_device
from fxscale.kernels import paged_attention, rms_norm, rotary, write_kv
from fxscale.serving.api import build_app
from fxscale.runtime.devices.calibrate import load_all_reduce
for name in fxscale.__all__:
    getattr(fxscale, name)
print(json.dumps({"file": fxscale.__file__, "requests": len(load_trace("azure-conv").requests),
                  "h100": load_device("h100").memory_bytes,
                  "all_reduce_sizes": len(load_all_reduce("h100")[8][0])}))
"""


@pytest.fixture(scope="module")
def fresh(tmp_path_factory) -> Path:
    """A virtual environment with only the wheel installed; dependencies are read from this
    environment's site-packages (a path entry: its .pth files, the editable hook among them,
    do not run)."""
    root = tmp_path_factory.mktemp("wheel")
    source = root / "source"  # the files git would commit: no build/ left from an earlier build
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"],
                            cwd=REPO, check=True, capture_output=True, text=True).stdout
    for name in listed.splitlines():
        if (REPO / name).is_file():
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, source / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                    "-q", "-w", str(root / "dist"), str(source)], check=True, timeout=600)
    wheel = next((root / "dist").glob("fxscale-*.whl"))
    env = root / "env"
    venv.create(env, with_pip=True)
    python = env / "bin" / "python"
    subprocess.run([str(python), "-m", "pip", "install", "-q", "--no-deps", "--no-index",
                    str(wheel)], check=True, timeout=600)
    target = subprocess.run([str(python), "-c", "import sysconfig; "
                             "print(sysconfig.get_paths()['purelib'])"], check=True,
                            capture_output=True, text=True).stdout.strip()
    ours = [p for p in site.getsitepackages() + [sysconfig.get_paths()["purelib"]]
            if Path(p).is_dir()]
    (Path(target) / "deps.pth").write_text("\n".join(dict.fromkeys(ours)) + "\n")
    return env


def run(env: Path, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([*args], cwd=cwd, capture_output=True, text=True, timeout=600,
                          env={"PATH": f"{env / 'bin'}:/usr/bin:/bin",
                               "FXSCALE_CACHE_DIR": str(cwd / "cache")})


def test_public_imports_and_data_files_come_from_the_wheel(fresh, tmp_path):
    result = run(fresh, str(fresh / "bin" / "python"), "-c", PUBLIC, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    found = json.loads(result.stdout.strip().splitlines()[-1])
    assert found["file"].startswith(str(fresh)), found  # not the source tree
    assert found["requests"] > 1000 and found["h100"] == 81559 * 2 ** 20
    assert found["all_reduce_sizes"] > 900  # the measured profiles ship in the wheel


def test_the_cli_runs_from_the_wheel(fresh, tmp_path):
    cli = str(fresh / "bin" / "fxscale")
    result = run(fresh, cli, "explain", "--model", "llama", "--meta", "--json", "-",
                 cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["groups"]
    graph = tmp_path / "g.json"
    graph.write_text(result.stdout)
    result = run(fresh, cli, "report", str(graph), "-o", str(tmp_path / "r.html"), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "<style>" in (tmp_path / "r.html").read_text()  # the page's stylesheet is packaged
    result = run(fresh, cli, "simulate", "--model", "llama-2-7b", "--layers", "1",
                 "--duration", "30", "--trace", "mooncake-conversation", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "GPU-h" in result.stdout
