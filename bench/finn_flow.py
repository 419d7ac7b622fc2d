"""FINN's own flow (finn-plus 1.6.1) on a finn-profile QONNX export, compared with qonnx execution
on N real test images. finn-plus cannot be installed beside torch 2.13.0 (README: FINN); run this
with a separate environment that holds it:

    python -m venv --system-site-packages .finnvenv
    .finnvenv/bin/pip install --no-deps finn-plus==1.6.1 pandas pytz tzdata termcolor mashumaro \
        scikit-learn joblib threadpoolctl narwhals onnx-passes psutil mip
    OMPQ_DATA_DIR=../shared/data nice -n 10 .finnvenv/bin/python bench/finn_flow.py \
        resnet20_finn.onnx --images 64 --limit 1500

Stages (each written to bench/results/finn_flow.json as soon as it ends):

1. qonnx execution of the file (``qonnx.core.onnx_exec``), one image at a time: the reference;
2. rounding ties of every activation Quant on the same images (``targets.count_ties``);
3. ``step_qonnx_to_finn`` (FINN's ConvertQONNXtoFINN, unchanged), executed with FINN's
   ``execute_onnx``: max |diff| against qonnx;
4. the default build steps ``step_tidy_up`` -> ``step_streamline`` -> ``step_convert_to_hw``;
5. finn-plus' ResNet steps ``step_resnet_tidy`` -> ``step_resnet_streamline`` ->
   ``step_resnet_convert_to_hw`` -> ``step_convert_to_hw`` (finn/builder/custom_step_library/
   resnet.py), each flow under a wall-clock limit (``--limit`` seconds);

after streamlining: max |diff| against qonnx, how many lowered convs read an integer tensor,
and after convert-to-hw how many became MVAU / VVAU. Vivado-dependent steps are not run. ``run``
(rewritten at every save): commit, library versions, load average, wall and CPU seconds so far
(run_record.py).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import signal
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))
OUT = HERE / "results" / "finn_flow.json"


class Timeout(Exception):
    pass


def _alarm(_signum: int, _frame: Any) -> None:
    raise Timeout


def finn_steps() -> tuple[Any, Any, Any]:
    """FINN's build steps, imported as a FINN user would (settings without a build folder; the
    Vivado RTL simulator that build_dataflow_steps imports at module level is not used here)."""
    from finn.util.settings import initialize_dummy_settings

    initialize_dummy_settings()
    import finn.xsi

    finn.xsi.SimEngine = None  # only the rtlsim steps use it; importing it needs Vivado
    import finn.builder.build_dataflow_steps as steps
    import finn.builder.custom_step_library.resnet as resnet
    from finn.builder.build_dataflow_config import DataflowBuildConfig

    cfg = DataflowBuildConfig(
        output_dir=str(HERE / "results" / "finn_build"),
        synth_clk_period_ns=10.0,
        generate_outputs=[],
    )
    return steps, resnet, cfg


class ChangeLog:
    """Which transformations inside qonnx ComposedTransformations (finn-plus' StreamlinePlus is
    one) report a change, to tell a slow fixed-point iteration from a cycle. Each inner
    transformation's ``apply`` is wrapped; what it computes is not touched."""

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()
        self.recent: list[str] = []

    def install(self) -> None:
        from qonnx.transformation.composed import ComposedTransformation

        log, init = self, ComposedTransformation.__init__

        def patched(composed: Any, transformations: list[Any]) -> None:
            init(composed, transformations)
            for t in transformations:
                if not isinstance(t, ComposedTransformation):
                    log.wrap(t)

        ComposedTransformation.__init__ = patched

    def wrap(self, t: Any) -> None:
        apply = t.apply

        def logged(model: Any) -> Any:
            model, changed = apply(model)
            if changed:
                name = type(t).__name__
                self.counts[name] += 1
                self.recent = [*self.recent[-39:], f"{name} ({len(model.graph.node)} nodes)"]
            return model, changed

        t.apply = logged

    def to_json(self) -> dict[str, Any]:
        return {
            "changes_per_transformation": dict(self.counts.most_common()),
            "last_40_changes": self.recent,
        }


CHANGES = ChangeLog()


def ops(model: Any) -> dict[str, int]:
    return dict(Counter(n.op_type for n in model.graph.node))


def run_finn(model: Any, images: np.ndarray) -> np.ndarray:
    import finn.core.onnx_exec as fexec

    iname, oname = model.graph.input[0].name, model.graph.output[0].name
    return np.concatenate(
        [fexec.execute_onnx(model, {iname: images[i : i + 1]})[oname] for i in range(len(images))]
    )


def compare(ref: np.ndarray, got: np.ndarray) -> dict[str, Any]:
    got = got.reshape(ref.shape)
    per_image = np.abs(ref - got).reshape(len(ref), -1).max(axis=1)
    return {
        "max_abs_diff": float(per_image.max()),
        "images_differing": int((per_image > 0).sum()),
        "top1_agree": int((ref.argmax(1) == got.argmax(1)).sum()),
    }


def conv_inputs(model: Any) -> dict[str, Any]:
    """Lowered convs (MatMul after Im2Col, or Conv) and whether FINN annotates their input as an
    integer type (what InferQuantizedMatrixVectorActivation / InferVectorVectorActivation need)."""
    layers = [n for n in model.graph.node if n.op_type in ("Conv", "MatMul")]
    integer, floating = [], []
    for n in layers:
        producer = model.find_producer(n.input[0])
        if n.op_type == "MatMul" and (producer is None or producer.op_type != "Im2Col"):
            continue  # the final Linear
        (integer if model.get_tensor_datatype(n.input[0]).is_integer() else floating).append(n.name)
    return {
        "convs": len(integer) + len(floating),
        "integer_input": len(integer),
        "float_input": floating,
    }


def hw_layers(model: Any) -> dict[str, int]:
    kinds = Counter(n.op_type for n in model.graph.node)
    return {
        "MVAU": sum(v for k, v in kinds.items() if k.startswith("MVAU")),
        "VVAU": sum(v for k, v in kinds.items() if k.startswith("VVAU")),
        "left_MatMul_or_Conv": kinds.get("MatMul", 0) + kinds.get("Conv", 0),
    }


def flow(
    name: str,
    model: Any,
    steps: list[Any],
    cfg: Any,
    images: np.ndarray,
    ref: np.ndarray,
    limit: int,
    save: Any,
) -> Any:
    out: dict[str, Any] = {"steps": [s.__name__ for s in steps], "seconds": {}}
    CHANGES.counts.clear()
    CHANGES.recent = []
    save(name, out)
    signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(limit)
    t_all = time.perf_counter()
    try:
        for step in steps:
            t0 = time.perf_counter()
            model = step(model, cfg)
            out["seconds"][step.__name__] = round(time.perf_counter() - t0, 1)
            out[f"ops_after_{step.__name__}"] = ops(model)
            if "streamline" in step.__name__:
                signal.alarm(0)
                out["conv_inputs"] = conv_inputs(model)
                t1 = time.perf_counter()
                out["streamlined_vs_qonnx"] = compare(ref, run_finn(model, images))
                out["seconds"]["execute_streamlined"] = round(time.perf_counter() - t1, 1)
                signal.alarm(max(1, int(limit - (time.perf_counter() - t_all))))
            save(name, out)
        out["hw_layers"] = hw_layers(model)
        out["finished"] = True
    except Timeout:
        out["finished"] = False
        out["stopped"] = f"wall-clock limit {limit} s reached in the step after " + (
            ", ".join(out["seconds"]) or "none"
        )
    finally:
        signal.alarm(0)
    out["composed_transformation_changes"] = CHANGES.to_json()
    save(name, out)
    return model


def main() -> None:
    import onnx
    from ompq_plugin.exporters import targets as T
    from ompq_plugin.exporters.qonnx import run_qonnx
    from qonnx.core.modelwrapper import ModelWrapper
    from run_record import RunRecord
    from test_export import real_images

    ap = argparse.ArgumentParser()
    ap.add_argument("onnx", help="finn-profile QONNX file written by `ompq export --target finn`")
    ap.add_argument("--images", type=int, default=64)
    ap.add_argument("--limit", type=int, default=1500, help="seconds per FINN flow")
    ap.add_argument("--flows", default="default,resnet")
    args = ap.parse_args()
    run = RunRecord(extra=("finn-plus",))
    data = Path(os.environ.get("OMPQ_DATA_DIR", HERE.parent.parent / "shared" / "data"))
    images = real_images(data, args.images).numpy()
    result: dict[str, Any] = {
        "command": f"python bench/finn_flow.py {args.onnx} --images {args.images} "
        f"--limit {args.limit}",
        "file": str(args.onnx),
        "images": args.images,
        "machine": "2 CPU cores shared with other jobs (busy); times are wall-clock",
    }

    def save(key: str | None = None, value: Any = None) -> None:
        if key is not None:
            result[key] = value
        result["run"] = run.to_json()
        OUT.parent.mkdir(exist_ok=True)
        tmp = OUT.with_suffix(".tmp")
        tmp.write_text(json.dumps(result, indent=2) + "\n")
        tmp.replace(OUT)

    result["versions"] = {"finn-plus": run.versions["finn-plus"]}
    model = onnx.load(args.onnx)
    t0 = time.perf_counter()
    ref = run_qonnx(model, images)
    result["seconds_qonnx"] = round(time.perf_counter() - t0, 1)
    modes = Counter(
        a.s.decode()
        for n in model.graph.node
        if n.op_type == "Quant"
        for a in n.attribute
        if a.name == "rounding_mode"
    )
    ties = T.count_ties(model, images)
    save(
        "ties",
        {
            "activation_values": ties.values,
            "positive": ties.positive,
            "negative": ties.negative,
            "rounded_unlike_finn": ties.disagreeing(),
            "quant_rounding_modes": dict(modes),
        },
    )
    steps, resnet, cfg = finn_steps()
    CHANGES.install()
    t0 = time.perf_counter()
    converted = steps.step_qonnx_to_finn(ModelWrapper(args.onnx), cfg)
    t1 = time.perf_counter()
    save(
        "qonnx_to_finn",
        {
            "seconds": round(t1 - t0, 1),
            "ops": ops(converted),
            "vs_qonnx": compare(ref, run_finn(converted, images)),
            "seconds_execute": round(time.perf_counter() - t1, 1),
        },
    )
    flows = {
        "default": [steps.step_tidy_up, steps.step_streamline, steps.step_convert_to_hw],
        "resnet": [
            resnet.step_resnet_tidy,
            resnet.step_resnet_streamline,
            resnet.step_resnet_convert_to_hw,
            steps.step_convert_to_hw,
        ],
    }
    for name in args.flows.split(","):
        flow(
            f"flow_{name}",
            ModelWrapper(copy.deepcopy(converted.model)),
            flows[name],
            cfg,
            images,
            ref,
            args.limit,
            save,
        )
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
