"""
What the machine can do: the device a run asked for (and whether it is there), the dtype 'auto' stands for, and
the peak FLOP/s that model FLOPs utilisation (MFU) divides by.
"""
import os
import time

import torch

# Dense bf16 tensor-core peak per device, in TFLOP/s (fp16 where the chip has no bf16), from the vendors' data
# sheets; sparsity doubles these on paper and never in training. Matched by substring of the CUDA device name,
# first match wins: the more specific names come first.
PEAK_TFLOPS = (
    ('GH200', 989), ('H200', 989), ('H100 PCIe', 756), ('H100 NVL', 835), ('H100', 989), ('H800', 989),
    ('B200', 2250), ('B100', 1750), ('A100', 312), ('A800', 312), ('L40S', 362), ('L40', 181), ('L4', 121),
    ('A40', 150), ('A10G', 70), ('A10', 125), ('RTX A6000', 155), ('RTX 6000 Ada', 364), ('RTX 4090', 165),
    ('RTX 3090', 71), ('V100', 125), ('T4', 65), ('MI300X', 1307), ('MI250X', 383),
)


def peak_flops(device_name):
    """The peak FLOP/s of a CUDA device named device_name (torch.cuda.get_device_name), or None if unknown."""
    for name, tflops in PEAK_TFLOPS:
        if name in device_name:
            return tflops * 1e12
    return None


def device_name(device):
    """The device, in words, as a run's record names its machine: the GPU's name, or the CPU's model and threads."""
    kind = device.split(':')[0]
    if kind == 'cuda':
        return torch.cuda.get_device_name(device)
    if kind != 'cpu':
        return kind
    cpu = 'CPU'
    if os.path.exists('/proc/cpuinfo'):  # Linux; elsewhere the threads alone
        with open('/proc/cpuinfo') as f:
            cpu = next((line.split(':', 1)[1].strip() for line in f if line.startswith('model name')), cpu)
    threads = torch.get_num_threads()
    return f"{cpu}, {threads} thread{'s' if threads > 1 else ''}"


def flops_per_token(model):
    # PaLM appendix B: 6N for the matmuls of forward and backward, plus the attention scores
    cfg = model.config
    return 6 * model.get_num_params(non_embedding=True) + 12 * cfg.n_layer * cfg.n_head * cfg.head_dim * cfg.block_size


def estimate_mfu(model, tokens_per_iter, dt, peak):
    """Model FLOPs utilisation: the FLOP/s achieved over the peak (peak_flops)."""
    return flops_per_token(model) * tokens_per_iter / dt / peak


def check_device(device):
    """Stops with one line if device names an accelerator this machine cannot use: a GPU config must not fall
    back to training a 381M model on CPU cores (a driver mismatch makes torch.cuda.is_available() False)."""
    kind = device.split(':')[0]
    if kind == 'cuda' and not torch.cuda.is_available():
        raise SystemExit(f"error: device={device!r} but CUDA is not usable here (torch {torch.__version__}, "
                         f"CUDA build {torch.version.cuda}): fix the driver, or run on the CPU with --device=cpu")
    if kind == 'mps' and not torch.backends.mps.is_available():
        raise SystemExit(f"error: device={device!r} but MPS is not available here: run with --device=cpu")


def cpu_bf16_is_faster():
    """Whether bf16 matmuls measure faster than float32's on this CPU: chips with AMX or AVX512-BF16 run them
    ~2x faster, chips without bf16 units ~30x slower."""
    a = {dt: torch.randn(512, 512).to(dt) for dt in (torch.float32, torch.bfloat16)}
    seconds = {dt: [] for dt in a}
    for _ in range(5):  # interleaved, best of 5: a busy machine slows both alike
        for dt, m in a.items():
            t = time.perf_counter()
            m @ m
            seconds[dt].append(time.perf_counter() - t)
    return min(seconds[torch.bfloat16]) < min(seconds[torch.float32])


def resolve_dtype(dtype, device_type):
    """The dtype name 'auto' stands for: bf16 on GPUs with bf16 units (not emulated: a V100 or T4 runs fp16 with
    the gradient scaler faster), else fp16; on CPU bf16 only where it measures faster. Other names pass through,
    checked."""
    if dtype == 'auto':
        if device_type == 'cuda':
            dtype = 'bfloat16' if torch.cuda.is_bf16_supported(including_emulation=False) else 'float16'
        elif device_type == 'cpu':
            dtype = 'bfloat16' if cpu_bf16_is_faster() else 'float32'
        else:
            dtype = 'float32'
    if dtype not in ('float32', 'bfloat16', 'float16'):
        raise SystemExit(f"error: dtype must be 'auto', 'float32', 'bfloat16' or 'float16', got {dtype!r}")
    return dtype


def split_batch(gradient_accumulation_steps, batch_size, world_size):
    """(micro-steps per rank, sequences per micro-step) that keep a step's sequences, gradient_accumulation_steps
    x batch_size, the same on world_size ranks. The micro-steps are shared out when world_size divides them (the
    global batch is then the very same as on one process); else each rank takes fewer, smaller micro-steps: the
    fewest that keep a micro-batch within batch_size. A one-line error says what to set when the sequences of a
    step do not divide among the ranks."""
    if gradient_accumulation_steps % world_size == 0:
        return gradient_accumulation_steps // world_size, batch_size
    sequences = gradient_accumulation_steps * batch_size
    if sequences % world_size:
        raise SystemExit(f'error: a step of gradient_accumulation_steps x batch_size = {gradient_accumulation_steps} '
                         f'x {batch_size} = {sequences} sequences does not divide among {world_size} processes: set '
                         f'them so that their product is a multiple of {world_size}')
    per_rank = sequences // world_size
    steps = next(s for s in range(1, per_rank + 1) if per_rank % s == 0 and per_rank // s <= batch_size)
    return steps, per_rank // steps
