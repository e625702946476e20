#!/usr/bin/env bash
# The one short check a session with a GPU runs (issue 10): the loop's GPU path on real hardware.
#
#   1. bench/throughput.py on cuda, fp32 and bf16: the loop against a bare PyTorch loop (target
#      >= 0.95x) and sampling samples/s;
#   2. a short CIFAR-10-shaped run of params/cifar10_consistency.yaml's teacher and CD stages on a
#      CIFAR-10-format dataset written on the spot (tests/image_data.py write_cifar10), at the
#      paper's network (DDPM++ as in the recipe) with few steps, bf16, through Ray Train with one
#      GPU worker (NCCL process group, device from ray.train.torch.get_device()); then the same
#      teacher resumed from a checkpoint cut half-way must equal the uninterrupted one bit for bit
#      (the CUDA generators travel in the checkpoint).
#
# Everything it writes goes under $OUT (default /tmp/gpu_check): throughput_*.json, the recipe, the
# stages' logs and times, resume.json. About 6-8 minutes on one H100/H200-class GPU (most of it
# Ray's start and the first CUDA/cuDNN kernels). Usage, from the repository root:
#   OUT=/tmp/gpu_check bash bench/gpu_check.sh
set -euo pipefail
PY=${PYTHON:-.venv/bin/python}
OUT=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-4}
{ uptime; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
  "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.is_available())"; } \
  | tee "$OUT/machine.txt"

# 1. throughput (bigger batches per step than on CPU are not needed: the ratio is what is checked)
for prec in fp32 bf16; do
  "$PY" bench/throughput.py --device cuda --precision "$prec" --steps 50 --repeats 5 \
    --out "$OUT/throughput_cuda_$prec.json" | tee "$OUT/throughput_cuda_$prec.txt"
done

# 2. CIFAR-10-shaped teacher + CD: recipe and data made here
WORK=$(mktemp -d)
"$PY" - "$WORK" "$OUT" <<'EOF'
import sys
from pathlib import Path

import yaml

sys.path[:0] = [".", "tests"]
from image_data import write_cifar10  # noqa: E402

work, out = Path(sys.argv[1]), Path(sys.argv[2])
write_cifar10(work / "data", n_train=2560, n_test=512, seed=0)
raw = yaml.safe_load(Path("params/cifar10_consistency.yaml").read_text())
raw["name"] = "gpu_check"
raw["data"]["root"] = str(work / "data")
raw["stages"] = {k: raw["stages"][k] for k in ("teacher", "cd")}
for k, steps in (("teacher", 400), ("cd", 200)):
    tr = raw["stages"][k]["train"]
    tr.update(steps=steps, batch_size=128, ckpt_every=steps // 2, log_every=50, precision="bf16")
    tr.pop("lr_warmup", None)
raw["compute"] = {"backend": "ray", "use_gpu": True, "num_workers": 1, "cpus_per_worker": 4}
raw["storage"] = {"root": str(work / "outputs")}
raw["tracking"] = {"enabled": False}
(out / "gpu_check.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
EOF
for stage in teacher cd; do
  t0=$(date +%s.%N)
  "$PY" -m stages.run "$OUT/gpu_check.yaml" "$stage" > "$OUT/$stage.log" 2>&1 || { tail -30 "$OUT/$stage.log"; exit 1; }
  echo "$stage $(echo "$(date +%s.%N) - $t0" | bc) s" | tee -a "$OUT/stage_times.txt"
done

# 3. exact resume on the GPU (fp32 and bf16): the loop alone, the EDM teacher on the same data
"$PY" - "$WORK" "$OUT" <<'EOF'
import json, sys
from pathlib import Path

import torch

sys.path.insert(0, ".")
from fastgen_core import loop
from fastgen_core.config import DataConfig, NetworkConfig, TrainConfig
from fastgen_core.data import load_data
from fastgen_core.methods import edm
from fastgen_core.methods.base import Context
from fastgen_core.noise import EDM

work, out = Path(sys.argv[1]), Path(sys.argv[2])
data = load_data(DataConfig(kind="images", name="cifar10", root=str(work / "data")))
net = NetworkConfig(arch="unet", width=64, depth=1, channel_mult=[1, 2, 2], emb_dim=256)
res = {}
for prec in ("fp32", "bf16"):
    def method():
        torch.manual_seed(0)
        return edm.Method(edm.Config(), Context(data, EDM(), net, device=torch.device("cuda")))
    cfg = TrainConfig(steps=40, batch_size=64, ckpt_every=20, log_every=10, precision=prec)
    full = loop.train(method(), cfg, work / f"a_{prec}", progress=False)
    loop.train(method(), cfg.model_copy(update={"steps": 20}), work / f"b_{prec}", progress=False)
    keys = torch.load(work / f"b_{prec}" / "last.pt", weights_only=True)["rng_states"][0]
    resumed = loop.train(method(), cfg, work / f"b_{prec}", progress=False)
    res[prec] = {"bitwise_equal": all(torch.equal(full["net"][k], resumed["net"][k]) for k in full["net"]),
                 "rng_keys": sorted(keys), "cuda_states": len(keys["cuda"])}
print(res)
(out / "resume.json").write_text(json.dumps(res, indent=2))
EOF
rm -rf "$WORK"
uptime | tee -a "$OUT/machine.txt"
