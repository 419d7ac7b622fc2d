"""The README's main command runs end to end with no data folder (the embedded ResNet-20 and
CIFAR-10 sample) and leaves its three files."""

import json

from ompq_plugin.cli import main
from ompq_plugin.qmodel_io import load_quantized


def test_demo_runs_the_whole_flow_on_the_embedded_default(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("OMPQ_DATA_DIR", raising=False)
    out = tmp_path / "demo"
    rc = main(["demo", "--no-gptq", "-o", str(out)])
    printed = capsys.readouterr()
    assert rc == 0, printed.err
    assert "embedded CIFAR-10 sample" in printed.out
    assert sorted(p.name for p in out.iterdir()) == ["bits.json", "resnet20.onnx", "resnet20_q.pt"]
    bits = json.loads((out / "bits.json").read_text())
    free = [layer["weight_bits"] for layer in bits["layers"][1:-1]]
    own = sum(layer["params"] * layer["weight_bits"] for layer in bits["layers"])
    assert min(free) >= 3 and own <= 4 * 268_336  # 4-bit average over the model's layers
    # plus the two frozen 2-bit shortcut convs `quantize` adds (16x32 and 32x64 weights)
    assert bits["totals"]["weight_memory_bits"] == own + (16 * 32 + 32 * 64) * 2
    assert bits["weights"]["sha256"].startswith("12fca82f")  # the embedded akamaster file
    assert "500 exact CIFAR-10 test images" in printed.out
    assert "top-1 91.40%" in printed.out  # the float model on the 500 embedded test images
    assert "quantized top-1" in printed.out and "PASS" in printed.out
    loaded = load_quantized(out / "resnet20_q.pt")  # the file reloads by itself
    assert loaded.bits.to_json() == bits
