"""`fxscale serve MODEL`: an OpenAI-compatible HTTP server (fxscale/serving/api.py) on the
operator-level engine. MODEL is a local Hugging Face model directory or a zoo name."""
from __future__ import annotations

import argparse
import functools
import ipaddress
import logging
import os
import signal
import socket
import sys
import threading
from typing import Any

from fxscale.cli.args import positive, positive_float
from fxscale.contracts.plan import LIVE_POLICIES

API_KEY_ENV = "FXSCALE_API_KEY"


def add_serve_command(sub: argparse._SubParsersAction) -> None:
    """Register `fxscale serve` on the command line's subparsers."""
    parser = sub.add_parser("serve", help="serve a model over an OpenAI-compatible HTTP API "
                                          "(/v1/completions, /v1/chat/completions, /metrics)")
    parser.add_argument("model", metavar="MODEL",
                        help="a Hugging Face model directory (config, safetensors weights, "
                             "tokenizer) or a zoo name (llama, gpt2, mistral, mixtral, opt: "
                             "random weights, a small built-in tokenizer)")
    parser.add_argument("--policy", choices=LIVE_POLICIES, default="operator",
                        help="operator: every operator group scales alone (default); model: "
                             "whole-model replicas")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to bind (default 127.0.0.1; any other needs --api-key)")
    parser.add_argument("--port", type=int, default=8000,
                        help="port to bind (default 8000; 0: any free port)")
    parser.add_argument("--api-key", default=os.environ.get(API_KEY_ENV),
                        help=f"Bearer token clients must send to /v1 and /metrics (default: "
                             f"${API_KEY_ENV})")
    parser.add_argument("--served-model-name", metavar="NAME",
                        help="the model name clients ask for (default: the directory's name "
                             "or the zoo name)")
    parser.add_argument("--slo-ttft", type=positive_float, metavar="S",
                        help="time-to-first-token target in seconds (with --slo-tbt)")
    parser.add_argument("--slo-tbt", type=positive_float, metavar="S",
                        help="time-between-tokens target in seconds (with --slo-ttft)")
    parser.add_argument("--autoscale", action="store_true",
                        help="plan and apply replicas per group against the SLO")
    parser.add_argument("--max-model-len", type=positive, metavar="N",
                        help="longest prompt + completion (default: the model's context)")
    parser.add_argument("--kv-cache-tokens", type=positive, default=16384, metavar="N",
                        help="tokens the paged KV cache holds per attention replica "
                             "(default 16384)")
    parser.add_argument("--max-num-batched-tokens", type=positive, default=512, metavar="N",
                        help="tokens per engine step (default 512)")
    parser.add_argument("--max-pending", type=positive, default=256, metavar="N",
                        help="requests in flight before new ones get 429 (default 256)")
    parser.add_argument("--budget", type=positive, default=2,
                        help="group executions at once (default 2)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"),
                        help="serve a copy of the weights in this dtype (default: the model's)")
    parser.add_argument("--backend", choices=("local", "ray"), default="local",
                        help="local: replicas are threads of this process (default); ray: "
                             "each replica a Ray actor (pip install 'fxscale[ray]')")
    parser.add_argument("--address", metavar="HOST:PORT",
                        help="with --backend ray: join this Ray cluster (default: start a "
                             "private one on 127.0.0.1, stopped at exit)")
    parser.add_argument("--compiled-graph", action="store_true",
                        help="with --backend ray and the operator policy: run steps whose "
                             "placement repeats as one Ray Compiled Graph (docs/ray.md)")
    parser.add_argument("--grace-period", type=positive_float, default=30.0, metavar="S",
                        help="on SIGTERM, seconds to finish requests in flight (default 30)")
    parser.add_argument("--log-level", choices=("debug", "info", "warning", "error"),
                        default="info")
    parser.set_defaults(run=_serve_command)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: it may resolve to anything
        return False


def _server_options(args: argparse.Namespace) -> dict[str, Any]:
    """fxscale.serve's options from the command line (a ValueError for a bad combination)."""
    from fxscale.contracts.plan import SLO

    if args.address is not None and args.backend != "ray":
        raise ValueError("--address names a Ray cluster: it goes with --backend ray")
    if args.compiled_graph and args.backend != "ray":
        raise ValueError("--compiled-graph runs steps as Ray Compiled Graphs: it goes with "
                         "--backend ray")
    if (args.slo_ttft is None) != (args.slo_tbt is None):
        raise ValueError("--slo-ttft and --slo-tbt go together")
    slo = SLO(args.slo_ttft, args.slo_tbt) if args.slo_ttft is not None else None
    if args.autoscale and slo is None:
        raise ValueError("--autoscale needs an SLO to plan for: --slo-ttft S --slo-tbt S")
    return {"policy": args.policy, "budget": args.budget, "slo": slo,
            "autoscale": args.autoscale, "max_model_len": args.max_model_len,
            "kv_cache_tokens": args.kv_cache_tokens, "dtype": args.dtype,
            "max_num_batched_tokens": args.max_num_batched_tokens,
            "max_pending": args.max_pending, "backend": args.backend,
            "address": args.address, "compiled_graph": args.compiled_graph}


def _bind(host: str, port: int) -> socket.socket:
    """The listening socket (a clear error when the port is taken)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as err:
        sock.close()
        raise ValueError(f"cannot listen on {host}:{port}: {err.strerror}; pick another "
                         "--port (0: any free one)") from None
    return sock


def _serve_command(args: argparse.Namespace) -> int:
    """Check the model, bind, print where to reach it, serve until SIGTERM or Ctrl-C."""
    import uvicorn

    from fxscale.models.loading import check_model, load_model
    from fxscale.serving.api import ServeSettings, build_app

    if not _is_loopback(args.host) and not args.api_key:
        raise ValueError(f"--host {args.host} serves beyond this machine: set --api-key (or "
                         f"${API_KEY_ENV}) so clients must authenticate")
    if not 0 <= args.port <= 65535:
        raise ValueError(f"--port must be from 0 to 65535, got {args.port}")
    options = _server_options(args)
    check_model(args.model)  # a missing or refused file is an error before anything starts
    logger = logging.getLogger("fxscale.serve")
    logger.addHandler(logging.StreamHandler(sys.stderr))
    logger.setLevel(args.log_level.upper())

    failed: list[BaseException] = []
    settings = ServeSettings(functools.partial(load_model, args.model, args.served_model_name),
                             args.api_key, options)
    config = uvicorn.Config(build_app(settings), log_level=args.log_level,
                            access_log=args.log_level == "debug",
                            timeout_graceful_shutdown=int(args.grace_period + 0.999))
    server = uvicorn.Server(config)

    def stop_on_failure(err: BaseException) -> None:
        failed.append(err)
        server.should_exit = True

    settings.on_failure = stop_on_failure
    sock = _bind(args.host, args.port)
    host, port = sock.getsockname()[:2]
    base = f"http://{f'[{host}]' if ':' in host else host}:{port}"
    auth = f" -H 'Authorization: Bearer {args.api_key}'" if args.api_key else ""
    print(f"fxscale serve: {args.model} on {base}/v1 (loading; {base}/ready answers 200 once "
          f"it is up)\n  curl {base}/v1/completions{auth} -H 'Content-Type: application/json' "
          f"-d '{{\"model\": \"{args.served_model_name or _default_name(args.model)}\", "
          f"\"prompt\": \"Hello\", \"max_tokens\": 16}}'", flush=True)
    # uvicorn re-raises the signal that stopped it once it is done: a handler of our own
    # makes that a clean exit 0 rather than death by SIGTERM
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: None)
    server.run(sockets=[sock])
    if failed:
        return 1
    print("fxscale serve: stopped (requests in flight were finished)", flush=True)
    return 0


def _default_name(model: str) -> str:
    from pathlib import Path

    path = Path(model)
    return path.resolve().name if path.is_dir() else model
