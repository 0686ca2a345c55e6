"""
Trains a medslm decoder on prepare.py's token shards:

    python train.py config/tiny_cpu.py                                            # laptop CPU
    torchrun --standalone --nproc_per_node=8 train.py config/medslm_381m.py       # 8 GPUs (--nnodes=N: N machines)

--init_from=resume continues out_dir/ckpt.pt; --init_from=<exported folder> continues pre-training from it.
Instruction tuning (SFT) is the same loop on chat data: a data_dir of train.jsonl and val.jsonl conversations
(chat.py), packed into block_size windows, the loss on assistant tokens only:

    python train.py config/sft_tiny_cpu.py                     # init_from=out-tiny, data_dir=data/tasks

Preference tuning (DPO) too: a data_dir whose train.jsonl and val.jsonl hold preference pairs (prompt, chosen,
rejected; chat.py), the loss DPO's on the replies, against the starting model as the reference:

    python train.py config/dpo_tiny_cpu.py                     # init_from=out-sft-tiny, data_dir=data/pairs

With --lora_rank=16, a run from a pre-trained model trains low-rank adapters over its frozen weights (lora.py).
A finished run leaves out_dir/export/ (weights, configs, optimizer, tokenizer, loss curves); --export_only=True
rebuilds it from out_dir/ckpt.pt.
"""
import copy
import datetime
import json
import math
import os
import signal
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, fields

import matplotlib
matplotlib.use('Agg')  # no display on training machines
import matplotlib.pyplot as plt
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from card import write_card
from chat import DPO_STATS, dpo_loss, is_pairs, require_chat
from checkpoint import (grow_vocab, load_base, load_checkpoint, load_lora, load_model, tokenizer_folder,
                        training_record, weights_file, write_export)
from configurator import configure
from data import chat_split, get_batch, mix_split, parse_mix, shard_split
from files import atomic_folder, sha256
from hardware import (check_device, device_name, estimate_mfu, peak_flops as device_peak_flops, resolve_dtype,
                      split_batch)
from lora import adapter_state_dict, adapters_off, add_lora, merge_lora, save_peft
from model import GPT, GPTConfig
from optim import configure_optimizers
from tokenizer import load_tokenizer, tokenizer_fingerprint

# -----------------------------------------------------------------------------
# I/O
out_dir = 'out'
eval_interval = 2000        # evaluate (and checkpoint) every this many optimizer steps, and at the end
log_interval = 1            # read the loss back from the device every this many steps
eval_iters = 200            # batches per split in an evaluation
always_save_checkpoint = True  # if False, checkpoint only when the val loss improves
init_from = 'scratch'       # 'scratch' | 'resume' (from out_dir/ckpt.pt) | path to an exported model folder
export_only = False         # just rebuild out_dir/export/ from out_dir/ckpt.pt
# data
data_dir = 'data/pubmed'    # prepare.py's output (meta.json, .bin shards), or chat JSON lines (train.jsonl, val.jsonl)
mix = ''                    # other data folders in every batch, 'folder:weight,...' (token shards or conversations):
                            # each weight the share of windows drawn from it, data_dir the rest. Validation: data_dir's
skip_bad = False            # chat data: skip (and count) bad JSON lines rather than stop at the first
dpo_beta = 0.1              # DPO (chat data of preference pairs): how far the rewards may pull from the reference
gradient_accumulation_steps = 40  # micro-steps per optimizer step, summed over all ranks
batch_size = 12             # sequences per micro-step
block_size = 1024
# model (GPTConfig's fields; see model.py)
vocab_size = None           # None: the data's vocabulary size from meta.json
n_layer = 12
n_head = 12
n_kv_head = None
n_embd = 768
intermediate_size = None
multiple_of = 256
norm = 'rmsnorm'
norm_eps = 1e-5
pos_embedding = 'rope'
rope_theta = 10000.0
mlp = 'swiglu'
bias = False
tie_embeddings = False
dropout = 0.0
# LoRA: low-rank adapters on a pre-trained model (init_from: its export or out_dir), its weights frozen
lora_rank = 0               # 0: full fine-tuning; 16 is the usual choice. The optimizer sees only the adapters
lora_alpha = 32.0           # the adapters' output is scaled by lora_alpha / lora_rank
lora_dropout = 0.0          # dropout on the adapters' input
lora_targets = 'wqkv,wo,w1,w2'  # the Linears of every block that get adapters: all attention and MLP projections
lora_train_embeddings = False  # also train the token (and position) embeddings and the head, in full
# AdamW
learning_rate = 6e-4        # peak learning rate, after warmup
max_iters = 600000          # optimizer steps
weight_decay = 1e-1
beta1 = 0.9
beta2 = 0.95
grad_clip = 1.0             # clip the global gradient norm to this; 0 disables
muon_lr = None              # Muon at this peak lr for the matrices inside the blocks (AdamW for the rest); None: AdamW
# learning rate schedule: linear warmup, then cosine decay to min_lr
warmup_iters = 2000
lr_decay_iters = 600000     # ~max_iters, per Chinchilla
min_lr = 6e-5               # ~learning_rate/10, per Chinchilla
# system
device = 'cuda' if torch.cuda.is_available() else 'cpu'  # 'cpu', 'cuda', 'cuda:1', 'mps'
dtype = 'auto'              # 'float32' | 'bfloat16' | 'float16' autocast | 'auto' (see resolve_dtype)
compile = torch.cuda.is_available()  # torch.compile; on CPU its minute of compile time rarely pays off
seed = 1337
peak_flops = None           # per device, MFU's denominator; None: hardware.py's table on CUDA, no MFU on a CPU
# -----------------------------------------------------------------------------
config_keys = configure(globals())
config = {k: globals()[k] for k in config_keys}  # what the user asked for, saved with every checkpoint


def export(checkpoint):
    # written whole or not at all (files.atomic_folder): a reader never sees a half-written export
    final = os.path.join(out_dir, 'export')
    records = {'meta.json': checkpoint['meta'], 'training_config.json': training_record(checkpoint)}
    with atomic_folder(final) as tmp:
        if checkpoint.get('lora'):  # merged into the weights, an ordinary export; the adapters alone for peft
            model = load_lora(checkpoint)
            why_not = save_peft(model, checkpoint['lora'], os.path.join(tmp, 'adapter'))
            if why_not:
                print(f'no peft adapter in the export: {why_not}')
            else:
                write_card(os.path.join(tmp, 'adapter'), {**records, 'config.json': checkpoint['model_args']},
                           'adapter', name=os.path.join(final, 'adapter'), source=final)
            model = merge_lora(model)
        else:
            model = GPT(GPTConfig(**checkpoint['model_args']))
            model.load_state_dict(checkpoint['model'])
        torch.save(checkpoint['optimizer'], os.path.join(tmp, 'optimizer.pt'))
        plot_losses(checkpoint, os.path.join(tmp, 'loss_curves.png'))
        write_export(tmp, model, records, checkpoint.get('tokenizer_dir', checkpoint['data_dir']), name=final)
    print(f'exported {final}')


def plot_losses(checkpoint, path):
    history, evals = checkpoint['history'], checkpoint['history']['eval']
    steps = [e['iter'] for e in evals]
    fig, ax = plt.subplots(figsize=(9, 5))
    ax.plot(history['train_loss'], color='tab:blue', lw=0.8, alpha=0.4, label='train (each step)')
    ax.plot(steps, [e['train_loss'] for e in evals], 'o-', color='tab:blue', label='train (eval)')
    ax.plot(steps, [e['val_loss'] for e in evals], 's-', color='tab:orange', label='val (eval)')
    ax.set(xlabel='iteration (optimizer steps)',
           ylabel='DPO loss (nats per pair)' if checkpoint.get('dpo') else 'cross-entropy loss (nats per token)',
           title=f"{os.path.basename(os.path.abspath(out_dir))} ({checkpoint['iter_num']} iterations)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.savefig(path, dpi=120, bbox_inches='tight')
    plt.close(fig)


ckpt_path = os.path.join(out_dir, 'ckpt.pt')
if export_only:
    if not os.path.exists(ckpt_path):
        raise SystemExit(f'error: {ckpt_path} not found: nothing to export')
    export(load_checkpoint(ckpt_path))
    raise SystemExit(0)

# DDP when launched by torchrun, which sets RANK
ddp = int(os.environ.get('RANK', -1)) != -1
check_device(device)
if ddp:
    # the other ranks wait in a collective while rank 0 writes a checkpoint (4.5 GB at 381M with Adam's state):
    # NCCL's default 10 minutes is short for a slow shared disk
    dist.init_process_group(backend='nccl' if device.startswith('cuda') else 'gloo',
                            timeout=datetime.timedelta(minutes=60))
    ddp_rank, ddp_world_size = dist.get_rank(), dist.get_world_size()
    if device.startswith('cuda'):
        device = f'cuda:{os.environ["LOCAL_RANK"]}'
        torch.cuda.set_device(device)
    else:  # CPU ranks on one machine share its cores
        torch.set_num_threads(max(1, os.cpu_count() // int(os.environ.get('LOCAL_WORLD_SIZE', 1))))
    # the same sequences per step on any number of ranks: fewer micro-steps each, or smaller ones
    gradient_accumulation_steps, batch_size = split_batch(gradient_accumulation_steps, batch_size, ddp_world_size)
else:
    ddp_rank, ddp_world_size = 0, 1
master_process = ddp_rank == 0  # the only rank that prints and writes files
torch.manual_seed(seed + ddp_rank)
device_type = device.split(':')[0]
if device_type == 'cuda':
    torch.set_float32_matmul_precision('high')  # TF32 matmuls

dtype = resolve_dtype(dtype, device_type)
if peak_flops is None and device_type == 'cuda':  # unknown devices: no MFU rather than a wrong one
    peak_flops = device_peak_flops(torch.cuda.get_device_name(device))
ptdtype = getattr(torch, dtype)
ctx = nullcontext() if dtype == 'float32' else torch.autocast(device_type=device_type, dtype=ptdtype)

# -----------------------------------------------------------------------------
# The run's kind, decided and checked here, once. The data folder says what is learnt: prepare.py's token shards
# (meta.json) pre-train; chat conversations (train.jsonl, val.jsonl) instruction-tune (SFT); preference pairs, the
# same files told apart by a "chosen" key in their first line, preference-tune (DPO). Chat data is encoded with the
# model's own tokenizer, so it needs a model to start from. lora_rank > 0 trains adapters over the frozen weights
# of init_from rather than the weights; a resumed run keeps its checkpoint's LoRA settings, as it keeps its shapes.
meta_path = os.path.join(data_dir, 'meta.json')
chat_data = not os.path.exists(meta_path) and os.path.exists(os.path.join(data_dir, 'train.jsonl'))
dpo_data = chat_data and is_pairs(os.path.join(data_dir, 'train.jsonl'))
tokenizer_dir = data_dir
if chat_data:
    tokenizer_dir = tokenizer_folder(out_dir if init_from == 'resume' else init_from)
    if init_from == 'scratch' or tokenizer_dir is None:
        raise SystemExit(f'error: chat data ({data_dir}) fine-tunes a pre-trained model: set init_from to its '
                         'export or out_dir (one with a tokenizer)')
    meta_path = os.path.join(tokenizer_dir, 'meta.json')
elif not os.path.exists(meta_path):
    raise SystemExit(f'error: {meta_path} not found: prepare the data first (python prepare.py --out {data_dir}), '
                     'or give a folder of chat data (train.jsonl, val.jsonl)')
if init_from not in ('scratch', 'resume') and not os.path.isdir(init_from):
    raise SystemExit(f"error: init_from must be 'scratch', 'resume' or an exported model folder, got {init_from!r}")
if init_from == 'resume' and not os.path.exists(ckpt_path):
    raise SystemExit(f'error: {ckpt_path} not found: nothing to resume')
checkpoint = load_checkpoint(ckpt_path, device) if init_from == 'resume' else None

if checkpoint is not None:
    adapters = checkpoint['lora']['adapters'] if checkpoint.get('lora') else None
else:
    adapters = dict(rank=lora_rank, alpha=lora_alpha, dropout=lora_dropout, targets=lora_targets,
                    train_embeddings=lora_train_embeddings) if lora_rank else None
if adapters and init_from == 'scratch':
    raise SystemExit('error: LoRA adapts a pre-trained model: set init_from to its export folder or out_dir')
if dpo_data and adapters and adapters['train_embeddings']:
    raise SystemExit('error: DPO with LoRA takes the base (adapters off) as its reference, which '
                     'lora_train_embeddings would move: train the adapters alone')
mix_parts = parse_mix(mix)
if mix_parts and dpo_data:
    raise SystemExit('error: DPO trains on preference pairs alone: mix takes token shards and conversations')
if dpo_data and checkpoint is not None and not checkpoint.get('dpo'):
    raise SystemExit(f'error: {ckpt_path} is not a DPO run: start one from it with --init_from={out_dir} '
                     'and another out_dir')
tokens_per_iter = (2 if dpo_data else 1) * gradient_accumulation_steps * ddp_world_size * batch_size * block_size
if master_process:
    kind = 'preference pairs (DPO)' if dpo_data else 'chat data (SFT)' if chat_data else 'token shards (pre-training)'
    start = {'scratch': 'from scratch', 'resume': f'resumed from {ckpt_path}'}.get(init_from, f'on {init_from}')
    tuning = f"LoRA rank {adapters['rank']}" if adapters else 'full'
    mixed = ''.join(f', {w:.0%} {folder}' for folder, w in mix_parts)
    print(f'data: {data_dir} is {kind}, {tuning} {start}' +
          (f'; batches mix {1 - sum(w for _, w in mix_parts):.0%} of it{mixed}' if mix_parts else ''))

# -----------------------------------------------------------------------------
# data (data.py): random windows of token shards, or chat data rendered once, up front
with open(meta_path) as f:
    meta = json.load(f)
if chat_data:
    tok = load_tokenizer(tokenizer_dir)
    splits = {split: chat_split(os.path.join(data_dir, f'{split}.jsonl'), tok, block_size, pairs=dpo_data,
                                skip_bad=skip_bad, seed=seed, verbose=master_process) for split in ('train', 'val')}
else:
    splits = {split: shard_split(data_dir, meta, split, block_size) for split in ('train', 'val')}
if mix_parts:  # trains on the mix; validates on data_dir alone, so val losses compare with an unmixed run's
    splits['train'] = mix_split(splits['train'], mix_parts, tokenizer_dir, meta, block_size, skip_bad, seed,
                                master_process)
# One sampler stream per micro-batch slot of the global batch (rank r owns slots r*k .. r*k+k-1): the global
# batch is then the same on any number of processes that divides the micro-steps, so runs compare across world
# sizes and resume exactly (more ranks than micro-steps split the micro-batches instead: other slots, other draws).
train_gens = [torch.Generator().manual_seed(seed + s) for s in
              range(ddp_rank * gradient_accumulation_steps, (ddp_rank + 1) * gradient_accumulation_steps)]

# -----------------------------------------------------------------------------
# model: new, the checkpoint's, or a model folder's weights with a fresh optimizer and schedule (continued
# pre-training, fine-tuning). lora (adapter settings and base) and dpo (the reference) are kept in every checkpoint
# to rebuild the run from; a base is named by path and sha256, and refused later if it changed.
iter_num, best_val_loss, history = 0, float('inf'), {'train_loss': [], 'eval': []}
lora, dpo = None, None
# what the model card tells of the run (card.py): its kind, the model it started from, the wall time of all its
# sessions and the machines they ran on
run = {'kind': 'dpo' if dpo_data else 'sft' if chat_data else 'pretraining', 'base': None, 'seconds': 0.0,
       'machines': []}
if init_from == 'scratch':
    model_args = {f.name: globals()[f.name] for f in fields(GPTConfig)}
    model_args['vocab_size'] = vocab_size if vocab_size is not None else meta['vocab_size']
    model = GPT(GPTConfig(**model_args))
elif init_from == 'resume':
    lora = checkpoint.get('lora')
    dpo = checkpoint['dpo'] if dpo_data else None
    if lora:  # its base, reloaded, and its adapters
        model = load_lora(checkpoint, device)
    else:
        model = GPT(GPTConfig(**checkpoint['model_args']))  # the checkpoint's shapes win over the config's
        model.load_state_dict(checkpoint['model'])
    iter_num, best_val_loss, history = checkpoint['iter_num'], checkpoint['best_val_loss'], checkpoint['history']
    run = checkpoint.get('run') or {**run, 'seconds': None}  # written before runs were recorded: time unknown
else:
    model = load_model(init_from)
    chat_ids = require_chat(tok) if chat_data else {}
    if chat_ids and max(chat_ids.values()) >= model.config.vocab_size:  # GPT-2's 50,257 ids have no room for them
        # frozen, the new rows would stay equal: one logit for all four
        if adapters and not adapters['train_embeddings']:
            raise SystemExit('error: the base has no rows for the chat tokens, so they are added: with LoRA they '
                             'must train, --lora_train_embeddings=True')
        model = grow_vocab(model, max(chat_ids.values()) + 1)
    run['base'] = base = {'base': os.path.abspath(init_from), 'base_sha256': sha256(weights_file(init_from))}
    if adapters:
        lora = {**base, 'adapters': adapters}
        add_lora(model, **adapters)
    if dpo_data:
        dpo = {'reference': None if lora else base}
machine = {'device': device_name(device), 'processes': ddp_world_size, 'dtype': dtype}
if machine not in run['machines']:
    run['machines'].append(machine)
if lora and master_process:
    print(f"LoRA on {lora['base']}: {sum(p.numel() for p in adapter_state_dict(model).values()):,} parameters train")

# DPO's reference is the starting model: with LoRA the same weights with the adapters off; else a frozen copy,
# which a resumed run reloads from the model it started from
reference = None
if dpo and not lora:
    reference = copy.deepcopy(model) if checkpoint is None else load_base(dpo['reference'], model.config.vocab_size)
    reference.requires_grad_(False).eval().to(device)

# the model fits the data
model_args = asdict(model.config)
if model_args['vocab_size'] < meta['vocab_size']:
    raise SystemExit(f"error: the model's vocab_size {model_args['vocab_size']} is smaller than the data's "
                     f"{meta['vocab_size']} ({meta_path})")
if init_from != 'scratch' and not chat_data:  # chat data is encoded with the model's own tokenizer, read above
    # the same vocab_size is not the same tokenizer: another BPE of that size would train silently on wrong ids
    if init_from == 'resume':
        base_meta, base_dir = checkpoint['meta'], checkpoint.get('tokenizer_dir', checkpoint['data_dir'])
    else:
        base_meta, base_dir = None, tokenizer_folder(init_from)
        if base_dir:
            with open(os.path.join(base_dir, 'meta.json')) as f:
                base_meta = json.load(f)
    theirs = tokenizer_fingerprint(base_meta, base_dir) if base_meta else None
    ours = tokenizer_fingerprint(meta, data_dir)
    if theirs and ours and theirs != ours:
        hint = os.path.join(out_dir, 'export') if init_from == 'resume' else init_from
        raise SystemExit(f"error: {data_dir} was encoded by another tokenizer (sha256 {ours[:12]}) than the model's "
                         f"({theirs[:12]}): prepare it with python prepare.py --tokenizer={hint}")
if block_size > model_args['block_size']:
    raise SystemExit(f"error: block_size {block_size} exceeds the model's {model_args['block_size']}")

# -----------------------------------------------------------------------------
# optimizer; a resumed run continues with the state, gradient scale and random streams it stopped with
model.to(device)
raw_model = model  # uncompiled and unwrapped: what gets saved and evaluated
optimizer = configure_optimizers(model, weight_decay, learning_rate, (beta1, beta2), device_type, muon_lr)
scaler = torch.amp.GradScaler(device_type, enabled=dtype == 'float16')  # bf16 has fp32's range: no scaling
if checkpoint is not None:
    optimizer.load_state_dict(checkpoint['optimizer'])
    if scaler.is_enabled() and checkpoint['scaler']:  # a bf16 or float32 run saved a disabled scaler's {}
        scaler.load_state_dict(checkpoint['scaler'])
    rng = checkpoint['rng']  # a changed gradient_accumulation_steps only changes which streams continue
    for g, state in zip(train_gens, rng['data'][ddp_rank * gradient_accumulation_steps:]):
        g.set_state(state.cpu())
    if len(rng['torch']) == ddp_world_size:  # dropout's streams are per rank
        torch.set_rng_state(rng['torch'][ddp_rank].cpu())
        if device_type == 'cuda' and rng['cuda'][ddp_rank] is not None:
            torch.cuda.set_rng_state(rng['cuda'][ddp_rank].cpu())
    checkpoint = None  # free the memory
if compile:
    if master_process:
        print('compiling the model... (takes a ~minute)')
    model = torch.compile(model)
if ddp:  # the rope buffer is the same on every rank: no need to broadcast buffers every forward
    model = DDP(model, device_ids=[int(os.environ['LOCAL_RANK'])] if device_type == 'cuda' else None,
                broadcast_buffers=False)


def get_lr(it):
    if it < warmup_iters:
        return learning_rate * (it + 1) / (warmup_iters + 1)
    if it > lr_decay_iters:
        return min_lr
    coeff = 0.5 * (1.0 + math.cos(math.pi * (it - warmup_iters) / max(1, lr_decay_iters - warmup_iters)))
    return min_lr + coeff * (learning_rate - min_lr)


STATS = DPO_STATS if dpo_data else ('loss',)  # what the log records of every step


def objective(model, X, Y):
    """The loss of a batch, and its STATS, detached: the loss alone, or with DPO its rewards too."""
    if not dpo_data:
        loss = model(X, Y)[1]
        return loss, loss.detach().float()[None]
    logps = model(X, Y, logprobs=True)[1]
    return dpo_loss(logps.view(-1, 2), reference_logps(X, Y).view(-1, 2), dpo_beta)


@torch.no_grad()
def reference_logps(X, Y):
    # the starting model, without dropout (as the policy is at step 0 with dropout off): the same weights with
    # the adapters off, or the frozen copy; either way uncompiled and outside DDP, which a no-grad pass needs not
    model = reference if reference is not None else raw_model
    training = model.training
    with adapters_off(model):
        logps = model.eval()(X, Y, logprobs=True)[1]
    model.train(training)
    return logps


@torch.no_grad()
def estimate_loss():
    # Batch k is drawn from its own seed: every evaluation sees the same windows (comparable over time, and
    # never moves the training streams), and the ranks share the batches out. The uncompiled model spares a
    # second compilation for the no-grad graph; evaluation is a small fraction of the compute.
    raw_model.eval()
    out = {}
    for split in ('train', 'val'):
        total = torch.zeros(len(STATS), device=device)
        for k in range(ddp_rank, eval_iters, ddp_world_size):
            generator = torch.Generator().manual_seed(seed + 10**6 + k)
            X, Y = get_batch(splits[split], batch_size, block_size, generator, device)
            with ctx:
                total += objective(raw_model, X, Y)[1]
        if ddp:
            dist.all_reduce(total)
        out[split] = dict(zip(STATS, (total / eval_iters).tolist()))
    raw_model.train()
    return out


def log(record):
    if master_process:
        with open(os.path.join(out_dir, 'log.jsonl'), 'a') as f:
            f.write(json.dumps(record) + '\n')


def stop(reason):
    if ddp:
        dist.destroy_process_group()
    raise SystemExit(f'error: {reason}: stopped; {ckpt_path} keeps the last good state')


def flush_steps():
    # The step losses stay on the device until here: one host sync (and one all-reduce for the mean over
    # ranks) per log interval rather than one per micro-step.
    global pending, t_flush
    if not pending:
        return
    stats = torch.stack([p[1] for p in pending])  # (steps, STATS)
    if ddp:
        dist.all_reduce(stats)
        stats /= ddp_world_size
    now = time.time()
    dt = (now - t_flush) / len(pending)  # only the interval is timed accurately: the device runs ahead
    tokens_per_s = tokens_per_iter / dt
    mfu = estimate_mfu(raw_model, tokens_per_iter / ddp_world_size, dt, peak_flops) if peak_flops else None
    for (it, _, lr, elapsed), values in zip(pending, stats.tolist()):
        record = dict(zip(STATS, values))
        loss = record['loss']
        history['train_loss'].append(loss)
        log({'iter': it, **record, 'lr': lr, 'tokens_per_s': tokens_per_s, 'mfu': mfu, 'elapsed_s': elapsed})
        if not math.isfinite(loss):
            stop(f'the loss became {loss} at iter {it}')
    if master_process:
        rewards = ''.join(f', {k.replace("_", " ")} {v:.4f}' for k, v in record.items() if k != 'loss')
        print(f'iter {it}: loss {loss:.4f}{rewards}, lr {lr:.2e}, {dt * 1000:.1f} ms/step, {tokens_per_s:,.0f} '
              f'tokens/s' + (f', mfu {mfu * 100:.2f}%' if mfu is not None else ''))
    pending, t_flush = [], now


def evaluate():
    stats = estimate_loss()
    record = {'iter': iter_num, 'train_loss': stats['train']['loss'], 'val_loss': stats['val']['loss']}
    if dpo_data:  # rewards, not perplexity: the loss is over pairs
        record.update({f'val_{k}': v for k, v in stats['val'].items() if k != 'loss'})
        scores = f", val reward accuracy {record['val_reward_accuracy']:.3f}, val margin {record['val_margin']:.4f}"
    else:
        record['val_ppl'] = math.exp(min(record['val_loss'], 700))  # math.exp raises past ~709
        scores = f", val ppl {record['val_ppl']:.2f}"
    if not chat_data:  # chat data scores assistant tokens only: no bytes-per-token of the whole text to convert by
        split = meta['splits']['val']
        record['val_bpb'] = record['val_loss'] / math.log(2) * split['tokens'] / split['bytes']
        scores += f", val bits/byte {record['val_bpb']:.4f}"
    history['eval'].append(record)
    log(record)
    if master_process:
        print(f"step {iter_num}: train loss {record['train_loss']:.4f}, val loss {record['val_loss']:.4f}{scores}")
    return record['val_loss']


def save_checkpoint():
    if not all(torch.isfinite(p).all() for p in raw_model.parameters()):
        stop(f'the weights became non-finite at iter {iter_num}')
    state = {'data': [g.get_state() for g in train_gens], 'torch': torch.get_rng_state(),
             'cuda': torch.cuda.get_rng_state() if device_type == 'cuda' else None}
    ranks = [state]
    if ddp:  # every rank's streams, so the resumed run draws what this one would have drawn
        ranks = [None] * ddp_world_size
        dist.all_gather_object(ranks, state)
    if not master_process:
        return
    checkpoint = {'model': adapter_state_dict(raw_model) if lora else raw_model.state_dict(), 'lora': lora,
                  'optimizer': optimizer.state_dict(),
                  'scaler': scaler.state_dict(), 'model_args': model_args, 'config': config, 'iter_num': iter_num,
                  'best_val_loss': best_val_loss, 'history': history, 'data_dir': data_dir, 'meta': meta,
                  'tokenizer_dir': tokenizer_dir, 'dpo': dpo,
                  'run': {**run, 'seconds': None if run['seconds'] is None else run['seconds'] + time.time() - t0},
                  'rng': {'data': [s for r in ranks for s in r['data']], 'torch': [r['torch'] for r in ranks],
                          'cuda': [r['cuda'] for r in ranks]}}
    tmp = ckpt_path + '.tmp'  # a crash while writing leaves the previous checkpoint whole
    torch.save(checkpoint, tmp)
    os.replace(tmp, ckpt_path)
    print(f'saved {ckpt_path} at iter {iter_num}')


# preemption (SIGTERM) and Ctrl-C (SIGINT): finish the step, checkpoint, exit. A second Ctrl-C kills at once; a
# second SIGTERM is ignored: schedulers signal every process of a job and torchrun forwards its own, so a rank
# often gets two, and must still save.
stop_requested = False


def request_stop(signum, frame):
    global stop_requested
    stop_requested = True
    if signum == signal.SIGINT:
        signal.signal(signum, signal.SIG_DFL)


def stop_now():
    if not ddp:
        return stop_requested
    # ranks may see the signal in different steps; they must all stop after the same one
    flag = torch.tensor(float(stop_requested), device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return flag.item() > 0


signal.signal(signal.SIGTERM, request_stop)
signal.signal(signal.SIGINT, request_stop)

if master_process:
    os.makedirs(out_dir, exist_ok=True)
    if init_from != 'resume':
        open(os.path.join(out_dir, 'log.jsonl'), 'w').close()
    print(f'{raw_model.get_num_params():,} parameters, {tokens_per_iter:,} tokens per iteration '
          f'({ddp_world_size} processes x {gradient_accumulation_steps} micro-steps x {batch_size}'
          f'{" pairs x 2" if dpo_data else ""} x {block_size}), '
          f'{dtype} on {device}')

def evaluate_and_save():
    """Evaluates, and saves a checkpoint if the val loss is the best yet (or always_save_checkpoint): whether it
    saved. Neither is counted in the next log line's speed."""
    global best_val_loss, t_flush
    val_loss = evaluate()
    saved = val_loss < best_val_loss or always_save_checkpoint
    if saved:
        best_val_loss = min(best_val_loss, val_loss)
        save_checkpoint()
    t_flush = time.time()
    return saved


# -----------------------------------------------------------------------------
# training loop
pending = []  # (iter, STATS on the device, lr, elapsed_s) of the steps not yet logged
t0 = t_flush = time.time()
stopping = False
if iter_num == 0:
    evaluate()  # the starting point of the loss curves
    t_flush = time.time()
while iter_num < max_iters:
    lr = get_lr(iter_num)
    for group in optimizer.param_groups:
        group['lr'] = lr
    X, Y = get_batch(splits['train'], batch_size, block_size, train_gens[0], device)
    step_stats = torch.zeros(len(STATS), device=device)
    for micro_step in range(gradient_accumulation_steps):
        if ddp:  # all-reduce the gradients only once, after the last micro-step
            model.require_backward_grad_sync = micro_step == gradient_accumulation_steps - 1
        with ctx:
            loss, stats = objective(model, X, Y)
            loss = loss / gradient_accumulation_steps
        if micro_step + 1 < gradient_accumulation_steps:  # read the next batch while the device computes
            X, Y = get_batch(splits['train'], batch_size, block_size, train_gens[micro_step + 1], device)
        step_stats += stats / gradient_accumulation_steps
        scaler.scale(loss).backward()
    if grad_clip != 0.0:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(raw_model.parameters(), grad_clip)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    pending.append((iter_num, step_stats, lr, time.time() - t0))
    iter_num += 1

    stopping = stop_now()
    evaluating = iter_num % eval_interval == 0 or iter_num == max_iters
    if iter_num % log_interval == 0 or evaluating or stopping:
        flush_steps()
    saved = evaluating and evaluate_and_save()
    if stopping:
        if not saved:  # even if the val loss is worse: this is where the resumed run continues
            save_checkpoint()
        if master_process:
            print(f'stopped by a signal at iter {iter_num}; continue with --init_from=resume')
        break

if ddp:
    dist.destroy_process_group()
if master_process and not stopping and os.path.exists(ckpt_path):
    export(load_checkpoint(ckpt_path))
if ddp:
    # DDP keeps the gloo group and its worker threads alive past destroy_process_group. A worker that lets go of
    # a finished collective's tensors while Python is shutting down cannot take the GIL and aborts the process
    # (SIGABRT, "terminate called without an active exception": about 1 run in 50 here) after all the work is
    # done. Everything is written and closed: leave without the interpreter's shutdown.
    sys.stdout.flush(), sys.stderr.flush()
    os._exit(0)
