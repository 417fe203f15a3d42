"""tritonpipe client: send image files to a served pipeline and print what comes back."""

from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from tritonpipe.choices import PROTOCOLS

from ._cli import run

if TYPE_CHECKING:
    from tritonpipe.client.client import PipelineClient

EPILOG = """examples:
  tritonpipe client cat.jpg dog.jpg                       # gRPC on 127.0.0.1:8001
  tritonpipe client cat.jpg --protocol http --url 127.0.0.1:8000
  tritonpipe client cat.jpg --serve model_repository --protocol all   # start a server just for this call
"""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="tritonpipe client", description=__doc__, epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("files", nargs="+", help="JPEG files to send, one request each")
    parser.add_argument("--protocol", choices=(*PROTOCOLS, "all"), default="grpc", help="(default: %(default)s)")
    parser.add_argument("--url", help="host:port of the server (default: 127.0.0.1:8001 for gRPC, :8000 for HTTP)")
    parser.add_argument("--model", help="model to call (default: the entry model among those the server serves)")
    parser.add_argument("--serve", metavar="REPOSITORY", help="start a server on this repository for the call, then stop it")
    parser.add_argument("--top-k", type=int, default=5, help="classes to show for classifier outputs")
    args = parser.parse_args(argv)
    missing = [name for name in args.files if not Path(name).is_file()]
    if missing:
        parser.error(f"no such file: {', '.join(missing)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    protocols = PROTOCOLS if args.protocol == "all" else (args.protocol,)

    def body() -> int:
        from tritonpipe.client.client import InferError, summarize
        from tritonpipe.server.owner import TritonServer

        with contextlib.ExitStack() as stack:
            server = None
            if args.serve:
                print(f"starting tritonserver on {args.serve} ...", flush=True)
                server = stack.enter_context(TritonServer(args.serve))
            failures = 0
            for protocol in protocols:
                if server is not None:
                    url = server.grpc_url if protocol == "grpc" else server.http_url
                else:
                    url = args.url or ("127.0.0.1:8001" if protocol == "grpc" else "127.0.0.1:8000")
                # closed before the server stops: Triton's shutdown waits for open HTTP connections
                with _connect(url, protocol, args.model or (server.entry if server else None)) as client:
                    print(f"[{protocol} {url}] model {client.model}")
                    for path in args.files:
                        try:
                            lines = summarize(client.infer_file(path), args.top_k)
                            print(f"  {path}\n    " + "\n    ".join(lines))
                        except InferError as exc:
                            failures += 1
                            print(f"  {path}\n    error: {exc}")
            return 1 if failures else 0

    return run(body)


def _connect(url: str, protocol: str, model: str | None) -> PipelineClient:
    from tritonclient.utils import InferenceServerException

    from tritonpipe.client.client import InferError, PipelineClient, status_of

    try:
        return PipelineClient(url, protocol=protocol, model=model)
    except (InferenceServerException, OSError) as exc:
        status = status_of(exc)
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        if status in ("UNAVAILABLE", "TIMEOUT") or isinstance(exc, OSError):
            raise InferError(f"no server answers at {url} over {protocol} ({reason}); start one with tritonpipe serve, "
                             "or pass --serve REPOSITORY", "UNAVAILABLE") from None
        raise InferError(f"the server at {url} refused the call ({status}: {reason})", status) from None


if __name__ == "__main__":
    sys.exit(main())
