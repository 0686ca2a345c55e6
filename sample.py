"""
Samples from a medslm model, streaming the text to the terminal as it is generated:

    python sample.py --out_dir=out-tiny --start="Metformin is" --num_samples=3 --max_new_tokens=200

out_dir is a training out_dir (ckpt.pt) or an exported folder (model.safetensors, meta.json, tokenizer.json).
Each sample ends at the end-of-document token or after max_new_tokens; speed goes to stderr.
"""
import os
import sys
import time
from contextlib import nullcontext

import torch

from configurator import configure
from model import load_model, quantize_int8, sample_logits, tokenizer_folder
from prepare import load_tokenizer

# -----------------------------------------------------------------------------
out_dir = 'out-tiny'    # training out_dir (ckpt.pt) or exported folder (model.safetensors)
start = ''              # the prompt, or FILE:path to read it from a file; '' starts a fresh document
num_samples = 3
max_new_tokens = 200    # cut short to fit the model's block_size
temperature = 0.8       # 0 is greedy (argmax); below 1 sharpens the distribution, above 1 flattens it
top_k = 200             # sample only from the k most likely tokens; None keeps all
top_p = 1.0             # then only from the fewest tokens whose probability reaches top_p; 1.0 keeps all
seed = 1337
device = 'cpu'          # 'cpu', 'cuda', 'cuda:1', 'mps'
dtype = 'float32'       # 'float32' | 'bfloat16' | 'float16' (autocast); CPU decoding is slower in bf16, even with bf16 units
compile = False         # torch.compile the forward pass; pays off on GPU for long generations
quantize = ''           # 'int8': int8 weights, a scale per output channel (model.quantize_int8): 4x fewer bytes to read
kv_cache = True         # False recomputes the whole sequence for every token (shows what the cache saves)
# -----------------------------------------------------------------------------
configure(globals())

if not any(os.path.exists(os.path.join(out_dir, f)) for f in ('ckpt.pt', 'model.safetensors')):
    sys.exit(f'error: {out_dir} holds neither ckpt.pt nor model.safetensors (--out_dir)')
if start.startswith('FILE:'):
    if not os.path.isfile(start[5:]):
        sys.exit(f'error: prompt file {start[5:]} not found')
    with open(start[5:], encoding='utf-8') as f:
        start = f.read()
ptdtype = {'float32': torch.float32, 'bfloat16': torch.bfloat16, 'float16': torch.float16}.get(dtype)
if ptdtype is None:
    sys.exit(f"error: --dtype must be 'float32', 'bfloat16' or 'float16', got {dtype!r}")
device_type = 'cuda' if 'cuda' in device else 'cpu'
ctx = nullcontext() if ptdtype == torch.float32 else torch.autocast(device_type=device_type, dtype=ptdtype)
torch.manual_seed(seed)

model = load_model(out_dir, device).eval()
if quantize not in ('', 'int8'):
    sys.exit(f"error: --quantize must be '' or 'int8', got {quantize!r}")
if quantize:
    quantize_int8(model)
if compile:
    model.forward = torch.compile(model.forward, dynamic=True)  # stream() calls model(...), so this is what runs

tok_dir = tokenizer_folder(out_dir)
if tok_dir is None:
    sys.exit(f'error: no tokenizer (meta.json) in {out_dir}, its export/ or its training data folder')
tok = load_tokenizer(tok_dir)
if tok.vocab_size > model.config.vocab_size:
    sys.exit(f'error: the tokenizer in {tok_dir} has {tok.vocab_size} tokens, the model {model.config.vocab_size}')

# in the training stream every document follows an EOS token, so a prompt starts after one too
ids = [tok.eos_id] + tok.encode(start)
block_size = model.config.block_size
if len(ids) >= block_size:
    sys.exit(f'error: the prompt is {len(ids) - 1} tokens; this model reads at most {block_size - 2} '
             f'(block_size {block_size})')
n_new = min(max_new_tokens, block_size - len(ids))
if n_new < max_new_tokens:
    print(f'note: max_new_tokens cut to {n_new} to fit block_size {block_size}', file=sys.stderr)
x = torch.tensor([ids], dtype=torch.long, device=device)
generator = torch.Generator(device=device).manual_seed(seed)


def full_forward_stream(idx, steps):
    # no cache: every step runs the whole sequence through the model again
    for _ in range(steps):
        logits, _ = model(idx)
        token = sample_logits(logits[:, -1], temperature, top_k or None, top_p, generator)
        yield token
        if token.item() == tok.eos_id:
            return
        idx = torch.cat([idx, token[:, None]], dim=1)


n_tokens, t0 = 0, time.time()
with torch.no_grad(), ctx:
    for _ in range(num_samples):
        sys.stdout.write(start)
        steps = (model.stream(x, n_new, temperature, top_k or None, top_p, tok.eos_id, generator) if kv_cache
                 else full_forward_stream(x, n_new))
        new, shown = [], 0
        for token in steps:
            n_tokens += 1
            if token.item() == tok.eos_id:
                break
            new.append(token.item())
            text = tok.decode(new)
            # a character whose bytes are split across tokens decodes to U+FFFD until its last byte arrives
            if not text.endswith('\ufffd'):
                sys.stdout.write(text[shown:])
                sys.stdout.flush()
                shown = len(text)
        sys.stdout.write(tok.decode(new)[shown:] + '\n---------------\n')
        sys.stdout.flush()
dt = time.time() - t0
print(f'{n_tokens} tokens in {dt:.2f}s: {n_tokens / dt:.1f} tokens/s '
      f'({"KV cache" if kv_cache else "no cache"}, {device}, {quantize or dtype})', file=sys.stderr)
