"""Random shift: DrQ's pad-and-crop exactly, one offset per sample and camera, training batches only."""

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from drifting_vla.formats.validation import check_random_shift, training_config
from drifting_vla.training.augmentation import random_shift, shift_offsets


def pad_and_crop(frame: torch.Tensor, offset: torch.Tensor, pad: int) -> torch.Tensor:
    """The textbook form: replicate-pad [3, H, W] by `pad`, crop H x W at (row, column) `offset`."""
    h, w = frame.shape[-2:]
    padded = F.pad(frame[None].float(), (pad, pad, pad, pad), mode="replicate")[0]
    return padded[:, offset[0] : offset[0] + h, offset[1] : offset[1] + w].to(frame.dtype)


def test_random_shift_is_replicate_padding_then_cropping_at_the_offset():
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (3, 2, 3, 9, 7), dtype=torch.uint8, generator=generator)
    offsets = shift_offsets(3, 2, 2, generator)
    shifted = random_shift(images, offsets, 2)
    assert shifted.dtype == torch.uint8 and shifted.shape == images.shape
    for b in range(3):
        for v in range(2):
            torch.testing.assert_close(shifted[b, v], pad_and_crop(images[b, v], offsets[b, v], 2), rtol=0, atol=0)


def test_every_history_step_of_a_sample_moves_with_the_same_offset():
    generator = torch.Generator().manual_seed(1)
    history = torch.randint(0, 256, (2, 3, 2, 3, 8, 8), dtype=torch.uint8, generator=generator)  # [B, n, V, 3, H, W]
    offsets = shift_offsets(2, 2, 3, generator)
    shifted = random_shift(history, offsets, 3)
    for step in range(3):
        torch.testing.assert_close(shifted[:, step], random_shift(history[:, step], offsets, 3), rtol=0, atol=0)


def test_the_centre_offset_leaves_the_image_as_it_was():
    images = torch.randint(0, 256, (2, 1, 3, 6, 6), dtype=torch.uint8)
    torch.testing.assert_close(random_shift(images, torch.full((2, 1, 2), 4), 4), images, rtol=0, atol=0)


def test_offsets_cover_every_shift_and_repeat_for_the_same_generator_state():
    offsets = shift_offsets(512, 2, 2, torch.Generator().manual_seed(3))
    assert set(offsets.unique().tolist()) == {0, 1, 2, 3, 4}
    torch.testing.assert_close(shift_offsets(512, 2, 2, torch.Generator().manual_seed(3)), offsets, rtol=0, atol=0)


def test_shift_is_off_by_default_and_the_pixels_asked_for_otherwise():
    assert training_config(OmegaConf.create({})).augmentation.random_shift == 0
    check_random_shift(0, feature_cache=True)
    check_random_shift(2, feature_cache=False)


def test_shift_with_the_feature_cache_is_an_error_saying_why():
    with pytest.raises(ValueError, match="computed once from the unaugmented images.*random_shift=0"):
        check_random_shift(4, feature_cache=True)
