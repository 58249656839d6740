"""The `fxscale` command line: demo, explain, profile, simulate, report, export-onnx, bench,
fidelity, serve."""
from __future__ import annotations

import _thread
import argparse
import signal
import sys
import threading
from functools import partial
from typing import Any, Callable, Sequence

from fxscale.cli.bench import add_bench_command
from fxscale.cli.demo import add_demo_command
from fxscale.cli.explain import add_explain_command
from fxscale.cli.export import add_export_command
from fxscale.cli.fidelity import add_fidelity_command
from fxscale.cli.profile import add_profile_command
from fxscale.cli.report import add_report_command
from fxscale.cli.serve import add_serve_command
from fxscale.cli.simulate import add_simulate_command

COMMANDS = (add_demo_command, add_explain_command, add_profile_command, add_simulate_command,
            add_report_command, add_export_command, add_bench_command, add_fidelity_command,
            add_serve_command)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `fxscale` console script."""
    parser = _parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return 2
    # SIGTERM unwinds like Ctrl-C, so a command that is writing files cleans up what it
    # started and leaves the previous results in place
    previous = signal.signal(signal.SIGTERM, _terminate) \
        if threading.current_thread() is threading.main_thread() else None
    previous_hook = sys.unraisablehook
    if previous is not None:  # a re-delivered interrupt reaches the main thread only
        sys.unraisablehook = partial(_redeliver_interrupt, previous_hook)
    try:
        return args.run(args)
    except (ValueError, FileNotFoundError, IsADirectoryError, NotADirectoryError) as err:
        print(f"fxscale {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"fxscale {args.command}: interrupted; nothing was left half-written",
              file=sys.stderr)
        return 130
    finally:
        if previous is not None:
            sys.unraisablehook = previous_hook
            signal.signal(signal.SIGTERM, previous)


def _terminate(signum: int, frame: object) -> None:
    """SIGTERM handler: raise KeyboardInterrupt in the main thread."""
    raise KeyboardInterrupt


def _redeliver_interrupt(previous_hook: Callable[[Any], None], unraisable: Any) -> None:
    """Interrupt the main thread again when Python dropped the interrupt: a signal handler
    that runs inside a finalizer (a `__del__`, a weakref callback; torch's export runs many)
    raises there, where the exception is only printed, and the command went on working."""
    if isinstance(unraisable.exc_value, KeyboardInterrupt):
        # from another thread a moment later: raised in this hook, it would be dropped too
        # (if it lands in another finalizer, this hook runs again)
        timer = threading.Timer(0.05, _thread.interrupt_main)
        timer.daemon = True
        timer.start()
    else:
        previous_hook(unraisable)


def _parser() -> argparse.ArgumentParser:
    """The argument parser with one subparser per command."""
    from fxscale import __version__

    parser = argparse.ArgumentParser(prog="fxscale", description=__doc__)
    parser.add_argument("--version", action="version", version=f"fxscale {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for add in COMMANDS:
        add(sub)
    return parser
