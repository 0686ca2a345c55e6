"""
Loading models: training checkpoints (ckpt.pt), exports (model.safetensors + config.json), LoRA runs (adapters
over a base model named by path and sha256) and the tokenizer that goes with each; and load_for_inference, the
start-up sample.py, eval.py and export.py share. Every bad input is a one-line SystemExit naming it. Writing the
export folder they read, the one writer of train.py's export and export.py --format=safetensors, is here too.
"""
import json
import math
import os
import shutil
from contextlib import nullcontext
from dataclasses import asdict, fields

import torch
from safetensors import SafetensorError
from safetensors.torch import load_model as load_safetensors, save_model

from card import write_card
from files import sha256
from hardware import check_device, resolve_dtype
from lora import adapter_state_dict, add_lora, merge_lora
from model import GPT, GPTConfig
from quantize import quantize_int8
from tokenizer import load_tokenizer


def load_checkpoint(ckpt_path, device='cpu', mmap=False):
    """torch.load of a training checkpoint, as data only; a truncated or foreign file is a one-line error."""
    try:
        checkpoint = torch.load(ckpt_path, map_location=device, weights_only=True, mmap=mmap)
    except (OSError, RuntimeError, EOFError, ValueError) as e:  # pickle's UnpicklingError is a RuntimeError here
        raise SystemExit(f'error: cannot read checkpoint {ckpt_path}: {type(e).__name__}: '
                         f'{" ".join(str(e).split())[:200]}')
    if not isinstance(checkpoint, dict) or not {'model', 'model_args'} <= checkpoint.keys():
        raise SystemExit(f'error: {ckpt_path} is not a medslm training checkpoint')
    return checkpoint


def load_model(path, device='cpu'):
    """A GPT from an exported folder (config.json + model.safetensors) or a training out_dir (ckpt.pt).
    A missing, truncated or foreign file is a SystemExit naming it: a one-line error for every script."""
    if os.path.exists(os.path.join(path, 'model.safetensors')):
        file = os.path.join(path, 'model.safetensors')
        try:
            with open(os.path.join(path, 'config.json')) as f:
                model_args = json.load(f)
        except (OSError, ValueError) as e:
            raise SystemExit(f'error: cannot read {path}/config.json: {e}')
        if 'n_layer' not in model_args:
            raise SystemExit(f'error: {path}/config.json is not a medslm model config (a Hugging Face export? '
                             'load that with transformers)')
        model = GPT(GPTConfig(**{k: v for k, v in model_args.items() if k in {f.name for f in fields(GPTConfig)}}))
        try:  # load_model, unlike load_file, restores tied weights
            load_safetensors(model, file, device=str(device))
        except (OSError, RuntimeError, SafetensorError) as e:  # RuntimeError: missing keys or wrong shapes
            raise SystemExit(f'error: cannot read {file}: {type(e).__name__}: {" ".join(str(e).split())[:300]}')
        return model.to(device)
    ckpt_path = os.path.join(path, 'ckpt.pt')
    if not os.path.exists(ckpt_path):
        raise SystemExit(f'error: {path} holds neither model.safetensors nor ckpt.pt')
    checkpoint = load_checkpoint(ckpt_path, mmap=True)  # on the CPU: the optimizer's state never reaches a GPU
    if checkpoint.get('lora'):  # train.py's LoRA run: adapters over a base model, merged here
        return merge_lora(load_lora(checkpoint, device))
    model = GPT(GPTConfig(**checkpoint['model_args']))
    try:
        model.load_state_dict(checkpoint['model'])
    except RuntimeError as e:  # missing or unexpected keys, wrong shapes
        raise SystemExit(f'error: {ckpt_path} does not fit its model_args: {" ".join(str(e).split())[:300]}')
    return model.to(device)


def grow_vocab(model, vocab_size):
    """The model with vocab_size token embeddings (and head rows), the new ones the mean of the old: fine-tuning
    can then learn tokens its pre-training vocabulary had no room for (GPT-2's 50,257 ids hold no chat tokens)."""
    state = model.state_dict()
    for name in ('tok_embeddings.weight', 'output.weight'):  # tied: both names, one tensor
        w = state[name]
        state[name] = torch.cat([w, w.mean(0, keepdim=True).expand(vocab_size - len(w), -1)])
    grown = GPT(GPTConfig(**{**asdict(model.config), 'vocab_size': vocab_size}))
    grown.load_state_dict(state)
    return grown.to(w.device)


def weights_file(path):
    """The file load_model reads the model at path from: an export's model.safetensors, or a run's ckpt.pt."""
    file = os.path.join(path, 'model.safetensors')
    return file if os.path.exists(file) else os.path.join(path, 'ckpt.pt')


def load_base(record, vocab_size, device='cpu'):
    """The model a training run started from (LoRA's base, DPO's reference), named by record ({'base': path,
    'base_sha256': of its weights file}) and refused if it changed since; its vocabulary grown to vocab_size as
    train.py grew it."""
    file = weights_file(record['base'])
    if not os.path.exists(file) or sha256(file) != record['base_sha256']:
        raise SystemExit(f"error: the base model {file} is missing or changed since training (its sha256 was "
                         f"{record['base_sha256'][:16]}...): the run's adapters or DPO reference fit only that model")
    model = load_model(record['base'], device)
    if vocab_size > model.config.vocab_size:  # train.py grew it for chat tokens
        model = grow_vocab(model, vocab_size)
    return model


def load_lora(checkpoint, device='cpu'):
    """The model of a LoRA training checkpoint, adapters not merged: its base (which must not have changed since)
    wrapped in the checkpoint's adapters."""
    lora = checkpoint['lora']
    model = load_base(lora, checkpoint['model_args']['vocab_size'], device)
    add_lora(model, **lora['adapters'])
    _, unexpected = model.load_state_dict(checkpoint['model'], strict=False)
    missing = sorted(set(adapter_state_dict(model)) - set(checkpoint['model']))
    if unexpected or missing:
        raise SystemExit(f"error: the checkpoint's adapters do not fit {lora['base']}: unexpected {unexpected[:3]}, "
                         f"missing {missing[:3]}")
    return model.to(device)


def tokenizer_folder(path):
    """The folder holding the tokenizer (meta.json) of the model at path: an export carries its own, a training
    out_dir has it in export/ or names its data folder in ckpt.pt. None if there is none."""
    for folder in (path, os.path.join(path, 'export')):
        if os.path.exists(os.path.join(folder, 'meta.json')):
            return folder
    ckpt_path = os.path.join(path, 'ckpt.pt')
    if os.path.exists(ckpt_path):
        checkpoint = load_checkpoint(ckpt_path, mmap=True)
        data_dir = checkpoint.get('tokenizer_dir', checkpoint['data_dir'])  # chat data: the base model's tokenizer
        if os.path.exists(os.path.join(data_dir, 'meta.json')):
            return data_dir
    return None


def find_tokenizer(out_dir):
    """tokenizer_folder(out_dir), which a script cannot do without: none is a one-line error."""
    tok_dir = tokenizer_folder(out_dir)
    if tok_dir is None:
        raise SystemExit(f'error: no tokenizer (meta.json) in {out_dir}, its export/ or its training data folder')
    return tok_dir


def load_for_inference(out_dir, device='cpu', dtype='float32', quantize='', tokenizer=True):
    """(model in eval mode, tokenizer, ctx) of the model at out_dir (a training out_dir or an export), as sample.py,
    eval.py and export.py start: ctx autocasts to dtype (float32: no autocast; auto: float32 on a CPU, where
    decoding is slower in bf16 even with bf16 units, else as training picks), quantize='int8' swaps in int8
    weights, tokenizer=False skips the tokenizer (None). Bad flags are a one-line error naming the flag."""
    if not any(os.path.exists(os.path.join(out_dir, f)) for f in ('ckpt.pt', 'model.safetensors')):
        raise SystemExit(f'error: {out_dir} holds neither ckpt.pt nor model.safetensors (--out_dir)')
    device_type = device.split(':')[0]
    if dtype == 'auto':
        dtype = 'float32' if device_type == 'cpu' else resolve_dtype(dtype, device_type)
    ptdtype = {'float32': torch.float32, 'bfloat16': torch.bfloat16, 'float16': torch.float16}.get(dtype)
    if ptdtype is None:
        raise SystemExit(f"error: --dtype must be 'auto', 'float32', 'bfloat16' or 'float16', got {dtype!r}")
    check_device(device)
    if device_type == 'cuda':
        torch.set_float32_matmul_precision('high')  # TF32 matmuls for float32
    ctx = nullcontext() if ptdtype == torch.float32 else torch.autocast(device_type=device_type, dtype=ptdtype)
    model = load_model(out_dir, device).eval()
    if quantize not in ('', 'int8'):
        raise SystemExit(f"error: --quantize must be '' or 'int8', got {quantize!r}")
    if quantize:
        quantize_int8(model)
    if not tokenizer:
        return model, None, ctx
    tok_dir = find_tokenizer(out_dir)
    tok = load_tokenizer(tok_dir)
    if tok.vocab_size > model.config.vocab_size:
        raise SystemExit(f'error: the tokenizer in {tok_dir} has {tok.vocab_size} tokens, '
                         f'the model {model.config.vocab_size}')
    return model, tok, ctx


def training_record(checkpoint):
    """training_config.json of a training checkpoint: the settings (config), the steps, the data folder, the best
    val loss and the loss history; run, what the model card tells of the run (its kind, the model it started from,
    wall time, machines); lora, the adapters' settings. What the checkpoint lacks is None."""
    best, lora = checkpoint.get('best_val_loss'), checkpoint.get('lora')
    finite_best = best if best is not None and math.isfinite(best) else None  # inf: no evaluation saved yet
    return {'config': checkpoint.get('config'), 'iter_num': checkpoint.get('iter_num'),
            'data_dir': checkpoint.get('data_dir'), 'best_val_loss': finite_best, 'history': checkpoint.get('history'),
            'run': checkpoint.get('run'), 'lora': lora and lora['adapters']}


def write_export(folder, model, records, tokenizer_dir, name=None):
    """Writes medslm's model folder, which sample.py, eval.py, export.py and merge.py read, into folder:
    model.safetensors, config.json (the model's), the other records (card.read_records' form: meta.json,
    training_config.json, merge.json, eval_*.json, each where given), the tokenizer file from tokenizer_dir, and
    last README.md, the model card of the folder (name: the path it is known by, once a temporary folder is renamed)."""
    save_model(model, os.path.join(folder, 'model.safetensors'))  # save_model, unlike save_file, handles tied weights
    records = {**records, 'config.json': asdict(model.config)}
    for file, record in records.items():
        with open(os.path.join(folder, file), 'w') as f:
            json.dump(record, f, indent=2)
    if records['meta.json'].get('tokenizer_file'):
        shutil.copy(os.path.join(tokenizer_dir, records['meta.json']['tokenizer_file']), folder)
    write_card(folder, records, name=name)
