"""
Speed of medslm against Hugging Face transformers, in one run on one machine: the training step, generation
and data preparation, each with its peak memory. Prints one table and writes it as JSON.

    python tools/bench.py                                # everything; compile and bf16 take a while on a CPU
    python tools/bench.py --compile=False --bf16=off     # the quick run: 2-3 minutes on 2 idle cores
    python tools/bench.py --config_file=config/tiny_cpu.py --batch_size=16 --n_layer=2
    python tools/bench.py --train=False --generate=False --data=False   # decoding only: ours against llama.cpp

Decoding (batch 1, greedy) runs our float32 and int8 models, eager and with the decode step compiled as sample.py
--compile does, and, when llama-cpp-python is installed, llama.cpp on GGUFs export.py writes from the same weights
(f32, q8_0, q4_0, q4_k_m), at 1 and 2 threads: tokens/s, the ratio to llama.cpp at the same precision, the bytes of
weights a token reads and the GB/s that makes.

Both sides get the same shape, weights and batch: ours is copied into LlamaForCausalLM (attn_implementation
'sdpa'), and the two losses are checked equal first. Timings are medians over repetitions after warm-up, with
ours and theirs interleaved rep by rep so that the drift of a shared machine hits both alike: quote the
ratios. MFU is against the peak FLOP/s of large matmuls in the same dtype, measured here. Peak memory is what
an item adds to the process while it runs (CUDA: allocated; CPU: resident set, Linux). On a shared CPU other
processes make multi-threaded ops wait for a descheduled thread: --threads=1 gives steadier numbers there.
"""
import copy
import ctypes
import gc
import json
import os
import resource
import runpy
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import nullcontext
from dataclasses import fields

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # run as python tools/bench.py: the project's modules sit one folder up
import records
import tokenizer
from configurator import configure
from hardware import estimate_mfu
from model import GPT, GPTConfig
from optim import configure_optimizers
from quantize import Int8Linear, quantize_int8

# -----------------------------------------------------------------------------
config_file = 'config/healthslm_15m.py'  # model shape: the file's GPTConfig keys (its training keys are ignored)
batch_size = 8          # training batch rows
seq_len = 256           # training batch columns; also the model's block_size, so MFU counts attention over it
warmup = 2              # untimed steps first (a compiled model compiles in the first)
reps = 5                # timed repetitions, median reported
compile = True          # also torch.compile: training steps and a decode step
bf16 = 'auto'           # bf16 autocast training rows: 'auto' if its matmuls measure faster than float32's here
                        # (CPUs with AVX512-BF16 or AMX, GPUs), 'force', or 'off'
bf16_reps = 3           # ... timed this many times: on CPUs without bf16 units they are slow
train = True            # the sections to run
generate = True
data = True
decode = True           # batch-1 decoding: ours (float32, int8, compiled) against llama.cpp (f32, q8_0, q4_0, q4_k_m)
decode_threads = (1, 2) # ... at each of these thread counts
prompt_len = 32         # generation: greedy, batch 1
new_tokens = 128
data_tokenizer = 'bpe'  # prepare.py --tokenizer for the data section ('bpe' trains an 8192-token BPE first)
device = 'cuda' if torch.cuda.is_available() else 'cpu'
threads = 0             # torch.set_num_threads; 0 keeps torch's default (one per core)
seed = 1337
out = 'bench.json'
globals().update(dict.fromkeys(f.name for f in fields(GPTConfig)))  # --n_layer=4 etc. override config_file
# -----------------------------------------------------------------------------
configure(globals())
if bf16 not in ('auto', 'force', 'off'):
    sys.exit(f"error: --bf16 must be 'auto', 'force' or 'off', got {bf16!r}")

if threads:
    torch.set_num_threads(threads)
torch.manual_seed(seed)
cuda = device.startswith('cuda')
device_type = 'cuda' if cuda else 'cpu'
load = os.getloadavg()[0] if hasattr(os, 'getloadavg') else None
model_keys = [f.name for f in fields(GPTConfig)]
shape = {k: v for k, v in runpy.run_path(config_file).items() if k in model_keys}
shape.update({k: globals()[k] for k in model_keys if globals()[k] is not None}, block_size=seq_len)
if prompt_len + new_tokens > seq_len:
    sys.exit(f'error: prompt_len + new_tokens ({prompt_len + new_tokens}) must fit in seq_len ({seq_len})')
model = GPT(GPTConfig(**shape)).to(device)  # pristine weights: every side below starts from a copy
cfg = model.config
if (cfg.norm, cfg.pos_embedding, cfg.mlp, cfg.bias) != ('rmsnorm', 'rope', 'swiglu', False):
    sys.exit('error: the transformers side is LlamaForCausalLM: needs norm=rmsnorm, rope, swiglu, bias=False')


def llama(model):
    """LlamaForCausalLM holding a copy of model's weights: wqkv and w1 are only split (RoPE is rotate_half in
    both). As export.py's llama(), which runs as a script and cannot be imported."""
    from transformers import LlamaConfig, LlamaForCausalLM
    c = model.config
    hf = LlamaForCausalLM(LlamaConfig(
        vocab_size=c.vocab_size, hidden_size=c.n_embd, intermediate_size=c.intermediate_size,
        num_hidden_layers=c.n_layer, num_attention_heads=c.n_head, num_key_value_heads=c.n_kv_head,
        head_dim=c.head_dim, max_position_embeddings=c.block_size, rms_norm_eps=c.norm_eps,
        rope_theta=c.rope_theta, tie_word_embeddings=c.tie_embeddings, attn_implementation='sdpa',
        bos_token_id=None, eos_token_id=None, pad_token_id=None))  # no EOS: generate runs the full length
    q, kv = c.n_head * c.head_dim, c.n_kv_head * c.head_dim
    sd = {'model.embed_tokens.weight': model.tok_embeddings.weight, 'model.norm.weight': model.norm.weight,
          'lm_head.weight': model.output.weight}
    for i, layer in enumerate(model.layers):
        p, attn, ffn = f'model.layers.{i}.', layer.attention, layer.feed_forward
        sd.update(zip([p + f'self_attn.{n}_proj.weight' for n in 'qkv'], attn.wqkv.weight.split([q, kv, kv])))
        sd.update(zip([p + f'mlp.{n}_proj.weight' for n in ('gate', 'up')], ffn.w1.weight.chunk(2)))
        sd.update({p + 'self_attn.o_proj.weight': attn.wo.weight, p + 'mlp.down_proj.weight': ffn.w2.weight,
                   p + 'input_layernorm.weight': layer.attention_norm.weight,
                   p + 'post_attention_layernorm.weight': layer.ffn_norm.weight})
    hf.load_state_dict(sd)
    assert sum(p.numel() for p in hf.parameters()) == model.get_num_params(), 'the head is not tied alike'
    return hf.to(device)


def compile_decode(m):
    """m with its decode step compiled as sample.py --compile does: a step (one token, its position a tensor) runs one
    compiled graph, the prompt's pass stays eager. stream() calls m(...), so replacing forward is enough."""
    whole, step = m.forward, torch.compile(m.forward)
    m.forward = lambda idx, targets=None, pos=0, logprobs=False: \
        (step if torch.is_tensor(pos) else whole)(idx, targets, pos, logprobs)
    return m


def sync():
    if cuda:
        torch.cuda.synchronize()


def peak_memory():
    if cuda:
        return torch.cuda.max_memory_allocated()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == 'darwin' else 1024)


def warm(fn, n):
    """Runs fn n times untimed (compiling, allocating optimizer state); returns the MB it added at peak."""
    gc.collect()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    elif os.path.exists('/proc/self/clear_refs'):
        getattr(ctypes.CDLL(None), 'malloc_trim', lambda _: 0)(0)  # glibc keeps freed memory resident: the
        with open('/proc/self/clear_refs', 'w') as f:                 # next item would reuse it unseen
            f.write('5')  # resets the resident high-water mark that getrusage reports to the current size
    base = torch.cuda.memory_allocated() if cuda else peak_memory()
    for _ in range(max(n, 1)):
        fn()
    sync()
    return round((peak_memory() - base) / 2**20)


def interleaved(fns, n):
    """Median seconds of each fn over n rounds; a round runs every fn once, so drift hits all alike."""
    times = {k: [] for k in fns}
    for _ in range(n):
        for k, fn in fns.items():
            sync()
            t = time.perf_counter()
            fn()
            sync()
            times[k].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}


def peak_flops(dtype, n=4096 if cuda else 2048):
    """Best FLOP/s of an n x n matmul in dtype: the roof MFU is measured against."""
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    warm(lambda: a @ b, 1)
    return 2 * n**3 / min(interleaved({i: lambda: a @ b for i in range(5)}, 1).values())


rows = []
def row(item, ours, theirs=None, mfu=(None, None), mb=(None, None)):
    rows.append(dict(item=item, ours=ours, theirs=theirs, ratio=theirs and ours / theirs, mfu_ours=mfu[0],
                     mfu_theirs=mfu[1], mb_ours=mb[0], mb_theirs=mb[1]))


peaks, notes, tokens, decode_rows = {}, [], batch_size * seq_len, []
def gguf_files(model, outtypes):
    """{outtype: path} of the model exported by export.py as GGUF files, in a temporary folder."""
    # export.py needs a tokenizer: a small BPE, its ids padded to the model's vocab_size with unused tokens
    tmp = tempfile.mkdtemp()
    tok = tokenizer.train_bpe(['Metformin lowers hepatic glucose output in type 2 diabetes.'] * 4, 300)
    tok.save(os.path.join(tmp, 'tokenizer.json'))
    with open(os.path.join(tmp, 'meta.json'), 'w') as f:
        json.dump(dict(tokenizer='bpe', vocab_size=model.config.vocab_size, pad_id=0, unk_id=1, bos_id=2, eos_id=3,
                       tokenizer_file='tokenizer.json', splits={}), f)
    from safetensors.torch import save_model
    save_model(model, os.path.join(tmp, 'model.safetensors'))
    with open(os.path.join(tmp, 'config.json'), 'w') as f:
        json.dump({fl.name: getattr(model.config, fl.name) for fl in fields(GPTConfig)}, f)
    for outtype in outtypes:
        subprocess.run([sys.executable, os.path.join(ROOT, 'export.py'), f'--out_dir={tmp}',
                        '--format=gguf', f'--outtype={outtype}'], check=True, stdout=subprocess.DEVNULL)
    return {outtype: os.path.join(tmp, f'model-{outtype}.gguf') for outtype in outtypes}


def gguf_matrix_bytes(path):
    """Bytes of a GGUF file's matrices that a decoded token reads: all but an untied token embedding (a lookup)."""
    import gguf
    tensors = {t.name: t for t in gguf.GGUFReader(path).tensors if len(t.shape) == 2}
    if 'output.weight' in tensors:
        del tensors['token_embd.weight']
    return sum(int(t.n_bytes) for t in tensors.values())


def llama_cpp_generate(llm, prompt_ids, new_tokens, vocab_size):
    # llama.cpp's own decode loop, greedy on its logits: one llama_decode call per token
    import llama_cpp
    llm.reset()
    llm.eval(prompt_ids)
    out = []
    for _ in range(new_tokens):
        logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(vocab_size,))
        out.append(int(logits.argmax()))
        if len(out) < new_tokens:
            llm.eval(out[-1:])
    return out


if train:
    x, y = torch.randint(0, cfg.vocab_size, (2, batch_size, seq_len), device=device)
    with torch.no_grad():
        loss = model(x, y)[1].item(), llama(model)(input_ids=x, labels=y, shift_labels=y).loss.item()
    assert abs(loss[0] - loss[1]) < 1e-4, f'losses differ: {loss[0]} (ours) {loss[1]} (theirs): bad weight map'
    notes.append(f'same weights and batch: initial loss {loss[0]:.5f} (medslm), {loss[1]:.5f} (transformers)')

    def train_step(hf, dtype, compiled):
        m = llama(model) if hf else copy.deepcopy(model)
        opt = torch.optim.AdamW(m.parameters(), lr=1e-4, weight_decay=0.1, fused=cuda) if hf else \
            configure_optimizers(m, 0.1, 1e-4, (0.9, 0.95), device_type)
        m = torch.compile(m) if compiled else m
        ctx = nullcontext() if dtype == 'float32' else torch.autocast(device_type, dtype=getattr(torch, dtype))

        def step():
            with ctx:
                loss = m(input_ids=x, labels=y, shift_labels=y).loss if hf else m(x, y)[1]
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return step

    modes = ['eager'] + ['compiled'] * compile
    for dtype, n in [('float32', reps)] + [('bfloat16', bf16_reps)] * (bf16 != 'off'):
        peaks[dtype] = peak_flops(getattr(torch, dtype))
        if dtype == 'bfloat16' and peaks[dtype] < peaks['float32'] and bf16 != 'force':
            notes.append(f"bf16 matmuls peak at {peaks[dtype] / 1e9:.0f} GFLOP/s here, float32 at "
                         f"{peaks['float32'] / 1e9:.0f}: bf16 autocast would be slower, so its rows are skipped; "
                         "--bf16=force runs them")
            continue
        fns = {(mode, hf): train_step(hf, dtype, mode == 'compiled') for mode in modes for hf in (False, True)}
        mb = {k: warm(fn, warmup) for k, fn in fns.items()}  # one at a time, for clean memory peaks
        dt = interleaved(fns, n)
        for mode in modes:
            ours, theirs = (mode, False), (mode, True)
            row(f'train {mode} {dtype}', tokens / dt[ours], tokens / dt[theirs],
                [estimate_mfu(model, tokens, dt[k], peaks[dtype]) for k in (ours, theirs)], (mb[ours], mb[theirs]))
        del fns

if generate:
    prompt = torch.randint(0, cfg.vocab_size, (1, prompt_len), device=device)
    ours, hf = copy.deepcopy(model).eval(), llama(model).eval()
    fns = {'eager': lambda: ours.generate(prompt, new_tokens, temperature=0)}
    if compile:
        compiled = compile_decode(copy.deepcopy(model).eval())
        fns['compiled'] = lambda: compiled.generate(prompt, new_tokens, temperature=0)
    fns['theirs'] = lambda: hf.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False,
                                        max_new_tokens=new_tokens)

    def no_cache():
        seq = prompt
        for _ in range(new_tokens):
            seq = torch.cat([seq, ours(seq)[0][:, -1].argmax(-1, keepdim=True)], dim=1)
        return seq
    with torch.no_grad():
        same = all(torch.equal(fn(), fns['theirs']()) for fn in fns.values())
        notes.append(f"greedy tokens of medslm and transformers {'identical' if same else 'DIFFER'}")
        mb = {k: warm(fn, warmup) for k, fn in fns.items()}
        dt = interleaved(fns, reps)
        for k in list(fns)[:-1]:
            row(f'generate {k}, KV cache', new_tokens / dt[k], new_tokens / dt['theirs'], mb=(mb[k], mb['theirs']))
        # at batch 1 every token reads every weight once: past the per-op overheads, memory bandwidth is the roof
        weight_bytes = sum(p.numel() * p.element_size() for p in ours.parameters())
        best = min(dt[k] for k in list(fns)[:-1])
        notes.append(f'decoding reads {weight_bytes / 2**20:.0f} MB of weights per token: our fastest streams '
                     f'{weight_bytes * new_tokens / best / 1e9:.1f} GB/s, transformers '
                     f"{weight_bytes * new_tokens / dt['theirs'] / 1e9:.1f} GB/s")
        mb = warm(no_cache, 0)  # once: it is slow
        row('generate eager, no cache', new_tokens / interleaved({0: no_cache}, 1)[0], mb=(mb, None))
    del fns

if decode:
    # Batch-1 greedy decoding, the same weights in every runtime. A token reads every weight matrix once, so
    # bytes read per token x tokens/s, against the machine's memory bandwidth, shows what is left to gain.
    try:
        import llama_cpp
    except ImportError:
        llama_cpp = None
        notes.append('llama.cpp rows skipped: pip install llama-cpp-python==0.3.36 (it compiles llama.cpp) adds them')
    prompt = torch.randint(0, cfg.vocab_size, (1, prompt_len), device=device)
    eager = copy.deepcopy(model).eval()
    int8 = quantize_int8(copy.deepcopy(model).eval())
    matrices = [m.weight for m in eager.modules() if isinstance(m, torch.nn.Linear)]  # the head once, if tied
    weight_bytes = {'float32': 4 * sum(w.numel() for w in matrices),
                    'int8': sum(m.weight.numel() + 4 * m.scale.numel() for m in int8.modules()
                                if isinstance(m, Int8Linear))}
    fns = {'medslm float32': lambda: eager.generate(prompt, new_tokens, temperature=0),
           'medslm int8': lambda: int8.generate(prompt, new_tokens, temperature=0)}
    if compile:
        compiled = compile_decode(copy.deepcopy(model).eval())
        compiled_int8 = compile_decode(quantize_int8(copy.deepcopy(model).eval()))
        fns['medslm compiled float32'] = lambda: compiled.generate(prompt, new_tokens, temperature=0)
        fns['medslm compiled int8'] = lambda: compiled_int8.generate(prompt, new_tokens, temperature=0)
    llms = gguf_files(model, ('f32', 'q8_0', 'q4_0', 'q4_k_m')) if llama_cpp is not None else {}
    weight_bytes.update({outtype: gguf_matrix_bytes(path) for outtype, path in llms.items()})

    big = torch.ones(2**26)  # 256 MB, well past the caches: a read of it measures memory bandwidth
    for n_threads in decode_threads:
        torch.set_num_threads(n_threads)
        runs = dict(fns)
        for outtype, path in llms.items():
            llm = llama_cpp.Llama(path, n_ctx=prompt_len + new_tokens, n_threads=n_threads,
                                  n_threads_batch=n_threads, verbose=False)
            runs[f'llama.cpp {outtype}'] = lambda llm=llm: llama_cpp_generate(
                llm, prompt[0].tolist(), new_tokens, cfg.vocab_size)
        with torch.no_grad():
            for fn in runs.values():
                warm(fn, warmup)
            dt = interleaved(runs, reps)
            bandwidth = 4 * big.numel() / min(interleaved({i: big.sum for i in range(3)}, 1).values())
        # each of ours against llama.cpp at the same precision
        same = {'medslm float32': 'llama.cpp f32', 'medslm compiled float32': 'llama.cpp f32',
                'medslm int8': 'llama.cpp q8_0', 'medslm compiled int8': 'llama.cpp q8_0'}
        for k in runs:
            kind, rate = k.split()[-1], new_tokens / dt[k]
            decode_rows.append(dict(runtime=k, threads=n_threads, tokens_per_s=rate,
                                    vs_llama_cpp=rate * dt[same[k]] / new_tokens if same.get(k) in runs else None,
                                    mb_per_token=weight_bytes[kind] / 1e6, gb_per_s=weight_bytes[kind] * rate / 1e9,
                                    bandwidth_gb_per_s=bandwidth / 1e9))
    torch.set_num_threads(threads or os.cpu_count())
    del fns, runs, llms

if data:
    # prepare.py end to end on the embedded corpus less its largest file. It times the bare tokenizer's batch encode
    # on the very batches it encodes, so both rates share the machine's load. A subprocess: its workers import
    # __main__, which must not be this script
    files = sorted(records.embedded_corpus(), key=os.path.getsize)[:-1]
    with tempfile.TemporaryDirectory() as tmp, tempfile.TemporaryFile('w+') as log:
        proc = subprocess.Popen([sys.executable, os.path.join(ROOT, 'prepare.py'), *files,
                                 '--tokenizer', data_tokenizer, '--vocab_size', '8192', '--out', tmp],
                                stdout=log, stderr=subprocess.STDOUT)
        # wait4: this child's peak (and its workers'), not that of the largest child so far (compile workers)
        _, status, usage = os.wait4(proc.pid, 0)
        if os.waitstatus_to_exitcode(status):
            log.seek(0)
            sys.exit(f'error: prepare.py failed:\n{log.read()[-3000:]}')
        with open(os.path.join(tmp, 'meta.json')) as f:
            rates = json.load(f)['tokens_per_s']
    mb = usage.ru_maxrss * (1 if sys.platform == 'darwin' else 1024) // 2**20
    row(f'data {data_tokenizer}, end to end', rates['end_to_end'], rates['bare_batch_encode'], mb=(mb, None))

env = dict(torch=torch.__version__, transformers=__import__('transformers').__version__, device=device,
           threads=torch.get_num_threads(), load_average=load, params=model.get_num_params(), shape=shape,
           batch=[batch_size, seq_len], generate=[prompt_len, new_tokens], peak_flops=peaks)
print(f"medslm vs transformers {env['transformers']} (torch {env['torch']}) on {device}, {env['threads']} threads"
      + (f", load average {load:.1f} at the start" if load is not None else '') + '\n'
      + f"{cfg.n_layer} layers, dim {cfg.n_embd}, {cfg.n_head}/{cfg.n_kv_head} heads, FFN {cfg.intermediate_size}, "
      f"vocab {cfg.vocab_size}{', tied' if cfg.tie_embeddings else ''}: {env['params'] / 1e6:.2f}M parameters; "
      f"training batch {batch_size} x {seq_len}; generation {prompt_len} + {new_tokens} tokens, batch 1, greedy\n"
      + 'MFU against the peak matmul: ' + (', '.join(f'{k} {v / 1e9:.0f} GFLOP/s' for k, v in peaks.items()) or '-'))
cell = lambda v, f: '-' if v is None else format(v, f)
print(f"\n{'tokens/s':28} {'medslm':>9} {'transformers':>12} {'ratio':>6} {'MFU':>13} {'peak MB':>11}")
for r in rows:  # (an empty table when only the decode section ran)
    print(f"{r['item']:28} {cell(r['ours'], ',.0f'):>9} {cell(r['theirs'], ',.0f'):>12} {cell(r['ratio'], '.2f'):>6} "
          f"{cell(r['mfu_ours'], '.1%'):>6} {cell(r['mfu_theirs'], '.1%'):>6} {cell(r['mb_ours'], 'd'):>5} "
          f"{cell(r['mb_theirs'], 'd'):>5}")
if decode_rows:
    print(f"\n{'decoding, batch 1, greedy':28} {'threads':>7} {'tokens/s':>9} {'vs llama.cpp':>12} {'MB/token':>9} "
          f"{'GB/s':>5} {'of memory bw':>12}")
    for r in decode_rows:
        print(f"{r['runtime']:28} {r['threads']:>7} {r['tokens_per_s']:>9,.0f} {cell(r['vs_llama_cpp'], '.2f'):>12} "
              f"{r['mb_per_token']:>9.1f} {r['gb_per_s']:>5.1f} {r['gb_per_s'] / r['bandwidth_gb_per_s']:>12.0%}")
print('\n' + '\n'.join(notes))
with open(out, 'w') as f:
    json.dump(dict(env, rows=rows, decode=decode_rows, notes=notes), f, indent=2)
