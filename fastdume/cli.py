"""`fastdume` command line: a thin dispatcher over fastdume.commands.<name>."""

import argparse
import importlib
import importlib.util
import sys

# subcommand modules in the order --help lists them
COMMANDS = (
    "demo",
    "upcycle",
    "stats",
    "fit",
    "add_expert",
    "remove_expert",
    "eval",
    "pipeline_train",
    "attack",
)


def _modules():
    for name in COMMANDS:
        spec = importlib.util.find_spec(f"fastdume.commands.{name}")
        if spec is not None:
            yield importlib.import_module(f"fastdume.commands.{name}")


def build_parser():
    parser = argparse.ArgumentParser(
        prog="fastdume",
        description="Training-free dynamic upcycling of dense experts into an MoE (DUME), "
        "its kernels, and pipeline post-training research tools.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module in _modules():
        module.add_parser(sub)
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    return int(args.run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
