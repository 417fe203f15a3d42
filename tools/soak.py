"""tritonpipe soak: load a served pipeline with good and bad inputs and check every answer."""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from pathlib import Path

from tritonpipe.choices import PROTOCOLS

from ._cli import run

EPILOG = """Every response is compared with the same stage chain run in this process; bad inputs
(truncated JPEG, random bytes, PNG, empty) must come back as INVALID_ARG.

examples:
  tritonpipe soak --serve model_repository --requests 5000 --concurrency 16
  tritonpipe soak --url 127.0.0.1:8001 --bad-fraction 0.1 --json soak.json
  tritonpipe soak --serve repo --kill-stub-after 500       # SIGKILL one Python stub during the load
  tritonpipe soak --serve repo --stop-server-after 500     # SIGINT the server; in-flight requests drain

exit status: 0 when nothing was wrong or lost (with a fault injected: nothing wrong and nothing hung),
1 otherwise, 2 on a usage or server error."""


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _count(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a count >= 0, got {text!r}")
    return value


def _fraction(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a fraction in [0, 1], got {text!r}")
    return value


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="tritonpipe soak", description=__doc__, epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    target = parser.add_mutually_exclusive_group()
    target.add_argument("--url", help="host:port of a running server (default: 127.0.0.1:8001 for gRPC, :8000 for HTTP)")
    target.add_argument("--serve", metavar="REPOSITORY", help="start a server on this repository for the run")
    parser.add_argument("--protocol", choices=PROTOCOLS, default="grpc", help="(default: %(default)s)")
    parser.add_argument("--model", help="model to call (default: the repository's entry model)")
    parser.add_argument("--concurrency", type=_positive, default=16, help="requests in flight (default: %(default)s)")
    parser.add_argument("--requests", type=_positive, default=2000, help="requests to send (default: %(default)s)")
    parser.add_argument("--bad-fraction", type=_fraction, default=0.05, help="share of bad inputs (default: %(default)s)")
    parser.add_argument("--corpus", metavar="DIR", type=Path, help="folder of JPEGs (default: a built-in synthetic set)")
    parser.add_argument("--warmup", type=_count, default=100, help="good requests before measuring (default: %(default)s)")
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds before a request counts as lost")
    parser.add_argument("--seed", type=_count, default=0, help="seed of the request mix (default: %(default)s)")
    parser.add_argument("--atol", type=float, help="allowed difference of outputs (default: 0 for integers, 1e-4 for floats)")
    parser.add_argument("--repository", type=Path, help="the served repository, if stages read files (default: --serve's)")
    parser.add_argument("--server-pid", type=int, help="server process for memory readings (default: found in /proc)")
    parser.add_argument("--exit-timeout", type=int, default=30, help="with --serve: seconds to drain on stop")
    faults = parser.add_mutually_exclusive_group()
    faults.add_argument("--kill-stub-after", type=_count, metavar="N", help="SIGKILL one Python stub after N requests")
    faults.add_argument("--stop-server-after", type=_count, metavar="N", help="with --serve: SIGINT the server after N requests")
    parser.add_argument("--json", metavar="OUT", type=Path, help="also write the results as JSON")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    if args.stop_server_after is not None and not args.serve:
        parser.error("--stop-server-after needs --serve")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    from tritonclient.utils import InferenceServerException

    def body() -> int:
        from tritonpipe.harness.soak import SoakOptions, format_report, run_soak
        from tritonpipe.server.owner import TritonServer

        with contextlib.ExitStack() as stack:
            server = None
            if args.serve:
                print(f"starting tritonserver on {args.serve} ...", file=sys.stderr, flush=True)
                server = stack.enter_context(TritonServer(args.serve, exit_timeout=args.exit_timeout))
            url = args.url or ("" if server else "127.0.0.1:8001" if args.protocol == "grpc" else "127.0.0.1:8000")
            options = SoakOptions(
                url=url, protocol=args.protocol, model=args.model, concurrency=args.concurrency,
                requests=args.requests, bad_fraction=args.bad_fraction, corpus=args.corpus, warmup=args.warmup,
                timeout=args.timeout, seed=args.seed, repository=args.repository, server_pid=args.server_pid,
                atol=args.atol, kill_stub_after=args.kill_stub_after, stop_server_after=args.stop_server_after,
                progress=not args.no_progress,
            )
            report = run_soak(options, server)
        print(format_report(report))
        if args.json:
            args.json.write_text(json.dumps(report.to_dict(), indent=2) + "\n")
        return 0 if report.ok else 1

    return run(body, expected=(InferenceServerException,))


if __name__ == "__main__":
    sys.exit(main())
