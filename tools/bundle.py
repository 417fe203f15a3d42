"""tritonpipe bundle: pack, unpack and check an offline bundle of the Triton server.

The bundle is one .tar.xz (at most 40 MB) holding the Triton server, the Python backend
stubs for chosen Python versions, perf_analyzer and only the shared libraries they need,
for hosts that cannot reach a package index.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tritonpipe.choices import BUNDLE_DIR, DEFAULT_PRESET, HOME_ENV

from ._cli import run

_DESCRIPTION = f"""\
Make a relocatable offline bundle of the Triton Inference Server (from the nvidia-pytriton
wheel), its Python backend stubs and perf_analyzer, as one .tar.xz of at most 40 MB.

On the build host:     tritonpipe bundle pack triton.tar.xz --python 3.12
On the target host:    tritonpipe bundle unpack triton.tar.xz /opt
                       (or: tar xf triton.tar.xz -C /opt)
                       export {HOME_ENV}=/opt/{BUNDLE_DIR}
"""

_EPILOG = """\
The target host needs glibc 2.35 or newer (Ubuntu 22.04+, Debian 12+), libstdc++ and zlib,
the CUDA driver for GPU work, and for each Python backend stub the matching Python with its
libpythonX.Y.so.1.0. Everything else is inside the bundle. Exit status: 0 on success,
1 when verify finds problems, 2 on errors.
"""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tritonpipe bundle",
        description=_DESCRIPTION,
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    pack = commands.add_parser(
        "pack",
        help="write a bundle tarball",
        description="Write a bundle .tar.xz from the Triton server found on this host "
        f"(the nvidia-pytriton wheel, or ${HOME_ENV}). Compression takes a few minutes.",
    )
    pack.add_argument("output", metavar="OUTPUT", type=Path, help="the .tar.xz file to write")
    pack.add_argument(
        "--python",
        dest="pythons",
        action="append",
        metavar="X.Y",
        help="Python version whose backend stub to include; repeat for several "
        "(default: this Python's version and 3.12). Use the version of the Python that will run "
        "the models on the target host.",
    )
    pack.add_argument("--no-perf-analyzer", action="store_true", help="leave perf_analyzer out")
    pack.add_argument("--overwrite", action="store_true", help="replace OUTPUT if it exists")
    pack.add_argument(
        "--preset",
        type=int,
        choices=range(10),
        metavar="0-9",
        default=None,
        help=f"xz compression level (default {DEFAULT_PRESET}; lower is faster and larger)",
    )
    pack.add_argument("--quiet", action="store_true", help="no progress bar")

    unpack = commands.add_parser(
        "unpack",
        help="unpack a bundle safely",
        description=f"Unpack ARCHIVE into DEST/{BUNDLE_DIR}, refusing members that would land "
        "outside DEST, and print the line that points tritonpipe at it.",
    )
    unpack.add_argument("archive", metavar="ARCHIVE", type=Path, help="a .tar.xz made by 'tritonpipe bundle pack'")
    unpack.add_argument("dest", metavar="DEST", type=Path, help="folder to unpack into (created if missing)")

    verify = commands.add_parser(
        "verify",
        help="check that an unpacked bundle's libraries resolve on this host",
        description="Run ldd on every binary and library of an unpacked bundle and report what "
        "is missing or comes from outside the bundle. Exit status 1 when there are problems.",
    )
    verify.add_argument("root", metavar="ROOT", type=Path, help=f"the unpacked {BUNDLE_DIR} folder")
    return parser


def _usage_lines(root: str) -> list[str]:
    return [
        f"  export {HOME_ENV}={root}",
        f"  perf_analyzer: LD_LIBRARY_PATH={root}/nvidia_pytriton.libs {root}/bin/perf_analyzer ...",
    ]


def _dispatch(args: argparse.Namespace) -> int:
    from tritonpipe.server import bundle

    if args.command == "pack":
        report = bundle.pack(
            args.output,
            pythons=args.pythons,
            include_perf_analyzer=not args.no_perf_analyzer,
            progress=not args.quiet,
            overwrite=args.overwrite,
            preset=args.preset,
        )
        print(
            f"wrote {report.path}: {report.size_mb:.1f} MB ({report.uncompressed_bytes / 1e6:.0f} MB unpacked, "
            f"{report.files} files; Python stubs {', '.join(report.pythons)}; "
            f"perf_analyzer {'included' if report.has_perf_analyzer else 'left out'})"
        )
        if report.over_limit:
            print(f"warning: larger than {bundle.SIZE_LIMIT_BYTES / 1e6:.0f} MB", file=sys.stderr)
        print("on the target host:")
        print(f"  tritonpipe bundle unpack {report.path.name} /opt   (or: tar xf {report.path.name} -C /opt)")
        for line in _usage_lines(f"/opt/{BUNDLE_DIR}"):
            print(line)
        return 0
    if args.command == "unpack":
        root = bundle.unpack(args.archive, args.dest)
        print(f"unpacked to {root}")
        for line in _usage_lines(str(root)):
            print(line)
        return 0
    problems = bundle.verify(args.root)
    if problems:
        for problem in problems:
            print(problem)
        print(f"{len(problems)} problem(s) in {args.root}", file=sys.stderr)
        return 1
    print(f"{args.root}: every library resolves from the bundle or the base system")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    return run(lambda: _dispatch(args))


if __name__ == "__main__":
    sys.exit(main())
