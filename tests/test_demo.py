"""The README's main command runs end to end on the real data and leaves its three files."""

import json

from ompq_plugin.cli import main
from ompq_plugin.qmodel_io import load_quantized


def test_demo_runs_the_whole_flow(data_dir, tmp_path, capsys):
    out = tmp_path / "demo"
    rc = main(["demo", "--data", str(data_dir), "--no-gptq", "-o", str(out)])
    printed = capsys.readouterr().out
    assert rc == 0
    assert sorted(p.name for p in out.iterdir()) == ["bits.json", "resnet20.onnx", "resnet20_q.pt"]
    bits = json.loads((out / "bits.json").read_text())
    free = [layer["weight_bits"] for layer in bits["layers"][1:-1]]
    assert min(free) >= 3 and bits["totals"]["weight_memory_bits"] <= 4 * 268_336
    assert "top-1 91.64%" in printed  # the float model, as in the MANIFEST
    assert "quantized top-1" in printed and "PASS" in printed
    loaded = load_quantized(out / "resnet20_q.pt")  # the file reloads by itself
    assert loaded.bits.to_json() == bits
