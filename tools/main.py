"""tritonpipe: one command for generating, serving, calling and measuring pipelines.

Each verb's module is imported only when it runs, and those modules import torch, tritonclient and
the rest only once their arguments are parsed, so help and usage errors come back at once.
"""

from __future__ import annotations

import importlib
import sys
from types import ModuleType

from tritonpipe.registry import did_you_mean

VERBS = ("generate", "serve", "client", "soak", "bench", "bundle", "build-engine", "export-example")


def verb_module(verb: str) -> ModuleType:
    return importlib.import_module(f"tritonpipe_tools.{verb.replace('-', '_')}")


def usage() -> str:
    lines = ["usage: tritonpipe VERB [ARGS ...]", "", "verbs:"]
    for verb in VERBS:
        # each module's docstring starts "tritonpipe VERB: what it does."
        lines.append(f"  {verb:<16}{verb_module(verb).__doc__.split(':', 1)[1].splitlines()[0].strip()}")
    lines += ["", "'tritonpipe VERB --help' describes a verb's arguments."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else list(argv)
    if not args:
        print(usage(), file=sys.stderr)
        return 2
    verb, rest = args[0], args[1:]
    if verb in ("-h", "--help"):
        print(usage())
        return 0
    if verb == "--version":
        from importlib.metadata import version

        print(f"tritonpipe {version('tritonpipe')}")
        return 0
    if verb not in VERBS:
        print(f"usage: tritonpipe VERB [ARGS ...]\ntritonpipe: error: unknown verb {verb!r}{did_you_mean(verb, list(VERBS))}"
              f" (one of {', '.join(VERBS)})", file=sys.stderr)
        return 2
    return verb_module(verb).main(rest)


if __name__ == "__main__":
    sys.exit(main())
