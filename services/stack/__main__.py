"""python -m services.stack up|down|status|env: the local stack by PID, without Docker.

    up [--servers-only] [--only NAME ...] [--kafka-storage memory|s3]
    down                      stop everything of the state directory, services first, and verify
    status [--json]           running / stopped / external per process, ready now (its probe), start time
    env                       the IEX_* variables that reach the stack, as shell exports
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time

from services.stack import servers
from services.stack.process import state_dir


def _ready(row: servers.Row) -> str:
    if row.ready is None:
        return "-"
    return "yes" if row.ready else f"no ({row.detail})" if row.detail else "no"


def _table(rows: list[servers.Row]) -> str:
    header = ("NAME", "STATE", "PID", "READY", "STARTED IN", "LISTENS")
    lines = [
        (row.name, row.state, str(row.pid or "-"), _ready(row), f"{row.ready_s:.1f}s" if row.ready_s is not None else "-", row.listens)
        for row in rows
    ]
    widths = [max(len(h), *(len(line[i]) for line in lines)) if lines else len(h) for i, h in enumerate(header)]
    out = []
    for line in [header, *lines]:
        out.append("  ".join(cell.ljust(widths[i]) for i, cell in enumerate(line)).rstrip())
    return "\n".join(out)


def _err(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def cmd_up(args: argparse.Namespace) -> int:
    names = list(servers.SERVER_NAMES) + ([] if args.servers_only else list(servers.SERVICE_NAMES))
    if args.only:
        names = [name for name in names if name in args.only]
        skipped = sorted(set(args.only) - set(names))
        if skipped:
            _err(f"not started with --servers-only: {', '.join(skipped)}")
        if not names:
            _err("nothing to start")
            return 2
    stack = servers.Stack(
        servers=[n for n in names if n in servers.SERVER_NAMES],
        services=[n for n in names if n in servers.SERVICE_NAMES],
        kafka_storage=args.kafka_storage,
        echo=_err,
    )
    began = time.monotonic()
    stack.up()
    print(_table(stack.rows))
    print(f"\nup in {time.monotonic() - began:.1f}s; logs and PIDs under {state_dir()}; stop with: python -m services.stack down")
    return 0


def cmd_down(args: argparse.Namespace) -> int:
    stopped = servers.stop_all(echo=_err)
    left = [row.name for row in servers.status() if row.state == "running"]
    if left:
        _err(f"still running: {', '.join(left)}")
        return 1
    print(f"stopped: {', '.join(stopped)}" if stopped else "nothing was running")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    rows = servers.status()
    if args.json:
        print(json.dumps({"state_dir": str(state_dir()), "processes": [row.as_dict() for row in rows]}, indent=2))
    else:
        print(_table(rows))
    return 0


def cmd_env(args: argparse.Namespace) -> int:
    for key, value in servers.stack_env().items():
        print(f"export {key}={shlex.quote(value)}")
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m services.stack", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    up = sub.add_parser("up", help="start servers (and services) and wait until each is ready")
    up.add_argument("--servers-only", action="store_true", help="Kafka, S3, Triton and Prometheus, no services")
    up.add_argument("--only", nargs="+", metavar="NAME", choices=servers.ALL_NAMES, help=f"start only these ({', '.join(servers.ALL_NAMES)})")
    up.add_argument(
        "--kafka-storage",
        choices=servers.KAFKA_STORAGES,
        default=None,
        help="memory (default, or IEX_KAFKA_STORAGE) or s3: topics and offsets in the local S3, surviving a broker kill",
    )
    up.set_defaults(func=cmd_up)
    down = sub.add_parser("down", help="stop everything of the state directory by PID and verify")
    down.set_defaults(func=cmd_down)
    st = sub.add_parser("status", help="running / stopped / external per process")
    st.add_argument("--json", action="store_true")
    st.set_defaults(func=cmd_status)
    env = sub.add_parser("env", help="print the IEX_* variables that reach the stack as shell exports")
    env.set_defaults(func=cmd_env)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        return args.func(args)
    except servers.StackError as exc:
        _err(f"error: {exc}")
        return 1
    except KeyboardInterrupt:
        _err("interrupted")
        return 130
    except BrokenPipeError:  # `status | head`
        sys.stderr.close()
        return 0


if __name__ == "__main__":
    sys.exit(main())
