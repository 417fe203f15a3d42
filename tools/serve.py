"""tritonpipe-serve: run a real Triton server on a model repository until Ctrl-C."""

from __future__ import annotations

import argparse
import signal
import sys
import threading

from tritonpipe.server.install import HOME_ENV, locate_triton
from tritonpipe.server.owner import TritonServer

from ._cli import run

EPILOG = f"""The server binds 127.0.0.1 by default. To listen on other addresses pass --host and
--allow-remote: anyone who can reach the port can then send it images.

The server comes from the nvidia-pytriton package, or from an unpacked tritonpipe-bundle
named by --triton-home or ${HOME_ENV}."""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="tritonpipe-serve", description=__doc__, epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("repository", nargs="?", default="model_repository", help="model repository (default: %(default)s)")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: %(default)s)")
    parser.add_argument("--allow-remote", action="store_true", help="allow a --host other than loopback")
    parser.add_argument("--http-port", type=int, default=8000, help="0 picks a free port (default: %(default)s)")
    parser.add_argument("--grpc-port", type=int, default=8001, help="0 picks a free port (default: %(default)s)")
    parser.add_argument("--metrics-port", type=int, default=8002, help="0 picks a free port (default: %(default)s)")
    parser.add_argument("--triton-home", help="folder of an unpacked tritonpipe-bundle")
    parser.add_argument("--exit-timeout", type=int, default=30, help="seconds to drain in-flight requests on stop")
    parser.add_argument("--log-verbose", type=int, default=0, help="Triton's log verbosity")
    parser.add_argument("--timeout", type=float, default=300, help="seconds to wait for the models to load")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    def body() -> int:
        server = TritonServer(
            args.repository, host=args.host, allow_remote=args.allow_remote,
            http_port=args.http_port, grpc_port=args.grpc_port, metrics_port=args.metrics_port,
            install=locate_triton(args.triton_home), exit_timeout=args.exit_timeout, log_verbose=args.log_verbose,
        )
        stop = threading.Event()
        signal.signal(signal.SIGTERM, lambda *_: stop.set())
        print(f"loading {server.repository} ...", flush=True)
        try:
            server.start(timeout=args.timeout)
            print(f"ready\n  HTTP     {server.http_url}\n  gRPC     {server.grpc_url}\n  metrics  {server.metrics_url}")
            print("Ctrl-C stops the server", flush=True)
            while not stop.is_set() and server.is_alive():
                stop.wait(0.5)
        except KeyboardInterrupt:
            pass
        finally:
            print("stopping ...", flush=True)
            code = server.stop()
            server.close()
        if code not in (0, None, -signal.SIGINT):
            print(f"tritonserver exited with code {code}; log:\n{server.logs()[-4000:]}", file=sys.stderr)
            return 1
        return 0

    return run(body)


if __name__ == "__main__":
    sys.exit(main())
