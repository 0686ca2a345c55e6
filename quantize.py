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
    of its row), a quarter of the bytes that batch-1 decoding reads per token. On CPU it runs fbgemm's int8 kernel,
    which also rounds each row of activations to 8 bits on the fly (llama.cpp's q8_0 does the same per 32 values);
    torch._weight_int8pack_mm keeps activations in float but has only a scalar kernel on AVX2 CPUs (2x slower than
    float32 here). Elsewhere (CUDA) the int8 weight is converted inside the matmul and the scale applied to its
    output: under torch.compile (sample.py compiles int8 decoding on CUDA) the conversion fuses into the kernel's
    loads, so a token reads one byte per weight; eager, it costs a weight-sized copy per call."""

    def __init__(self, linear):
        super().__init__()
        w = linear.weight.detach().float()
        scale = w.abs().amax(dim=1).clamp(min=1e-12) / 127
        self.register_buffer('weight', torch.round(w / scale[:, None]).to(torch.int8))
        self.register_buffer('scale', scale)
        self.bias = linear.bias
        self.packed = None
        if w.device.type == 'cpu' and 'fbgemm' in torch.backends.quantized.supported_engines:
            zero = torch.zeros(len(scale), dtype=torch.long)
            with warnings.catch_warnings():  # torch deprecates quantized tensors; this one only feeds the prepack
                warnings.simplefilter('ignore')
                qw = torch.quantize_per_channel(w, scale.double(), zero, 0, torch.qint8)
            self.packed = torch.ops.quantized.linear_prepack(qw, None if self.bias is None else self.bias.float())

    def forward(self, x):
        if self.packed is not None:  # reduce_range: 7-bit activations, so AVX2's int16 pair sums cannot saturate
            return torch.ops.quantized.linear_dynamic(x.float(), self.packed, True).to(x.dtype)
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
