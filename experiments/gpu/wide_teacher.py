"""A 1.1B-parameter stand-in teacher for memory measurements: the embedded teacher's architecture,
tokenizer and image processor, with a Llama text model of 24 layers of width 2048 and random weights.

    python experiments/gpu/wide_teacher.py /tmp/wide

Its distillation losses mean nothing; what it shows is how the weights' memory divides between
GPUs (experiments/gpu/fsdp_memory.sh; numbers in docs/results/distill/multi-gpu.json).
"""
import shutil
import sys
from pathlib import Path

import torch
from transformers import AutoConfig, LlavaForConditionalGeneration

from matvlm_cli.hybrid.processors import PROCESSOR_FILES
from matvlm_cli.paths import default_teacher_dir

output = Path(sys.argv[1])
config = AutoConfig.from_pretrained(default_teacher_dir())
config.text_config.update({"hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 24,
                           "num_attention_heads": 16, "num_key_value_heads": 4, "head_dim": 128})
torch.manual_seed(0)
model = LlavaForConditionalGeneration(config)
model.save_pretrained(output)
for name in PROCESSOR_FILES:
    if (default_teacher_dir() / name).is_file():
        shutil.copy2(default_teacher_dir() / name, output / name)
print(f"{sum(p.numel() for p in model.parameters()) / 1e9:.2f}B parameters in {output}")
