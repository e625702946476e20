"""Group kind `students`: Multi-Student Distillation (Song et al. 2024; docs/methods.md §8), declared once.

    msd:
      kind: students
      inputs: {teacher: teacher}                  # and any other input of the student method (shared by all)
      students: {k: 4, partition: contiguous, size: same}   # partition: contiguous | [[0, 1, 2], …]
      method: {name: dmd2, ratio: 5}              # the student method (any distillation method)
      network: {…}                                # size smaller: the students' (smaller) network
      train: {steps: 2000, …}                     # each student's training
      tsm: {train: {steps: 1000, …}}              # size smaller: Teacher Score Matching first (optional)
      gan: {method: {gan_gen_weight: 3e-3}, train: {steps: 500, …}}   # then DM + GAN (optional)

expands (`StageSpec.expand`) into ordinary stages:
- `msd_tsm_<k>` (size smaller with `tsm`): method `tsm` (fastgen_core/methods/tsm.py), the student's
  network regressing the teacher's denoiser on noised real data of group k;
- `msd_<k>`, k = 0 … K−1: a `distill` stage of the student method trained only on group k's classes
  (`classes` of stages/train.py: the data is filtered, input pair sets are not — the paper shares
  the regression set); a smaller student starts from its TSM stage (`warm_start` input) or, without
  `tsm`, from random weights;
- `msd_gan_<k>` (with `gan`): MSD's last phase, DM + GAN: the student method with `gan: true` (and
  the phase's other method settings), its generator started from `msd_<k>`'s exported weights
  (`warm_start`), its fake critic from `msd_<k>`'s live critic (as DMD2's code resumes), the
  classifier head from scratch; the router then combines these;
- `msd`: the router (fastgen_core/methods/router.py), a zero-step `distill` stage that copies the
  K students into one model sending each class label to its student (1 NFE for one-step students),
  evaluated, sampled and registered like any model.
The members are ordinary stages everywhere (dvc.yaml, the flow, digests); this module's `run` is
never called.
"""
from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, ValidationError, model_validator

from fastgen_core.config import FieldError, NetworkConfig, Strict, TrainConfig
from fastgen_core.methods.router import Config as RouterConfig
from fastgen_core.methods.router import contiguous, partition_problem
from fastgen_core.methods.tsm import Config as TSMConfig
from fastgen_core.noise import NoiseProcess

from . import train
from .spec import MethodConfig, Problem, StageError, StageSpec

# roles the expansion sets itself (the router's, and a smaller student's TSM start)
OWN_ROLES = ("students", train.WARM_START)


class Students(Strict):
    """How many students, which classes each gets, and their size."""

    k: int = Field(..., ge=1, description="K: the number of students")
    partition: Literal["contiguous"] | list[list[int]] = Field(
        "contiguous", description="contiguous: K consecutive runs of classes of equal size (up to one class when K "
        "does not divide the classes); or the K groups of class labels explicitly (disjoint, covering every class, "
        "sizes differing by at most one)")
    size: Literal["same", "smaller"] = Field(
        "same", description="same: each student is the teacher's network, started from the teacher; smaller: the "
        "group's `network`, started from its TSM stage (or from random weights without `tsm`)")

    @model_validator(mode="after")
    def _groups(self):
        if self.partition == "contiguous":
            return self
        if len(self.partition) != self.k:
            raise FieldError("partition", f"{len(self.partition)} groups of classes for k = {self.k} students")
        why = partition_problem(self.partition)
        if why:
            raise FieldError("partition", why)
        if not balanced(self.partition):
            raise FieldError("partition", f"groups of sizes {[len(g) for g in self.partition]}: MSD splits the "
                             "classes into groups of equal size (up to one class when k does not divide them)")
        return self


class TSMStage(Strict):
    """Teacher Score Matching of each smaller student before its distillation (docs/methods.md §8)."""

    method: TSMConfig = Field(default_factory=TSMConfig, description="the tsm method's settings")
    train: TrainConfig = Field(default_factory=TrainConfig, description="each TSM stage's training-loop settings")


class GANPhase(Strict):
    """DM + GAN after DM (MSD's last phase, docs/methods.md §8): each student trained again from its DM
    stage with the method's GAN term switched on."""

    method: dict[str, Any] = Field(default_factory=dict, description="the students' method settings that change "
                                   "in this phase (gan: true is set; e.g. gan_gen_weight, gan_noised)")
    train: TrainConfig = Field(default_factory=TrainConfig, description="each DM + GAN stage's training-loop settings")


class Spec(StageSpec):
    """K students of one method, each on its class group, and the router that combines them."""

    kind: Literal["students"]
    students: Students = Field(..., description="{k, partition, size}")
    method: MethodConfig = Field(..., description="the students' method (e.g. dmd2); every student gets it")
    network: NetworkConfig | None = Field(None, description="size smaller: the students' network (size same: none, "
                                          "the students copy the teacher's)")
    train: TrainConfig = Field(default_factory=TrainConfig, description="each student's training-loop settings")
    noise: NoiseProcess | None = Field(None, description="the students' noise process (None: the recipe's)")
    tsm: TSMStage | None = Field(None, description="size smaller: a TSM stage before each student (None: none)")
    gan: GANPhase | None = Field(None, description="a DM + GAN stage after each student's DM stage, started from it "
                                 "(None: none; the students' method must have a GAN term)")

    @model_validator(mode="after")
    def _consistent(self):
        if not isinstance(self.inputs.get("teacher"), str):
            raise FieldError("inputs", "a students group needs one `teacher` input (the teacher of every student)")
        own = [r for r in OWN_ROLES if r in self.inputs]
        if own:
            raise FieldError("inputs", f"the group sets {', '.join(own)} itself: remove it")
        if self.students.size == "same":
            if self.network is not None:
                raise FieldError("network", "size same: the students copy the teacher's network; remove network "
                                 "or set students.size: smaller")
            if self.tsm is not None:
                raise FieldError("tsm", "TSM warms up smaller students: remove tsm or set students.size: smaller")
        else:
            if self.network is None:
                raise FieldError("network", "size smaller: give the students' network")
            if "init_from_teacher" not in type(self.method).model_fields:
                raise FieldError("method.name", f"size smaller needs a student method that can start from other "
                                 f"weights than the teacher's (a setting init_from_teacher); {self.method.name!r} "
                                 "has none")
        if self.gan is not None:
            self._gan_method()
        return self

    def _gan_method(self) -> MethodConfig:
        """The students' method with the GAN phase's changes (gan: true), validated as one."""
        fields = type(self.method).model_fields
        if "gan" not in fields or "init_from_teacher" not in fields:
            raise FieldError("gan", f"a DM + GAN phase needs a student method with a GAN term that can start from "
                             f"other weights than the teacher's (settings gan, init_from_teacher); "
                             f"{self.method.name!r} has not")
        bad = sorted(set(self.gan.method) - set(fields) | {"name", "init_from_teacher"} & set(self.gan.method))
        if bad:
            raise FieldError("gan.method", f"{', '.join(bad)}: not a setting of {self.method.name!r} this phase can "
                             "change")
        try:
            return type(self.method).model_validate({**self.method.model_dump(), **self.gan.method, "gan": True,
                                                     "init_from_teacher": False})
        except ValidationError as e:
            err = e.errors()[0]
            raise FieldError("gan.method." + ".".join(map(str, err["loc"])), err["msg"]) from None

    def expand(self, name: str, recipe) -> dict[str, StageSpec]:
        C, p = num_classes(recipe.data), self.students.partition
        # unknown or unusable class counts expand into empty groups, which `Route.problems` reports
        groups = [list(g) for g in p] if p != "contiguous" else contiguous(C, self.students.k) if C else \
            [[] for _ in range(self.students.k)]
        if C and partition_problem(groups, C):  # reported once, by the router (`Route.problems`)
            groups = [[] for _ in groups]
        method = self.method
        if self.students.size == "smaller":
            method = method.model_copy(update={"init_from_teacher": False})
        gan_method = self._gan_method() if self.gan is not None else None
        members: dict[str, StageSpec] = {}
        for k, group in enumerate(groups):
            inputs = dict(self.inputs)
            if self.tsm is not None:
                members[f"{name}_tsm_{k}"] = train.Spec(
                    kind="distill", inputs={"teacher": self.inputs["teacher"]}, method=self.tsm.method,
                    network=self.network, train=self.tsm.train, noise=self.noise, classes=group or None)
                inputs[train.WARM_START] = f"{name}_tsm_{k}"
            members[f"{name}_{k}"] = train.Spec(
                kind="distill", inputs=inputs, method=method, network=self.network, train=self.train,
                noise=self.noise, classes=group or None)
            if gan_method is not None:
                members[f"{name}_gan_{k}"] = train.Spec(
                    kind="distill", inputs={**self.inputs, train.WARM_START: f"{name}_{k}"}, method=gan_method,
                    network=self.network, train=self.gan.train, noise=self.noise, classes=group or None)
        last = f"{name}_gan" if gan_method is not None else name
        members[name] = Route(kind="distill", inputs={"students": [f"{last}_{k}" for k in range(len(groups))]},
                              method=RouterConfig(classes=groups if all(groups) else None),
                              train=TrainConfig(steps=0), noise=self.noise)
        members[name]._partition = (p, C)
        return members


def balanced(groups: list[list[int]]) -> bool:
    """Groups of equal size, up to one class (K groups of C classes when K does not divide C)."""
    sizes = [len(g) for g in groups]
    return max(sizes) - min(sizes) <= 1


def num_classes(data) -> int | None:
    """The class count of conditional data as far as the settings tell without loading images
    (None: unknown until loaded, or 0 for unconditional data)."""
    if not data.conditional:
        return 0
    if data.kind == "digits" or (data.kind == "images" and data.name in ("cifar10", "mnist")):
        return 10  # fixed class sets; an image folder's classes are its subfolders, known once listed
    if data.kind == "toy":
        from fastgen_core.data import cached_data

        return cached_data(data).num_classes
    return None


class Route(train.Spec):
    """The group's router stage: a zero-step `distill` stage of method `router`, whose settings (and
    params digest) are those of any such stage; it also checks the partition against the data."""

    _partition: tuple = (None, None)  # (the declaration's partition, the data's class count)

    def problems(self, recipe, name: str) -> list[Problem]:
        at = f"stages.{name}.students"
        partition, C = self._partition
        if C == 0:
            return [(at, "MSD splits class labels among the students: it needs class-conditional data "
                     "(data.conditional: true)")]
        groups = self.method.classes or (partition if partition != "contiguous" else [])
        if C is None and partition == "contiguous":
            return [(f"{at}.partition", "the class count of this data is known once loaded: give the groups "
                     "explicitly")]
        if C is not None:
            why = partition_problem(groups, C) if groups else f"k = {len(self.inputs['students'])} students for {C} classes"
            if why:
                return [(f"{at}.partition", why)]
            if not balanced(groups):
                return [(f"{at}.partition", f"groups of sizes {[len(g) for g in groups]}: MSD splits the classes "
                         "into groups of equal size (up to one class when k does not divide them)")]
        return super().problems(recipe, name)


def run(ctx) -> None:
    raise StageError(f"stage {ctx.name}: a students group is expanded into its stages and never run itself")
