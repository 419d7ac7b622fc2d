"""The learning-rate plan of a fine-tuning run and what resuming it with other options means.

A run follows half a cosine from its learning rate down to 0 at its last epoch. Resuming with the
same ``epochs`` keeps that plan (the result equals an uninterrupted run; a finished run then has
nothing left to train, and the caller decides whether writing its model is wanted). Resuming an
unfinished run with another ``epochs`` re-plans from the saved epoch: half a cosine from the rate
reached there down to 0 at the new last epoch, so the rate never climbs back up. Another
``epochs`` on a finished run, or one not beyond the saved epoch, has nothing to run and is
refused, as is a change of learning rate, batch size, seed, process count or training set.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import asdict, dataclass
from typing import Any

from ompq_plugin.errors import OmpqError


@dataclass(frozen=True)
class CosineSegment:
    """Learning rate from ``start_lr`` at optimizer step ``start_step`` down to 0 at ``end_step``
    (half a cosine; constant 0 after it: the rate never rises again)."""

    start_step: int
    start_lr: float
    end_step: int

    def lr(self, step: int) -> float:
        span = self.end_step - self.start_step
        if span <= 0:
            return 0.0
        t = min(max(step - self.start_step, 0), span) / span
        return self.start_lr * 0.5 * (1.0 + math.cos(math.pi * t))


@dataclass(frozen=True)
class TrainingPlan:
    """What a run was started with; a resume must match it (except ``epochs``)."""

    epochs: int
    lr: float
    batch_size: int
    steps_per_epoch: int
    seed: int
    world_size: int
    schedule: CosineSegment

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @staticmethod
    def from_json(data: dict[str, Any]) -> TrainingPlan:
        return TrainingPlan(**{**data, "schedule": CosineSegment(**data["schedule"])})


@dataclass(frozen=True)
class ResumePoint:
    """Where a checkpoint stands: ``epoch`` of ``plan.epochs`` done."""

    epoch: int
    plan: TrainingPlan

    @property
    def finished(self) -> bool:
        return self.epoch >= self.plan.epochs


def check_epochs(
    point: ResumePoint, epochs: int, where: str = "the checkpoint", output: str = "OUTPUT"
) -> None:
    """Refuse an ``epochs`` that leaves a resumed run nothing to do, naming the fix."""
    saved = point.plan
    if point.finished and epochs == saved.epochs:
        return  # nothing left to train; the caller may still want the final model
    if point.finished:
        raise OmpqError(
            f"{where} finished all {saved.epochs} epochs (learning rate annealed to 0), so "
            f"--resume --epochs {epochs} has nothing to run; nothing was written. To train "
            "further, fine-tune the written model file in a new run: "
            f"`ompq train {output} --epochs N -o NEW` (without --resume)"
        )
    if epochs <= point.epoch:
        raise OmpqError(
            f"{where} has already run {point.epoch} of {saved.epochs} epochs, so --epochs "
            f"{epochs} has nothing to run; nothing was written. Pass --epochs {saved.epochs} to "
            f"finish its plan (or any value above {point.epoch})"
        )


def resume_plan(
    point: ResumePoint,
    epochs: int,
    lr: float,
    batch_size: int,
    steps_per_epoch: int,
    seed: int,
    world_size: int,
    where: str = "the checkpoint",
) -> TrainingPlan:
    """The plan a resumed run follows, or an :class:`OmpqError` saying why it cannot resume.

    A finished run resumed with its own ``epochs`` keeps its plan (nothing left to train)."""
    check_epochs(point, epochs, where)
    saved = point.plan
    mismatch = [
        (flag, was, now)
        for flag, was, now in (
            ("--lr", saved.lr, lr),
            ("--batch-size", saved.batch_size, batch_size),
            ("--seed", saved.seed, seed),
            ("processes (torchrun)", saved.world_size, world_size),
            (
                "steps per epoch (training images / batch size)",
                saved.steps_per_epoch,
                steps_per_epoch,
            ),
        )
        if was != now
    ]
    if mismatch:
        flag, was, now = mismatch[0]
        raise OmpqError(
            f"{where} was trained with {flag} {was}, this run has {now}; resume with the same "
            f"{flag} (and the same training images), or drop --resume to start again"
        )
    if epochs == saved.epochs:
        return saved
    start = point.epoch * steps_per_epoch
    segment = CosineSegment(start, saved.schedule.lr(start), epochs * steps_per_epoch)
    return dataclasses.replace(saved, epochs=epochs, schedule=segment)
