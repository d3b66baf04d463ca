"""AdaBN: re-estimate every BatchNorm layer's running statistics on a new site's images.

Li, Wang, Shi, Liu & Hou (2016), "Revisiting batch normalization for practical domain adaptation":
the learnt weights stay, only the normalisation moves to the new site's feature statistics (a
different scanner, population or exposure shifts them). No label is needed. Unlike
``fedfreeze.training.engine.reestimate_bn_stats``, which updates only the layers that trained,
every BatchNorm layer is re-estimated, whatever the model's freezing state.
"""

from __future__ import annotations

import torch
from torch import nn

from fedfreeze.errors import DataError
from fedfreeze.training.engine import EVAL_BATCH, average_bn_stats


def batchnorm_layers(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


@torch.no_grad()
def reestimate_all_bn(model: nn.Module, images: torch.Tensor, device: torch.device, batch: int = EVAL_BATCH) -> int:
    """Set every BatchNorm layer's running mean and variance to their cumulative average over the
    batches of ``images`` (as ``torch.optim.swa_utils.update_bn``: each batch counts once, the
    variance is the batch's unbiased one); returns how many layers changed.

    Only the BatchNorm layers run in training mode (dropout and everything else stay in eval mode),
    nothing is trained, and a failure leaves the statistics as they were.
    """
    layers = batchnorm_layers(model)
    if not layers:
        raise DataError("the model has no BatchNorm layers: there are no statistics to re-estimate")
    if len(images) < 2:
        raise DataError(f"re-estimating BatchNorm statistics needs at least 2 images, got {len(images)}")
    modes = {m: m.training for m in model.modules()}
    try:
        nn.Module.train(model, False)  # plain eval for every module, whatever the model's own train() keeps
        for m in layers:
            m.train(True)
        average_bn_stats(model, layers, images, device, batch)
    finally:
        for module, mode in modes.items():
            module.training = mode
    return len(layers)
