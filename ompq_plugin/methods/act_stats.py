"""Activation quantization errors measured on the search's own forward pass.

A forward pre-hook on each layer sees the layer's input on the N search samples while the ORM
features stream past (the hook runs inside the same single pass) and keeps a few thousand of
its values (:func:`_capture`: only the passes that need the whole tensor), never the tensor;
when the pass ends, the rest of the preparation (:func:`_finish`) runs and every layer's values
are scored at every width together (:func:`score`). Layers reading the same tensor (one act
group) share one measurement.

Cost: scoring every width over the whole tensor cost 5x a float forward pass on ResNet-20
(7 widths x 6 element-wise passes per layer input). :func:`prepare_input` instead makes three
passes over the tensor (energy, per-group minimum and maximum; two on a ReLU's output, which
has no negative value to look for), whatever the widths:

* the calibration threshold (99.999th percentile of ``|x|``) is exact, as before;
* the *tail* (every element at or above a bound just under the threshold: every element any
  width clips, and the largest rounding errors) is scored exactly;
* the *bulk* (the rest: pure rounding error at every width, bounded by half a step) is scored on
  ``SAMPLE`` elements spread over the tensor and scaled up to the bulk's size (ratio estimate).

Tensors of at most ``SAMPLE`` elements are scored exactly. Accuracy of the estimate against the
exact error, measured on every scored input of the real ResNet-20 / ResNet-56 (N = 64, all
widths 2-8, float and power-of-two scales; ``bench/act_error_estimate.py``): within 4.0 % /
6.6 % with ``SAMPLE`` = 16384
(2.1 % / 3.0 % with 65536, a quarter of the speed of the whole search on ResNet-20); the bits
the search picks on them were identical with either, in 144 searches (6 profiles, 2 image
draws, 3 budgets, both ORM methods).
"""

from __future__ import annotations

import functools
import math
import time
import weakref
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from ompq_plugin.errors import OmpqError
from ompq_plugin.methods.quant_error import ACT_PERCENTILE

SAMPLE = 1 << 14  # bulk elements scored per layer input
_MIN_SCALE = 1e-10  # Brevitas scaling_min_val (as quant_error)
_GROUPS = tuple(1 << k for k in range(8, 17))  # slice counts _top may split a tensor into


class NonFiniteError(ValueError):
    """The scored tensor has NaN/Inf values."""


@dataclass
class ActErrorStats:
    """Relative input-quantization error per layer and width, filled by :func:`record`."""

    errors: dict[str, dict[int, float]] = field(default_factory=dict)
    seconds: float = 0.0
    non_finite: str | None = None  # the first layer whose input had NaN/Inf values


def _slices(n: int, j: int) -> int:
    """How many slices :func:`_top` cuts ``n`` elements into to find the j largest: the fewest
    of at most 256 elements (few peaks to rank, few elements per hit), or the most there are;
    0 when no slice count fits."""
    fits = [g for g in _GROUPS if n % g == 0 and n >= 16 * g and j <= g // 4]
    return next((g for g in fits if n // g <= 256), fits[-1] if fits else 0)


def _peak_slices(
    flat: torch.Tensor, groups: int, j: int, nonnegative: bool
) -> tuple[bool, torch.Tensor, torch.Tensor]:
    """(signed, cut, hits): the tensor cut into ``groups`` consecutive slices, ``cut`` the j-th
    largest slice peak (magnitude), ``hits`` every element of the slices whose peak reaches it
    (a copy). The two passes over the whole tensor (maxima, and minima unless ``nonnegative``)
    are here."""
    table = flat.view(groups, -1)
    high = table.amax(dim=1)
    low = None if nonnegative else table.amin(dim=1)
    signed = low is not None and bool(low.min() < 0)
    peaks = torch.maximum(high, -low) if low is not None and signed else high
    cut = peaks.topk(j).values[-1]
    hits = table.index_select(0, (peaks >= cut).nonzero().squeeze(1)).reshape(-1)
    return signed, cut, hits


def _top(
    flat: torch.Tensor, j: int, nonnegative: bool = False
) -> tuple[bool, torch.Tensor, torch.Tensor]:
    """(signed, values, magnitudes): every element of the flat tensor whose magnitude reaches
    its j-th largest magnitude (perhaps a few more), found without ranking the whole tensor.
    The tensor is split into ``groups`` consecutive slices (the rows of a table), each slice's
    minimum and maximum taken in one pass each; the j-th largest slice peak bounds the j-th
    largest magnitude from below, so only the slices whose peak reaches it are searched.
    (Reducing along rows of 256 elements took 55 us per million elements, single-threaded;
    the interleaved columns used before, 119 us.)
    A tensor too small or oddly sized for the table comes back whole. ``nonnegative``: the
    caller knows the tensor has no negative value (a ReLU's output), so its minima are not
    needed (one pass fewer)."""
    groups = _slices(flat.numel(), j)
    if not groups:
        signed = not nonnegative and bool(flat.min() < 0)
        return signed, flat, flat.abs() if signed else flat
    signed, cut, hits = _peak_slices(flat, groups, j, nonnegative)
    return (signed, *_reaching(hits, cut, signed))


def _reaching(
    values: torch.Tensor, cut: torch.Tensor | float, signed: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """(values, magnitudes) of the elements of ``values`` whose magnitude reaches ``cut``."""
    mags = values.abs() if signed else values
    keep = mags >= cut
    return values[keep], mags[keep]


def percentile_threshold(mag: torch.Tensor) -> float:
    """The ``ACT_PERCENTILE`` percentile of a flat non-negative tensor, as ``quant_error``'s
    ``act_threshold`` (the k-th smallest value, read as the j-th largest)."""
    n = mag.numel()
    k = max(1, min(n, int(round(ACT_PERCENTILE / 100 * n))))
    j = n - k + 1
    return float(_top(mag, j)[2].topk(j).values[-1])


def _range(bits: int, signed: bool, threshold: float, power_of_two: bool) -> tuple[int, int, float]:
    """(lowest level, highest level, scale) of the per-tensor quantizer (``quantize_act``)."""
    thr = max(threshold, _MIN_SCALE)
    if signed:
        half = 2 ** (bits - 1)
        lo, hi, levels, float_div = -half, half - 1, half, half
    else:
        lo, hi, levels, float_div = 0, 2**bits - 1, 2**bits, 2**bits - 1
    if power_of_two:
        po2 = float(torch.exp2(torch.ceil(torch.log2(torch.tensor(thr, dtype=torch.float64)))))
        return lo, hi, po2 / levels
    return lo, hi, thr / float_div


_ROW_LENGTHS = (256, 4096)  # rows are padded to the first of these they fit, or to the longest


def _rows_sq_errors(
    rows: Sequence[torch.Tensor], ranges: Sequence[Sequence[tuple[int, int, float]]]
) -> list[list[float]]:
    """``sum (Q(x) - x)^2`` of each flat tensor ``rows[i]`` at every (lowest level, highest
    level, scale) of ``ranges[i]`` (every row with the same number of widths).

    Rows of similar length are padded with zeros (which score 0 at any width) to one length and
    stacked, and each width quantizes every row at once: a fixed handful of torch calls per
    width for all the layer inputs of a search (at ``SAMPLE`` elements per input the calls, not
    the arithmetic, were most of the cost)."""
    out: list[list[float]] = [[] for _ in rows]
    buckets: dict[int, list[int]] = {}
    for i, r in enumerate(rows):
        length = next((n for n in _ROW_LENGTHS if r.numel() <= n), 0)
        buckets.setdefault(length, []).append(i)
    for members in buckets.values():
        longest = max(rows[i].numel() for i in members)
        first = rows[members[0]]
        if len(members) == 1:
            x = first.reshape(1, -1)
        else:
            x = torch.zeros(len(members), longest, dtype=torch.float32, device=first.device)
            for row, i in zip(x, members, strict=True):
                row[: rows[i].numel()] = rows[i]
        shape = (len(ranges[members[0]]), len(members), 1)  # widths x rows x 1
        table = [ranges[i] for i in members]
        scale, lo, hi = (
            torch.tensor([[float(r[k]) for r in rs] for rs in table], device=x.device).T.reshape(
                shape
            )
            for k in (2, 0, 1)
        )
        # one width at a time in one reused rows x elements buffer: a widths x rows x elements
        # block (25 MB on ResNet-56) was fresh memory on every search, and its page faults made
        # the scoring 3-5x slower inside a search than alone (measured)
        buf = torch.empty_like(x)
        sums = []
        for s_w, lo_w, hi_w in zip(scale, lo, hi, strict=True):
            torch.div(x, s_w, out=buf)
            buf.round_()
            torch.minimum(buf, hi_w, out=buf)
            torch.maximum(buf, lo_w, out=buf)
            buf.mul_(s_w).sub_(x).square_()
            sums.append(buf.sum(dim=1))
        for i, row_sums in zip(members, torch.stack(sums, dim=1).tolist(), strict=True):
            out[i] = row_sums
    return out


@functools.lru_cache(maxsize=64)
def _spread_indices(n: int, count: int) -> torch.Tensor:
    """``count`` indices spread evenly over ``range(n)`` without a period (golden-ratio
    sequence), so the sample cannot alias with the tensor's channel or row layout; sorted, so
    that gathering them reads memory in order."""
    phase = torch.arange(count, dtype=torch.float64) * 0.6180339887498949 % 1.0
    return (phase * n).long().clamp_(max=n - 1).sort().values


@dataclass(frozen=True)
class _Prepared:
    """What :func:`prepare_input` keeps of one tensor: the parts to score, each with the
    factor that scales its sum up, the quantizer of each width, and the energy."""

    widths: tuple[int, ...]
    parts: tuple[tuple[torch.Tensor, float], ...]
    ranges: tuple[tuple[int, int, float], ...]
    energy: float


@dataclass(frozen=True)
class _Captured:
    """What a hook keeps of one layer input: the results of the passes that need the whole
    tensor, made while the forward pass holds it. :func:`_finish` does the rest when the pass
    ends, with the model's kernels out of the way (the same small operations took about twice
    as long between the layers of a forward pass, measured on ResNet-20)."""

    widths: tuple[int, ...]
    power_of_two: bool
    n: int
    j: int  # the threshold is the j-th largest magnitude
    energy: float
    signed: bool | None  # None: not known yet (the whole tensor was kept)
    kept: torch.Tensor  # the slices whose peak reaches ``cut``, or the whole tensor (copied)
    cut: torch.Tensor | None  # the j-th largest slice peak; None: ``kept`` is the whole tensor
    drawn: torch.Tensor | None  # the spread sample of the whole tensor (with ``cut``)


def _capture(
    x: torch.Tensor, bits: Iterable[int], power_of_two: bool, sample: int, nonnegative: bool
) -> _Captured:
    """The passes over the whole tensor: energy, slice peaks, the slices that hold the largest
    values, the spread sample (see :func:`_top`)."""
    flat = x.detach().reshape(-1)
    if flat.dtype != torch.float32:
        flat = flat.float()
    flat = flat.contiguous()
    widths = tuple(bits)
    if any(b < 2 for b in widths):
        raise ValueError(f"bits must be at least 2, got {min(widths)}")
    energy = float(torch.dot(flat, flat))
    if not math.isfinite(energy):
        raise NonFiniteError("the tensor has NaN/Inf values")
    n = flat.numel()
    k = max(1, min(n, int(round(ACT_PERCENTILE / 100 * n))))
    j = n - k + 1
    groups = _slices(n, j)
    if energy == 0.0 or n <= sample or not groups:
        # a copy: the model may change the tensor in place before the block's end scores it
        whole = flat.clone() if energy else flat[:0]
        known = False if nonnegative else None
        return _Captured(widths, power_of_two, n, j, energy, known, whole, None, None)
    signed, cut, kept = _peak_slices(flat, groups, j, nonnegative)
    drawn = flat.index_select(0, _spread_indices(n, sample).to(flat.device))
    return _Captured(widths, power_of_two, n, j, energy, signed, kept, cut, drawn)


def _finish(c: _Captured) -> _Prepared:
    """The parts to score and the quantizer of each width, from what :func:`_capture` kept."""
    if c.energy == 0.0:
        zero = tuple(_range(b, False, 0.0, c.power_of_two) for b in c.widths)
        return _Prepared(c.widths, (), zero, 0.0)
    if c.cut is None:  # scored exactly
        signed = bool(c.kept.min() < 0) if c.signed is None else c.signed
        mags = c.kept.abs() if signed else c.kept
        thr = float(mags.topk(c.j).values[-1])
        parts: tuple[tuple[torch.Tensor, float], ...] = ((c.kept, 1.0),)
    else:  # the top values exactly (signs kept), the rest through the spread sample
        assert c.signed is not None and c.drawn is not None
        signed = c.signed
        top, top_mag = _reaching(c.kept, c.cut, signed)
        thr = float(top_mag.topk(c.j).values[-1])
        cut = float(top_mag.min())
        inside = (c.drawn.abs() if signed else c.drawn) < cut
        rest = c.drawn * inside  # the top values, scored exactly above, score 0 here
        kept = int(inside.sum())
        parts = ((top, 1.0), (rest, (c.n - top.numel()) / max(kept, 1)))
    ranges = tuple(_range(b, signed, thr, c.power_of_two) for b in c.widths)
    return _Prepared(c.widths, parts, ranges, c.energy)


def prepare_input(
    x: torch.Tensor,
    bits: Iterable[int],
    power_of_two: bool,
    sample: int = SAMPLE,
    nonnegative: bool = False,
) -> _Prepared:
    """The passes over the whole tensor (energy, threshold, top values, the spread sample) that
    :func:`input_errors` needs; :func:`score` turns many of them into errors at once.
    ``nonnegative``: ``x`` is known to have no negative value (a ReLU's output), which saves the
    pass that looks for one; the result is the same."""
    return _finish(_capture(x, bits, power_of_two, sample, nonnegative))


def score(prepared: Sequence[_Prepared]) -> list[dict[int, float]]:
    """Relative errors ``||Q_b(x) - x||^2 / ||x||^2`` of prepared tensors at their widths, all
    their parts scored together (those with the same number of widths in one block)."""
    out: list[dict[int, float]] = [dict.fromkeys(p.widths, 0.0) for p in prepared]
    by_count: dict[int, list[tuple[int, int]]] = {}  # widths -> (tensor, part) pairs
    for i, p in enumerate(prepared):
        for k in range(len(p.parts)):
            by_count.setdefault(len(p.widths), []).append((i, k))
    totals = [[0.0] * len(p.widths) for p in prepared]
    for pairs in by_count.values():
        sums = _rows_sq_errors(
            [prepared[i].parts[k][0] for i, k in pairs], [prepared[i].ranges for i, _ in pairs]
        )
        for (i, k), errors in zip(pairs, sums, strict=True):
            factor = prepared[i].parts[k][1]
            totals[i] = [t + factor * e for t, e in zip(totals[i], errors, strict=True)]
    for i, p in enumerate(prepared):
        if p.parts:
            out[i] = {b: e / p.energy for b, e in zip(p.widths, totals[i], strict=True)}
    return out


def input_errors(
    x: torch.Tensor, bits: Iterable[int], power_of_two: bool, sample: int = SAMPLE
) -> dict[int, float]:
    """Relative error ``||Q_b(x) - x||^2 / ||x||^2`` of the layer input ``x`` at each width
    (see the module doc: exact top values, sampled rest). Signed if ``x`` has negative values."""
    return score([prepare_input(x, bits, power_of_two, sample)])[0]


def _module(model: nn.Module, name: str) -> nn.Module:
    try:
        return model.get_submodule(name)
    except AttributeError:
        raise OmpqError(f"the model has no layer {name!r} to measure") from None


@contextmanager
def record(
    model: nn.Module,
    widths: Mapping[str, Sequence[int]],
    power_of_two: bool,
    relu_fed: frozenset[str] = frozenset(),
) -> Iterator[ActErrorStats]:
    """While active, every forward of ``model`` measures the inputs of the layers in ``widths``
    (layer name -> activation widths to score). The first call of each layer counts; a tensor
    already scored for another layer (same storage, shape and widths) is not scored again. An
    input with NaN/Inf values is not scored: the first such layer is ``non_finite`` (the caller
    names the layer that produced them). Layers in ``relu_fed`` read a ReLU's output (no negative
    value: the search of a minimum is skipped). The hooks keep a few thousand values per input
    (:func:`_capture`); the errors are scored together when the block ends."""
    stats = ActErrorStats()
    captured: list[_Captured] = []
    which: dict[str, int] = {}  # layer -> its entry of ``captured``
    # (address, shape, strides, version, widths) -> (the tensor, its entry); a hit needs the
    # tensor alive (its memory cannot hold another tensor) and unmodified (same version)
    seen: dict[tuple[object, ...], tuple[weakref.ref, int]] = {}

    def hook(name: str) -> object:
        def run(_module: nn.Module, args: tuple[object, ...]) -> None:
            if name in which or not args or not isinstance(args[0], torch.Tensor):
                return
            start = time.perf_counter()
            x = args[0]
            key = (x.data_ptr(), tuple(x.shape), x.stride(), x._version, tuple(widths[name]))
            hit = seen.get(key)
            if hit is None or hit[0]() is None:
                try:
                    captured.append(
                        _capture(x, widths[name], power_of_two, SAMPLE, name in relu_fed)
                    )
                except NonFiniteError:
                    stats.non_finite = stats.non_finite or name
                    return
                except ValueError as exc:
                    raise OmpqError(
                        f"the input of layer {name}: {exc}; check the weights "
                        "and the input normalisation"
                    ) from None
                hit = (weakref.ref(x), len(captured) - 1)
                seen[key] = hit
            which[name] = hit[1]
            stats.seconds += time.perf_counter() - start

        return run

    handles = [_module(model, n).register_forward_pre_hook(hook(n)) for n in widths]
    try:
        yield stats
    finally:
        for h in handles:
            h.remove()
    start = time.perf_counter()
    errors = score([_finish(c) for c in captured])
    stats.errors.update({name: dict(errors[i]) for name, i in which.items()})
    stats.seconds += time.perf_counter() - start
