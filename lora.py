"""
LoRA (Hu et al. 2021): fine-tuning a pre-trained medslm model through low-rank adapters on the Linear layers of
its blocks, the base weights frozen. An adapted Linear computes

    y = x W^T + b + dropout(x) A^T B^T * alpha / rank

with A (rank x in) Kaiming-uniform and B (out x rank) zero at the start, so the adapted model starts equal to its
base, bit for bit. Only A and B train (and the embeddings and head, if asked): their gradients and optimizer
state are all the memory fine-tuning adds to inference. train.py (lora_rank > 0) checkpoints only the adapters,
with the path and sha256 of their base; its export folds them into the weights (W + B A * alpha / rank, an
ordinary export) and writes them alone in Hugging Face peft's layout (adapter/), for our --format=hf export.
checkpoint.py loads such a run (load_lora), checking that its base is unchanged.
"""
import json
import math
import os
from contextlib import contextmanager

import torch
import torch.nn as nn
from safetensors.torch import save_file

from hf_layout import hf_layout, hf_projections

TARGETS = ('wqkv', 'wo', 'w1', 'w2')  # every attention and MLP projection of a block


class LoRALinear(nn.Linear):
    """A Linear whose weight and bias are the wrapped Linear's own (frozen), plus a trainable low-rank update.
    A subclass, so code that handles every nn.Linear (setup_caches' weight layout for decoding) handles it too."""

    def __init__(self, linear, rank, alpha, dropout):
        super().__init__(linear.in_features, linear.out_features, bias=False, device='meta')
        self.weight, self.bias = linear.weight, linear.bias
        like = dict(device=linear.weight.device, dtype=linear.weight.dtype)
        self.lora_A = nn.Parameter(torch.empty(rank, linear.in_features, **like))
        self.lora_B = nn.Parameter(torch.zeros(linear.out_features, rank, **like))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # nn.Linear's own init, as in peft and litgpt
        self.scale = alpha / rank
        self.lora_dropout = nn.Dropout(dropout) if dropout else nn.Identity()
        self.enabled = True  # False: the base Linear alone (adapters_off)

    def forward(self, x):
        if not self.enabled:
            return super().forward(x)
        # scaled in the rank-wide middle: the cheapest place for the multiply
        return super().forward(x) + (self.lora_dropout(x) @ self.lora_A.t() * self.scale) @ self.lora_B.t()


@contextmanager
def adapters_off(model):
    """Within it, the model computes as its base, every adapter skipped: DPO's reference with no second copy of
    the weights. A model without adapters is unchanged."""
    adapted = [m for m in model.modules() if isinstance(m, LoRALinear)]
    for m in adapted:
        m.enabled = False
    try:
        yield model
    finally:
        for m in adapted:
            m.enabled = True


def add_lora(model, rank, alpha, dropout=0.0, targets=','.join(TARGETS), train_embeddings=False):
    """Wraps the Linears named in targets (comma-separated, among TARGETS) of every block in LoRALinear and
    freezes all else, the token (and position) embeddings and head too unless train_embeddings. In place."""
    names = targets.split(',')
    if rank < 1 or not set(names) <= set(TARGETS):
        raise SystemExit(f'error: LoRA needs lora_rank >= 1 and lora_targets among {",".join(TARGETS)}, '
                         f'got rank {rank} and {targets!r}')
    if any(isinstance(m, LoRALinear) for m in model.modules()):
        raise SystemExit('error: the model has adapters already: merge_lora them first')
    model.requires_grad_(False)
    for name, module in list(model.named_modules()):
        if name.rsplit('.', 1)[-1] in names:
            model.set_submodule(name, LoRALinear(module, rank, alpha, dropout))
    if train_embeddings:  # the tied head is the embedding itself
        for module in (model.tok_embeddings, model.output, getattr(model, 'pos_embeddings', None)):
            if module is not None:
                module.weight.requires_grad_(True)
    return model


def adapter_state_dict(model):
    """The trainable tensors (adapters, and the embeddings and head if they train): what a checkpoint keeps."""
    return {name: p.detach() for name, p in model.named_parameters() if p.requires_grad}


@torch.no_grad()
def merge_lora(model):
    """Replaces each LoRALinear by a plain Linear of weight W + B A * scale, in place: the model is then an ordinary
    GPT, its state_dict under the base's names, to save as any export."""
    for name, module in list(model.named_modules()):
        if isinstance(module, LoRALinear):
            linear = nn.Linear(module.in_features, module.out_features, bias=False, device='meta')
            delta = module.lora_B.double() @ module.lora_A.double() * module.scale  # one rounding, at the end
            linear.weight = nn.Parameter((module.weight.double() + delta).to(module.weight.dtype))
            linear.bias = module.bias
            model.set_submodule(name, linear)
    return model.requires_grad_(True)


def save_peft(model, lora, folder):
    """Writes the adapters of model (not merged) as peft's adapter_config.json and adapter_model.safetensors, named
    for our --format=hf export of the base (Llama splits wqkv and w1: each part gets the same A and its rows of
    B). Trained embeddings and head go in as peft's modules_to_save. Returns None, or why it cannot."""
    layout = hf_layout(model.config)
    if layout is None:
        return 'the block matches neither the Llama nor the GPT-2 layout of --format=hf'
    tensors, targets = {}, set()
    for name, module in model.named_modules():
        if isinstance(module, LoRALinear):
            _, i, ours = name.split('.', 2)  # layers.{i}.attention.wqkv
            prefix = 'base_model.model.' + (f'model.layers.{i}.' if layout == 'llama' else f'transformer.h.{i}.')
            for hf_name, rows in hf_projections(model.config, layout, ours, module.lora_B).items():
                tensors[prefix + hf_name + '.lora_A.weight'] = module.lora_A
                tensors[prefix + hf_name + '.lora_B.weight'] = rows
                targets.add(hf_name)
    embeddings = {'tok_embeddings': 'model.embed_tokens' if layout == 'llama' else 'transformer.wte',
                  'pos_embeddings': 'transformer.wpe', 'output': 'lm_head'}
    trained = [ours for ours in embeddings if getattr(model, ours, None) is not None
               and getattr(model, ours).weight.requires_grad]
    for ours in trained:
        tensors['base_model.model.' + embeddings[ours] + '.weight'] = getattr(model, ours).weight
    adapters = lora['adapters']
    config = dict(peft_type='LORA', task_type='CAUSAL_LM', base_model_name_or_path=lora['base'],
                  r=adapters['rank'], lora_alpha=adapters['alpha'], lora_dropout=adapters['dropout'],
                  target_modules=sorted(targets), bias='none', fan_in_fan_out=layout == 'gpt2',  # GPT-2's Conv1D
                  modules_to_save=[embeddings[ours].rsplit('.', 1)[-1] for ours in trained] or None,
                  init_lora_weights=True, inference_mode=True, use_rslora=False, use_dora=False)
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, 'adapter_config.json'), 'w') as f:
        json.dump(config, f, indent=2)
    save_file({k: v.detach().contiguous().clone() for k, v in tensors.items()},
              os.path.join(folder, 'adapter_model.safetensors'), metadata={'format': 'pt'})
    return None
