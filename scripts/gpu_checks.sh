#!/usr/bin/env bash
# The GPU checks of cvtrain, as one prepared script for a lent GPU machine (it has PyTorch, but no
# internet and none of hydra-core / omegaconf / mlxtend / airbench).
#
#   bash scripts/gpu_checks.sh prepare   # here, with the package registry: wheels into .whl/, the
#                                        # CIFAR-10 JPG tarball into .gpu_data/ (both git-ignored)
#   bash scripts/gpu_checks.sh run       # there: install, torchrun on nccl (one process), CUDA tests,
#                                        # the benchmark's overhead and speedrun sections (about 7 minutes)
#   bash scripts/gpu_checks.sh resnet20  # there: the ResNet-20 preset beside a plain loop, capped at
#                                        # 50 epochs a side (about 5 minutes on an H200)
#
# The device tool's call: command "bash scripts/gpu_checks.sh run", carry [".whl", ".gpu_data"],
# timeout_s 600; each command must end inside one call (10 minutes).
# Everything it measures lands in $OUT (or ./gpu_out): pytest's log, benchmark.json, the logs.
set -uo pipefail
cd "$(dirname "$0")/.."
mode=${1:-run}

if [ "$mode" = prepare ]; then
    set -e
    mkdir -p .whl .gpu_data
    # pure-Python packages the GPU image lacks (sdists for the two that have no wheel)
    python3 -m pip download -q --no-deps -d .whl hydra-core==1.3.8 omegaconf==2.3.1 mlxtend==0.25.0 \
        antlr4-python3-runtime==4.9.3 airbench==0.1.8
    cp ../shared/data/cifar10-train-jpg.tar.gz .gpu_data/
    ls -la .whl .gpu_data
    exit 0
fi

OUT=${OUT:-$PWD/gpu_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
log() { echo "== $(date +%T) $*"; }

log "install (no index: the GPU image's torch, torchvision, tensorboard; the carried wheels)"
python3 -m pip install -q --no-index --no-deps --no-build-isolation --target /tmp/site .whl/* \
    || { echo "install of the carried packages failed"; exit 1; }
python3 -m pip install -q --no-index --no-deps --no-build-isolation --target /tmp/site . \
    || { echo "install of cvtrain failed"; exit 1; }
export PYTHONPATH=/tmp/site
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, cvtrain; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())" | tee -a "$OUT/gpu.txt"

log "CIFAR-10 JPGs"
mkdir -p /tmp/cifar10 && tar xzf .gpu_data/cifar10-train-jpg.tar.gz -C /tmp/cifar10
ROOT=$(dirname "$(find /tmp/cifar10 -maxdepth 3 -type d -name airplane | head -1)")
echo "root $ROOT"

if [ "$mode" = resnet20 ]; then
    log "benchmark: the ResNet-20 preset beside a plain loop, time to 91%"
    python3 scripts/benchmark.py --cifar-root "$ROOT" --only resnet20 --resnet20-epochs 50 \
        --json "$OUT/benchmark_resnet20.json" 2>&1 | tee "$OUT/benchmark_resnet20.txt"
    log "done"
    exit 0
fi

log "nccl: torchrun with one CUDA process (cpu:gloo,cuda:nccl), 2 epochs of LeNet on CIFAR-10"
python3 -m torch.distributed.run --standalone --nproc_per_node=1 -m cvtrain data=imagefolder data.root="$ROOT" \
    model=lenet trainer.device=cuda trainer.epochs=2 trainer.viz=false hydra.run.dir=/tmp/nccl_run 2>&1 \
    | tail -5 | tee "$OUT/nccl.txt"
python3 -c "import json; print(json.load(open('/tmp/nccl_run/summary.json')))" 2>&1 | tee -a "$OUT/nccl.txt"
# a world of one joins no process group in cvtrain: the backend itself, with cvtrain's init, on a world of one
MASTER_ADDR=127.0.0.1 MASTER_PORT=29533 python3 -c "
import torch, torch.distributed as dist, datetime
dist.init_process_group('cpu:gloo,cuda:nccl', rank=0, world_size=1, timeout=datetime.timedelta(seconds=60))
t = torch.ones(4, device='cuda'); dist.all_reduce(t); torch.cuda.synchronize()
print('nccl all_reduce on cuda:', t.tolist(), 'nccl version', torch.cuda.nccl.version())
dist.destroy_process_group()" 2>&1 | tee -a "$OUT/nccl.txt"

log "CUDA tests (the ones that skip without CUDA, and the speed options)"
python3 -m pytest -q -p no:cacheprovider tests/test_speed.py tests/test_benchmark.py 2>&1 | tail -20 | tee "$OUT/pytest.txt"

log "benchmark: overhead on CUDA, the speedrun preset beside airbench94 (5 seeds each)"
python3 scripts/benchmark.py --cifar-root "$ROOT" --only overhead,speedrun --seeds 5 \
    --json "$OUT/benchmark.json" 2>&1 | tee "$OUT/benchmark.txt"
log "done"
