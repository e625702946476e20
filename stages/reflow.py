"""Stage group `reflow`: R rounds of rectified-flow reflow declared once (docs/methods.md §13).

A declaration

    reflow:
      kind: reflow
      inputs: {teacher: rf1}        # the 1-RF (a stage of method rf)
      rounds: 2
      pairs: {n_pairs: 5000}        # the pair stage of every round
      method: {name: rf}            # the k-RF of every round
      train: {...}
      distill: {train: {...}}       # optional: a one-step distilled student of every flow

expands (`Spec.expand`) into ordinary stages, round k = 1..R taking the previous flow F_{k−1}
(F_0 = the teacher):

    <name>_pairs<k>   ode_pairs   the deterministic couplings (z0, F_{k−1}(z0))
    <name>_<k>        distill     the (k+1)-RF: method rf on those pairs, initialised from F_{k−1}

where the last round's flow carries the group's name, `<name>` (what other stages' inputs naming the
group receive). With `distill`, every flow F_{k−1}, k = 1..R+1, also gets a one-step student
`<name>_distill<k>` (method rf, `t_schedule: t0`) trained on F_{k−1}'s pairs `<name>_pairs<k>` and
initialised from F_{k−1} (RF's "k-RF + distill"); distilling the last flow adds `<name>_pairs<R+1>`.
The group itself never runs.
"""
from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from fastgen_core.config import FieldError, NetworkConfig, Strict, TrainConfig
from fastgen_core.methods import rf
from fastgen_core.noise import NoiseProcess

from . import ode_pairs, train
from .spec import StageError, StageSpec, one_input


class DistillConfig(Strict):
    """The one-step students (RF's distillation: t fixed at ε_t, regress z0 + v(z0) onto the pair's sample)."""

    train: TrainConfig = Field(default_factory=TrainConfig, description="training-loop settings of each student")
    metric: Literal["l2", "pseudo_huber"] = Field("l2", description="distance of the one-step regression")


class Spec(StageSpec):
    """R reflow rounds from the `teacher` input (a rectified flow), expanded into ode_pairs and distill stages."""

    kind: Literal["reflow"]
    rounds: int = Field(2, ge=1, le=10, description="reflow rounds R: the last flow is the (R+1)-RF")
    pairs: ode_pairs.PairsConfig = Field(default_factory=ode_pairs.PairsConfig,
                                         description="the pair stage of every round (couplings of the previous flow)")
    method: rf.Config = Field(default_factory=rf.Config, description="the k-RF of every round (method rf)")
    network: NetworkConfig | None = Field(None, description="network of every flow (None: the teacher's, "
                                          "as the flows start from its weights)")
    train: TrainConfig = Field(default_factory=TrainConfig, description="training-loop settings of every round")
    noise: NoiseProcess | None = Field(None, description="noise process of every flow (None: the recipe's; "
                                       "rf trains in `flow`)")
    distill: DistillConfig | None = Field(None, description="one-step students of every flow (None: none)")

    @model_validator(mode="after")
    def _one_teacher(self):
        if set(self.inputs) != {"teacher"} or one_input(self, "teacher") is None:
            raise FieldError("inputs", "a reflow group takes one input, `teacher`: the flow (method rf) "
                             "whose couplings the first round reflows")
        if self.method.t_schedule != "uniform":
            raise FieldError("method.t_schedule", "the rounds' flows train on uniform t; one-step "
                             "students are declared with `distill`")
        return self

    def expand(self, name: str, recipe) -> dict[str, StageSpec]:
        def flow(prev: str, pairs: str, method: rf.Config, tr: TrainConfig) -> train.Spec:
            return train.Spec(kind="distill", inputs={"pairs": pairs, "teacher": prev}, method=method,
                              network=self.network, train=tr, noise=self.noise)

        def pair_stage(prev: str) -> ode_pairs.Spec:
            return ode_pairs.Spec(kind="ode_pairs", inputs={"teacher": prev}, pairs=self.pairs)

        out: dict[str, StageSpec] = {}
        flows = [self.inputs["teacher"]]  # F_0, F_1, ..., F_R
        for k in range(1, self.rounds + 1):
            out[f"{name}_pairs{k}"] = pair_stage(flows[-1])
            flows.append(name if k == self.rounds else f"{name}_{k}")
            out[flows[-1]] = flow(flows[-2], f"{name}_pairs{k}", self.method, self.train)
        if self.distill is not None:
            out[f"{name}_pairs{self.rounds + 1}"] = pair_stage(name)
            student = self.method.model_copy(update={"t_schedule": "t0", "metric": self.distill.metric})
            for k in range(1, self.rounds + 2):
                out[f"{name}_distill{k}"] = flow(flows[k - 1], f"{name}_pairs{k}", student, self.distill.train)
        out[name] = out.pop(name)  # the group's own name last
        return out


def run(ctx) -> None:
    raise StageError(f"{ctx.recipe.path}: stages.{ctx.name}: a reflow group is expanded into its stages "
                     "when the recipe is loaded and never runs itself")
