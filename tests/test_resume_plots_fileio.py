"""Resume semantics (pure plan + a real fine-tune), atomic writes, flag suggestions and the
pictures' readability at ResNet-56 size: fast, in-process."""

from __future__ import annotations

import dataclasses
import errno
import os
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
from cli_helpers import TINY_MODEL

from ompq_plugin.cli import build_parser, close_options, main, unrecognized_message
from ompq_plugin.errors import OmpqError
from ompq_plugin.fileio import atomic_path, check_writable, signals_held
from ompq_plugin.qat_plan import CosineSegment, ResumePoint, TrainingPlan, resume_plan

SPE = 10  # steps per epoch


def _plan(epochs: int = 5, lr: float = 0.01) -> TrainingPlan:
    return TrainingPlan(epochs, lr, 32, SPE, 0, 1, CosineSegment(0, lr, epochs * SPE))


def _resume(point: ResumePoint, epochs: int, **changes: float) -> TrainingPlan:
    kw = {"lr": 0.01, "batch_size": 32, "steps_per_epoch": SPE, "seed": 0, "world_size": 1}
    return resume_plan(point, epochs, **{**kw, **changes})


def test_resume_with_the_same_epochs_keeps_the_plan() -> None:
    point = ResumePoint(3, _plan())
    assert _resume(point, 5) == point.plan


@pytest.mark.parametrize("epochs", [4, 6, 12])
def test_resume_with_other_epochs_replans_without_the_rate_rising(epochs: int) -> None:
    point = ResumePoint(3, _plan())
    plan = _resume(point, epochs)
    start = 3 * SPE
    assert plan.epochs == epochs and plan.schedule.start_step == start
    assert plan.schedule.lr(start) == pytest.approx(point.plan.schedule.lr(start))
    rates = [plan.schedule.lr(s) for s in range(start, epochs * SPE + 5)]
    assert all(a >= b for a, b in zip(rates, rates[1:], strict=False))
    assert rates[-1] == 0.0  # annealed to zero at the new last epoch, and stays there


def test_resume_with_nothing_to_run_is_refused() -> None:
    with pytest.raises(OmpqError, match=r"already run 3 of 5 epochs.*Pass --epochs 5"):
        _resume(ResumePoint(3, _plan()), 2)
    with pytest.raises(OmpqError, match=r"finished all 5 epochs.*--epochs 1 has nothing"):
        _resume(ResumePoint(5, _plan()), 1)
    assert _resume(ResumePoint(5, _plan()), 5).epochs == 5  # the caller decides to write it


@pytest.mark.parametrize(("change", "flag"), [({"lr": 0.1}, "--lr"),
                                              ({"batch_size": 64}, "--batch-size"),
                                              ({"steps_per_epoch": 7}, "steps per epoch")])
def test_resume_with_other_options_is_refused(change: dict, flag: str) -> None:
    with pytest.raises(OmpqError, match=f"trained with {flag}"):
        _resume(ResumePoint(2, _plan()), 5, **change)


def test_cosine_matches_torch_for_a_fresh_plan() -> None:
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=0.01)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=50)
    seg = _plan().schedule
    for step in range(50):
        assert seg.lr(step) == pytest.approx(opt.param_groups[0]["lr"], abs=1e-12)
        opt.step()
        sched.step()


def test_finetune_resume_with_more_epochs_replans(tmp_path: Path) -> None:
    from ompq_plugin.hw_profiles import load_profile

    from ompq_plugin.qat import finetune, read_resume_point
    from ompq_plugin.quantizer import quantize, uniform_bitconfig

    torch.manual_seed(0)
    namespace: dict = {}
    exec(compile(TINY_MODEL, "tiny", "exec"), namespace)  # noqa: S102 - our own test model
    model = namespace["make"]().eval()
    x = torch.randn(16, 3, 32, 32)
    bits = uniform_bitconfig(model, x, 4, 8, "tiny")
    from ompq_plugin.ptq import calibrate

    q = quantize(model, bits, load_profile("generic"))
    calibrate(q, x)
    images = torch.randint(0, 256, (32, 3, 32, 32), dtype=torch.uint8)
    labels = torch.randint(0, 10, (32,))
    kw = dict(batch_size=8, norm=((0.5,) * 3, (0.25,) * 3), progress=False, bits=bits,
              checkpoint=tmp_path / "c.ckpt")
    finetune(q, (images, labels), None, 2, 0.05, stop_after=1, **kw)
    assert read_resume_point(tmp_path / "c.ckpt").epoch == 1
    history = finetune(q, (images, labels), None, 4, 0.05, resume=True, **kw)
    assert [h.epoch for h in history] == [1, 2, 3, 4]
    lrs = [h.lr for h in history]
    assert all(a > b for a, b in zip(lrs, lrs[1:], strict=False)), lrs
    assert read_resume_point(tmp_path / "c.ckpt").plan.epochs == 4


# ------------------------------------------------------------------------------ files


def test_check_writable_refuses_before_any_work(tmp_path: Path) -> None:
    (tmp_path / "afile").write_text("x")
    (tmp_path / "adir").mkdir()
    with pytest.raises(OmpqError, match="afile is a file, not a folder"):
        check_writable(tmp_path / "afile" / "out.json")
    with pytest.raises(OmpqError, match="is a folder; pass a file name"):
        check_writable(tmp_path / "adir")
    with pytest.raises(OmpqError, match="does not exist"):
        check_writable(tmp_path / "nope" / "out.json")
    assert check_writable(tmp_path / "out.json") == tmp_path / "out.json"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adir", "afile"]  # probe removed


def test_a_failed_write_names_the_file_and_the_fix(tmp_path: Path) -> None:
    target = tmp_path / "out.bin"
    target.write_text("old")
    with pytest.raises(OmpqError, match=r"could not write .*out.bin \(No space left on device\)"
                       r".*disk is full"), atomic_path(target):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["out.bin"]


def test_an_interrupt_inside_the_block_leaves_no_temporary(tmp_path: Path) -> None:
    target = tmp_path / "out.bin"
    with pytest.raises(KeyboardInterrupt), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []


def test_signals_held_delays_sigint_to_the_end_of_the_block() -> None:
    reached = []
    with pytest.raises(KeyboardInterrupt):
        with signals_held():
            os.kill(os.getpid(), signal.SIGINT)
            reached.append("after kill")  # still runs: the signal waits
        reached.append("after block")  # never runs: the signal arrives first
    assert reached == ["after kill"]


# ------------------------------------------------------------------------------ CLI text


def test_flag_suggestions() -> None:
    search = build_parser()._subparsers._group_actions[0].choices["search"]  # type: ignore
    options = [s for a in search._actions for s in a.option_strings]
    assert close_options("--avg-bits", options)[0] == "--avg-weight-bits"
    assert close_options("--orm-plt", options)[0] == "--orm-plot"
    text = unrecognized_message(search, ["--frobnicate"])
    assert "see `ompq search --help`" in text


def test_search_lists_every_written_file(data_dir: Path, tmp_path: Path, capsys) -> None:
    (tmp_path / "tiny.py").write_text(TINY_MODEL)
    out = [str(tmp_path / n) for n in ("bits.json", "orm.png", "bits.svg")]
    assert main(["search", "--model", f"{tmp_path / 'tiny.py'}:make", "--data", str(data_dir),
                 "--samples", "16", "-o", out[0], "--orm-plot", out[1], "--bits-plot",
                 out[2]]) == 0
    assert f"wrote {', '.join(out)}" in capsys.readouterr().out
    assert all(Path(p).stat().st_size > 0 for p in out)


# ------------------------------------------------------------------------------ pictures


def _resnet56_config():  # noqa: ANN202
    from ompq_plugin.models import build_model
    from ompq_plugin.quantizer import uniform_bitconfig

    model, _ = build_model("resnet56")
    config = uniform_bitconfig(model, torch.randn(1, 3, 32, 32), 4, 8, "resnet56")
    rng = np.random.default_rng(0)
    layers = [dataclasses.replace(lb, weight_bits=int(rng.integers(2, 9)))
              for lb in config.layers]
    return dataclasses.replace(config, layers=layers)


def _no_overlap(labels: list, renderer, axis: int) -> None:  # noqa: ANN001
    boxes = sorted((lab.get_window_extent(renderer) for lab in labels if lab.get_text()),
                   key=lambda b: b.bounds[axis])
    for a, b in zip(boxes, boxes[1:], strict=False):
        lo_b, hi_a = (b.y0, a.y1) if axis == 1 else (b.x0, a.x1)
        assert lo_b >= hi_a - 0.5, (a, b)


def test_orm_and_bit_charts_are_readable_at_resnet56_size() -> None:
    from ompq_plugin.report import bits_figure, orm_figure

    config = _resnet56_config()
    names = [lb.name for lb in config.layers]
    assert len(names) >= 55
    k = np.random.default_rng(1).random((len(names), len(names)))
    for fig in (orm_figure((k + k.T) / 2, names, "ORM", config), bits_figure(config)):
        fig.canvas.draw()
        renderer = fig.canvas.get_renderer()
        ax = fig.axes[0]
        ylabels = ax.get_yticklabels()
        assert [t.get_text() for t in ylabels] == names
        assert min(t.get_fontsize() for t in ylabels) >= 5.0
        _no_overlap(ylabels, renderer, axis=1)
        if ax.get_xticklabels()[0].get_text() in names:  # the heat map's rotated column names
            _no_overlap(ax.get_xticklabels(), renderer, axis=0)
        shown = [t.get_text() for a in fig.axes for t in a.texts]
        assert shown.count(f"W{config.layers[7].weight_bits}/A8") >= 1
        assert len([s for s in shown if s.startswith("W")]) == len(names)  # every layer's bits
        import matplotlib.pyplot as plt

        plt.close(fig)


def test_totals_caption_shows_counts_as_counts_and_seconds_as_seconds() -> None:
    from ompq_plugin.bitconfig import BitConfig, LayerBits
    from ompq_plugin.report import totals_table

    layer = LayerBits("conv", "conv", 4, 8, 100, 1000, 10, "g")
    config = BitConfig(model="m", profile="generic", method="hawq", layers=[layer],
                       timings={"hessian_s": 5.9, "hessian_iterations": 100.0})
    assert totals_table(config).caption == "time: hessian 5.90 s, hessian iterations 100"
