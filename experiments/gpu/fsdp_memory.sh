# Per-GPU peak memory, 1.09B-parameter stand-in teacher (experiments/gpu/wide_teacher.py): 1 GPU vs 2-GPU DDP vs 2-GPU FSDP.
# Run from the repository root on a 2-GPU machine: OUT=/tmp/out bash experiments/gpu/fsdp_memory.sh (numbers in docs/results/distill/multi-gpu.json).
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name --format=csv,noheader; date -u
[ -d .whl ] && python3 -m pip install -q --no-index --no-deps --find-links .whl pillow accelerate==1.15.0 2>&1 | grep -v WARNING | tail -2
python3 -m matvlm_cli.world --output /tmp/w --seed 0 --train-size 2000 | tail -1
python3 experiments/gpu/wide_teacher.py /tmp/wide 2>&1 | tail -1
cat > /tmp/r.yaml <<'Y'
teacher: /tmp/wide
data: [{json: /tmp/w/train/conversations.json, image_root: /tmp/w/train}]
model_max_length: 512
optimizer: {lr: 1.0e-4, warmup_steps: 2}
training: {max_steps: 20, batch_size: 8, seed: 0}
output: {dir: /tmp/one, log_every: 5}
Y
run() { name=$1; shift; /usr/bin/time -f "$name wall %e s" timeout 170 "$@" > $OUT/$name.log 2>&1; echo "$name rc $?"; tail -2 $OUT/$name.log | cut -c1-220
  echo "$name $(tr -d '\n' < /tmp/$name/summary.json 2>/dev/null) $(tail -1 /tmp/$name/log.jsonl 2>/dev/null)" >> $OUT/memory.txt; rm -rf /tmp/$name/final; }
run one python3 -m matvlm_cli distill /tmp/r.yaml
run ddp python3 -m matvlm_cli distill /tmp/r.yaml --num-gpus 2 --set training.batch_size=4 --set output.dir=/tmp/ddp
run fsdp python3 -m matvlm_cli distill /tmp/r.yaml --num-gpus 2 --set training.batch_size=4 --set training.distributed=fsdp --set output.dir=/tmp/fsdp
run ddp-bf16 python3 -m matvlm_cli distill /tmp/r.yaml --num-gpus 2 --set training.batch_size=4 --set training.precision=bf16 --set output.dir=/tmp/ddp-bf16
run fsdp-bf16 python3 -m matvlm_cli distill /tmp/r.yaml --num-gpus 2 --set training.batch_size=4 --set training.precision=bf16 --set training.distributed=fsdp --set output.dir=/tmp/fsdp-bf16
cat $OUT/memory.txt
