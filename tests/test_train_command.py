"""The distillation command ``python -m wadi_core.distill.train`` and its prompt loader: JourneyDB prompts in the
official ``dataset.py`` order, the other prompt forms and their errors, the arguments and ``--config``; a few CPU
steps on the smoke SD1.5 and PixArt-α pipelines write the log, a checkpoint, ``training_args.json`` and a trained
student that stock diffusers runs in one step; rerunning resumes; Ctrl-C keeps the checkpoint."""

import json
import random

import pandas as pd
import pytest
import torch
from diffusers import DiffusionPipeline, PixArtAlphaPipeline, StableDiffusionPipeline

from wadi_core.backbones import load_backbone
from wadi_core.distill import prompts as prompt_files
from wadi_core.distill import train
from wadi_core.distill.prompts import PROMPT_CACHE_NAME, load_prompts

CAPTIONS = ["a red circle above a blue square", "two green triangles", "a yellow star on the left",
            "a red circle above a blue square", "a purple square", "two green triangles", "an orange circle",
            "a blue star right of a red circle", "a small white square"]
TINY_RUN = ["--batch-size-per-process", "2", "--student-rank", "2", "--fake-rank", "1", "--student-lr", "1e-2",
            "--checkpoint-every", "1"]


@pytest.fixture(scope="module", autouse=True)
def cache(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("WADI_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))
        yield


def write_lines(path, rows):
    path.write_text("".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows))
    return path


def journeydb_rows(captions):
    """Rows in JourneyDB's train_anno.jsonl layout: the Midjourney prompt beside the caption under Task2."""
    return [{"img_path": f"./{i:03d}/{i}.jpg", "prompt": f"midjourney prompt {i} --v 5", "Task1": {"Style": []},
             "Task2": {"Caption": caption}} for i, caption in enumerate(captions)]


@pytest.fixture
def journeydb(tmp_path):
    rows = journeydb_rows(CAPTIONS)
    rows[2]["Task2"] = {"Caption:": rows[2]["Task2"]["Caption"]}  # a key spelling dataset.py accepts
    rows.insert(4, {"img_path": "./x.jpg", "prompt": "no caption here", "Task2": {"Caption": ""}})
    return write_lines(tmp_path / "train_anno.jsonl", rows)


def official_order(captions):
    """dataset.py's TextPromptDataset, verbatim: set(filter(None, ...)), sort, random.seed(2023), shuffle."""
    state = random.getstate()
    try:
        prompts = list(set(filter(None, captions)))
        prompts.sort()
        random.seed(2023)
        random.shuffle(prompts)
    finally:
        random.setstate(state)
    return prompts


# ----------------------------------------------------------------------------------------------------------------
# Prompt loader
# ----------------------------------------------------------------------------------------------------------------


def test_journeydb_prompts_in_the_official_order_and_cached(journeydb, tmp_path, monkeypatch):
    expected = sorted(set(CAPTIONS))
    random.Random(2023).shuffle(expected)
    cache_dir = tmp_path / "out"
    prompts = load_prompts(journeydb, cache_dir=cache_dir)
    assert prompts == expected == official_order(CAPTIONS + [""])
    assert len(prompts) == 7 and not any(p.startswith("midjourney") for p in prompts)
    assert json.loads((cache_dir / PROMPT_CACHE_NAME).read_text()) == prompts
    assert (cache_dir / PROMPT_CACHE_NAME).read_text() == json.dumps(prompts)  # dataset.py's json.dump bytes

    monkeypatch.setattr(prompt_files, "_journeydb_prompts", lambda path: pytest.fail("the cache was not reused"))
    assert load_prompts(journeydb, cache_dir=cache_dir) == prompts
    monkeypatch.undo()
    write_lines(journeydb, journeydb_rows(["only one caption"]))  # the source changed: the cache is rebuilt
    assert load_prompts(journeydb, cache_dir=cache_dir) == ["only one caption"]
    assert json.loads((cache_dir / PROMPT_CACHE_NAME).read_text()) == ["only one caption"]


def test_other_prompt_forms_keep_their_order(tmp_path):
    text = tmp_path / "prompts.txt"
    text.write_bytes(b"a red circle\r\n\r\n  two blue squares \na green star\n")
    assert load_prompts(text) == ["a red circle", "two blue squares", "a green star"]
    rows = write_lines(tmp_path / "rows.jsonl", [{"prompt": "b second"}, "", {"caption": "a first"},
                                                 {"prompt": "b second"}, {"prompt": " "}])
    assert load_prompts(rows, cache_dir=tmp_path / "out") == ["b second", "a first", "b second"]
    assert not (tmp_path / "out").exists()  # only JourneyDB files are processed and cached
    array = tmp_path / "train_prompt.jsonl"
    array.write_text(json.dumps(["z prompt", "a prompt", ""]))  # the official cache itself
    assert load_prompts(array) == ["z prompt", "a prompt"]


def test_prompt_file_errors_name_the_file_and_what_was_expected(tmp_path):
    no_captions = write_lines(tmp_path / "train_anno.jsonl", [{"img_path": "a.jpg", "Task2": {"Caption": ""}},
                                                              {"img_path": "b.jpg", "Task2": {}}])
    with pytest.raises(ValueError, match=r"train_anno\.jsonl holds no usable prompt.*Task2.*Caption"):
        load_prompts(no_captions, cache_dir=tmp_path / "out")
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())  # nothing half-written
    no_prompts = write_lines(tmp_path / "rows.jsonl", [{"text": "a red circle"}])
    with pytest.raises(ValueError, match=r"rows\.jsonl holds no usable prompt.*\"prompt\" or \"caption\""):
        load_prompts(no_prompts)
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    with pytest.raises(ValueError, match=r"empty\.txt is empty; expected a JourneyDB train_anno\.jsonl"):
        load_prompts(empty)
    bad = write_lines(tmp_path / "bad.jsonl", journeydb_rows(["one", "two"]) + ['{"Task2": {"Caption": "x"'])
    with pytest.raises(ValueError, match=r"bad\.jsonl, line 3: not valid JSON"):
        load_prompts(bad, cache_dir=tmp_path / "bad_out")
    assert not (tmp_path / "bad_out" / PROMPT_CACHE_NAME).exists()
    listed = write_lines(tmp_path / "listed.jsonl", [{"prompt": "fine"}, '["a", "list"]'])
    with pytest.raises(ValueError, match=r"listed\.jsonl, line 2: a JSON list, not an object"):
        load_prompts(listed)
    with pytest.raises(FileNotFoundError, match="missing.jsonl does not exist"):
        load_prompts(tmp_path / "missing.jsonl")


# ----------------------------------------------------------------------------------------------------------------
# Arguments
# ----------------------------------------------------------------------------------------------------------------


def test_config_file_keys_are_the_flags_and_flags_override_them(tmp_path, capsys):
    settings = {"backbone": "smoke-sd15", "prompts": "p.txt", "output-dir": "runs/x", "steps": 40,
                "student_lr": 3e-4, "gradient_checkpointing": False, "mixed_precision": "bf16"}
    config = tmp_path / "run.json"
    config.write_text(json.dumps(settings))
    args = train.parse_args(["--config", str(config), "--steps", "7"])
    assert (args.backbone, args.output_dir, args.steps, args.student_lr) == ("smoke-sd15", "runs/x", 7, 3e-4)
    assert (args.gradient_checkpointing, args.mixed_precision, args.batch_size_per_process) == (False, "bf16", 16)
    yaml_config = tmp_path / "run.yaml"
    yaml_config.write_text("backbone: sd15\nprompts: p.txt\noutput_dir: out\nfake_rank: 8\n")
    args = train.parse_args(["--config", str(yaml_config), "--no-gradient-checkpointing"])
    assert (args.backbone, args.fake_rank, args.gradient_checkpointing) == ("sd15", 8, False)

    config.write_text(json.dumps({**settings, "learning_rate": 1e-4}))
    with pytest.raises(SystemExit):
        train.parse_args(["--config", str(config)])
    assert "unknown key 'learning_rate'; the keys are the flags" in capsys.readouterr().err


@pytest.mark.parametrize("extra, message", [
    (["--student-lr", "-1"], "VSDConfig.student_lr: must be > 0"),
    (["--steps", "0"], "argument --steps: must be a positive integer, got 0"),
    (["--one-step-alpha-bar", "2"], "one_step_alpha_bar: must be None or lie in (0, 1)"),
    (["--mixed-precision", "fp8"], "invalid choice: 'fp8'"),
])
def test_bad_arguments_are_clear_errors(extra, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        train.parse_args(["--backbone", "smoke-sd15", "--prompts", "p.txt", "--output-dir", "out", *extra])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_help_explains_every_flag(capsys):
    with pytest.raises(SystemExit) as exit_info:
        train.main(["--help"])
    assert exit_info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    options = [a for a in train.build_parser()._actions if a.option_strings and a.dest != "help"]
    assert all(a.help and a.option_strings[0] in text for a in options)
    assert "(default: 16)" in text and "(default: 22200)" in text and "Task2.Caption" in text


def test_required_arguments(capsys):
    with pytest.raises(SystemExit):
        train.parse_args(["--prompts", "p.txt", "--output-dir", "out"])
    assert "--backbone is required" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------------------------
# The command
# ----------------------------------------------------------------------------------------------------------------


def read_log(out):
    return pd.read_csv(out / "log.csv")


def checkpoints(out):
    return sorted(p.name for p in out.glob("checkpoint-*.safetensors"))


def test_sd15_command_trains_exports_the_student_and_resumes(journeydb, tmp_path, capsys):
    out = tmp_path / "runs" / "wadi-sd15"
    argv = ["--backbone", "smoke-sd15", "--prompts", str(journeydb), "--output-dir", str(out), *TINY_RUN]
    assert train.main([*argv, "--steps", "2"]) == 0
    printed = capsys.readouterr().out
    assert str(out / "student") in printed and "optimizer adamw" in printed
    log = read_log(out)
    assert list(log["step"]) == [1, 2] and log["generator_loss"].notna().all()
    assert checkpoints(out) == ["checkpoint-2.safetensors"]
    assert json.loads((out / PROMPT_CACHE_NAME).read_text()) == load_prompts(journeydb)
    args = json.loads((out / "training_args.json").read_text())
    assert (args["status"], args["steps_done"], args["num_prompts"], args["num_processes"]) == ("finished", 2, 7, 1)
    assert {k: args["vsd_config"][k] for k in ("student_rank", "fake_rank", "batch_size", "steps", "mixed_precision",
                                               "optimizer", "gradient_checkpointing", "student_lr")} == dict(
        student_rank=2, fake_rank=1, batch_size=2, steps=2, mixed_precision="no", optimizer="adamw",
        gradient_checkpointing=True, student_lr=1e-2)

    pipeline = DiffusionPipeline.from_pretrained(out / "student")
    assert type(pipeline) is StableDiffusionPipeline and pipeline.scheduler.__class__.__name__ == "LCMScheduler"
    pipeline.set_progress_bar_config(disable=True)
    images = pipeline(["a red circle"], num_inference_steps=1, guidance_scale=0.0, output_type="pt",
                      generator=torch.Generator().manual_seed(0)).images
    assert images.shape == (1, 3, 32, 32) and torch.isfinite(images).all()
    teacher = load_backbone("smoke-sd15", device="cpu").denoiser.state_dict()
    exported = pipeline.unet.state_dict()
    assert exported.keys() == teacher.keys()
    changed = [name for name in teacher if not torch.equal(teacher[name], exported[name])]
    assert changed and all(name.endswith(".weight") for name in changed)  # LoRaD rotated the adapted Linears

    assert train.main([*argv, "--steps", "3"]) == 0  # the same command with more steps continues the run
    assert "resumed from step 2" in capsys.readouterr().out
    resumed = read_log(out)
    assert list(resumed["step"]) == [1, 2, 3]
    pd.testing.assert_frame_equal(resumed.iloc[:2], log)
    assert checkpoints(out) == ["checkpoint-3.safetensors"]
    assert json.loads((out / "training_args.json").read_text())["steps_done"] == 3


def test_ctrl_c_keeps_the_checkpoint_and_the_rerun_resumes(journeydb, tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    argv = ["--backbone", "smoke-sd15", "--prompts", str(journeydb), "--output-dir", str(out), "--steps", "2",
            "--no-gradient-checkpointing", *TINY_RUN]
    distill = train.distill

    def interrupted_after_one_step(*args, **kwargs):
        distill(*args, **kwargs, max_steps=1)
        raise KeyboardInterrupt

    monkeypatch.setattr(train, "distill", interrupted_after_one_step)
    assert train.main(argv) == train.INTERRUPTED_EXIT_CODE
    printed = capsys.readouterr().out
    assert f"the last checkpoint {out / 'checkpoint-1.safetensors'} is kept" in printed
    assert "Rerun the same command to resume" in printed
    assert not (out / "student").exists()
    assert json.loads((out / "training_args.json").read_text())["status"] == "interrupted"

    monkeypatch.undo()
    assert train.main(argv) == 0
    assert "resumed from step 1" in capsys.readouterr().out
    assert list(read_log(out)["step"]) == [1, 2] and (out / "student" / "model_index.json").is_file()


def test_resuming_with_other_prompts_is_refused(journeydb, tmp_path):
    out = tmp_path / "run"
    argv = ["--backbone", "smoke-sd15", "--output-dir", str(out), "--steps", "1", "--no-gradient-checkpointing",
            *TINY_RUN]
    assert train.main([*argv, "--prompts", str(journeydb)]) == 0
    other = write_lines(tmp_path / "other.jsonl", [{"prompt": "something else entirely"}])
    with pytest.raises(ValueError, match=r"cannot resume from .*checkpoint-1.*another --prompts"):
        train.main([*argv, "--prompts", str(other), "--steps", "2"])
    assert list(read_log(out)["step"]) == [1]


def test_pixart_command_exports_a_one_step_pipeline(tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\na blue square\na green star\n")
    out = tmp_path / "wadi-pixart"
    assert train.main(["--backbone", "smoke-pixart-alpha-256", "--prompts", str(prompts), "--output-dir", str(out),
                       "--steps", "2", *TINY_RUN]) == 0  # step 1's fake score is the teacher: no update yet
    args = json.loads((out / "training_args.json").read_text())
    assert args["vsd_config"]["one_step_alpha_bar"] == 0.0047  # the official PixArt value, from the backbone
    assert args["vsd_config"]["mixed_precision"] == "no"  # bf16 is the default on CUDA only
    assert list(read_log(out)["step"]) == [1, 2]
    pipeline = DiffusionPipeline.from_pretrained(out / "student")
    assert type(pipeline) is PixArtAlphaPipeline
    pipeline.set_progress_bar_config(disable=True)
    images = pipeline(["a red circle"], num_inference_steps=1, guidance_scale=0.0, output_type="pt",
                      use_resolution_binning=False, clean_caption=False,
                      generator=torch.Generator().manual_seed(0)).images
    assert images.shape == (1, 3, 32, 32) and torch.isfinite(images).all()
    teacher = load_backbone("smoke-pixart-alpha-256", device="cpu").denoiser.state_dict()
    assert any(not torch.equal(teacher[name], value) for name, value in pipeline.transformer.state_dict().items())
