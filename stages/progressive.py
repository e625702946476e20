"""Group kind `progressive`: the rounds of progressive distillation (docs/methods.md §9), declared once.

    pd:
      kind: progressive
      inputs: {teacher: wstudent}
      rounds: {teacher_steps: 64, student_steps: 1}
      method: {w_min: 0.0, w_max: 4.0}        # fastgen_core/methods/progressive.py, without N
      train: {steps: 600, ...}                 # each round's training

expands (`StageSpec.expand`) into one `distill` stage of method `progressive` per round, the
student's N halving from teacher_steps/2 to student_steps: `pd_32`, `pd_16`, …, `pd_2`, `pd` (the
last carries the group's name, so an input naming `pd` gets the final student). Each round's
`teacher` input is the previous round's student (the first round's: the group's `teacher`).
The member stages are ordinary stages everywhere (dvc.yaml, the flow, digests); this module's
`run` is never called.

Each round's learning rate is annealed linearly to 0 over its steps (`train.lr_schedule:
linear_decay`, as Salimans & Ho 2022 and their public distillation configs: Adam, no warmup, a
linear anneal over each round's updates); the group sets it unless `train` sets `lr_schedule` itself.
"""
from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from fastgen_core.config import FieldError, NetworkConfig, Strict, TrainConfig
from fastgen_core.methods.progressive import Config as ProgressiveConfig
from fastgen_core.noise import NoiseProcess

from . import train
from .spec import StageError, StageSpec, one_input


class Rounds(Strict):
    """The sampler steps of the first round's teacher and of the last round's student."""

    teacher_steps: int = Field(..., ge=2, description="the first round's teacher steps (its student takes half)")
    student_steps: int = Field(1, ge=1, description="the last round's student steps")

    @model_validator(mode="after")
    def _halving(self):
        n = self.teacher_steps
        while n > self.student_steps and n % 2 == 0:
            n //= 2
        if n != self.student_steps or self.teacher_steps <= self.student_steps:
            raise FieldError("student_steps", f"teacher_steps ({self.teacher_steps}) must be student_steps "
                             f"({self.student_steps}) times a power of two ≥ 2: each round halves the steps")
        return self

    def Ns(self) -> list[int]:
        """N of each round's student: teacher_steps/2, teacher_steps/4, …, student_steps."""
        out, n = [], self.teacher_steps
        while n > self.student_steps:
            n //= 2
            out.append(n)
        return out


class Spec(StageSpec):
    """Rounds of progressive distillation from the `teacher` input (one distill stage each)."""

    kind: Literal["progressive"]
    rounds: Rounds = Field(..., description="{teacher_steps, student_steps}: the students' N halves each round "
                           "from teacher_steps/2 down to student_steps")
    method: ProgressiveConfig = Field(default_factory=ProgressiveConfig,
                                      description="the progressive method's settings, except N (set per round)")
    network: NetworkConfig | None = Field(None, description="network of the students (None: the teacher's)")
    train: TrainConfig = Field(default_factory=TrainConfig, description="each round's training-loop settings "
                               "(lr_schedule, unless set: linear_decay, the paper's anneal to 0 within each round)")
    noise: NoiseProcess | None = Field(None, description="the rounds' noise process (None: the recipe's)")

    @model_validator(mode="after")
    def _paper_lr_schedule(self):
        if "lr_schedule" not in self.train.model_fields_set:
            self.train = self.train.model_copy(update={"lr_schedule": "linear_decay"})
        return self

    @model_validator(mode="after")
    def _n_per_round(self):
        if "N" in self.method.model_fields_set:
            raise FieldError("method.N", "N is set per round from `rounds`: remove it")
        if set(self.inputs) != {"teacher"} or one_input(self, "teacher") is None:
            raise FieldError("inputs", "a progressive group takes one input, `teacher` (the first round's teacher)")
        return self

    def expand(self, name: str, recipe) -> dict[str, StageSpec]:
        members, teacher = {}, self.inputs["teacher"]
        Ns = self.rounds.Ns()
        for N in Ns:
            member = name if N == Ns[-1] else f"{name}_{N}"
            members[member] = train.Spec(
                kind="distill", inputs={"teacher": teacher},
                method=self.method.model_copy(update={"N": N}), network=self.network,
                train=self.train, noise=self.noise)
            teacher = member
        return members


def run(ctx) -> None:
    raise StageError(f"stage {ctx.name}: a progressive group is expanded into its rounds and never run itself")
