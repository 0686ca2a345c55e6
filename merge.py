"""
Merges exported medslm models of one architecture into a new export folder, tensor by tensor:

    python merge.py --models=out-a/export,out-b/export --out=out-merged                  # the mean
    python merge.py --models=out-a/export,out-b/export --method=slerp --t=0.3 --out=out-merged
    python merge.py --models=out-a/export,out-b/export --method=ties --base=out-base/export --density=0.2 --out=...

linear and slerp merge the weights; task_arithmetic and ties merge task vectors (a model less the base it was
fine-tuned from) and add the result to the base. The output is an ordinary export (model.safetensors, config.json,
meta.json, the tokenizer and with it the chat tokens) that sample.py, eval.py and export.py read, plus merge.json:
the inputs with the sha256 of their weights, the method and its parameters, and README.md, its model card. Inputs
that differ in config, tensor names and shapes or tokenizer are a one-line error before any tensor is read.
"""
import json
import math
import os
import shutil
import sys

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from card import read_records, write_card
from configurator import configure
from files import atomic_folder, sha256

# -----------------------------------------------------------------------------
models = ''             # comma-separated export folders (train.py's out_dir/export, export.py --format=safetensors)
method = 'linear'       # 'linear' | 'slerp' (two models) | 'task_arithmetic' | 'ties' (these two need base)
weights = ''            # linear, task_arithmetic, ties: one weight per model, comma-separated; '' gives each 1
t = 0.5                 # slerp: 0 gives the first model, 1 the second
base = ''               # task_arithmetic, ties: the export the models were fine-tuned from
density = 0.2           # ties: the fraction of each task vector's entries kept, the largest in magnitude
scale = 1.0             # task_arithmetic, ties: the merged task vector is added to the base times this (lambda)
out = 'out-merged'      # the new export folder; replaced whole if it exists
# -----------------------------------------------------------------------------
configure(globals())


def linear(tensors, weights):
    """sum_i w_i theta_i / sum_i w_i: the weighted mean."""
    return sum(w * x for w, x in zip(weights, tensors)) / sum(weights)


def slerp(a, b, t, parallel=0.9995, eps=1e-8):
    """Spherical interpolation of a and b as flat vectors, at angle Omega apart (cos Omega = a.b / |a| |b|):

        sin((1 - t) Omega) / sin Omega * a + sin(t Omega) / sin Omega * b

    It keeps the interpolated direction on the arc between them, where linear interpolation cuts the chord (and
    shrinks the norm). Nearly parallel tensors (|cos Omega| > parallel) or a zero one fall back to linear
    interpolation (1 - t) a + t b: the formula divides by sin Omega ~ 0 there."""
    na, nb = a.norm().item(), b.norm().item()
    cos = (a.flatten() @ b.flatten()).item() / (na * nb) if min(na, nb) > eps else 1.0
    if abs(cos) > parallel:
        return (1 - t) * a + t * b
    omega = math.acos(max(-1.0, min(1.0, cos)))
    return math.sin((1 - t) * omega) / math.sin(omega) * a + math.sin(t * omega) / math.sin(omega) * b


def task_arithmetic(base, tensors, weights, scale):
    """base + scale * sum_i w_i (theta_i - base) (Ilharco et al. 2023)."""
    return base + scale * sum(w * (x - base) for w, x in zip(weights, tensors))


def ties(base, tensors, weights, density, scale):
    """TIES (Yadav et al. 2023). Each task vector tau_i = theta_i - base is trimmed to its top density fraction of
    entries by magnitude (the rest set to 0); each entry's sign is elected as that of sum_i w_i tau_i (the side
    with more mass); the entries that agree with it are averaged, sum_i w_i tau_i / sum_i w_i over the agreeing i
    (0 where none agrees); the base gets scale times that. Trimming and the election drop the small and the
    conflicting updates that a plain sum would let interfere."""
    trimmed = []
    for x in tensors:
        tau = (x - base).flatten()
        k = int(density * tau.numel())
        if k < tau.numel():
            keep = torch.zeros_like(tau, dtype=torch.bool)
            keep[tau.abs().topk(k).indices] = True
            tau = tau * keep
        trimmed.append(tau.view_as(base))
    sign = torch.sign(sum(w * tau for w, tau in zip(weights, trimmed)))
    agree = [(torch.sign(tau) == sign) & (tau != 0) for tau in trimmed]
    mass = sum(w * tau * a for w, tau, a in zip(weights, trimmed, agree))
    count = sum(w * a for w, a in zip(weights, agree))
    return base + scale * torch.where(count != 0, mass / torch.where(count != 0, count, 1), 0.0)


def read_export(path):
    """(config, meta, {tensor name: shape}, tokenizer file or None) of an export; a one-line error if it is none."""
    for name in ('config.json', 'model.safetensors', 'meta.json'):
        if not os.path.isfile(os.path.join(path, name)):
            sys.exit(f'error: {path} is not a medslm export: no {name} (train.py writes out_dir/export)')
    with open(os.path.join(path, 'config.json')) as f:
        config = json.load(f)
    with open(os.path.join(path, 'meta.json')) as f:
        meta = json.load(f)
    if 'n_layer' not in config:
        sys.exit(f'error: {path}/config.json is not a medslm model config (a Hugging Face export?)')
    tokenizer = meta.get('tokenizer_file') and os.path.join(path, meta['tokenizer_file'])
    if tokenizer and not os.path.isfile(tokenizer):
        sys.exit(f'error: {path} has no {meta["tokenizer_file"]}, the tokenizer its meta.json names')
    with safe_open(os.path.join(path, 'model.safetensors'), 'pt') as f:
        shapes = {name: f.get_slice(name).get_shape() for name in f.keys()}
    return config, meta, shapes, tokenizer


def tokenizer_identity(meta, tokenizer):
    # the fingerprint prepare.py records where it does; else the kind, the vocabulary size and the file's bytes
    if meta.get('tokenizer_fingerprint'):
        return meta['tokenizer_fingerprint']
    return meta.get('tokenizer'), meta.get('vocab_size'), tokenizer and sha256(tokenizer)


paths = [p for p in models.split(',') if p]
weights = [float(w) for w in weights.split(',') if w] or [1.0] * len(paths)
if method not in ('linear', 'slerp', 'task_arithmetic', 'ties'):
    sys.exit(f"error: --method must be 'linear', 'slerp', 'task_arithmetic' or 'ties', got {method!r}")
needed = {'linear': 'at least two', 'slerp': 'two', 'task_arithmetic': 'one or more', 'ties': 'one or more'}[method]
if len(paths) < (2 if method in ('linear', 'slerp') else 1) or (method == 'slerp' and len(paths) != 2):
    sys.exit(f'error: {method} merges {needed} models, got {len(paths)} (--models=a,b,...)')
if len(weights) != len(paths) or sum(weights) == 0:
    sys.exit(f'error: --weights gives {len(weights)} weights (sum {sum(weights)}) for {len(paths)} models')
if (method in ('task_arithmetic', 'ties')) != bool(base):
    sys.exit(f'error: --base is the model task vectors are taken from: task_arithmetic and ties need it, '
             f'linear and slerp take none (method {method}, base {base!r})')
if not 0 <= t <= 1 or not 0 < density <= 1:
    sys.exit(f'error: need 0 <= t <= 1 and 0 < density <= 1, got t={t}, density={density}')
inputs = paths + [base] * bool(base)
if os.path.abspath(out) in map(os.path.abspath, inputs):
    sys.exit(f'error: --out={out} is one of the inputs')
exports = [read_export(p) for p in inputs]
config, meta, shapes, tokenizer = exports[0]
for path, (c, m, s, tok) in zip(inputs[1:], exports[1:]):
    if c != config:
        diff = sorted(k for k in set(c) | set(config) if c.get(k) != config.get(k))
        sys.exit(f'error: {path} has another config than {inputs[0]} ({", ".join(diff)}): only one architecture merges')
    if s != shapes:
        diff = sorted(k for k in set(s) | set(shapes) if s.get(k) != shapes.get(k))
        sys.exit(f'error: {path} has other tensors than {inputs[0]} ({", ".join(diff[:3])})')
    if tokenizer_identity(m, tok) != tokenizer_identity(meta, tokenizer):
        sys.exit(f'error: {path} has another tokenizer than {inputs[0]}: token ids would mean different things')

files = [safe_open(os.path.join(p, 'model.safetensors'), 'pt') for p in inputs]
merged = {}
for name in shapes:  # one tensor at a time: the inputs are never all in memory
    tensors = [f.get_tensor(name) for f in files]
    dtype, xs = tensors[0].dtype, [x.float() for x in tensors]
    if method == 'linear':
        merged[name] = linear(xs, weights)
    elif method == 'slerp':
        merged[name] = slerp(xs[0], xs[1], t)
    elif method == 'task_arithmetic':
        merged[name] = task_arithmetic(xs[-1], xs[:-1], weights, scale)
    else:
        merged[name] = ties(xs[-1], xs[:-1], weights, density, scale)
    merged[name] = merged[name].to(dtype)

sources = [{'path': os.path.abspath(p), 'sha256': sha256(os.path.join(p, 'model.safetensors'))} for p in inputs]
record = {'method': method, 'models': sources[:len(paths)], **({'base': sources[-1]} if base else {}),
          **{'linear': dict(weights=weights), 'slerp': dict(t=t),
             'task_arithmetic': dict(weights=weights, scale=scale),
             'ties': dict(weights=weights, density=density, scale=scale)}[method]}
with atomic_folder(out) as tmp:  # written whole or not at all: out is never half-written
    save_file(merged, os.path.join(tmp, 'model.safetensors'), metadata={'format': 'pt'})
    for name in filter(None, ['config.json', 'meta.json', tokenizer and os.path.basename(tokenizer)]):
        shutil.copy(os.path.join(inputs[0], name), tmp)
    with open(os.path.join(tmp, 'merge.json'), 'w') as f:
        json.dump(record, f, indent=2)
    write_card(tmp, read_records(tmp), name=out)  # README.md: the model card, its lineage from merge.json
print(f'wrote {out}: {method} of {len(paths)} model' + 's' * (len(paths) > 1) + (f' over {base}' if base else ''))
