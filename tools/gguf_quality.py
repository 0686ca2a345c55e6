"""
What each GGUF outtype costs in quality. export.py writes the model in every outtype; the file's tensors are read
back, dequantized (gguf.quants) into our model and scored on the val split: bits per byte, the share of positions
whose top token equals the float32 model's, and how many greedy tokens after a few val prompts equal float32's
before the first difference. With llama-cpp-python importable, also llama.cpp's own bits per byte on each file
(without it q4_k_m, which only llama.cpp's quantizer writes, is skipped). Prints one markdown table.

    python tools/gguf_quality.py --out_dir=out-tiny/export --data_dir=data/pubmed_4k \
        --outtypes=f32,q8_0,q5_0,q4_1,q4_0,q4_k_m
    python tools/gguf_quality.py --out_dir=out-tiny/export --windows=16 --outtypes=f32,q4_0   # a quick look

Bits per byte: the val split in non-overlapping windows of block_size tokens, every token after a window's first
scored, bytes per token from meta.json's val split (eval.py's strided windows give early tokens more context: its
figure is a little lower). llama.cpp scores the same windows with an f32 KV cache, so the columns compare directly;
both "vs f32" are against our float32 model.
"""
import copy
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from collections import Counter

import gguf
import numpy as np
import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # run as python tools/gguf_quality.py: the project's modules sit one folder up
from checkpoint import load_model
from configurator import configure
from data import shard_split

# -----------------------------------------------------------------------------
out_dir = 'out-tiny/export'  # exported folder (model.safetensors) or training out_dir (ckpt.pt), tokenizer findable
data_dir = 'data/pubmed_4k'  # tokenized data (meta.json + shards) whose val split is scored
outtypes = 'f32,q8_0,q5_0,q4_1,q4_0,q4_k_m'  # export.py --outtype values, comma-separated
windows = 0             # val windows of block_size tokens scored; 0: all of them
batch_size = 8          # windows per forward pass of our model
prompts = 8             # greedy agreement: this many val prompts of prompt_len tokens, one every prompt_stride
prompt_len = 16
prompt_stride = 997     # (prime: the prompts fall at varied places within the windows)
new_tokens = 48
# -----------------------------------------------------------------------------
configure(globals())
try:
    import llama_cpp
except ImportError:
    llama_cpp = None

start = time.perf_counter()
model = load_model(out_dir).eval()
cfg, T = model.config, model.config.block_size
with open(os.path.join(data_dir, 'meta.json')) as f:
    meta = json.load(f)
if 'val' not in meta['splits']:
    sys.exit(f'error: {data_dir}/meta.json has no val split')
files, _, token_dtype = shard_split(data_dir, meta, 'val', T)
val = np.concatenate([np.fromfile(p, dtype=token_dtype) for p in files]).astype(np.int64)
if val.max() >= cfg.vocab_size:
    sys.exit(f'error: {data_dir} holds token id {val.max()}, past the model\'s vocab_size {cfg.vocab_size}')
val_windows = torch.from_numpy(val[:len(val) // T * T].reshape(-1, T))[:windows or None]
n_scored = len(val_windows) * (T - 1)
bytes_per_token = meta['splits']['val']['bytes'] / meta['splits']['val']['tokens']
if (prompts - 1) * prompt_stride + prompt_len > len(val):
    sys.exit(f'error: {prompts} val prompts every {prompt_stride} tokens need more than {len(val)} val tokens')
prompt_ids = [torch.from_numpy(val[i * prompt_stride:i * prompt_stride + prompt_len])[None] for i in range(prompts)]


def bits_per_byte(nll_nats):
    return nll_nats / math.log(2) / (n_scored * bytes_per_token)


@torch.no_grad()
def score(m):
    """(val bits per byte, top token at every position of every window (W, T)) of our model m."""
    nll, top = 0.0, []
    for x in val_windows.split(batch_size):
        logits = m.output(m.hidden(x)).float()  # (B, T, vocab)
        nll += F.cross_entropy(logits[:, :-1].flatten(0, 1), x[:, 1:].flatten(), reduction='sum').item()
        top.append(logits.argmax(-1))
    return bits_per_byte(nll), torch.cat(top)


def greedy(m):
    return [m.generate(p, new_tokens, temperature=0)[0, prompt_len:].tolist() for p in prompt_ids]


def read_back(path):
    """The GGUF file's tensors dequantized into our state dict, export.py's gguf_tensors undone (q and k rows
    de-interleaved per head, wqkv and w1 re-stacked), and how many tensors it stores in each type."""
    tensors = gguf.GGUFReader(path).tensors
    w = {t.name: torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type).copy()).float() for t in tensors}

    def halves(rows, n_head):  # per head: rows [0, 2, 4, ..., 1, 3, ...] back to rotate_half's order
        return rows.reshape(n_head, cfg.head_dim // 2, 2, -1).transpose(1, 2).reshape(rows.shape)

    state = {'tok_embeddings.weight': w['token_embd.weight'], 'norm.weight': w['output_norm.weight'],
             'output.weight': w.get('output.weight', w['token_embd.weight'])}  # tied: the file has no output
    for i in range(cfg.n_layer):
        b, p = f'blk.{i}.', f'layers.{i}.'
        state[p + 'attention_norm.weight'] = w[b + 'attn_norm.weight']
        state[p + 'ffn_norm.weight'] = w[b + 'ffn_norm.weight']
        for kind in ('weight', 'bias') if cfg.bias else ('weight',):
            q, k, v = (w[b + f'attn_{n}.{kind}'] for n in 'qkv')
            state[p + f'attention.wqkv.{kind}'] = torch.cat([halves(q, cfg.n_head), halves(k, cfg.n_kv_head), v])
            state[p + f'attention.wo.{kind}'] = w[b + f'attn_output.{kind}']
            state[p + f'feed_forward.w1.{kind}'] = torch.cat([w[b + f'ffn_gate.{kind}'], w[b + f'ffn_up.{kind}']])
            state[p + f'feed_forward.w2.{kind}'] = w[b + f'ffn_down.{kind}']
    return state, Counter(t.tensor_type.name for t in tensors)


def llama_cpp_bits_per_byte(path):
    # the same windows, each from an empty cache; an f32 KV cache, as llama.cpp's default f16 one alone moves
    # logits by ~1e-3
    f32, threads = llama_cpp.GGML_TYPE_F32, torch.get_num_threads()
    llm = llama_cpp.Llama(path, n_ctx=T, n_batch=T, n_ubatch=T, n_threads=threads, n_threads_batch=threads,
                          logits_all=True, type_k=f32, type_v=f32, flash_attn=False, verbose=False)
    nll = 0.0
    for x in val_windows:
        llm.reset()
        llm.eval(x.tolist())
        logits = torch.from_numpy(np.array(llm.scores[:T - 1]))
        nll += F.cross_entropy(logits, x[1:], reduction='sum').item()
    return bits_per_byte(nll)


def measure(outtype, folder):
    """One table row for outtype, or None, saying why, where export.py cannot write it (its one-line error)."""
    path = os.path.join(folder, f'model-{outtype}.gguf')
    export = subprocess.run([sys.executable, os.path.join(ROOT, 'export.py'), f'--out_dir={out_dir}',
                             '--format=gguf', f'--outtype={outtype}', f'--export_dir={path}'],
                            capture_output=True, text=True)
    if export.returncode:
        print(f'{outtype}: skipped, {(export.stderr.strip().splitlines() or ["export.py failed"])[-1]}', flush=True)
        return None
    state, types = read_back(path)
    m = copy.deepcopy(model)
    m.load_state_dict(state)
    bpb, top = score(m)
    row = dict(outtype=outtype, bytes=os.path.getsize(path), bpb=bpb,
               types=', '.join(f'{n} {k}' for k, n in types.most_common()), top=(top == ref_top).float().mean().item(),
               greedy=[next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), new_tokens)  # before a difference
                       for a, b in zip(greedy(m), ref_greedy)],
               llama_cpp=llama_cpp_bits_per_byte(path) if llama_cpp else None)
    print(json.dumps(row), flush=True)
    return row


ref_bpb, ref_top = score(model)
ref_greedy = greedy(model)
print(f'float32 model: val bits/byte {ref_bpb:.5f}, {n_scored:,} tokens scored in {len(val_windows)} windows of {T}')
if llama_cpp is None:
    print("llama.cpp's own bits per byte left out (and q4_k_m): llama-cpp-python is not importable")
with tempfile.TemporaryDirectory(prefix='gguf_quality-') as folder:
    rows = [row for row in (measure(t, folder) for t in outtypes.split(',')) if row]

vs = lambda bpb: '- | -' if bpb is None else f'{bpb:.5f} | {bpb / ref_bpb - 1:+.2%}'
print(f'\n| outtype | file bytes | tensor types | val bits/byte | vs f32 | same top token | greedy tokens equal '
      f'to f32 (of {new_tokens}, {prompts} prompts) | llama.cpp val bits/byte | vs f32 |\n' + '|---' * 9 + '|')
for r in rows:
    print(f"| {r['outtype']} | {r['bytes']:,} | {r['types']} | {vs(r['bpb'])} | {r['top']:.1%} | "
          f"{' '.join(map(str, r['greedy']))} | {vs(r['llama_cpp'])} |")
print(f'\n{time.perf_counter() - start:.0f} s')
