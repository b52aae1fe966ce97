"""The downstream tasks (wadi_core.tasks, notebook 05): ControlNet trained on the teacher and used with a one-step
student (also through the stock ControlNet pipeline), and re-dilated high-resolution synthesis. Runs on the
random-weight SD1.5-structured pipeline (4 levels, as SD1.5) and the smoke profile, in temporary directories."""

import dataclasses

import numpy as np
import pytest
import torch

from wadi_core.distill import export_student
from wadi_core.tasks import (
    ControlledDenoiser,
    cached_controlnet_samples,
    control_images,
    controlnet_one_step,
    controlnet_pipeline,
    controlnet_sample,
    load_or_train_controlnet,
    mask_iou,
    object_components,
    object_mask,
    train_controlnet,
)
from wadi_core.tasks.controlnet import new_controlnet
from wadi_core.tasks.highres import (
    count_objects,
    image_size,
    named_objects,
    one_step_at_size,
    read_dilation_settings,
    redilated,
    redilation_settings,
    repetition_rate,
)
from wadi_core.world import make_split

PROMPTS = ["a red circle", "a blue square left of a green triangle", "a big yellow star at the top", "a red square"]


@pytest.fixture(scope="module")
def world(sd15_smoke_student):
    """(profile, the SD1.5-structured smoke backbone, 16 held-out scenes with condition maps, a LoRaD student)."""
    profile, backbone, student = sd15_smoke_student
    split = make_split("coco14-like", profile.world, with_maps=True, count=16)
    return profile, backbone, split, student


def _trained_controlnet(backbone, config):
    """A ControlNet whose zero convolutions are no longer zero (so that its residuals and the control matter)."""
    net = new_controlnet(backbone.denoiser, config)
    with torch.no_grad():
        for block in [*net.controlnet_down_blocks, net.controlnet_mid_block, net.controlnet_cond_embedding.conv_out]:
            block.weight.normal_(std=0.1, generator=torch.Generator().manual_seed(0))
    return net.eval()


def test_control_images_are_rgb_maps(world):
    _, _, split, _ = world
    mask, edge = control_images(split, "mask"), control_images(split, "edge")
    assert mask.shape == (16, 3, 32, 32) and set(mask.unique().tolist()) <= {0.0, 1.0}
    assert torch.equal(mask[:, 0], mask[:, 2]) and (edge <= mask).all() and edge.sum() < mask.sum()
    with pytest.raises(ValueError, match="unknown condition 'depth'"):
        control_images(split, "depth")
    with pytest.raises(ValueError, match="with_maps=True"):
        control_images(make_split("coco14-like", world[0].world, count=4), "mask")


def test_bad_control_images_are_named(world):
    _, backbone, split, student = world
    control = control_images(split, "mask")[:4]
    net = new_controlnet(backbone.denoiser, world[0].controlnet)
    with pytest.raises(ValueError, match=r"\(4, 3, 32, 32\).*got \(4, 1, 32, 32\)"):
        controlnet_one_step(student, backbone, net, PROMPTS, control[:, :1])
    with pytest.raises(ValueError, match=r"got \(4, 3, 64, 64\)"):
        controlnet_one_step(student, backbone, net, PROMPTS, torch.zeros(4, 3, 64, 64))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        controlnet_sample(backbone, net, PROMPTS, control * 255, 2, 3.0)


def test_fresh_controlnet_leaves_the_unet_unchanged_and_a_trained_one_does_not(world):
    profile, backbone, split, _ = world
    unet = backbone.denoiser
    x, cond = backbone.noise(4, 0), backbone.encode_prompts(PROMPTS)
    control = control_images(split, "mask")[:4]
    controlled = ControlledDenoiser(unet, _trained_controlnet(backbone, profile.controlnet), control)
    with torch.no_grad():
        plain = unet(x, 500, encoder_hidden_states=cond).sample
        fresh = ControlledDenoiser(unet, new_controlnet(unet, profile.controlnet), control)(x, 500, cond).sample
        trained = controlled(x, 500, cond).sample
        doubled = controlled(torch.cat([x, x]), 500, torch.cat([cond, cond])).sample
    torch.testing.assert_close(fresh, plain)  # zero convolutions: ControlNet starts as the identity
    assert (trained - plain).abs().max() > 1e-3
    # a CFG batch (null half + conditional half) sees the control images repeated
    torch.testing.assert_close(doubled[4:], trained, atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="not a multiple of the 4 control images"):
        controlled(x[:3], 500, cond[:3])


def test_train_controlnet_learns_on_the_frozen_teacher(world):
    profile, backbone, split, _ = world
    before = {k: v.clone() for k, v in backbone.denoiser.state_dict().items()}
    config = dataclasses.replace(profile.controlnet, steps=3, batch_size=4)
    net, log = train_controlnet(backbone, split, "edge", config, progress=False)
    assert log["step"] == [0.0, 1.0, 2.0] and all(np.isfinite(log["loss"]))
    assert not any(p.requires_grad for p in net.parameters())
    assert any(p.abs().sum() > 0 for p in net.controlnet_down_blocks.parameters())  # zero convs moved
    for k, v in backbone.denoiser.state_dict().items():
        assert torch.equal(v, before[k]), f"the teacher's {k} changed"


def test_load_or_train_controlnet_round_trip(world):
    profile, backbone, _, _ = world
    first = load_or_train_controlnet(profile, backbone, "mask", progress=False)
    again = load_or_train_controlnet(profile, backbone, "mask", progress=False)
    assert first.trained and not again.trained and first.path == again.path
    for (name, a), (_, b) in zip(first.model.state_dict().items(), again.model.state_dict().items()):
        assert torch.equal(a, b), name
    with pytest.raises(ValueError, match="unknown condition"):
        load_or_train_controlnet(profile, backbone, "depth")


def test_one_step_under_controlnet_equals_the_stock_pipeline(world, tmp_path):
    profile, backbone, split, student = world
    net = _trained_controlnet(backbone, profile.controlnet)
    control = control_images(split, "edge")[:4]
    z = backbone.noise(4, seed=3)
    ours = controlnet_one_step(student, backbone, net, PROMPTS, control, latents=z)
    pipe = controlnet_pipeline(export_student(student, backbone, tmp_path / "student"), net)
    pipe.set_progress_bar_config(disable=True)
    stock = pipe(PROMPTS, image=control, num_inference_steps=1, guidance_scale=0.0, latents=z,
                 output_type="pt").images
    torch.testing.assert_close(stock, ours, atol=2e-4, rtol=1e-3)
    assert not torch.allclose(ours, controlnet_one_step(student, backbone, net, PROMPTS, control * 0, latents=z))


def test_controlnet_sample_is_deterministic(world):
    profile, backbone, split, _ = world
    net = _trained_controlnet(backbone, profile.controlnet)
    control = control_images(split, "mask")[:4]
    a = controlnet_sample(backbone, net, PROMPTS, control, 2, 3.0, seed=1, batch_size=2)
    b = controlnet_sample(backbone, net, PROMPTS, control, 2, 3.0, seed=1, batch_size=4)
    assert a.shape == (4, 3, 32, 32) and 0 <= a.min() and a.max() <= 1
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_cached_controlnet_samples_are_the_sampled_pixels(world):
    profile, backbone, split, _ = world
    net = _trained_controlnet(backbone, profile.controlnet)
    control = control_images(split, "mask")[:4]
    first = cached_controlnet_samples(backbone, net, PROMPTS, control, 2, 3.0, seed=5)
    again = cached_controlnet_samples(backbone, net, PROMPTS, control, 2, 3.0, seed=5)
    assert first.sampled and not again.sampled and first.path == again.path
    torch.testing.assert_close(again.images, first.images)
    direct = controlnet_sample(backbone, net, PROMPTS, control, 2, 3.0, seed=5)
    assert (first.images - direct).abs().max() <= 0.5 / 255 + 1e-6  # stored as the PNG values FID reads
    other = cached_controlnet_samples(backbone, net, PROMPTS, torch.flip(control, [0]), 2, 3.0, seed=5)
    assert other.sampled and other.path != first.path  # other control images: another cache entry


def test_object_mask_recovers_rendered_masks(smoke_profile):
    split = make_split("coco14-like", smoke_profile.world, with_maps=True, count=64)
    iou = mask_iou(object_mask(split.images_float() / 2 + 0.5), split.masks[:, 0].bool())
    assert iou.mean() > 0.85 and iou.min() > 0.5


def test_object_components_join_diagonal_neighbours():
    images = torch.zeros(2, 3, 8, 8)
    images[0, 0, 1, 1] = images[0, 0, 2, 2] = 1.0  # diagonal neighbours: one 8-connected object
    images[0, 2, 5:7, 5:8] = 0.9  # a second object of 6 pixels
    images[0, 1, 0, 7] = 0.2  # below the threshold: background
    (labels, sizes), (empty_labels, empty_sizes) = object_components(images)
    assert sorted(sizes.tolist()) == [2, 6] and labels[1, 1] == labels[2, 2] != 0 and labels[0, 7] == 0
    assert not empty_labels.any() and len(empty_sizes) == 0


def test_mask_iou():
    a = torch.zeros(3, 4, 4, dtype=torch.bool)
    b = a.clone()
    a[0, :2], b[0, :1] = True, True  # 4 of 8
    a[1, 0, 0] = True  # disjoint from an empty mask
    torch.testing.assert_close(mask_iou(a, b), torch.tensor([0.5, 0.0, 1.0]))
    with pytest.raises(ValueError, match="shapes differ"):
        mask_iou(a, b[:, :2])


# --------------------------------------------------------------------------------------------------------------
# High resolution
# --------------------------------------------------------------------------------------------------------------


def test_lowest_level_settings_match_scalecrafter_sd15_1024(world):
    unet = world[1].denoiser  # SD1.5's block structure, one resnet per down block
    settings = redilation_settings(unet, (("lowest", 2),))
    expected = {"down_blocks.3.resnets.0.conv1", "down_blocks.3.resnets.0.conv2", "mid_block.resnets.0.conv1",
                "mid_block.resnets.0.conv2", "mid_block.resnets.1.conv1", "mid_block.resnets.1.conv2",
                "up_blocks.0.upsamplers.0.conv"} | {f"up_blocks.0.resnets.{i}.conv{j}" for i in (0, 1) for j in (1, 2)}
    assert set(settings) == expected and set(settings.values()) == {2}
    assert redilation_settings(unet, (("down_blocks.3", 2), ("mid_block", 2), ("up_blocks.0", 2))) == settings


@pytest.mark.parametrize("blocks, message", [
    ((("down_blocks.9", 2),), "no block 'down_blocks.9'"),
    ((("mid_block", 0),), "integer ≥ 1, got 0"),
    ((("mid_block", 1.5),), "integer ≥ 1, got 1.5"),
])
def test_bad_redilation_settings_are_named(world, blocks, message):
    with pytest.raises(ValueError, match=message):
        redilation_settings(world[1].denoiser, blocks)


def test_redilated_dilates_then_restores(world):
    unet = world[1].denoiser
    settings = redilation_settings(unet, (("lowest", 2),))
    conv = dict(unet.named_modules())["mid_block.resnets.0.conv1"]
    x, cond = torch.randn(1, 4, 32, 32), world[1].encode_prompts(PROMPTS[:1])
    with torch.no_grad():
        plain = unet(x, 999, encoder_hidden_states=cond).sample
        with redilated(unet, settings):
            assert conv.dilation == (2, 2) and conv.padding == (2, 2)
            dilated = unet(x, 999, encoder_hidden_states=cond).sample
        with redilated(unet, {name: 1 for name in settings}):
            same = unet(x, 999, encoder_hidden_states=cond).sample
    assert conv.dilation == (1, 1) and conv.padding == (1, 1)
    assert dilated.shape == plain.shape and (dilated - plain).abs().max() > 1e-4
    torch.testing.assert_close(same, plain)
    with pytest.raises(RuntimeError), redilated(unet, settings):
        raise RuntimeError("interrupted")
    assert conv.dilation == (1, 1)
    with pytest.raises(ValueError, match="not a stride-1 3×3 Conv2d"):
        with redilated(unet, {"conv_in.weight": 2}):
            pass


def test_read_dilation_settings(tmp_path):
    path = tmp_path / "sd1.5_1024x1024.txt"
    path.write_text("down_blocks.3.resnets.0.conv1:2\nmid_block.resnets.0.conv2:2\n\n")
    assert read_dilation_settings(path) == {"down_blocks.3.resnets.0.conv1": 2, "mid_block.resnets.0.conv2": 2}
    path.write_text("mid_block.resnets.0.conv2=2\n")
    with pytest.raises(ValueError, match=r":1: expected"):
        read_dilation_settings(path)


def test_one_step_at_size_shapes_and_errors(world):
    _, backbone, _, student = world
    settings = redilation_settings(student, (("lowest", 2),))
    assert image_size(backbone, (2, 3.5)) == (64, 112)
    square = one_step_at_size(student, backbone, PROMPTS, 64, 64, seed=0, settings=settings)
    wide = one_step_at_size(student, backbone, PROMPTS[:2], 64, 112, seed=0)
    assert square.shape == (4, 3, 64, 64) and wide.shape == (2, 3, 64, 112)
    assert not torch.allclose(square, one_step_at_size(student, backbone, PROMPTS, 64, 64, seed=0))
    with pytest.raises(ValueError, match="must be a multiple of 16"):
        one_step_at_size(student, backbone, PROMPTS, 64, 72)
    with pytest.raises(ValueError, match="≥ 1"):
        image_size(backbone, (0.5, 1))


def test_count_objects_never_overcounts_real_scenes(smoke_profile):
    split = make_split("coco14-like", smoke_profile.world, count=128)
    images = split.images_float() / 2 + 0.5
    counts = count_objects(images)
    assert (counts <= named_objects(split.captions)).all() and (counts >= 1).mean() > 0.95
    assert repetition_rate(images, split.captions) == 0.0
    blobs = torch.zeros(1, 3, 32, 32)
    for x in (2, 12, 22):
        blobs[0, 0, 5:9, x : x + 4] = 1.0
    blobs[0, 1, 30, 30] = 1.0  # one pixel: below min_pixels
    assert count_objects(blobs).tolist() == [3]
    assert repetition_rate(blobs, ["a red square"]) == 1.0


def test_seconds_per_image_is_the_median_over_repeats(monkeypatch):
    from wadi_core.tasks import controlnet

    clock = iter([0.0, 1.0, 1.0, 4.0, 4.0, 4.5])  # calls of 1 s, 3 s and 0.5 s, each of a batch of 2
    monkeypatch.setattr(controlnet.time, "perf_counter", lambda: next(clock))
    calls = []

    def generate():
        calls.append(1)
        return torch.zeros(2, 3, 4, 4)

    assert controlnet.seconds_per_image(generate, repeats=3) == 0.5
    assert len(calls) == 3
    with pytest.raises(ValueError, match="repeats"):
        controlnet.seconds_per_image(generate, repeats=0)
