"""
Samples from a medslm model, streaming the text to the terminal as it is generated:

    python sample.py --out_dir=out-tiny --start="Metformin is" --num_samples=3 --max_new_tokens=200

out_dir is a training out_dir (ckpt.pt) or an exported folder (model.safetensors, meta.json, tokenizer.json).
Each sample ends at the end-of-document token or after max_new_tokens; the speed of generation goes to stderr.

An instruction-tuned model (train.py on chat data) chats: type a message and Enter, the reply streams back;
the conversation so far is the context, its oldest turns dropped to fit block_size; Ctrl-D ends. With --start,
one reply to that message (for scripts):

    python sample.py --out_dir=out-sft-tiny --chat
    python sample.py --out_dir=out-sft-tiny --chat --start="Write a title for this abstract. ..." --temperature=0
"""
import os
import sys
import time

import torch

from configurator import configure
from chat import render, require_chat
from checkpoint import load_for_inference
from model import sample_logits

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
dtype = 'auto'          # 'float32' | 'bfloat16' | 'float16' (autocast) | 'auto': float32 on CPU (decoding is slower in bf16
                        # there, even with bf16 units), bf16 on GPUs that have it, else fp16
compile = False         # torch.compile the decode step: at healthslm_15m's shape on a CPU 1.5x tokens/s in float32, 2x
                        # in int8, after a first compile of ~25 s (~5 s once cached): pays off for long generations
quantize = ''           # 'int8': int8 weights, a scale per output channel (quantize.py): 4x fewer bytes to read
kv_cache = True         # False recomputes the whole sequence for every token (shows what the cache saves)
chat = False            # talk to an instruction-tuned model; with start, answer that one message and exit
system = ''             # chat: a system message that opens the conversation
# -----------------------------------------------------------------------------
configure(globals())

if start.startswith('FILE:'):
    if not os.path.isfile(start[5:]):
        sys.exit(f'error: prompt file {start[5:]} not found')
    with open(start[5:], encoding='utf-8') as f:
        start = f.read()
torch.manual_seed(seed)
model, tok, ctx = load_for_inference(out_dir, device, dtype, quantize)
if compile or (quantize and model.output.weight.is_cuda):  # eager int8 on a GPU converts every weight per call
    # the decode step only (stream() calls model(...)), one graph; the prompt's pass stays eager. Compiling the whole
    # forward, dynamic=True, decoded healthslm_15m at 0.55x (int8) to 0.7x (float32) the speed on a CPU
    whole, step = model.forward, torch.compile(model.forward)
    model.forward = lambda idx, targets=None, pos=0, logprobs=False: \
        (step if torch.is_tensor(pos) else whole)(idx, targets, pos, logprobs)

block_size = model.config.block_size
generator = torch.Generator(device=device).manual_seed(seed)


def full_forward_stream(idx, steps, stop_id):
    # no cache: every step runs the whole sequence through the model again
    for _ in range(steps):
        logits, _ = model(idx)
        token = sample_logits(logits[:, -1], temperature, top_k or None, top_p, generator)
        yield token
        if token.item() == stop_id:
            return
        idx = torch.cat([idx, token[:, None]], dim=1)


def write_reply(ids, max_new, stop_id):
    """Samples up to max_new tokens after ids, writing the text to stdout as it comes; returns the new ids."""
    x = torch.tensor([ids], dtype=torch.long, device=device)
    steps = (model.stream(x, max_new, temperature, top_k or None, top_p, stop_id, generator) if kv_cache
             else full_forward_stream(x, max_new, stop_id))
    new, shown = [], 0
    for token in steps:
        if token.item() == stop_id:
            break
        new.append(token.item())
        text = tok.decode(new)
        # a character whose bytes are split across tokens decodes to U+FFFD until its last byte arrives
        if not text.endswith('\ufffd'):
            sys.stdout.write(text[shown:])
            sys.stdout.flush()
            shown = len(text)
    sys.stdout.write(tok.decode(new)[shown:])
    sys.stdout.flush()
    return new


def fit_history(messages):
    """The rendered prompt of the conversation, its oldest turns dropped until a reply of max_new_tokens fits in
    block_size (the system message and the newest user message always stay); None if even those do not."""
    head, turns = messages[:1] if system else [], messages[1:] if system else messages
    while True:
        ids, _ = render(head + turns, tok, add_generation_prompt=True)
        if len(ids) + max_new_tokens <= block_size or len(turns) == 1:
            return ids if len(ids) < block_size else None
        turns = turns[2:] if len(turns) > 2 else turns[-1:]  # a user turn and its reply go together


def read_message():
    """The next non-blank line of stdin, with a prompt at a terminal; None at the end of input (Ctrl-D)."""
    while True:
        if sys.stdin.isatty():
            sys.stdout.write('> ')
            sys.stdout.flush()
        line = sys.stdin.readline()
        if not line:
            return None
        if line.strip():
            return line.rstrip('\n')


n_tokens, seconds = 0, 0.0  # seconds generating: not those spent waiting for the user
if chat:
    require_chat(tok, model.config.vocab_size)
    history = [{'role': 'system', 'content': system}] if system else []
    if not start and sys.stdin.isatty():
        print('(type a message and Enter; Ctrl-D leaves)', file=sys.stderr)
    with torch.no_grad(), ctx:
        while True:
            message = start or read_message()
            if message is None:
                break
            history.append({'role': 'user', 'content': message})
            ids = fit_history(history)
            if ids is None:
                print(f'(that message does not fit in {block_size} tokens; say it shorter)', file=sys.stderr)
                history.pop()
            else:
                t0 = time.perf_counter()
                reply = write_reply(ids, min(max_new_tokens, block_size - len(ids)), tok.chat['end'])
                seconds += time.perf_counter() - t0
                sys.stdout.write('\n')
                n_tokens += len(reply)
                history.append({'role': 'assistant', 'content': tok.decode(reply)})
            if start:
                break
else:
    # in the training stream every document follows an EOS token, so a prompt starts after one too
    ids = [tok.eos_id] + tok.encode(start)
    if len(ids) >= block_size:
        sys.exit(f'error: the prompt is {len(ids) - 1} tokens; this model reads at most {block_size - 2} '
                 f'(block_size {block_size})')
    n_new = min(max_new_tokens, block_size - len(ids))
    if n_new < max_new_tokens:
        print(f'note: max_new_tokens cut to {n_new} to fit block_size {block_size}', file=sys.stderr)
    with torch.no_grad(), ctx:
        for _ in range(num_samples):
            sys.stdout.write(start)
            t0 = time.perf_counter()
            n_tokens += len(write_reply(ids, n_new, tok.eos_id))
            seconds += time.perf_counter() - t0
            sys.stdout.write('\n---------------\n')
            sys.stdout.flush()
print(f'{n_tokens} tokens in {seconds:.2f}s of generation: {n_tokens / max(seconds, 1e-9):.1f} tokens/s '
      f'({"KV cache" if kv_cache else "no cache"}, {device}, '
      f'{quantize or str(getattr(ctx, "fast_dtype", torch.float32)).removeprefix("torch.")})', file=sys.stderr)
