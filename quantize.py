"""
Int8 weights for sampling and evaluation (sample.py and eval.py --quantize=int8): a quarter of the bytes that
batch-1 decoding reads per token. Not for training.
"""
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F


class Int8Linear(nn.Module):
    """Inference-only stand-in for an nn.Linear: int8 weights with one float scale per output channel (absmax / 127
    of its row), a quarter of the bytes that batch-1 decoding reads per token. Three kernels, by where it runs:
    - CPU, eager: fbgemm's int8 GEMM, which also rounds the activations to 7 bits on the fly (llama.cpp's q8_0
      rounds to 8 per 32 values). Eager decoding is bound by the per-op overhead of the ops around it, not by it.
    - CPU, compiled (sample.py --compile, the decode step): a step's few rows go through torch._weight_int8pack_mm,
      the weight-only kernel gpt-fast uses, with activations in bf16 (8 bits of mantissa): its AVX2/AVX512 loop is
      vectorised for bf16 only (float32 input runs a scalar loop, 10x slower). fbgemm's op would break the graph,
      and is no faster per call (16 vs 17 us a 256 x 1024 matrix, one thread). Compiled, int8 decodes healthslm_15m
      at 2.1x its eager speed, 1.75x compiled float32's (docs/RESULTS.md). The kernel reads its input 16 values at
      a time with no tail, so in_features must be a multiple of 16.
    - Elsewhere (CUDA, or many rows compiled: eval.py --compile scores thousands, where that kernel is 2-3x slower
      than float32's GEMM) the int8 weight is converted inside the matmul and the scale applied to its output:
      under torch.compile the conversion fuses into the kernel's loads on CUDA; eager, it costs a weight-sized copy."""

    def __init__(self, linear):
        super().__init__()
        w = linear.weight.detach().float()
        scale = w.abs().amax(dim=1).clamp(min=1e-12) / 127
        self.register_buffer('weight', torch.round(w / scale[:, None]).to(torch.int8))
        self.register_buffer('scale', scale)
        self.register_buffer('scale_bf16', scale.bfloat16(), persistent=False)  # _weight_int8pack_mm's dtype
        self.bias = linear.bias
        self.packed = None
        if w.device.type == 'cpu' and 'fbgemm' in torch.backends.quantized.supported_engines:
            zero = torch.zeros(len(scale), dtype=torch.long)
            with warnings.catch_warnings():  # torch deprecates quantized tensors; this one only feeds the prepack
                warnings.simplefilter('ignore')
                qw = torch.quantize_per_channel(w, scale.double(), zero, 0, torch.qint8)
            self.packed = torch.ops.quantized.linear_prepack(qw, None if self.bias is None else self.bias.float())

    def forward(self, x):
        if not torch.compiler.is_compiling() and self.packed is not None:
            # reduce_range: 7-bit activations, so AVX2's int16 pair sums cannot saturate
            return torch.ops.quantized.linear_dynamic(x.float(), self.packed, True).to(x.dtype)
        rows = x.numel() // x.size(-1)
        if x.device.type == 'cpu' and self.weight.size(1) % 16 == 0 and rows <= 4:  # 4: the kernel's row block
            y = torch._weight_int8pack_mm(x.reshape(rows, -1).to(torch.bfloat16), self.weight, self.scale_bf16)
            y = y.view(*x.shape[:-1], -1).to(x.dtype)
        else:
            y = F.linear(x, self.weight.to(x.dtype)) * self.scale.to(x.dtype)
        return y if self.bias is None else y + self.bias.to(x.dtype)


def quantize_int8(model):
    """Swaps every Linear of model (attention, feed-forward, head) for an Int8Linear, in place; for sampling and
    evaluation, not training. A tied head gets its own int8 copy; the embedding lookup stays in float."""
    for module in list(model.modules()):
        for name, child in module.named_children():
            if isinstance(child, nn.Linear):
                setattr(module, name, Int8Linear(child))
    return model
