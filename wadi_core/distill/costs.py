"""What a VSD step and a one-step student cost (issue "VSD trainer", Benchmark; WADI_PAPER.md §3.5, §4.2).

Measured, never asserted: a training step of the WaDi loop with our :class:`~wadi_core.adapters.LoRaDLinear`
student against the same step with the official forward-hook LoRaD (which runs every Linear twice and keeps W',
cos, sin for backward), and the inference cost of a one-step student against the multi-step teacher. Timings
are medians of ``time.perf_counter`` over repeats; memory is the bytes autograd keeps for backward in the
student's forward (``saved_tensors_hooks``, each storage once, parameters excluded), the part of a step's peak
that grows with the adapter's implementation.
"""

from __future__ import annotations

import copy
import statistics
import time

import torch
from torch import nn

from ..adapters import inject, select_layers
from ..adapters.official_hook import OfficialHookLoRaD
from ..bench import count_saved_bytes
from .config import VSDConfig
from .losses import fake_score_loss, generator_loss, one_step_x0

def official_hook_student(teacher: nn.Module, rank: int) -> nn.Module:
    """A teacher copy whose student-rule Linears carry the official ``theta_a``/``theta_b`` + forward hook
    (:class:`~wadi_core.adapters.official_hook.OfficialHookLoRaD`); every other parameter frozen."""
    student = copy.deepcopy(teacher).requires_grad_(False)
    for name in select_layers(student, "student"):
        parent_name, _, child = name.rpartition(".")
        parent = student.get_submodule(parent_name) if parent_name else student
        setattr(parent, child, OfficialHookLoRaD(getattr(parent, child), rank))
    return student


def _saved_bytes_of(fn, excluded: list[torch.Tensor]) -> int:
    """Bytes autograd keeps for backward while ``fn()`` runs (``excluded`` storages not counted)."""
    with count_saved_bytes(excluded) as saved:
        out = fn()
    out.sum().backward()
    return sum(saved.values())


def vsd_step_cost(
    teacher: nn.Module,
    scheduler,
    prompt_embeds: torch.Tensor,
    null_embed: torch.Tensor,
    config: VSDConfig,
    official_hook: bool = False,
    repeats: int = 5,
    warmup: int = 2,
    seed: int = 0,
) -> dict[str, float]:
    """Median wall time of one WaDi generator step (student one-step forward, real/fake CFG scores, student
    backward + AdamW, ``fake_updates_per_step`` fake-score updates) and of the student's forward+backward alone,
    plus the student forward's saved-for-backward MiB. The student is ``config.student_method`` at
    ``config.student_rank`` (any adapter, or ``"full"``); ``official_hook=True`` builds a LoRaD student the
    official way instead. ``warmup`` untimed steps come first (allocator and kernel caches)."""
    if official_hook and config.student_method != "lorad":
        raise ValueError(f"official_hook=True needs student_method 'lorad', got {config.student_method!r}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if official_hook:
            student = official_hook_student(teacher, config.student_rank)
        else:
            student = copy.deepcopy(teacher)
            inject(student, config.student_method, config.student_rank, "student")
        fake = copy.deepcopy(teacher)
        inject(fake, config.fake_method, config.fake_rank, "fake")
    real = teacher.requires_grad_(False).eval()
    student_params = [p for p in student.parameters() if p.requires_grad]
    opt_student = torch.optim.AdamW(student_params, lr=config.student_lr)
    opt_fake = torch.optim.AdamW([p for p in fake.parameters() if p.requires_grad], lr=config.fake_lr)
    generator = torch.Generator().manual_seed(seed)
    channels, size = teacher.config.in_channels, teacher.config.sample_size
    null = null_embed.reshape(1, *prompt_embeds.shape[1:])

    def batch():
        index = torch.randint(0, len(prompt_embeds), (config.batch_size,), generator=generator)
        return prompt_embeds[index], torch.randn(config.batch_size, channels, size, size, generator=generator)

    step_s, student_s = [], []
    for repeat in range(warmup + repeats):
        cond, z = batch()
        began = time.perf_counter()
        x0 = one_step_x0(student, z, cond, scheduler)
        loss, _ = generator_loss(x0, real, fake, cond, null, scheduler, config.guidance_scale, generator,
                                 t_range=config.t_range)
        loss.backward()
        opt_student.step()
        opt_student.zero_grad(set_to_none=True)
        for _ in range(config.fake_updates_per_step):
            fake_score_loss(fake, x0.detach(), cond, null, scheduler, generator).backward()
            opt_fake.step()
            opt_fake.zero_grad(set_to_none=True)
        elapsed = time.perf_counter() - began
        # The student's own forward+backward (what the adapter implementation changes).
        began = time.perf_counter()
        one_step_x0(student, z, cond, scheduler).sum().backward()
        student_elapsed = time.perf_counter() - began
        opt_student.zero_grad(set_to_none=True)
        if repeat >= warmup:
            step_s.append(elapsed)
            student_s.append(student_elapsed)
    cond, z = batch()
    saved = _saved_bytes_of(lambda: one_step_x0(student, z, cond, scheduler),
                            [*student.parameters(), *student.buffers(), z, cond])
    opt_student.zero_grad(set_to_none=True)
    return {"step_s": statistics.median(step_s), "student_fwd_bwd_s": statistics.median(student_s),
            "student_saved_MiB": saved / 2**20}


@torch.no_grad()
def unet_call_seconds(unet: nn.Module, prompt_embeds: torch.Tensor, batch_size: int, repeats: int = 10,
                      seed: int = 0) -> float:
    """Median wall time of one U-Net call on ``batch_size`` noisy inputs (t = T−1, no CFG)."""
    generator = torch.Generator().manual_seed(seed)
    channels, size = unet.config.in_channels, unet.config.sample_size
    z = torch.randn(batch_size, channels, size, size, generator=generator)
    cond = prompt_embeds[:batch_size]
    t = torch.full((batch_size,), 999, dtype=torch.long)
    times = []
    for repeat in range(repeats + 1):
        began = time.perf_counter()
        unet(z, t, encoder_hidden_states=cond)
        if repeat:
            times.append(time.perf_counter() - began)
    return statistics.median(times)
