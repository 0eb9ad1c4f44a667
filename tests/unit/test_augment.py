"""Training-time image augmentation (optim.augment): flips and edge-repeating shifts, seeded."""

import torch

from raypipe.pipeline.train import augment_images


def _coordinate_images(batch: int, size: int) -> torch.Tensor:
    """uint8 [B, S, S, 3] whose pixel (y, x) holds (y, x, image index): every move is readable."""
    y, x = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    image = torch.stack([y, x, torch.zeros_like(y)], dim=-1)
    images = image.expand(batch, size, size, 3).clone()
    images[..., 2] = torch.arange(batch)[:, None, None]
    return images.to(torch.uint8)


def test_each_image_is_flipped_and_or_shifted_within_bounds_and_stays_itself():
    images = _coordinate_images(64, 32)
    out = augment_images(images, torch.Generator().manual_seed(0))
    assert out.shape == images.shape and out.dtype == torch.uint8
    assert torch.equal(out[..., 2], images[..., 2])  # no pixel moves between images
    flips = 0
    for b in range(len(out)):
        rows, cols = out[b, :, :, 0].long(), out[b, :, :, 1].long()
        assert torch.all(rows == rows[:, :1])  # whole rows move together
        assert torch.all(cols == cols[:1, :])
        dy = rows[16, 0] - 16
        assert abs(dy) <= 2  # S / 16
        flipped = bool(cols[0, 0] > cols[0, -1])
        flips += flipped
        unflipped = 31 - cols[0] if flipped else cols[0]
        dx = unflipped[16] - 16
        assert abs(dx) <= 2
        assert torch.equal(unflipped, (torch.arange(32) + dx).clamp(0, 31))
        assert torch.equal(rows[:, 0], (torch.arange(32) + dy).clamp(0, 31))  # edges repeat, no wrap-around
    assert 16 < flips < 48  # about half


def test_a_seed_gives_the_same_augmentation_and_epochs_differ():
    images = _coordinate_images(8, 16)
    generator = torch.Generator().manual_seed(3)
    first, second = augment_images(images, generator), augment_images(images, generator)
    assert torch.equal(first, augment_images(images, torch.Generator().manual_seed(3)))
    assert not torch.equal(first, second)


def test_a_white_background_stays_white():
    images = torch.full((4, 64, 64, 3), 255, dtype=torch.uint8)
    images[:, 20:40, 20:40] = 0
    out = augment_images(images, torch.Generator().manual_seed(1))
    assert int((out == 0).sum()) == int((images == 0).sum())  # the object moved whole, nothing new came in
