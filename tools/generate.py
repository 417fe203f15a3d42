"""tritonpipe generate: write a Triton model repository from a torchpipe-style configuration."""

from __future__ import annotations

import argparse
import shutil
import sys

from tritonpipe.choices import DEVICES

from ._cli import run

EPILOG = """examples:
  tritonpipe generate --backend "S[DecodeMat,ResizeMat]" --set resize_h=224 --set resize_w=224 -o model_repository
  tritonpipe generate examples/resnet18/pipeline.toml -o model_repository --force
  tritonpipe generate graph.json --plugin my_stages.py --dry-run
  tritonpipe generate --list-stages                  # every stage and its parameters
  tritonpipe generate --reference > docs/CONFIG.md   # every configuration key

A configuration is torchpipe's node dict ({"backend": ..., "instance_num": 2, "max": 4, ...})
or a graph of such nodes linked by "next". Everything is checked before anything is written.
"""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="tritonpipe generate",
        description=__doc__,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("config", nargs="?", help="TOML or JSON configuration file")
    parser.add_argument("--backend", help='backend string for a single node, e.g. "S[DecodeMat,ResizeMat]"')
    parser.add_argument(
        "--set", dest="settings", action="append", default=[], metavar="KEY=VALUE",
        help="set a node key (repeatable); with a file it overrides the file's top-level keys",
    )
    parser.add_argument("--name", help="name of the entry model clients call (default: the config's 'name' or 'pipeline')")
    parser.add_argument("--plugin", action="append", default=[], metavar="FILE.py", help="Python file registering custom stages")
    parser.add_argument("-o", "--output", default="model_repository", help="repository folder to write (default: %(default)s)")
    parser.add_argument(
        "--device", choices=DEVICES, default="auto",
        help="where GPU-capable stages run: auto lets Triton pick the GPU when there is one (default: %(default)s)",
    )
    parser.add_argument(
        "--native", default="", metavar="ENGINES",
        help="serve model steps of these engines (tensorrt,onnxruntime) with Triton's own backends instead of "
        "the Python runner; TensorRT needs a .plan (see tritonpipe build-engine)",
    )
    parser.add_argument(
        "--k8s", metavar="DIR",
        help="also write Kubernetes manifests for the repository to DIR (kustomize base and cpu/gpu/mig overlays)",
    )
    parser.add_argument("--force", action="store_true", help="replace the output folder if it is not empty")
    parser.add_argument("--dry-run", action="store_true", help="print the configs instead of writing them")
    parser.add_argument("--list-stages", action="store_true", help="print every stage (with --plugin ones) and its parameters, and exit")
    parser.add_argument("--markdown", action="store_true", help="with --list-stages: as the README's Markdown table")
    parser.add_argument("--reference", action="store_true",
                        help="print the configuration reference (docs/CONFIG.md: every key, its type, default, range, an example) and exit")
    args = parser.parse_args(argv)
    args.native = tuple(e.strip().lower() for e in args.native.split(",") if e.strip())
    if args.markdown and not args.list_stages:
        parser.error("--markdown goes with --list-stages")
    if args.list_stages and args.reference:
        parser.error("give --list-stages or --reference, not both")
    if args.list_stages or args.reference:
        return args
    if bool(args.config) == bool(args.backend):
        parser.error("give either a configuration file or --backend")
    if args.k8s is not None and (args.dry_run or not args.k8s.strip()):
        parser.error("--k8s needs a folder and writes files; it cannot go with --dry-run")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    def body() -> int:
        if args.list_stages:
            from tritonpipe.stages import load_plugin
            from tritonpipe.stages.catalog import stage_listing, stage_table_markdown

            for plugin in args.plugin:
                load_plugin(plugin)
            print(stage_table_markdown() if args.markdown else stage_listing(shutil.get_terminal_size().columns))
            return 0
        if args.reference:
            from tritonpipe.pipeline.reference import config_reference_markdown

            print(config_reference_markdown(), end="")
            return 0

        from tritonpipe.pipeline.files import compose_config, parse_overrides
        from tritonpipe.pipeline.graph import load_graph
        from tritonpipe.repository.configs import to_text
        from tritonpipe.repository.generate import build_repository, generate_repository

        config, base_dir = compose_config(args.config, args.backend, parse_overrides(args.settings))
        graph = load_graph(config, name=args.name, plugins=args.plugin, base_dir=base_dir)
        if args.dry_run:
            _, configs, _ = build_repository(graph, args.device, args.native)
            _warn_host(configs)
            for name, config_proto in configs.items():
                print(f"# {name}/config.pbtxt\n{to_text(config_proto)}")
            return 0
        if args.k8s:
            from tritonpipe.deploy import k8s

            k8s.check_target(args.k8s, args.output, args.force)  # before anything is written
        repository = generate_repository(graph, args.output, device=args.device, overwrite=args.force, native=args.native)
        _warn_host(repository.configs)
        print(f"wrote {repository.path}")
        if args.k8s:
            manifests = k8s.build_manifests(repository.configs, repository.path, repository.entry)
            print(f"wrote {k8s.write_manifests(manifests, args.k8s, overwrite=args.force)}")
            print("\n".join(k8s.summary(manifests)))
        for name, config_proto in sorted(repository.configs.items()):
            kind = config_proto.platform or config_proto.backend
            print(f"  {name:<32} {kind:<16} max_batch_size={config_proto.max_batch_size}")
        print(f"entry model: {repository.entry}")
        print(f"serve it with: tritonpipe serve {args.output}")
        return 0

    return run(body)


def _warn_host(configs: dict) -> None:
    """What the repository asks of this host that it cannot give, and GPU models left at torchpipe's defaults."""
    from tritonpipe.repository.capacity import capacity_warning, gpu_shape_note, host_capacity

    available_mb, cores, gpu = host_capacity()
    for line in (capacity_warning(configs, available_mb, cores, gpu), gpu_shape_note(configs, gpu)):
        if line:
            print(line, file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
