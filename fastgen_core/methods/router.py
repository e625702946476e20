"""The router of Multi-Student Distillation (Song et al. 2024; docs/methods.md §8): K students, each
distilled on one group of classes, combined into one model that sends each class label to the
student owning it (1 NFE for a one-step student).

A router is "trained" for zero steps by a `distill` stage (the `students` group's last stage): it
owns a copy of every exported network of each input student, `s<k>_<net>`, and nothing it steps
(no optimiser groups). Its model folder is an ordinary one (model.safetensors + model.json, loaded
by `models.load_model`); model.json records, per student, its classes and its own model.json
facts, so that `sample` rebuilds each student's view and calls that student's method:

    x[i] = sample_{k(y_i)}(z[i], nfe, y_i),    k(c) = the student whose group holds class c.

Partition (`classes`, in the order of the `students` input): disjoint, non-empty groups of class
labels that together cover 0 … C−1; None: `contiguous(C, K)`, consecutive runs whose sizes differ by at most one.
"""
from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field, field_validator
from torch import nn

from ..config import Strict
from .base import Method as _Base
from .base import Role


def contiguous(num_classes: int, k: int) -> list[list[int]]:
    """K consecutive runs of classes 0 … C−1, sizes differing by at most one (equal when K divides C)."""
    bounds = [round(i * num_classes / k) for i in range(k + 1)]
    return [list(range(bounds[i], bounds[i + 1])) for i in range(k)]


def partition_problem(groups: list[list[int]], num_classes: int | None = None) -> str | None:
    """Why `groups` is not a partition of the classes 0 … C−1 into non-empty disjoint groups (None:
    it is). Without `num_classes` only emptiness, negatives and overlaps are checked."""
    if any(not g for g in groups):
        return "a group of classes is empty"
    flat = [c for g in groups for c in g]
    if any(c < 0 for c in flat):
        return f"class labels are ≥ 0, got {sorted(c for c in flat if c < 0)}"
    twice = sorted({c for c in flat if flat.count(c) > 1})
    if twice:
        return f"classes {twice} are in more than one group (the groups must be disjoint)"
    if num_classes is not None:
        outside = sorted(c for c in flat if c >= num_classes)
        if outside:
            return f"classes {outside} do not exist (the data has classes 0 … {num_classes - 1})"
        missing = sorted(set(range(num_classes)) - set(flat))
        if missing:
            return f"classes {missing} are in no group (the groups must cover every class)"
    return None


class Config(Strict):
    name: Literal["router"] = "router"
    classes: list[list[int]] | None = Field(
        None, description="the classes of each student, in the order of the `students` input (disjoint, covering "
        "every class); None: consecutive runs whose sizes differ by at most one")

    @field_validator("classes")
    @classmethod
    def _disjoint(cls, v):
        why = v is not None and partition_problem(v)
        if why:
            raise ValueError(why)
        return v


class Method(_Base):
    """Owns a copy of each student's networks; steps nothing (`groups` is empty)."""

    roles = {"students": Role("models", description="the K students, one per class group (any generating method)")}
    needs_network = False  # the networks are the students' (stages/train.py: no `network` setting needed)

    def __init__(self, cfg: Config, ctx):
        super().__init__(cfg, ctx)
        students, C = ctx.inputs["students"], ctx.data.num_classes
        if C == 0:
            raise ValueError("a router sends class labels to students: it needs class-conditional data")
        groups = cfg.classes if cfg.classes is not None else contiguous(C, len(students))
        why = partition_problem(groups, C) or (
            None if len(groups) == len(students) else f"{len(groups)} groups of classes for {len(students)} students")
        if why:
            raise ValueError(f"router: {why}")
        self.routes = []
        for k, (student, group) in enumerate(zip(students, groups)):
            for n in student.nets:
                self.add_net(f"s{k}_{n}", student.meta_net_cfg(n), init_from=student.nets[n]).requires_grad_(False)
            facts = {key: v for key, v in student.meta.items() if key != "snapshot"}
            self.routes.append({"classes": list(group), "nets": list(student.nets), "model": facts})
        self.export = tuple(self.nets)

    def groups(self):
        return []

    def meta(self) -> dict:
        return {"students": self.routes}


def student_views(model) -> list[tuple[list[int], object]]:
    """(classes, the student as a `LoadedModel` sharing the router's networks) for each student."""
    from ..models import LoadedModel
    from ..noise import load_process

    views = []
    for k, route in enumerate(model.meta["students"]):
        nets = nn.ModuleDict({n: model.nets[f"s{k}_{n}"] for n in route["nets"]})
        views.append((route["classes"], LoadedModel(route["model"], nets, load_process(route["model"]["noise"]))))
    return views


def route(class_labels: torch.Tensor, groups: list[list[int]]) -> torch.Tensor:
    """k(y): the index of the group holding each label (−1: none does)."""
    owner = torch.full_like(class_labels, -1)
    for k, g in enumerate(groups):
        owner[torch.isin(class_labels, torch.as_tensor(g, device=class_labels.device))] = k
    return owner


@torch.no_grad()
def sample(model, z, nfe, class_labels=None):
    """Each row from the student owning its class, at `nfe` evaluations of that student."""
    if class_labels is None:
        raise ValueError("a router needs class labels: it sends each label to its student")
    views = student_views(model)
    owner = route(class_labels, [g for g, _ in views])
    if (owner < 0).any():
        raise ValueError(f"classes {sorted(set(class_labels[owner < 0].tolist()))} belong to no student")
    out = None
    for k, (_, student) in enumerate(views):
        rows = (owner == k).nonzero().flatten()
        if len(rows) == 0:
            continue
        x = student.sample(z[rows], nfe, class_labels[rows])
        out = torch.empty((len(z), *x.shape[1:]), dtype=x.dtype, device=x.device) if out is None else out
        out[rows] = x
    return out
