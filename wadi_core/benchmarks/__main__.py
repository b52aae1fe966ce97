"""``python -m wadi_core.benchmarks {layers,kernels,training-step,sd15-step,worlds,gpu-check} [options]``; see the
package doc."""

from __future__ import annotations

import argparse
import importlib
import sys

# Subcommand → (module of this package, one-line description). Each module has add_arguments(parser) and
# main(args) -> exit status; only the chosen one is imported, so `kernels` never imports diffusers and `gpu-check`
# imports only the standard library until it runs the check.
COMMANDS = {
    "layers": ("layers", "per-Linear cost of LoRaD vs the official hook, LoRA, DoRA and plain Linears"),
    "kernels": ("kernels", "fused Triton LoRaD vs its reference, the official hook and the GEMM floor"),
    "training-step": ("training_step", "one WaDi generator step per student on the tiny world's teacher"),
    "sd15-step": ("sd15_step", "one student forward+backward of the SD1.5 U-Net: LoRaD, official hook, full, frozen"),
    "worlds": ("worlds", "teacher step and WaDi step in three tiny worlds (pixel, pixel + SD1.5 attention, latent)"),
    "gpu-check": ("gpu_check", "make gpu-check: its wheels, then kernels fp16/bf16 and the SD1.5 step on a CUDA GPU"),
}


def _module(command: str):
    return importlib.import_module(f"wadi_core.benchmarks.{COMMANDS[command][0]}")


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    """The command line; only the subcommand named in ``argv`` (its first positional) gets its options added."""
    chosen = next((arg for arg in argv if not arg.startswith("-")), None)
    parser = argparse.ArgumentParser(prog="python -m wadi_core.benchmarks",
                                     description="Benchmarks of LoRaD's cost (results/tables/benchmarks_*).")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="{" + ",".join(COMMANDS) + "}")
    for command, (_, description) in COMMANDS.items():
        subparser = subparsers.add_parser(command, help=description, description=description)
        if command == chosen:
            _module(command).add_arguments(subparser)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv``, run the chosen benchmark; argument errors exit with 2."""
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser(argv).parse_args(argv)
    return _module(args.command).main(args)


if __name__ == "__main__":
    sys.exit(main())
