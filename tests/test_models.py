"""Model registry, architectures, checkpoint loading, user factories and evaluation."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
import torch
from torch import fx, nn

from ompq_plugin.data import cifar_folder, load_cifar10
from ompq_plugin.errors import OmpqError
from ompq_plugin.evaluation import count_correct, evaluate
from ompq_plugin.models import (
    MODELS,
    build_model,
    load_checkpoint,
    load_user_factory,
)
from ompq_plugin.models.mobilenetv2 import MobileNetV2

PARAMS = {
    "resnet20": 269_722,  # MANIFEST
    "resnet32": 464_154,
    "resnet56": 853_018,
    "resnet18": 11_689_512,  # torchvision resnet18
    "resnet50": 25_557_032,  # torchvision resnet50
    "mobilenetv2": 3_504_872,  # torchvision mobilenet_v2 (width 1.0, 1000 classes)
}
CLASSES = {"mobilenetv2": 1000, "resnet18": 1000, "resnet50": 1000}


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", sorted(MODELS))
def test_registry_model_builds_traces_and_runs(name: str) -> None:
    model, spec = build_model(name)
    assert not model.training and not spec.pretrained and spec.weights_path is None
    if name in PARAMS:
        assert n_params(model) == PARAMS[name]
    with torch.no_grad():
        assert model(torch.randn(1, *spec.input_size)).shape == (1, CLASSES.get(name, 10))
        traced = fx.symbolic_trace(model)
        x = torch.randn(2, 3, 32, 32)  # small input keeps the traced-vs-eager check cheap
        assert torch.allclose(traced(x), model(x), atol=1e-5)
    # every activation is a module of its own: no ReLU module is called twice
    acts = [n.target for n in traced.graph.nodes
            if n.op == "call_module" and isinstance(traced.get_submodule(n.target),
                                                   (nn.ReLU, nn.ReLU6))]
    assert acts and len(acts) == len(set(acts))
    assert not any(n.op == "call_function" and "relu" in str(n.target) for n in traced.graph.nodes)


def _depthwise(model: nn.Module) -> list[nn.Conv2d]:
    return [m for m in model.modules() if isinstance(m, nn.Conv2d)
            and m.groups > 1 and m.groups == m.in_channels == m.out_channels]


def test_mobilenetv2_structure() -> None:
    imagenet, _ = build_model("mobilenetv2")
    cifar, _ = build_model("mobilenetv2_cifar")
    assert len(_depthwise(imagenet)) == len(_depthwise(cifar)) == 17
    assert imagenet.features[0][0].stride == (2, 2) and cifar.features[0][0].stride == (1, 1)
    with torch.no_grad():
        assert cifar.features(torch.zeros(1, 3, 32, 32)).shape == (1, 1280, 4, 4)

    def stride2(m: nn.Module) -> int:
        return sum(c.stride == (2, 2) for c in m.modules() if isinstance(c, nn.Conv2d))

    assert (stride2(imagenet), stride2(cifar)) == (5, 3)  # 224 -> 7 and 32 -> 4
    assert sum(isinstance(m, nn.ReLU6) for m in cifar.modules()) == 35
    keys = imagenet.state_dict().keys()  # torchvision names
    for key in ("features.0.0.weight", "features.1.conv.0.0.weight", "features.1.conv.1.weight",
                "features.2.conv.1.0.weight", "features.2.conv.3.running_var",
                "features.18.1.bias", "classifier.1.weight"):
        assert key in keys


def test_mobilenetv2_width_multiplier() -> None:
    half = MobileNetV2(num_classes=10, width_mult=0.5, stem="cifar").eval()
    assert n_params(half) < n_params(build_model("mobilenetv2_cifar")[0])
    convs = [m for m in half.modules() if isinstance(m, nn.Conv2d)]
    assert all(m.out_channels % 8 == 0 for m in convs)
    assert convs[0].out_channels == 16 and half.last_channel == 1280
    with torch.no_grad():
        assert half(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    with pytest.raises(ValueError):
        MobileNetV2(stem="tiny")  # type: ignore[arg-type]


def test_imagenet_resnet_torchvision_names() -> None:
    r18, _ = build_model("resnet18")
    keys = r18.state_dict().keys()
    for key in ("conv1.weight", "bn1.num_batches_tracked", "layer1.1.conv2.weight",
                "layer2.0.downsample.0.weight", "layer2.0.downsample.1.running_mean",
                "fc.bias"):
        assert key in keys
    assert "layer1.0.downsample.0.weight" not in keys
    r50, _ = build_model("resnet50")
    assert "layer1.0.downsample.0.weight" in r50.state_dict()  # 64 -> 256 channels
    assert r50.layer4[0].conv2.stride == (2, 2)  # v1.5: stride on the 3x3 conv


# ------------------------------------------------------------------------------ checkpoints


@pytest.fixture()
def r20() -> nn.Module:
    torch.manual_seed(0)
    return build_model("resnet20")[0]


@pytest.mark.parametrize("form", ["plain", "module_prefix", "state_dict", "model"])
def test_load_checkpoint_forms(tmp_path: Path, r20: nn.Module, form: str) -> None:
    sd = r20.state_dict()
    if form == "module_prefix":
        obj: object = {"state_dict": {f"module.{k}": v for k, v in sd.items()}, "best_prec1": 1.0}
    elif form == "state_dict":
        obj = {"state_dict": sd, "epoch": 3}
    elif form == "model":
        obj = {"model": sd, "optimizer": {}}
    else:
        obj = sd
    path = tmp_path / "ck.pt"
    torch.save(obj, path)
    torch.manual_seed(1)
    fresh, spec = build_model("resnet20", weights=path)
    assert spec.pretrained and spec.weights_path == str(path)
    assert all(torch.equal(v, fresh.state_dict()[k]) for k, v in sd.items())


def test_real_weights_from_data_dir(data_dir: Path) -> None:
    model, spec = build_model("resnet20", data_dir=data_dir)
    assert spec.pretrained and spec.weights_path == str(data_dir / "weights/resnet20.th")
    # a CIFAR batch folder given as the data folder still finds ../weights
    _, spec2 = build_model("resnet20", data_dir=data_dir / "cifar10-exact")
    assert spec2.pretrained
    # registry models without weights stay random; a folder without weights/ is an error
    assert not build_model("mobilenetv2_cifar", data_dir=data_dir)[1].pretrained
    with pytest.raises(OmpqError, match="--weights"):
        build_model("resnet32", data_dir=data_dir / "cifar10-exact" / "..X")


def test_mismatch_lists_keys(tmp_path: Path) -> None:
    path = tmp_path / "r32.pt"
    torch.save(build_model("resnet32")[0].state_dict(), path)
    with pytest.raises(OmpqError) as exc:
        build_model("resnet20", weights=path)
    msg = str(exc.value)
    assert "unexpected keys" in msg and "layer1.3.conv1.weight" in msg and "more)" in msg
    assert "\n" not in msg

    sd = build_model("resnet20")[0].state_dict()
    del sd["layer2.1.bn1.weight"]
    sd["linear.weight"] = torch.zeros(100, 64)
    sd["extra.thing"] = torch.zeros(1)
    torch.save(sd, path)
    with pytest.raises(OmpqError) as exc:
        load_checkpoint(build_model("resnet20")[0], path)
    msg = str(exc.value)
    assert "missing keys 1 [layer2.1.bn1.weight]" in msg
    assert "unexpected keys 1 [extra.thing]" in msg
    assert "linear.weight (100, 64) vs model (10, 64)" in msg


def test_bad_checkpoint_files(tmp_path: Path, r20: nn.Module, data_dir: Path) -> None:
    with pytest.raises(OmpqError, match="not found"):
        load_checkpoint(r20, tmp_path / "missing.pt")
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"this is not a checkpoint")
    truncated = tmp_path / "truncated.th"
    truncated.write_bytes((data_dir / "weights/resnet20.th").read_bytes()[:50_000])
    for path in (garbage, truncated):
        with pytest.raises(OmpqError, match="not a .*PyTorch checkpoint") as exc:
            load_checkpoint(r20, path)
        assert "\n" not in str(exc.value)
    objects = tmp_path / "module.pt"
    torch.save(nn.Linear(2, 2), objects)  # a pickled module, not a state dict
    with pytest.raises(OmpqError, match="state_dict"):
        load_checkpoint(r20, objects)
    notdict = tmp_path / "list.pt"
    torch.save([torch.zeros(1)], notdict)
    with pytest.raises(OmpqError, match="holds no state dict"):
        load_checkpoint(r20, notdict)


def test_nan_weights_are_rejected(tmp_path: Path, r20: nn.Module) -> None:
    sd = r20.state_dict()
    sd["layer3.2.conv2.weight"] = sd["layer3.2.conv2.weight"].clone()
    sd["layer3.2.conv2.weight"][0, 0, 0, 0] = float("nan")
    path = tmp_path / "nan.pt"
    torch.save(sd, path)
    before = r20.layer3[2].conv2.weight.clone()
    with pytest.raises(OmpqError, match="layer3.2.conv2.weight contains NaN"):
        load_checkpoint(r20, path)
    assert torch.equal(r20.layer3[2].conv2.weight, before)  # untouched


# ------------------------------------------------------------------------------ user models

USER_FILE = textwrap.dedent(
    """
    from torch import nn
    from helper import WIDTH

    def make():
        return nn.Sequential(nn.Conv2d(3, WIDTH, 3, padding=1), nn.ReLU(),
                             nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(WIDTH, 10))

    def broken():
        raise ValueError("boom")

    def not_a_model():
        return 42

    VALUE = 3
    """
)


@pytest.fixture()
def user_file(tmp_path: Path) -> Path:
    (tmp_path / "helper.py").write_text("WIDTH = 8\n")
    path = tmp_path / "mynet.py"
    path.write_text(USER_FILE)
    return path


def test_user_factory(user_file: Path, tmp_path: Path) -> None:
    model, spec = build_model(f"{user_file}:make")
    assert isinstance(model, nn.Sequential) and not model.training and not spec.pretrained
    assert spec.input_size == (3, 32, 32)
    assert (spec.mean, spec.std) == ((0.0,) * 3, (1.0,) * 3)  # no normalisation unless given
    assert spec.name == f"{user_file.resolve()}:make"  # absolute: works from any folder
    ck = tmp_path / "w.pt"
    torch.save({"state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}}, ck)
    again, spec2 = build_model(f"{user_file}:make", weights=ck, input_size=(3, 64, 64),
                               mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    assert spec2.pretrained and spec2.input_size == (3, 64, 64) and spec2.std == (0.25,) * 3
    assert torch.equal(again[0].weight, model[0].weight)
    assert callable(spec2.factory) and isinstance(spec2.factory(), nn.Module)
    assert load_user_factory(f"{user_file}:make") is not None


@pytest.mark.parametrize(
    ("suffix", "pattern"),
    [
        (":nothere", "has no 'nothere'.*make"),
        (":broken", "raised ValueError: boom"),
        (":not_a_model", "not a torch.nn.Module"),
        (":VALUE", "not callable"),
        ("", "file.py:factory"),
    ],
)
def test_user_factory_errors(user_file: Path, suffix: str, pattern: str) -> None:
    with pytest.raises(OmpqError, match=pattern):
        build_model(f"{user_file}{suffix}")


def test_user_file_errors(tmp_path: Path, user_file: Path) -> None:
    with pytest.raises(OmpqError, match="not found"):
        build_model(f"{tmp_path / 'absent.py'}:make")
    bad = tmp_path / "bad.py"
    bad.write_text("def make(:\n")
    with pytest.raises(OmpqError, match="importing .*SyntaxError"):
        build_model(f"{bad}:make")
    with pytest.raises(OmpqError, match="unknown model 'resnet99'.*resnet50"):
        build_model("resnet99")
    with pytest.raises(OmpqError, match="mean/std need 3 values"):
        build_model(f"{user_file}:make", mean=(0.5,))


# ------------------------------------------------------------------------------ evaluation


def test_evaluate_inputs_and_mode(data_dir: Path) -> None:
    test = load_cifar10(cifar_folder(data_dir, "exact"), "test")
    small = test.subset(torch.arange(60))
    model, spec = build_model("resnet20", data_dir=data_dir)
    model.train()
    acc = evaluate(model, small, norm=spec, batch_size=25)
    assert model.training  # mode restored
    from ompq_plugin.data import normalise

    x = normalise(small.images, spec.mean, spec.std)
    assert evaluate(model, x, small.labels) == acc  # float images are used as given
    assert evaluate(model, small.images, small.labels, (spec.mean, spec.std)) == acc
    assert 0 <= acc <= 100
    with pytest.raises(OmpqError, match="normalisation"):
        evaluate(model, small.images, small.labels)


@pytest.mark.slow
def test_pretrained_cifar_resnets_reproduce_manifest(data_dir: Path) -> None:
    test = load_cifar10(cifar_folder(data_dir, "exact"), "test")
    expected = {"resnet20": 932, "resnet32": 944, "resnet56": 943}  # MANIFEST, of 1017
    for name, correct in expected.items():
        model, spec = build_model(name, data_dir=data_dir)
        assert spec.pretrained
        assert count_correct(model, test, norm=spec, batch_size=500) == (correct, 1017)
    assert round(100 * 932 / 1017, 2) == 91.64
