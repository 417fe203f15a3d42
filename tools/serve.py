"""tritonpipe serve: run a real Triton server on a model repository until Ctrl-C."""

from __future__ import annotations

import argparse
import contextlib
import logging
import signal
import sys
import time
from typing import TYPE_CHECKING

from tritonpipe.choices import HOME_ENV, MODEL_CONTROL

from ._cli import run

if TYPE_CHECKING:
    from tritonpipe.server.owner import TritonServer

EPILOG = f"""The server binds 127.0.0.1 by default. To listen on other addresses pass --host and
--allow-remote: anyone who can reach the port can then send it images.

A Python stub that dies, or a model whose requests stop finishing for --hang-timeout seconds,
is replaced by reloading that model; a crashed tritonserver is restarted. Each heal is logged as
"heal model=... instance=... took=...s".

More tritonserver flags go after "--", e.g.
  tritonpipe serve repo --grpc-port 9001 -- --http-restricted-api=inference:key=secret

Ctrl-C, SIGTERM or SIGHUP stops the server: it drains the requests in flight for up to
--exit-timeout seconds (idle keep-alive connections do not hold it). A second one stops it at once.

The server comes from the nvidia-pytriton package, or from a bundle unpacked by tritonpipe bundle,
named by --triton-home or ${HOME_ENV}."""


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    argv = sys.argv[1:] if argv is None else list(argv)
    # everything after the first "--" is tritonserver's, wherever serve's own options are
    ours, triton = (argv[:argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])
    parser = argparse.ArgumentParser(
        prog="tritonpipe serve", description=__doc__, epilog=EPILOG,
        usage="%(prog)s [options] [repository] [-- TRITON_FLAG ...]", formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("repository", nargs="?", default="model_repository", help="model repository (default: %(default)s)")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: %(default)s)")
    parser.add_argument("--allow-remote", action="store_true", help="allow a --host other than loopback")
    parser.add_argument("--http-port", type=int, default=8000, help="0 picks a free port (default: %(default)s)")
    parser.add_argument("--grpc-port", type=int, default=8001, help="0 picks a free port (default: %(default)s)")
    parser.add_argument("--metrics-port", type=int, default=8002, help="0 picks a free port (default: %(default)s)")
    parser.add_argument("--no-http", action="store_true", help="serve gRPC (and metrics) only; the HTTP port stays closed")
    parser.add_argument("--triton-home", help="folder of a bundle unpacked by tritonpipe bundle")
    parser.add_argument("--exit-timeout", type=int, default=30, help="seconds to drain in-flight requests on stop")
    parser.add_argument("--log-verbose", type=int, default=0, help="Triton's log verbosity")
    parser.add_argument("--timeout", type=float, default=300, help="seconds to wait for the models to load")
    parser.add_argument("--hang-timeout", type=float, default=60,
                        help="seconds a model may have requests waiting and finish none before its stubs are replaced; "
                             "0 turns this off (default: %(default)s)")
    parser.add_argument("--no-heal", action="store_true", help="do not replace dead stubs or restart a crashed server")
    parser.add_argument("--model-control", choices=MODEL_CONTROL, default="owner",
                        help="owner: only the owner loads and unloads models (default); explicit: any client that "
                             "reaches the ports may, through Triton's model-repository API, and healing is off")
    parser.add_argument("--log-file", help="write the server's log here and keep it (default: a temporary file, kept on failure)")
    parser.add_argument("--mps", action="store_true",
                        help="run the GPU instances under a CUDA MPS daemon of the server's own, so that they share the "
                             "GPU at once instead of in turns (needs nvidia-cuda-mps-control; see the README)")
    args = parser.parse_args(ours)
    args.triton_args = triton
    if args.hang_timeout < 0:
        parser.error(f"--hang-timeout must be 0 (off) or more seconds, got {args.hang_timeout}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    logging.basicConfig(format="%(asctime)s %(levelname)s %(message)s", level=logging.WARNING)

    def body() -> int:
        from tritonpipe.server.heal import HealPolicy
        from tritonpipe.server.install import locate_triton
        from tritonpipe.server.owner import ServerError, TritonServer

        heal = False if args.no_heal else HealPolicy(hang_timeout_s=args.hang_timeout or None)
        server = TritonServer(
            args.repository, host=args.host, allow_remote=args.allow_remote, http=not args.no_http,
            http_port=args.http_port, grpc_port=args.grpc_port, metrics_port=args.metrics_port,
            install=locate_triton(args.triton_home), exit_timeout=args.exit_timeout, log_verbose=args.log_verbose,
            heal=heal, log_file=args.log_file, extra_args=tuple(args.triton_args), model_control=args.model_control,
            mps=args.mps,
        )
        _stop_on_signals(server)
        try:
            server.check_ports()  # a port in use is named before anything starts (start() checks again)
            print(f"loading {server.repository} ...\n  log      {server.log_path}", flush=True)
            try:
                server.start(timeout=args.timeout)
            except ServerError:
                if not server.stop_requested:
                    raise
                print("stopped before the server was ready", file=sys.stderr)
                return 130
            http = server.http_url if server.http else "off (--no-http)"
            print(f"ready\n  HTTP     {http}\n  gRPC     {server.grpc_url}\n  metrics  {server.metrics_url}")
            print(f"  log      {server.log_path}\nCtrl-C stops the server", flush=True)
            while not server.stop_requested and _serving(server):
                time.sleep(0.5)
        finally:
            if server.process is not None:
                with contextlib.suppress(OSError):  # a terminal that is gone (SIGHUP) must not keep the server running
                    print("stopping ...", flush=True)
            code = server.stop()
            log = server.logs()  # before close(), which may remove a clean run's log
            server.close()
        if server.forced_stop == "asked again":
            print("stopped at once on a second signal: requests still in flight were cut off", file=sys.stderr)
        elif server.forced_stop is None and code not in (0, None, -signal.SIGINT):
            print(f"tritonserver exited with code {code}; the end of its log ({server.log_path}):\n{log[-4000:]}",
                  file=sys.stderr)
            return 1
        return 0

    return run(body)


def _stop_on_signals(server: TritonServer) -> None:
    """The first signal stops the server gracefully, a second one at once; neither leaves it running.

    Installed explicitly: a background job of a script inherits SIGINT as ignored, and Python then
    installs no KeyboardInterrupt for it.
    """

    def on_signal(signum, frame) -> None:
        server.request_stop()

    for signum in STOP_SIGNALS:
        signal.signal(signum, on_signal)


def _serving(server: TritonServer) -> bool:
    """Alive, or down while its supervisor is bringing it back."""
    supervising = server.supervisor is not None and server.supervisor.is_running()
    return server.is_alive() or supervising


if __name__ == "__main__":
    sys.exit(main())
