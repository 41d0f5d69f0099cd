"""Batched on-device augmentation: shapes, labels, exactness, and independence of sharding."""

import torch
import torch.nn.functional as F

from resnet.train.augment import apply_cutout, augment, plan_epoch


def _images(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8,
                         generator=torch.Generator().manual_seed(seed))


def test_crop_equals_pad_and_crop_with_flip():
    x, ids = _images(16), torch.arange(16)
    plan = plan_epoch(16, seed=1, epoch=0, mode="crop")
    out = augment(x, ids, plan, "crop")
    padded = F.pad(x.float() / 255, (4, 4, 4, 4))  # zero padding of 4, as RandomCrop(32, 4)
    for i in range(16):
        dx, dy = (int(v) for v in plan.shift[i])
        cols = torch.arange(32).flip(0) if plan.flip[i] else torch.arange(32)
        expected = padded[i, :, 4 + dy:36 + dy, :][:, :, cols + 4 + dx]
        assert torch.equal(out[i], expected)
    assert plan.shift.abs().max() <= 4 and plan.flip.any() and not plan.flip.all()


def test_labels_follow_their_images():
    # Each image is one flat colour chosen by its label; shifts fill with zeros at the border
    # only, so the dominant colour after augmentation still names the label.
    labels = torch.arange(40) % 10
    colours = torch.linspace(20, 250, 10).round().to(torch.uint8)
    x = colours[labels].view(-1, 1, 1, 1).expand(-1, 3, 32, 32).contiguous()
    ids = torch.randperm(40)
    for mode, cutout in (("crop", 8), ("keras", 0)):
        plan = plan_epoch(40, seed=0, epoch=3, mode=mode)
        out = augment(x[ids], ids, plan, mode, cutout)
        assert out.shape == (40, 3, 32, 32) and out.dtype == torch.float32
        assert 0 <= out.min() and out.max() <= 1
        dominant = (out * 255).round().flatten(1).mode(dim=1).values
        assert torch.equal(dominant, colours[labels[ids]].float())


def test_result_does_not_depend_on_how_the_batch_is_sharded():
    x = _images(64, seed=2)
    plan = plan_epoch(64, seed=7, epoch=5, mode="crop")
    ids = plan.order[:32]
    whole = augment(x[ids], ids, plan, "crop", cutout=8)
    halves = torch.cat([augment(x[ids[:16]], ids[:16], plan, "crop", cutout=8),
                        augment(x[ids[16:]], ids[16:], plan, "crop", cutout=8)])
    assert torch.equal(whole, halves)


def test_plans_are_drawn_from_seed_and_epoch():
    a, b = plan_epoch(100, 0, 1, "keras"), plan_epoch(100, 0, 1, "keras")
    assert torch.equal(a.order, b.order) and torch.equal(a.shift, b.shift)
    c = plan_epoch(100, 0, 2, "keras")
    assert not torch.equal(a.order, c.order)
    assert sorted(a.order.tolist()) == list(range(100))
    assert a.shift.abs().max() <= 3.2 and a.shift.abs().max() > 2  # Keras 0.1 * 32 pixels


def test_keras_shift_fills_with_the_nearest_edge():
    x = torch.zeros(1, 3, 32, 32, dtype=torch.uint8)
    x[..., :, -1] = 255  # right-most column white
    plan = plan_epoch(1, 0, 0, "keras")
    plan.shift[:] = torch.tensor([3.0, 0.0])  # sample 3 pixels to the right
    plan.flip[:] = False
    out = augment(x, torch.tensor([0]), plan, "keras")
    assert torch.all(out[0, :, :, -4:] == 1.0)  # the edge column is replicated, not zero


def test_keras_shifts_move_the_mean_subtracted_image_as_keras_does():
    # The Keras example subtracts the mean image, then its generator shifts: the model sees
    # shifted(x) - shifted(mean). A PixelMean model subtracts the unshifted mean, so the loop
    # hands augment() the mean as the centre to shift with the image.
    x, mean = _images(4, seed=1), _images(1, seed=2)
    plan = plan_epoch(4, 0, 0, "keras")
    ids = torch.arange(4)
    centre = mean.float() / 255
    seen = augment(x, ids, plan, "keras", centre=centre) - centre  # what the model computes on
    shifted_mean = augment(mean.expand(4, -1, -1, -1), ids, plan, "keras")
    assert torch.allclose(seen, augment(x, ids, plan, "keras") - shifted_mean, atol=1e-5)
    assert not torch.allclose(seen, augment(x, ids, plan, "keras") - centre, atol=1e-2)


def test_cutout_zeroes_a_clipped_square():
    x = torch.ones(2, 3, 32, 32)
    out = apply_cutout(x, torch.tensor([[16, 16], [0, 0]]), 8)
    assert (out[0, 0] == 0).sum() == 64
    assert (out[1, 0] == 0).sum() == 16  # a corner centre keeps a quarter of the square
