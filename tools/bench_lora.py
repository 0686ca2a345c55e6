"""
Memory and speed of a LoRA training step against a full fine-tuning step, each side in its own process:

    python tools/bench_lora.py                                                    # healthslm_15m, batch 8 x 256
    python tools/bench_lora.py --config_file=config/medslm_381m.py --batch_size=1 --steps=4

A step is train.py's: forward with the fused loss, backward, AdamW (configure_optimizers: only parameters that
take gradients get optimizer state). Peak memory is the process's resident set high-water mark (ru_maxrss; CUDA:
max allocated), weights, gradients, optimizer state and activations together; the weights alone are measured
first. Tokens/s is the median step after the first. The sides alternate over `rounds` processes each, so the
drift of a shared machine hits both alike; medians are reported.
"""
import json
import os
import resource
import runpy
import statistics
import subprocess
import sys
import time
from contextlib import nullcontext
from dataclasses import fields

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # run as python tools/bench_lora.py: the project's modules sit one folder up
from configurator import configure
from lora import add_lora
from model import GPT, GPTConfig
from optim import configure_optimizers

# -----------------------------------------------------------------------------
config_file = 'config/healthslm_15m.py'  # model shape: the file's GPTConfig keys (its training keys are ignored)
batch_size = 8
seq_len = 256
steps = 5               # optimizer steps per process; the first is untimed
rounds = 2              # processes per side, alternating
lora_rank = 16
lora_alpha = 32.0
dtype = 'float32'       # 'float32' | 'bfloat16' (autocast; the weights stay float32, as in train.py)
compile = False
device = 'cuda' if torch.cuda.is_available() else 'cpu'
side = ''               # '' runs both sides in subprocesses; 'full' or 'lora' runs one here and prints JSON
# -----------------------------------------------------------------------------
configure(globals())


def peak_mb():
    if device.startswith('cuda'):
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (2**20 if sys.platform == 'darwin' else 2**10)


def run_side():
    keys = [f.name for f in fields(GPTConfig)]
    shape = {k: v for k, v in runpy.run_path(config_file).items() if k in keys}
    torch.manual_seed(0)
    model = GPT(GPTConfig(**{**shape, 'block_size': seq_len})).to(device)
    weights_mb = peak_mb()
    if side == 'lora':
        add_lora(model, lora_rank, lora_alpha)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    optimizer = configure_optimizers(model, 0.1, 1e-4, (0.9, 0.95), device.split(':')[0])
    step_model = torch.compile(model) if compile else model
    ctx = nullcontext() if dtype == 'float32' else torch.autocast(device.split(':')[0], dtype=getattr(torch, dtype))
    x, y = torch.randint(0, model.config.vocab_size, (2, batch_size, seq_len), device=device)
    seconds = []
    for _ in range(steps):
        t = time.perf_counter()
        with ctx:
            loss = step_model(x, y)[1]
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.startswith('cuda'):
            torch.cuda.synchronize()
        seconds.append(time.perf_counter() - t)
    state_mb = sum(t.numel() * t.element_size() for s in optimizer.state.values() for t in s.values()
                   if torch.is_tensor(t)) / 2**20
    print(json.dumps(dict(params=sum(p.numel() for p in model.parameters()), trainable=trainable,
                          weights_mb=weights_mb, peak_mb=peak_mb(), optimizer_state_mb=state_mb,
                          tokens_per_s=batch_size * seq_len / statistics.median(seconds[1:]))))


if side:
    run_side()
    raise SystemExit(0)

results = {'full': [], 'lora': []}
for _ in range(rounds):
    for name in results:
        proc = subprocess.run([sys.executable, __file__, *sys.argv[1:], f'--side={name}'], capture_output=True,
                              text=True)
        if proc.returncode:
            sys.exit(f'error: the {name} side failed:\n{proc.stderr[-2000:]}')
        results[name].append(json.loads(proc.stdout.strip().splitlines()[-1]))
print(f'{config_file}: batch {batch_size} x {seq_len}, {dtype}, {"compiled, " if compile else ""}{device}, '
      f'{torch.get_num_threads()} threads, LoRA rank {lora_rank} on wqkv, wo, w1, w2; medians of {rounds} processes')
print(f"{'':6} {'parameters':>12} {'trainable':>12} {'weights MB':>11} {'optimizer MB':>13} {'peak MB':>9} "
      f"{'tokens/s':>9}")
for name, runs in results.items():
    median = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
    print(f"{name:6} {median['params']:>12,.0f} {median['trainable']:>12,.0f} {median['weights_mb']:>11,.0f} "
          f"{median['optimizer_state_mb']:>13,.1f} {median['peak_mb']:>9,.0f} {median['tokens_per_s']:>9,.0f}")
