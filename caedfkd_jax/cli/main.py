"""The `caedfkd` command: one subcommand per job, each living in its own module.

Each command module exposes `add_arguments(parser)` and `run(args) -> int`;
`distill` and `train` hand their arguments to the absl/ml_collections launcher instead.
"""

import argparse
import importlib
import importlib.metadata
import sys

# subcommand -> (module, one-line help)
COMMANDS = {
    "convert": ("caedfkd_jax.io.convert", "PyTorch checkpoint -> model bundle"),
    "convert-diffusion": ("caedfkd_jax.diffusion.weights",
                          "local diffusers Stable Diffusion folder -> diffusion bundle (DiffDFKD)"),
    "export": ("caedfkd_jax.io.export",
               "model bundle -> state dict: torch, safetensors, torchvision, detectron2"),
    "evaluate": ("caedfkd_jax.eval.evaluate", "top-1 and per-class accuracy of a bundle"),
    "probe": ("caedfkd_jax.eval.probe", "linear, kNN and fine-tuning probes of a bundle's features"),
    "embed": ("caedfkd_jax.io.embeddings", "class-name embeddings from a local text encoder"),
    "distill": ("caedfkd_jax.cli.distill", "CAE-DFKD: teacher bundle -> student bundle, no real data"),
    "train": ("caedfkd_jax.cli.train", "supervised training of a zoo network: a teacher, or the "
              "data-accessible student"),
    "transfer": ("caedfkd_jax.cli.transfer", "fine-tune a bundle's backbone on dense tasks "
                 "(NYUv2 multi-task, segmentation folders): the paper's transfer tables"),
    "dense-data": ("caedfkd_jax.transfer.procedural_nyu", "procedural NYUv2-layout scenes "
                   "textured with CIFAR-10 images: a proxy for tests and CPU studies"),
    "demo": ("caedfkd_jax.cli.demo", "offline end-to-end demo on scikit-learn's digits"),
}


class OneLineErrorParser(argparse.ArgumentParser):
  """argparse, but a usage error is one line like every other error: the usage block it would
  print first is what --help is for."""

  def error(self, message: str):
    self.exit(2, f"{self.prog}: error: {message} (`{self.prog} --help` shows the usage)\n")


def main(argv: list[str] | None = None) -> int:
  argv = sys.argv[1:] if argv is None else argv
  parser = OneLineErrorParser(
      prog="caedfkd", description="Data-free knowledge distillation (CAE-DFKD) in JAX.")
  parser.add_argument("--version", action="version", version=f"caedfkd {version()}")
  sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
  for name, (_, help_text) in COMMANDS.items():
    sub.add_parser(name, help=help_text, add_help=False)
  if not argv:  # no command at all: the list of commands, not an error line
    parser.print_help(sys.stderr)
    return 2
  if argv[0] not in COMMANDS:
    parser.parse_args(argv)  # --help, or one error line naming the unknown command; exits
  name, rest = argv[0], argv[1:]
  module = importlib.import_module(COMMANDS[name][0])
  try:
    if name in ("distill", "train"):
      return module.main([f"caedfkd {name}", *rest])
    cmd_parser = OneLineErrorParser(prog=f"caedfkd {name}", description=COMMANDS[name][1])
    module.add_arguments(cmd_parser)
    args = cmd_parser.parse_args(rest)
    return int(module.run(args) or 0)
  except (ValueError, FileNotFoundError, ImportError) as e:
    # Bad input or a missing optional extra: one clear message, no traceback.
    print(f"caedfkd {name}: error: {e}", file=sys.stderr)
    return 2
  except KeyboardInterrupt:   # distill and train checkpoint on the first Ctrl-C; this is the rest.
    print(f"caedfkd {name}: interrupted; nothing of this invocation was kept beyond what it "
          "already wrote (rerun the same command).", file=sys.stderr)
    return 130


def version() -> str:
  """The installed distribution's version (the source tree's when not installed)."""
  try:
    return importlib.metadata.version("caedfkd-jax")
  except importlib.metadata.PackageNotFoundError:
    return "unknown (not installed)"


if __name__ == "__main__":
  sys.exit(main())
