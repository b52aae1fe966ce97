"""The distillation command: WaDi (§3.3) on one device or many, as the official ``train_dkd_sd1.5.sh`` runs
``train_dkd_sd.py`` (8 GPUs × 16 prompts = the global batch of 128)::

    accelerate launch --num_processes 8 -m wadi_core.distill.train --backbone sd15 \\
        --prompts JourneyDB/data/train/train_anno.jsonl --output-dir runs/wadi-sd15
    python -m wadi_core.distill.train --backbone smoke-sd15 --prompts prompts.txt --output-dir runs/smoke \\
        --steps 10 --batch-size-per-process 2        # one device or the CPU

``--output-dir`` receives ``train_prompt.jsonl`` (a JourneyDB file's prompts in the official order,
:mod:`.prompts`), ``log.csv`` (one row per generator step), the latest ``checkpoint-<step>.safetensors``,
``training_args.json`` (the resolved settings) and ``student/``: the merged student as a stock diffusers pipeline
with a one-step LCM scheduler (:func:`~.students.export_student`). The official code's checkpoint save hook never
fires and its final save keeps the unrotated weights, so loading it gives back the teacher; the export here is
always the trained student. Rerunning the same command resumes from the checkpoint (a larger ``--steps``
continues the run); Ctrl-C keeps the last checkpoint.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from ..artifacts import atomic_path, module_digest, prompts_digest
from .config import MIXED_PRECISION, OPTIMIZERS, VSDConfig
from .prompts import PROMPT_CACHE_NAME, load_prompts
from .students import distill, export_student
from .vsd import LOG_NAME, latest_checkpoint

ARGS_NAME = "training_args.json"
STUDENT_FOLDER = "student"
OFFICIAL_BATCH_PER_PROCESS = 16  # train_dkd_sd1.5.sh: 8 processes × 16 = VSDConfig's global batch of 128
INTERRUPTED_EXIT_CODE = 130  # the shell's code for a process stopped by Ctrl-C
_DEFAULT = VSDConfig()  # the official recipe: the flags' defaults come from it
_FROM_CONFIG = "config"  # --config itself cannot be a key of the config file


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows a flag's default where it has one (a default of None is the backbone's or the machine's, told in
    the flag's help)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        return action.help if action.default is None else super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    """The command's arguments; every default not given here is the backbone's or the machine's."""
    parser = argparse.ArgumentParser(
        prog="python -m wadi_core.distill.train",
        description="Distil a diffusion backbone into a one-step WaDi student (LoRaD student, LoRaD fake score, "
                    "VSD; WaDi §3.3). Runs on the CPU, one GPU or under `accelerate launch` over several GPUs; "
                    "rerunning the same command resumes from the latest checkpoint in --output-dir.",
        formatter_class=_HelpFormatter,
    )
    add = parser.add_argument
    add("--config", metavar="FILE",
        help='JSON or YAML file whose keys are this command\'s flags (e.g. {"backbone": "sd15", "steps": 1000}); '
             "flags given on the command line override it")
    add("--backbone", metavar="NAME_OR_DIR",
        help="teacher: tiny, sd15, sd21-base, pixart-alpha-256, smoke-sd15, smoke-sd21-base, "
             "smoke-pixart-alpha-256, or a local diffusers pipeline folder (required)")
    add("--prompts", metavar="FILE",
        help="training prompts: a JourneyDB train_anno.jsonl (captions under Task2.Caption; de-duplicated, sorted "
             'and shuffled with seed 2023 as the official dataset.py), a .jsonl of {"prompt": ...} or '
             '{"caption": ...} rows, a .txt with one prompt per line, or a JSON array of prompts (detected by '
             "content; required)")
    add("--output-dir", metavar="DIR",
        help="where the log, checkpoints, training_args.json and the exported student/ go; a checkpoint there is "
             "resumed (required)")
    add("--steps", metavar="N", type=_positive_int, default=_DEFAULT.steps,
        help="generator steps in total (the paper: 2 epochs of JourneyDB at batch 128)")
    add("--batch-size-per-process", metavar="B", type=_positive_int, default=OFFICIAL_BATCH_PER_PROCESS,
        help="prompts per process and step; the global batch is this × accelerate's number of processes "
             "(official: 8 × 16 = 128)")
    add("--student-rank", metavar="R", type=_positive_int,
        help="LoRaD rank of the student (default: the backbone's, 256 for SD, 128 for PixArt-α)")
    add("--fake-rank", metavar="R", type=_positive_int,
        help="LoRaD rank of the fake score (default: the backbone's, 32)")
    add("--student-lr", metavar="LR", type=float, default=_DEFAULT.student_lr,
        help="AdamW learning rate of the student")
    add("--fake-lr", metavar="LR", type=float, default=_DEFAULT.fake_lr,
        help="AdamW learning rate of the fake score")
    add("--guidance-scale", metavar="W", type=float, default=_DEFAULT.guidance_scale,
        help="classifier-free guidance of the real and the fake score in the generator loss")
    add("--fake-guidance-scale", metavar="W", type=float,
        help="guidance of the fake score alone (default: --guidance-scale, as the official code; 1 leaves the "
             "fake score unguided, as DMD does)")
    add("--mixed-precision", choices=MIXED_PRECISION,
        help="accelerate's mixed precision (default: fp16 on CUDA for SD, bf16 on CUDA for PixArt-α, as the "
             "official scripts; no on the CPU)")
    add("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=True,
        help="gradient checkpointing of the student and the fake score (the official scripts: on)")
    add("--optimizer", choices=OPTIMIZERS,
        help="adamw, or adamw_8bit (bitsandbytes' AdamW8bit, the official choice; the default when bitsandbytes "
             "imports and CUDA is available, else adamw)")
    add("--checkpoint-every", metavar="N", type=_positive_int, default=_DEFAULT.checkpoint_every,
        help="generator steps between checkpoints (one is also written at the last step; only the latest is kept)")
    add("--seed", metavar="SEED", type=int, default=_DEFAULT.seed,
        help="seed of the adapter initialisation and of every draw of the loop (each process adds its index)")
    add("--max-prompts", metavar="N", type=_positive_int,
        help="train on the first N prompts only (for quick runs)")
    add("--one-step-alpha-bar", metavar="ALPHA_BAR", type=float,
        help="ᾱ of the one-step formula x0 = (z − √(1−ᾱ)·ε̂)/√ᾱ (default: the backbone's: the scheduler's "
             "ᾱ_{T−1} for SD, the official 0.0047 for PixArt-α)")
    add("--ema-decay", metavar="DECAY", type=float,
        help="θ-EMA decay of the student, which is then exported instead of the raw student (default: off, as "
             "the paper)")
    return parser


def _config_file_argv(path: str, parser: argparse.ArgumentParser) -> list[str]:
    """The flags that ``path``'s keys stand for (``{"steps": 10}`` → ``["--steps", "10"]``), so a config file is
    parsed, checked and overridden exactly as flags are."""
    file = Path(path)
    if not file.is_file():
        parser.error(f"--config {path}: no such file")
    suffix = file.suffix.lower()
    if suffix not in (".json", ".yaml", ".yml"):
        parser.error(f"--config {path}: expected a .json, .yaml or .yml file")
    text = file.read_text(encoding="utf-8")
    if suffix == ".json":
        try:
            settings = json.loads(text)
        except ValueError as err:
            parser.error(f"--config {path}: not valid JSON ({err})")
    else:
        try:
            import yaml
        except ImportError:
            parser.error(f"--config {path}: reading YAML needs PyYAML (pip install pyyaml), or use a .json file")
        try:
            settings = yaml.safe_load(text)
        except yaml.YAMLError as err:
            parser.error(f"--config {path}: not valid YAML ({err})")
    if not isinstance(settings, dict):
        parser.error(f"--config {path}: expected a mapping of flag names to values, got {type(settings).__name__}")
    actions = {action.dest: action for action in parser._actions if action.option_strings and action.dest != "help"}
    argv = []
    for key, value in settings.items():
        dest = str(key).lstrip("-").replace("-", "_")
        if dest not in actions or dest == _FROM_CONFIG:
            known = ", ".join(sorted(name for name in actions if name != _FROM_CONFIG))
            parser.error(f"--config {path}: unknown key {key!r}; the keys are the flags: {known}")
        action = actions[dest]
        if value is None:
            continue
        if isinstance(action, argparse.BooleanOptionalAction):
            if not isinstance(value, bool):
                parser.error(f"--config {path}: {key!r} must be true or false, got {value!r}")
            argv.append(action.option_strings[0] if value else action.option_strings[1])
        elif isinstance(value, (dict, list)):
            parser.error(f"--config {path}: {key!r} takes a single value, got {value!r}")
        else:
            argv += [action.option_strings[0], str(value)]
    return argv


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Flags over ``--config``'s keys over the defaults; --backbone, --prompts and --output-dir are required."""
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    config_only = argparse.ArgumentParser(add_help=False)
    config_only.add_argument("--config")
    known, _ = config_only.parse_known_args(argv)
    from_file = [] if known.config is None else _config_file_argv(known.config, parser)
    args = parser.parse_args(from_file + argv)
    for name in ("backbone", "prompts", "output_dir"):
        if getattr(args, name) is None:
            parser.error(f"--{name.replace('_', '-')} is required (a flag, or a key of --config)")
    try:
        VSDConfig(**_given_fields(args, num_processes=1))
    except ValueError as err:
        parser.error(str(err))
    if args.optimizer == "adamw_8bit" and not _bitsandbytes_available():
        parser.error("--optimizer adamw_8bit needs bitsandbytes (pip install bitsandbytes, on a GPU machine); "
                     "or use --optimizer adamw")
    return args


def _bitsandbytes_available() -> bool:
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        return False
    return True


def _given_fields(args: argparse.Namespace, num_processes: int) -> dict:
    """The :class:`VSDConfig` fields the arguments set (those left open take the backbone's or machine's value)."""
    fields = dict(
        steps=args.steps,
        batch_size=args.batch_size_per_process * num_processes,
        student_rank=args.student_rank,
        fake_rank=args.fake_rank,
        student_lr=args.student_lr,
        fake_lr=args.fake_lr,
        guidance_scale=args.guidance_scale,
        fake_guidance_scale=args.fake_guidance_scale,
        mixed_precision=args.mixed_precision,
        gradient_checkpointing=args.gradient_checkpointing,
        optimizer=args.optimizer,
        checkpoint_every=args.checkpoint_every,
        seed=args.seed,
        one_step_alpha_bar=args.one_step_alpha_bar,
        ema_decay=args.ema_decay,
    )
    return {name: value for name, value in fields.items() if value is not None}


def resolve_config(args: argparse.Namespace, backbone, num_processes: int, cuda: bool) -> VSDConfig:
    """The run's :class:`VSDConfig`: the arguments, then the backbone's ranks and one-step ᾱ, then the machine's
    precision (fp16 on CUDA, bf16 for PixArt-α as ``train_dkd_pixart.sh``; no on the CPU) and optimizer."""
    pixart = backbone.pipeline_class == "PixArtAlphaPipeline"
    defaults = dict(
        student_rank=backbone.student_rank,
        fake_rank=backbone.fake_rank,
        one_step_alpha_bar=backbone.one_step_alpha_bar,
        mixed_precision=("bf16" if pixart else "fp16") if cuda else "no",
        optimizer="adamw_8bit" if cuda and _bitsandbytes_available() else "adamw",
    )
    return VSDConfig(**{**defaults, **_given_fields(args, num_processes)})


def _check_resumable(out_dir: Path, run: dict) -> None:
    """A checkpoint in ``out_dir`` must come from the same teacher and prompts (``resume_vsd`` checks the rest)."""
    checkpoint, args_path = latest_checkpoint(out_dir), out_dir / ARGS_NAME
    if checkpoint is None or not args_path.is_file():
        return
    previous = json.loads(args_path.read_text())
    for key, flag in (("teacher_digest", "--backbone"), ("prompts_digest", "--prompts / --max-prompts")):
        if previous.get(key) != run[key]:
            raise ValueError(f"cannot resume from {checkpoint}: it was trained with another {flag} "
                             f"({previous.get('backbone')!r} on {previous.get('num_prompts')} prompts of "
                             f"{previous.get('prompts')!r}); use the original {flag} or another --output-dir")


def _write_args(out_dir: Path, run: dict) -> None:
    with atomic_path(out_dir / ARGS_NAME) as tmp:
        tmp.write_text(json.dumps(run, indent=2) + "\n")


def _text_state_gib(backbone, count: int) -> float:
    null = backbone.null_embedding()
    return count * null.numel() * 4 / 2**30  # cached as float32 (N, L, D)


def main(argv: list[str] | None = None) -> int:
    """Parse the arguments, distil (resuming), export the merged student; returns the exit code."""
    args = parse_args(argv)
    from accelerate import PartialState

    from ..backbones import load_backbone

    cuda = torch.cuda.is_available()
    process = PartialState(cpu=not cuda)
    out_dir = Path(args.output_dir)
    with process.main_process_first():  # the main process writes the JourneyDB cache, the others read it
        prompts = load_prompts(args.prompts, cache_dir=out_dir)
    prompts = prompts[: args.max_prompts]
    # float32 weights: the trainable adapters must be fp32 under fp16/bf16 autocast, and they live in copies.
    backbone = load_backbone(args.backbone, device=process.device, dtype=torch.float32)
    if args.one_step_alpha_bar is not None:  # the exported student's scheduler then samples with it too
        backbone.one_step_alpha_bar = args.one_step_alpha_bar
    config = resolve_config(args, backbone, process.num_processes, cuda)
    run = {
        "argv": sys.argv[1:] if argv is None else list(argv),
        "backbone": args.backbone,
        "pipeline_class": backbone.pipeline_class,
        "teacher_digest": module_digest(backbone.denoiser),
        "prompts": str(Path(args.prompts).resolve()),
        "max_prompts": args.max_prompts,
        "num_prompts": len(prompts),
        "prompts_digest": prompts_digest(prompts),
        "num_processes": process.num_processes,
        "batch_size_per_process": args.batch_size_per_process,
        "vsd_config": config.to_dict(),
    }
    _check_resumable(out_dir, run)
    if process.is_main_process:
        _write_args(out_dir, {**run, "status": "training"})
    if args.optimizer:
        optimizer_note = ""
    elif config.optimizer == "adamw_8bit":
        optimizer_note = " (bitsandbytes and CUDA found)"
    else:
        optimizer_note = " (adamw_8bit, the official choice, needs CUDA and bitsandbytes)"
    process.print(
        f"WaDi distillation of {args.backbone} ({backbone.pipeline_class or 'pixel-space U-Net'}) on "
        f"{len(prompts)} prompts from {args.prompts}\n"
        f"  {process.num_processes} process(es) × {args.batch_size_per_process} = global batch "
        f"{config.batch_size}; {config.steps} steps; student LoRaD r={config.student_rank} lr={config.student_lr}, "
        f"fake LoRaD r={config.fake_rank} lr={config.fake_lr}; guidance {config.guidance_scale}\n"
        f"  mixed precision {config.mixed_precision}; optimizer {config.optimizer}{optimizer_note}; gradient "
        f"checkpointing {'on' if config.gradient_checkpointing else 'off'}\n"
        f"  text states of the prompts: about {_text_state_gib(backbone, len(prompts)):.2f} GiB in memory per "
        "process"
    )
    try:
        result = distill(backbone, prompts, config, out_dir, progress=process.is_main_process)
    except KeyboardInterrupt:
        checkpoint = latest_checkpoint(out_dir)
        if process.is_main_process:
            _write_args(out_dir, {**run, "status": "interrupted"})
        kept = (f"the last checkpoint {checkpoint} is kept" if checkpoint else
                f"no checkpoint was written yet (one every {config.checkpoint_every} steps)")
        process.print(f"\nInterrupted: {kept}. "
                      f"{'Rerun the same command to resume from it' if checkpoint else 'Rerun to start again'}.")
        return INTERRUPTED_EXIT_CODE
    student_dir = out_dir / STUDENT_FOLDER
    if process.is_main_process:
        export_student(result.ema_student or result.student, backbone, student_dir)
        _write_args(out_dir, {**run, "status": "finished", "steps_done": result.steps_done,
                              "student": STUDENT_FOLDER, "student_is_ema": result.ema_student is not None})
    process.wait_for_everyone()
    cached = out_dir / PROMPT_CACHE_NAME
    process.print(
        f"Done: {result.steps_done}/{config.steps} generator steps"
        f"{f' (resumed from step {result.resumed_from})' if result.resumed_from is not None else ''}.\n"
        f"  merged student ({'a stock diffusers pipeline, one step' if backbone.vae else 'the U-Net alone'}): "
        f"{student_dir}\n"
        f"  training log: {out_dir / LOG_NAME}\n"
        f"  checkpoint (resume by rerunning with a larger --steps): {latest_checkpoint(out_dir)}\n"
        f"  resolved settings: {out_dir / ARGS_NAME}"
        + (f"\n  prompts in the official order: {cached}" if cached.is_file() else "")
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
