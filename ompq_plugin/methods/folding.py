"""Float weights as the quantizer sees them: BatchNorm folded into the preceding layer."""

from __future__ import annotations

import copy

from torch import nn

from ompq_plugin.errors import OmpqError


def folded_copy(model: nn.Module) -> nn.Module:
    """An eval-mode copy of ``model`` with every BatchNorm folded (same function, same layer
    names), the weights ``quantize`` quantizes; ``model`` itself when folding is impossible."""
    from ompq_plugin.quantizer import _fold_batchnorms, _trace

    try:
        gm = _trace(copy.deepcopy(model).eval())
        _fold_batchnorms(gm, {})  # an unfoldable BatchNorm stays as it is: weights unchanged
        gm.recompile()
    except OmpqError:
        return model
    return gm.eval()
