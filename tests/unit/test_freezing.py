import copy

import torch

from fedfreeze.training.engine import train_phase
from fedfreeze.training.freezing import apply_parts


def bn_stats(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in module.state_dict().items() if "running_" in k}


def test_apply_parts_sets_requires_grad_by_structure(lite0_random):
    apply_parts(lite0_random, {"head", "layer4"})
    for part, _, param in lite0_random.named_part_parameters():
        assert param.requires_grad == (part in {"head", "layer4"}), part
    assert lite0_random.frozen == {"stem", "layer1", "layer2", "layer3"}
    assert lite0_random.frozen_prefix() == ["stem", "layer1", "layer2", "layer3"]


def test_train_mode_keeps_frozen_groups_in_eval(lite0_random):
    apply_parts(lite0_random, {"head", "layer4"})
    lite0_random.train()
    assert not lite0_random.groups["layer3"].training
    assert not any(m.training for m in lite0_random.groups["stem"].modules())
    assert lite0_random.groups["layer4"].training
    assert lite0_random.head.training


def test_frozen_batchnorm_statistics_do_not_move_during_training(lite0_random, fast_train, rng):
    model = lite0_random
    before = {g: bn_stats(model.groups[g]) for g in model.groups}
    images = torch.randint(0, 256, (16, 3, 64, 64), dtype=torch.uint8)
    labels = torch.tensor([0, 1] * 8)
    cfg = fast_train.model_copy(update={"bn_stats": "update"})
    train_phase(
        model, images, labels, frozenset({"head", "layer4"}), cfg, epochs=1, rng=rng, device=torch.device("cpu")
    )
    for group in ("stem", "layer1", "layer2", "layer3"):
        after = bn_stats(model.groups[group])
        assert all(torch.equal(before[group][k], after[k]) for k in after), group
    # the trainable group's statistics did move: the check above can fail
    moved = bn_stats(model.groups["layer4"])
    assert any(not torch.equal(before["layer4"][k], moved[k]) for k in moved)


def test_bn_stats_frozen_keeps_trainable_statistics_but_trains_scale_and_shift(lite0_random, fast_train, rng):
    model = lite0_random
    layer4 = model.groups["layer4"]
    stats_before = bn_stats(layer4)
    scale_before = layer4[0]._bn2.weight.detach().clone()
    images = torch.randint(0, 256, (16, 3, 64, 64), dtype=torch.uint8)
    labels = torch.tensor([0, 1] * 8)
    frozen = fast_train.model_copy(update={"bn_stats": "frozen"})
    train_phase(
        model, images, labels, frozenset({"head", "layer4"}), frozen, epochs=1, rng=rng, device=torch.device("cpu")
    )
    after = bn_stats(layer4)
    assert all(torch.equal(stats_before[k], after[k]) for k in after)
    assert not torch.equal(scale_before, layer4[0]._bn2.weight)


def test_frozen_weights_unchanged_and_trainable_ones_change(lite0_random, fast_train, rng):
    model = lite0_random
    before = copy.deepcopy(model.state_dict())
    images = torch.randint(0, 256, (16, 3, 64, 64), dtype=torch.uint8)
    labels = torch.tensor([0, 1] * 8)
    train_phase(
        model, images, labels, frozenset({"head", "layer4"}), fast_train, epochs=1, rng=rng, device=torch.device("cpu")
    )
    after = model.state_dict()
    for key, value in after.items():
        part = model.part_of_key(key)
        if part in {"stem", "layer1", "layer2", "layer3"}:
            assert torch.equal(before[key], value), key
    assert not torch.equal(before["head.fc.weight"], after["head.fc.weight"])
    assert not torch.equal(
        before["groups.layer4.0._project_conv.weight"], after["groups.layer4.0._project_conv.weight"]
    )


def test_frozen_prefix_runs_without_autograd(lite0_random):
    model = lite0_random
    apply_parts(model, {"head", "layer4"})
    seen = {}

    def hook(name):
        def record(module, inputs, output):
            seen[name] = output.requires_grad

        return record

    for name in model.groups:
        model.groups[name].register_forward_hook(hook(name))
    model.train()
    model(torch.rand(2, 3, 64, 64))
    assert seen == {"stem": False, "layer1": False, "layer2": False, "layer3": False, "layer4": True}


def test_gradients_flow_only_into_trainable_parts(lite0_random):
    model = lite0_random
    apply_parts(model, {"head", "layer3"})
    model.train()
    model(torch.rand(2, 3, 64, 64)).sum().backward()
    for part, name, param in model.named_part_parameters():
        if part in {"head", "layer3"}:
            continue
        assert param.grad is None, f"{part}.{name}"
    assert model.groups["layer3"][0]._project_conv.weight.grad is not None


def test_bn_stats_auto_freezes_pretrained_statistics_and_learns_random_ones(fast_train, rng):
    from fedfreeze.config import ModelConfig
    from fedfreeze.models.registry import build_model

    images = torch.randint(0, 256, (16, 3, 64, 64), dtype=torch.uint8)
    labels = torch.tensor([0, 1] * 8)
    cfg = fast_train.model_copy(update={"bn_stats": "auto"})
    for weights, should_move in (("package", False), ("none", True)):
        model, _ = build_model(ModelConfig(weights=weights, input_size=64))
        before = bn_stats(model.groups["layer4"])
        train_phase(
            model, images, labels, frozenset({"head", "layer4"}), cfg, epochs=1, rng=rng, device=torch.device("cpu")
        )
        after = bn_stats(model.groups["layer4"])
        moved = any(not torch.equal(before[k], after[k]) for k in after)
        assert moved == should_move, weights
        # from scratch the statistics follow the weights at PyTorch's momentum, not TensorFlow's 0.01
        assert model.groups["layer4"][0]._bn0.momentum == (0.01 if weights == "package" else 0.1)


def test_learnt_batchnorm_statistics_are_reestimated_on_the_data_after_training(lite0_random, fast_train, rng):
    """From random weights the running statistics end as the data's, not an average still near (0, 1)."""
    model = lite0_random
    gen = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (16, 3, 64, 64), dtype=torch.uint8, generator=gen)
    labels = torch.tensor([0, 1] * 8)
    train_phase(
        model, images, labels, frozenset({"head", "layer4"}), fast_train, epochs=1, rng=rng, device=torch.device("cpu")
    )  # bn-stats "auto" from random weights: statistics learnt
    bn = model.groups["layer4"][0]._bn0  # the first BatchNorm of the trainable group
    seen = []
    handle = bn.register_forward_hook(lambda module, args, out: seen.append(args[0]))
    model.eval()
    with torch.no_grad():
        model(images.float() / 255.0)
    handle.remove()
    (x,) = seen
    # 16 images in 2 equal batches of 8: the average of batch means is the mean over all images
    torch.testing.assert_close(bn.running_mean, x.mean(dim=(0, 2, 3)), rtol=1e-4, atol=1e-5)
    assert bn.momentum is not None  # the layer's own momentum is back for later training
