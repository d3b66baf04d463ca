import copy

import numpy as np
import torch

from fedfreeze.training.engine import train_phase


def test_zero_initialised_adapters_leave_the_function_unchanged(lite0_random):
    model = lite0_random.eval()
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        before = model(x)
    model.add_adapters("layer4", rank=4)
    model.add_adapters("layer3", rank=4)
    model.eval()
    with torch.no_grad():
        after = model(x)
    assert torch.allclose(before, after, atol=1e-6)
    assert model.parts == ["stem", "layer1", "layer2", "layer3", "layer3.adapters", "layer4", "layer4.adapters", "head"]


def test_adapters_sized_per_block_with_the_blocks_stride(lite0_random):
    lite0_random.add_adapters("layer4", rank=4)
    adapters = lite0_random.adapters["layer4"].blocks
    assert len(adapters) == len(lite0_random.groups["layer4"])
    first = adapters[0]
    assert first.down.stride == (2, 2) and first.down.in_channels == 112 and first.up.out_channels == 192
    assert adapters[-1].up.out_channels == 1280  # the head convolution ends layer4


def test_training_adapters_only_changes_adapters_and_head(lite0_random):
    model = lite0_random
    model.add_adapters("layer4", rank=4)
    before = copy.deepcopy(model.state_dict())
    images = torch.randint(0, 256, (16, 3, 64, 64), dtype=torch.uint8)
    labels = torch.tensor([0, 1] * 8)
    from fedfreeze.config import TrainConfig

    cfg = TrainConfig(batch_size=8, augment=False, cutmix_prob=0.0)
    train_phase(
        model,
        images,
        labels,
        frozenset({"head", "layer4.adapters"}),
        cfg,
        epochs=1,
        rng=np.random.default_rng(0),
        device=torch.device("cpu"),
    )
    changed = {k for k, v in model.state_dict().items() if not torch.equal(before[k], v)}
    assert changed, "nothing trained"
    assert {model.part_of_key(k) for k in changed} == {"head", "layer4.adapters"}
    # layer4 is frozen but its adapters train, so it is not part of the no-grad prefix
    assert model.frozen_prefix() == ["stem", "layer1", "layer2", "layer3"]
