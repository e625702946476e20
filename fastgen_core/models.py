"""Trained-model artifacts: `model.safetensors` (evaluation-EMA weights) + `model.json` (how to
rebuild and sample it), and for methods with `resume` networks `resume.safetensors` (their live
training weights, which a stage warm-started from the model loads: DMD2's fake critic). Loading
never unpickles: safetensors holds tensors only."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from .config import NetworkConfig
from .noise import EDMDenoiser, Process, load_process


@dataclass
class LoadedModel:
    meta: dict
    nets: nn.ModuleDict
    noise: Process  # the process the model was trained in (fastgen_core.noise)

    @property
    def method(self) -> ModuleType:
        from .methods import get_method

        return get_method(self.meta["method"])

    @property
    def cfg(self):
        return self.method.Config.model_validate(self.meta["method_config"])

    @property
    def num_classes(self) -> int:
        return self.meta["num_classes"]

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.meta["shape"])

    def meta_net_cfg(self, name: str = "net") -> NetworkConfig:
        """The NetworkConfig network `name` was built from (students copy their teacher's)."""
        return NetworkConfig.model_validate(self.meta["networks"][name])

    def denoiser(self, name: str = "net") -> EDMDenoiser:
        """The EDM x0-predictor D(x, σ) of network `name` (teachers, critics)."""
        return EDMDenoiser(self.nets[name], self.noise)

    @torch.no_grad()
    def sample(self, z: torch.Tensor, nfe: int, class_labels: torch.Tensor | None = None) -> torch.Tensor:
        """Generate from standard-normal z (the sampler scales it by σ_max) with `nfe` evaluations."""
        return self.method.sample(self, z, nfe, class_labels)


def snapshot_dir(model_dir: str | Path, step: int) -> Path:
    """Where a training stage saves the EMA snapshot taken at `step` (a model folder)."""
    return Path(model_dir) / "snapshots" / f"step_{step:06d}"


RESUME = "resume.safetensors"


def _flat(states: dict[str, dict]) -> dict[str, torch.Tensor]:
    return {f"{n}.{k}": v.detach().cpu().contiguous().clone() for n, sd in states.items() for k, v in sd.items()}


def _read(file: Path, device) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(file), device=str(device))
    except SafetensorError as e:  # e.g. a pickle put in its place: never unpickled, refused
        raise ValueError(f"{file}: not a safetensors file, refusing to load it ({e})") from None


def save_model(out: Path, method_name: str, method_cfg, net_cfgs: dict[str, NetworkConfig],
               states: dict[str, dict], shape, num_classes: int, noise: Process, extra: dict | None = None) -> None:
    save_file(_flat(states), str(Path(out) / "model.safetensors"))
    meta = {
        "method": method_name,
        "method_config": method_cfg.model_dump(mode="json"),
        "networks": {n: net_cfgs[n].model_dump(mode="json") for n in states},
        "shape": list(shape),
        "num_classes": num_classes,
        "noise": noise.model_dump(mode="json"),
        **(extra or {}),
    }
    (Path(out) / "model.json").write_text(json.dumps(meta, indent=2))


def load_model(path: str | Path, device: str | torch.device = "cpu") -> LoadedModel:
    from .nets import build_network

    path = Path(path)
    meta = json.loads((path / "model.json").read_text())
    tensors = _read(path / "model.safetensors", device)
    nets = nn.ModuleDict()
    for name, ncfg in meta["networks"].items():
        net = build_network(NetworkConfig.model_validate(ncfg), tuple(meta["shape"]), meta["num_classes"])
        prefix = name + "."
        net.load_state_dict({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)})
        nets[name] = net.to(device).eval().requires_grad_(False)
    return LoadedModel(meta, nets, load_process(meta["noise"]))


def save_resume(out: Path, states: dict[str, dict]) -> None:
    """The live weights of a method's `resume` networks beside its model (nothing when it has none)."""
    if states:
        save_file(_flat(states), str(Path(out) / RESUME))


def load_resume(path: str | Path, device: str | torch.device = "cpu") -> dict[str, dict]:
    """{network: live state dict} saved beside the model at `path` ({} when it has none)."""
    file = Path(path) / RESUME
    if not file.exists():
        return {}
    states: dict[str, dict] = {}
    for key, v in _read(file, device).items():
        name, _, k = key.partition(".")
        states.setdefault(name, {})[k] = v
    return states
