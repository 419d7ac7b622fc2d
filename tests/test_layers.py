"""Layer discovery: which layers, their counts, where features are read, activation groups."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ompq_plugin.errors import OmpqError
from ompq_plugin.layers import discover_layers
from ompq_plugin.models import MODELS


def resnet20_layers():
    return discover_layers(MODELS["resnet20"].factory().eval(), torch.randn(1, 3, 32, 32))


def test_resnet20_has_19_convs_and_one_linear_with_exact_counts():
    found = resnet20_layers()
    kinds = [layer.kind for layer in found.layers]
    assert kinds == ["conv"] * 19 + ["linear"]
    assert found.traced and not found.unsupported
    first, block_conv, fc = found.layers[0], found.layers[1], found.layers[-1]
    assert (first.params, first.macs) == (16 * 3 * 9, 16 * 32 * 32 * 3 * 9)
    assert (block_conv.params, block_conv.macs) == (16 * 16 * 9, 16 * 32 * 32 * 16 * 9)
    assert (fc.params, fc.macs, fc.input_shape) == (640, 640, (64,))
    # 268,336 quantizable weights (the checkpoint's 269,722 also counts BN and the fc bias).
    assert found.total_params == 268_336


def test_resnet_feature_points_follow_the_authors_code():
    by_name = {layer.name: layer for layer in resnet20_layers().layers}
    assert by_name["conv1"].feature_node == "relu"  # conv -> bn -> relu
    assert by_name["layer1.0.conv1"].feature_node == "layer1_0_relu1"  # post-ReLU
    assert by_name["layer1.0.conv2"].feature_node == "layer1_0_relu2"  # block output after add
    assert by_name["linear"].feature_node == "linear"  # logits


def test_resnet_activation_groups_are_the_tensors_layers_read():
    found = resnet20_layers()
    by_name = {layer.name: layer for layer in found.layers}
    assert by_name["conv1"].act_group == "input"
    assert by_name["layer1.0.conv2"].act_group == "layer1.0.relu1"
    assert by_name["layer2.0.conv1"].act_group == "layer1.2.relu2"
    assert by_name["linear"].act_group == "layer3.2.relu2"  # through pool and flatten
    assert len(found.act_groups) == 20  # every layer reads its own tensor in ResNet-20


def test_layers_sharing_an_input_share_a_group_and_residual_adds_tie_groups():
    class TwoBranches(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(3, 4, 3, padding=1)
            self.b = nn.Conv2d(3, 4, 1)
            self.c = nn.Conv2d(4, 4, 1)
            self.d = nn.Conv2d(4, 4, 1)

        def forward(self, x):
            y = F.relu(self.a(x)) + self.b(x)  # a and b read x
            p, q = F.relu(y), torch.relu(y * 2)
            return self.c(p) + self.d(q) + (p + q).mean()  # p + q ties c's and d's inputs

    found = discover_layers(TwoBranches(), torch.randn(1, 3, 8, 8))
    groups = {layer.name: layer.act_group for layer in found.layers}
    assert groups["a"] == groups["b"] == "input"
    assert groups["c"] == groups["d"]
    assert found.act_groups[groups["c"]] == ("c", "d")


def test_mobilenetv2_kinds_include_depthwise_and_pointwise():
    found = discover_layers(MODELS["mobilenetv2_cifar"].factory().eval(), torch.randn(1, 3, 32, 32))
    kinds = {layer.kind for layer in found.layers}
    assert {"conv", "depthwise", "pointwise", "linear"} <= kinds
    dw = next(layer for layer in found.layers if layer.kind == "depthwise")
    c = dw.output_shape[0]
    assert dw.params == c * 9 and dw.macs == dw.output_shape[0] * dw.output_shape[1] ** 2 * 9


def test_conv1d_grouped_and_linear_on_sequences():
    model = nn.Sequential(nn.Conv1d(4, 8, 3, groups=2), nn.ReLU(), nn.Linear(6, 5))
    found = discover_layers(model, torch.randn(1, 4, 8))
    conv, fc = found.layers
    assert conv.kind == "conv" and conv.macs == 8 * 6 * 2 * 3
    assert fc.kind == "linear" and fc.macs == 8 * 5 * 6  # applied to each of 8 rows


def test_unsupported_layers_are_listed_by_name_never_dropped():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ConvTranspose2d(4, 4, 2), nn.Flatten())
    found = discover_layers(model, torch.randn(1, 3, 8, 8))
    assert [(u.name, u.module_type) for u in found.unsupported] == [("1", "ConvTranspose2d")]
    with pytest.raises(OmpqError, match=r"1 \(ConvTranspose2d\).*--allow-unsupported"):
        found.require_supported()


def test_untraceable_model_falls_back_to_layer_outputs():
    class DataDependent(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)
            self.fc = nn.Linear(4, 2)

        def forward(self, x):
            y = self.conv(x)
            if y.sum() > 0:  # control flow on values: torch.fx cannot trace this
                y = y * 2
            return self.fc(y.mean((2, 3)))

    found = discover_layers(DataDependent(), torch.randn(1, 3, 8, 8))
    assert not found.traced
    assert [layer.feature_node for layer in found.layers] == ["conv", "fc"]
    assert len(found.act_groups) == 2


def test_shared_weights_and_layerless_models_are_clear_errors():
    conv = nn.Conv2d(3, 3, 1)
    with pytest.raises(OmpqError, match="more than once"):
        discover_layers(nn.Sequential(conv, conv), torch.randn(1, 3, 4, 4))
    with pytest.raises(OmpqError, match="nothing to quantize"):
        discover_layers(nn.Sequential(nn.ReLU()), torch.randn(1, 3, 4, 4))
    with pytest.raises(OmpqError, match="input size"):
        discover_layers(nn.Sequential(nn.Linear(5, 2)), torch.randn(1, 3))


@pytest.mark.parametrize("mode", ["train", "eval", "mixed"])
def test_discovery_runs_in_eval_mode_and_restores_the_modes(mode: str) -> None:
    """The pass runs every module in eval mode (BatchNorm uses, never updates, its running
    statistics) and leaves each module's mode as it found it, a mixed model included."""
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 2, 1))
    model.train(mode != "eval")
    if mode == "mixed":  # the root in eval mode, one BatchNorm left in training mode
        model.eval()
        model[1].train()
    before = {n: m.training for n, m in model.named_modules()}
    stats = model[1].running_mean.clone()
    seen = []
    model[1].register_forward_pre_hook(lambda m, _a: seen.append(m.training))
    discover_layers(model, torch.randn(2, 3, 8, 8))
    assert seen == [False]
    assert torch.equal(model[1].running_mean, stats)
    after = {n: m.training for n, m in model.named_modules()}
    assert after == before
