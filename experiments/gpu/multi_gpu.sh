# 1 GPU vs 2-GPU DDP vs 2-GPU FSDP (same recipe, global batch 16, 40 steps), FSDP resume, FSDP bf16; logs into $OUT.
# Run from the repository root on a 2-GPU machine: OUT=/tmp/out bash experiments/gpu/multi_gpu.sh (numbers in docs/results/distill/multi-gpu.json).
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader; date -u
[ -d .whl ] && python3 -m pip install -q --no-index --no-deps --find-links .whl pillow accelerate==1.15.0 pytest pluggy iniconfig 2>&1 | grep -v WARNING | tail -2
python3 -c "import torch, accelerate, transformers; print('torch', torch.__version__, 'accelerate', accelerate.__version__, 'transformers', transformers.__version__)"
python3 -m matvlm_cli.world --output /tmp/w --seed 0 --train-size 2000 | tail -1
cat > /tmp/r.yaml <<'Y'
data: [{json: /tmp/w/train/conversations.json, image_root: /tmp/w/train}]
model_max_length: 512
optimizer: {lr: 1.0e-3, warmup_steps: 5, decay_steps: 10, max_grad_norm: 1.0}
training: {max_steps: 40, batch_size: 16, seed: 0}
output: {dir: /tmp/one, log_every: 5, save_every: 20}
Y
run() { name=$1; shift; /usr/bin/time -f "$name wall %e s" timeout 120 "$@" > $OUT/$name.log 2>&1; echo "$name rc $?"; tail -2 $OUT/$name.log | cut -c1-220
  cp /tmp/$name/log.jsonl $OUT/$name.jsonl 2>/dev/null; cp /tmp/$name/summary.json $OUT/$name-summary.json 2>/dev/null; }
run one python3 -m matvlm_cli distill /tmp/r.yaml
run ddp accelerate launch --num_processes 2 --multi_gpu -m matvlm_cli distill /tmp/r.yaml --set training.batch_size=8 --set output.dir=/tmp/ddp
run fsdp python3 -m matvlm_cli distill /tmp/r.yaml --num-gpus 2 --set training.distributed=fsdp --set training.batch_size=8 --set output.dir=/tmp/fsdp
run fsdp-resumed python3 -m matvlm_cli distill /tmp/r.yaml --num-gpus 2 --set training.distributed=fsdp --set training.batch_size=8 \
  --set output.dir=/tmp/fsdp-resumed --set output.resume=/tmp/fsdp/checkpoints/step-0000020
run fsdp-bf16 python3 -m matvlm_cli distill /tmp/r.yaml --num-gpus 2 --set training.distributed=fsdp --set training.batch_size=8 \
  --set training.precision=bf16 --set output.dir=/tmp/fsdp-bf16
run ddp-bf16 accelerate launch --num_processes 2 --multi_gpu -m matvlm_cli distill /tmp/r.yaml --set training.batch_size=8 \
  --set training.precision=bf16 --set output.dir=/tmp/ddp-bf16
python3 - <<'P' 2>&1 | tee $OUT/compare.txt
import json
from safetensors.torch import load_file
from matvlm_cli.hybrid import load_hybrid
def log(n):
    try: return {e["step"]: e["loss"] for e in map(json.loads, open(f"/tmp/{n}/log.jsonl"))}
    except FileNotFoundError: return {}
logs = {n: log(n) for n in ["one", "ddp", "fsdp", "fsdp-resumed", "fsdp-bf16", "ddp-bf16"]}
print("step " + " ".join(f"{n:>12}" for n in logs))
for s in sorted(logs["one"]):
    print(f"{s:4d} " + " ".join(f"{logs[n].get(s, float('nan')):12.4f}" for n in logs))
def weights(n):
    try: return load_file(f"/tmp/{n}/final/model.safetensors")
    except Exception as e: print(n, "no final:", e); return None
ref = weights("ddp")
for n in ["one", "fsdp", "fsdp-resumed", "fsdp-bf16", "ddp-bf16"]:
    w = weights(n)
    if w is not None and ref is not None:
        print(f"final {n} vs ddp: same keys {w.keys() == ref.keys()}, max |diff| {max((w[k].float() - ref[k].float()).abs().max().item() for k in ref):.3g}")
f, r = weights("fsdp"), weights("fsdp-resumed")
if f and r: print("fsdp resumed vs straight: max |diff|", max((f[k] - r[k]).abs().max().item() for k in f))
m = load_hybrid("/tmp/fsdp/final"); print("fsdp final loads:", type(m).__name__, m.config.matvlm["layers"], m.config.matvlm["distill_steps"])
for n in logs: print(n, open(f"/tmp/{n}/summary.json").read().replace("\n", " ") if __import__("os").path.exists(f"/tmp/{n}/summary.json") else "no summary")
P
