"""`python -m launch {local,tpu-vm,k8s,image} ...`: run the trainer somewhere, build its image.

Each subcommand lives in its own module (`local.py`, `tpu_vm.py`, `k8s.py`, `image.py`), which
exposes `add_parser(subparsers)`; the parser it adds sets `func(args) -> int`.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from launch import common

_SUBCOMMANDS = {"local": "launch.local", "tpu-vm": "launch.tpu_vm", "k8s": "launch.k8s",
                "image": "launch.image"}


class _Parser(argparse.ArgumentParser):

  def error(self, message):
    # One line and exit 2, like every other bad-input path of the project.
    print(f"{self.prog}: error: {message}", file=sys.stderr)
    raise SystemExit(2)


def main(argv: list[str] | None = None) -> int:
  parser = _Parser(prog="python -m launch", description=__doc__.splitlines()[0])
  subparsers = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
  for module_name in _SUBCOMMANDS.values():
    importlib.import_module(module_name).add_parser(subparsers)
  args = parser.parse_args(argv)
  try:
    return args.func(args)
  except common.UsageError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2


if __name__ == "__main__":
  sys.exit(main())
