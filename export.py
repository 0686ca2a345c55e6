"""
Exports a medslm model so other tools can load it without our code:

    python export.py --out_dir=out-tiny --format=hf           # -> out-tiny/hf
    python export.py --out_dir=out-tiny --format=safetensors  # -> out-tiny/safetensors
    python export.py --out_dir=out-tiny --format=gguf --outtype=q8_0  # -> out-tiny/model-q8_0.gguf

--format=hf writes a Hugging Face folder that transformers' AutoModelForCausalLM and AutoTokenizer load with no
custom code: the modern block (RMSNorm, RoPE, SwiGLU) as LlamaForCausalLM, the classic block (LayerNorm,
learned positions, GELU) as GPT2LMHeadModel, plus the tokenizer. --format=safetensors writes the plain folder
train.py exports (model.safetensors, config.json, meta.json, tokenizer.json), which sample.py and eval.py read.
--format=gguf writes one file for llama.cpp (and Ollama, LM Studio, which run it): the modern block as its
`llama` architecture, the tokenizer with its GPT-2 pre-tokenizer declared, the special and chat tokens and the
chat template; f32, bf16, q8_0 (what llama.cpp's convert_hf_to_gguf.py offers), q5_0, q4_1, q4_0 (llama-quantize's
choice of type per tensor, written by the gguf package's numpy code) or q4_k_m (llama.cpp's own quantizer, through
the optional llama-cpp-python). llama.cpp's own converter cannot take our --format=hf folder: it recognises
pre-tokenizers by a hash of known vocabularies, and ours is new.
The files are written by hand (json + safetensors, gguf through llama.cpp's gguf package): transformers is not
needed here. Every export gets a model card (card.py): README.md in the folder, <name>.README.md beside a GGUF file.
"""
import dataclasses
import importlib.util
import json
import os
import shutil
import sys

import gguf
import torch
from safetensors.torch import save_file
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

from configurator import configure
from files import atomic_folder
from card import read_records, write_card
from checkpoint import find_tokenizer, load_checkpoint, load_for_inference, training_record, write_export
from hf_layout import HF_PROJECTIONS, hf_layout, hf_projections
from chat import CHAT_TEMPLATE, MARKER_ESCAPE
from tokenizer import CHAT_TOKENS, gpt2_encoding, load_tokenizer

# -----------------------------------------------------------------------------
out_dir = 'out-tiny'    # training out_dir (ckpt.pt) or exported folder (model.safetensors) to export
format = 'hf'           # 'hf' (transformers: Llama or GPT-2 layout) | 'safetensors' (medslm's own folder) | 'gguf'
outtype = 'f32'         # gguf weights: 'f32' (lossless) | 'bf16' | 'q8_0' (8 bits in blocks of 32) | 'q5_0' | 'q4_1'
                        # | 'q4_0' | 'q4_k_m' (llama.cpp's quantizer: pip install llama-cpp-python); norms stay f32
export_dir = ''         # where to write; '' means out_dir/<format> (gguf: out_dir/model-<outtype>.gguf). Replaced if it exists
# -----------------------------------------------------------------------------
configure(globals())


def llama(model):
    """config.json and tensors of LlamaForCausalLM. RoPE already uses Llama's rotate_half layout, so q and k
    need no permutation; wqkv and w1 are only split."""
    cfg, sd = model.config, model.state_dict()
    t = {'model.embed_tokens.weight': sd['tok_embeddings.weight'], 'model.norm.weight': sd['norm.weight']}
    if not cfg.tie_embeddings:
        t['lm_head.weight'] = sd['output.weight']
    for i in range(cfg.n_layer):
        p, hf = f'layers.{i}.', f'model.layers.{i}.'
        t[hf + 'input_layernorm.weight'] = sd[p + 'attention_norm.weight']
        t[hf + 'post_attention_layernorm.weight'] = sd[p + 'ffn_norm.weight']
        for kind in ['weight', 'bias'] if cfg.bias else ['weight']:
            for ours in HF_PROJECTIONS['llama']:
                for name, rows in hf_projections(cfg, 'llama', ours, sd[p + ours + '.' + kind]).items():
                    t[hf + name + '.' + kind] = rows
    config = dict(architectures=['LlamaForCausalLM'], model_type='llama', vocab_size=cfg.vocab_size,
                  hidden_size=cfg.n_embd, intermediate_size=cfg.intermediate_size, num_hidden_layers=cfg.n_layer,
                  num_attention_heads=cfg.n_head, num_key_value_heads=cfg.n_kv_head, head_dim=cfg.head_dim,
                  hidden_act='silu', max_position_embeddings=cfg.block_size, rms_norm_eps=cfg.norm_eps,
                  rope_theta=cfg.rope_theta, attention_bias=cfg.bias, mlp_bias=cfg.bias,
                  tie_word_embeddings=cfg.tie_embeddings)
    return config, t


def gpt2(model):
    """config.json and tensors of GPT2LMHeadModel. Its Conv1D layers store weights as (in, out), the transpose
    of nn.Linear; it always has biases, so a bias-free model gets zeros."""
    cfg, sd = model.config, model.state_dict()

    def bias(name, n):
        return sd.get(name, torch.zeros(n))

    t = {'transformer.wte.weight': sd['tok_embeddings.weight'], 'transformer.wpe.weight': sd['pos_embeddings.weight'],
         'transformer.ln_f.weight': sd['norm.weight'], 'transformer.ln_f.bias': bias('norm.bias', cfg.n_embd)}
    if not cfg.tie_embeddings:
        t['lm_head.weight'] = sd['output.weight']
    for i in range(cfg.n_layer):
        p, hf = f'layers.{i}.', f'transformer.h.{i}.'
        for ours, (theirs,) in HF_PROJECTIONS['gpt2'].items():
            w = sd[p + ours + '.weight']
            t[hf + theirs + '.weight'] = w.t()
            t[hf + theirs + '.bias'] = bias(p + ours + '.bias', w.size(0))
        for ours, theirs in [('attention_norm', 'ln_1'), ('ffn_norm', 'ln_2')]:
            t[hf + theirs + '.weight'] = sd[p + ours + '.weight']
            t[hf + theirs + '.bias'] = bias(p + ours + '.bias', cfg.n_embd)
    config = dict(architectures=['GPT2LMHeadModel'], model_type='gpt2', vocab_size=cfg.vocab_size,
                  n_positions=cfg.block_size, n_embd=cfg.n_embd, n_layer=cfg.n_layer, n_head=cfg.n_head,
                  n_inner=cfg.intermediate_size, activation_function='gelu_new', layer_norm_epsilon=cfg.norm_eps,
                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, scale_attn_weights=True,
                  tie_word_embeddings=cfg.tie_embeddings)
    return config, t


def bytes_to_unicode():
    # GPT-2's printable stand-in for each byte: vocab.json and tokenizer.json spell byte-level tokens with it
    bs = [*range(ord('!'), ord('~') + 1), *range(ord('¡'), ord('¬') + 1), *range(ord('®'), ord('ÿ') + 1)]
    cs = bs + [256 + n for n in range(256 - len(bs))]
    bs = bs + [b for b in range(256) if b not in bs]
    return dict(zip(bs, map(chr, cs)))


def gpt2_vocab():
    """GPT-2's vocabulary (byte-level spelling -> id) and merges, rebuilt from the tiktoken ranks prepare.py encodes
    with. tiktoken keeps only ranks; the merge that made a token is what BPE restricted to lower ranks leaves it as."""
    ranks = gpt2_encoding()._mergeable_ranks
    byte_char = bytes_to_unicode()
    spell = lambda token: ''.join(byte_char[b] for b in token)
    merges = []
    for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
        parts = [bytes([b]) for b in token]
        while len(parts) > 2:
            pair_ranks = [ranks.get(a + b, rank) for a, b in zip(parts, parts[1:])]
            i = min(range(len(pair_ranks)), key=pair_ranks.__getitem__)
            assert pair_ranks[i] < rank, f'{token} is not a merge of lower-ranked tokens'
            parts[i:i + 2] = [parts[i] + parts[i + 1]]
        if len(parts) == 2:
            merges.append((spell(parts[0]), spell(parts[1])))
    return {spell(token): rank for token, rank in ranks.items()}, merges


def gpt2_tokenizer(path, chat):
    """GPT-2's tokenizer.json (+ vocab.json, merges.txt), from gpt2_vocab(); with chat, the chat tokens too."""
    vocab, merges = gpt2_vocab()
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)  # GPT-2's split regex
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(['<|endoftext|>'])
    if chat:  # a model fine-tuned on chat grew rows 50257..50260 for them (train.py)
        tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in CHAT_TOKENS])
    tok.save(os.path.join(path, 'tokenizer.json'))
    with open(os.path.join(path, 'vocab.json'), 'w', encoding='utf-8') as f:
        json.dump({**vocab, '<|endoftext|>': len(vocab)}, f, ensure_ascii=False)
    with open(os.path.join(path, 'merges.txt'), 'w', encoding='utf-8') as f:
        f.write('#version: 0.2\n' + ''.join(f'{a} {b}\n' for a, b in merges))


def chat_unescape(normalizer):
    """tokenizer.json's normalizer undoing CHAT_TEMPLATE's escape, then running ours (None: ours has none): "<",
    U+FFFF, "|" back to "<|", then two U+FFFF back to one. The chat markers are matched in the raw text, before any
    normalizer: a literal marker in a message, escaped, is not one, and BPE then gets the message's own text.
    Outside a chat, only text holding U+FFFF (a noncharacter) encodes differently from ours."""
    replace = lambda a, b: {'type': 'Replace', 'pattern': {'String': a}, 'content': b}
    e = MARKER_ESCAPE
    return {'type': 'Sequence',
            'normalizers': [replace(f'<{e}|', '<|'), replace(e + e, e)] + [normalizer] * bool(normalizer)}


def gguf_tensors(model):
    """llama()'s tensors under llama.cpp's names. Its `llama` architecture rotates adjacent pairs (x[2i], x[2i+1]),
    ours and Hugging Face's the halves (x[i], x[i + hd/2]): the rows of q and k are reordered per head so that
    each pair sits side by side, as convert_hf_to_gguf.py does. q.k scores and so the outputs are unchanged."""
    cfg = model.config

    def interleave(w, n_head):  # per head: rows [0, hd/2, 1, hd/2 + 1, ...]
        return w.reshape(n_head, 2, cfg.head_dim // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)

    names = {'input_layernorm': 'attn_norm', 'post_attention_layernorm': 'ffn_norm', 'self_attn.q_proj': 'attn_q',
             'self_attn.k_proj': 'attn_k', 'self_attn.v_proj': 'attn_v', 'self_attn.o_proj': 'attn_output',
             'mlp.gate_proj': 'ffn_gate', 'mlp.up_proj': 'ffn_up', 'mlp.down_proj': 'ffn_down'}
    t = {}
    for name, w in llama(model)[1].items():
        if name.startswith('model.layers.'):
            i, rest = name[len('model.layers.'):].split('.', 1)
            module, kind = rest.rsplit('.', 1)
            if module == 'self_attn.q_proj':
                w = interleave(w, cfg.n_head)
            elif module == 'self_attn.k_proj':
                w = interleave(w, cfg.n_kv_head)
            name = f'blk.{i}.{names[module]}.{kind}'
        else:
            name = {'model.embed_tokens.weight': 'token_embd.weight', 'model.norm.weight': 'output_norm.weight',
                    'lm_head.weight': 'output.weight'}[name]
        t[name] = w.detach().float().contiguous()
    return t  # a tied head has no output.weight: llama.cpp then uses token_embd


def gguf_vocab(meta, tok_dir, vocab_size):
    """(tokens, token types, merges) as llama.cpp's `gpt2` tokenizer model reads them: byte-level spelled tokens,
    the special and chat tokens as CONTROL (never produced from text, skipped in detokenization unless asked),
    ids the tokenizer does not use, up to the model's vocab_size, as UNUSED [PAD<id>] placeholders."""
    T = gguf.TokenType
    if meta['tokenizer'] == 'gpt2':
        vocab, merges = gpt2_vocab()
        special = {v: k for k, v in gpt2_encoding()._special_tokens.items()}  # <|endoftext|> and chat tokens
    else:
        with open(os.path.join(tok_dir, meta['tokenizer_file']), encoding='utf-8') as f:
            spec = json.load(f)
        vocab = spec['model']['vocab']
        merges = [m.split(' ', 1) if isinstance(m, str) else m for m in spec['model']['merges']]
        special = {t['id']: t['content'] for t in spec['added_tokens']}
    tokens, types = [f'[PAD{i}]' for i in range(vocab_size)], [T.UNUSED] * vocab_size
    for token, i in vocab.items():
        if i < vocab_size:
            tokens[i], types[i] = token, T.NORMAL
    for i, token in special.items():
        if i < vocab_size:
            tokens[i], types[i] = token, T.CONTROL
    return tokens, types, [f'{a} {b}' for a, b in merges]


GGUF_OUTTYPES = ('f32', 'bf16', 'q8_0', 'q5_0', 'q4_1', 'q4_0', 'q4_k_m')  # gguf's numpy code writes all but q4_k_m
BELOW_8_BITS = ('q5_0', 'q4_1', 'q4_0')


def gguf_tensor_type(name, t, outtype, tied):
    """The type a tensor is stored in, as llama.cpp's quantizer (llama-quantize) picks it for outtype: vectors (the
    norms) f32; under a 4- or 5-bit outtype the output head (token_embd when tied) in q8_0, where llama.cpp takes
    Q6_K (gguf's numpy code writes no k-quants; llama.cpp too takes Q8_0 where a row is not a multiple of 256), and
    an untied token_embd in outtype, as there; every other matrix in outtype. The quantized types run in blocks of
    32 along a row: a matrix whose rows are not a multiple of 32 long stays f32 (llama.cpp: f16)."""
    Q = gguf.GGMLQuantizationType
    if t.dim() == 1:
        return Q.F32
    qtype = getattr(Q, outtype.upper())
    if outtype in BELOW_8_BITS and (name == 'output.weight' or (tied and name == 'token_embd.weight')):
        qtype = Q.Q8_0
    return Q.F32 if t.size(1) % gguf.GGML_QUANT_SIZES[qtype][0] else qtype


def llama_cpp_quantize(src, dst):
    """Writes dst, the f32 GGUF file src in q4_k_m, with llama.cpp's own quantizer (llama-cpp-python): Q4_K blocks
    of 256, Q6_K for the head and half of the attn_v and ffn_down matrices; Q5_0 and Q8_0 in blocks of 32 for rows
    not a multiple of 256."""
    import ctypes
    import llama_cpp
    llama_cpp.llama_backend_init()
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M
    if llama_cpp.llama_model_quantize(src.encode(), dst.encode(), ctypes.byref(params)):
        raise SystemExit(f'error: llama.cpp could not quantize {src} to q4_k_m (its log above says why)')


def write_gguf(path, model, meta, tok_dir, outtype, name):
    if outtype == 'q4_k_m':  # llama.cpp quantizes a file: the f32 one, written beside path, then removed
        try:
            write_gguf(path + '.f32', model, meta, tok_dir, 'f32', name)
            llama_cpp_quantize(path + '.f32', path)
        finally:
            if os.path.exists(path + '.f32'):
                os.remove(path + '.f32')
        return
    cfg = model.config
    w = gguf.GGUFWriter(path, 'llama')
    w.add_name(name)
    w.add_context_length(cfg.block_size)
    w.add_embedding_length(cfg.n_embd)
    w.add_block_count(cfg.n_layer)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.n_head)
    w.add_head_count_kv(cfg.n_kv_head)
    w.add_rope_dimension_count(cfg.head_dim)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_layer_norm_rms_eps(cfg.norm_eps)
    w.add_vocab_size(cfg.vocab_size)
    w.add_file_type(getattr(gguf.LlamaFileType, 'ALL_F32' if outtype == 'f32' else f'MOSTLY_{outtype.upper()}'))
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    tokens, types, merges = gguf_vocab(meta, tok_dir, cfg.vocab_size)
    w.add_tokenizer_model('gpt2')  # byte-level BPE with merges
    w.add_tokenizer_pre('gpt-2')   # GPT-2's split regex, which our ByteLevel pre-tokenizer and tiktoken's GPT-2 use
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    # Every training document follows an EOS, so EOS is our BOS: llama.cpp then starts a plain prompt with it, as
    # sample.py does (a chat prompt too, where sample.py --chat starts at <|system|> or <|user|>)
    w.add_bos_token_id(meta['eos_id'])
    w.add_add_bos_token(True)
    w.add_eos_token_id(meta['eos_id'])
    w.add_add_eos_token(False)
    for key in ('unk', 'pad'):
        if meta.get(f'{key}_id') is not None:
            getattr(w, f'add_{key}_token_id')(meta[f'{key}_id'])
    w.add_chat_template(CHAT_TEMPLATE)
    tensors = gguf_tensors(model)
    for tname, t in tensors.items():
        qtype = gguf_tensor_type(tname, t, outtype, tied='output.weight' not in tensors)
        w.add_tensor(tname, gguf.quants.quantize(t.numpy(), qtype), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def write_hf(folder, model, tok_dir, meta):
    """A Hugging Face folder: config.json, model.safetensors and the tokenizer in the Llama or GPT-2 layout."""
    cfg = model.config
    config, tensors = (llama if hf_layout(cfg) == 'llama' else gpt2)(model)
    chat_ids = load_tokenizer(tok_dir).chat  # None: a vocabulary from before the chat tokens
    chat = chat_ids is not None and cfg.vocab_size > max(chat_ids.values())
    if meta['tokenizer'] == 'gpt2':
        gpt2_tokenizer(folder, chat)
    else:
        shutil.copy(os.path.join(tok_dir, meta['tokenizer_file']), os.path.join(folder, 'tokenizer.json'))
    with open(os.path.join(folder, 'tokenizer.json')) as f:
        tokenizer = json.load(f)
    # the chat markers as plain added tokens: split_special_tokens (below) would otherwise spell them out
    # in the text apply_chat_template renders
    for t in tokenizer['added_tokens']:
        t['special'] = t['special'] and t['content'] not in CHAT_TOKENS
    if chat:  # undoes CHAT_TEMPLATE's escape of a literal marker in a message (chat.py), before BPE sees the text
        tokenizer['normalizer'] = chat_unescape(tokenizer.get('normalizer'))
    with open(os.path.join(folder, 'tokenizer.json'), 'w', encoding='utf-8') as f:
        json.dump(tokenizer, f, ensure_ascii=False)
    special = {t['id']: t['content'] for t in tokenizer['added_tokens']}
    tokens = {f'{k}_token': special[meta[f'{k}_id']] for k in ('bos', 'eos', 'unk', 'pad')
              if meta.get(f'{k}_id') in special}
    if chat:
        tokens['chat_template'] = CHAT_TEMPLATE
    with open(os.path.join(folder, 'tokenizer_config.json'), 'w', encoding='utf-8') as f:
        # as ours: a special token's text in the input is plain text, and decode cleans up no spaces
        json.dump({'tokenizer_class': 'PreTrainedTokenizerFast', 'model_max_length': cfg.block_size,
                   'split_special_tokens': True, 'clean_up_tokenization_spaces': False, **tokens},
                  f, indent=2, ensure_ascii=False)
    config.update({f'{k}_token_id': meta.get(f'{k}_id') for k in ('bos', 'eos', 'pad')})
    config['torch_dtype'] = 'float32'
    with open(os.path.join(folder, 'config.json'), 'w') as f:
        json.dump(config, f, indent=2)
    # copies: safetensors refuses tensors that share storage (the q, k, v views of wqkv) or are transposed
    save_file({k: v.contiguous().clone() for k, v in tensors.items()}, os.path.join(folder, 'model.safetensors'),
              metadata={'format': 'pt'})


if format not in ('hf', 'safetensors', 'gguf'):
    sys.exit(f"error: --format must be 'hf', 'safetensors' or 'gguf', got {format!r}")
if outtype not in GGUF_OUTTYPES:
    sys.exit(f"error: --outtype must be one of {', '.join(GGUF_OUTTYPES)}, got {outtype!r}")
if outtype == 'q4_k_m' and importlib.util.find_spec('llama_cpp') is None:
    sys.exit("error: --outtype=q4_k_m runs llama.cpp's own quantizer, which needs the llama-cpp-python package "
             "(pip install llama-cpp-python; it compiles llama.cpp), or take --outtype=q4_0")
# float32 on the CPU, never int8: an export holds the weights as trained. It copies or converts the tokenizer's
# files, so it needs their folder rather than a loaded tokenizer
model = load_for_inference(out_dir, 'cpu', 'float32', tokenizer=False)[0].float()
cfg = model.config
tok_dir = find_tokenizer(out_dir)
with open(os.path.join(tok_dir, 'meta.json')) as f:
    meta = json.load(f)
modern, classic = hf_layout(cfg) == 'llama', hf_layout(cfg) == 'gpt2'
if format == 'hf' and not (modern or classic):
    sys.exit(f'error: norm={cfg.norm} pos_embedding={cfg.pos_embedding} mlp={cfg.mlp} n_kv_head={cfg.n_kv_head} '
             f'matches neither Llama (rmsnorm, rope, swiglu) nor GPT-2 (layernorm, learned, gelu, no GQA); '
             f'use --format=safetensors')
if format == 'gguf' and not modern:
    sys.exit(f'error: --format=gguf writes llama.cpp\'s llama architecture: it needs norm=rmsnorm, pos_embedding=rope '
             f'and mlp=swiglu, this model has {cfg.norm}, {cfg.pos_embedding}, {cfg.mlp}')

dst = export_dir or os.path.join(out_dir, f'model-{outtype}.gguf' if format == 'gguf' else format)
# what the model card is written from: the records of an export, or of a training out_dir's checkpoint
records = {**read_records(out_dir), 'config.json': dataclasses.asdict(cfg), 'meta.json': meta}
ckpt_path = os.path.join(out_dir, 'ckpt.pt')
if 'training_config.json' not in records and os.path.exists(ckpt_path):
    records['training_config.json'] = training_record(load_checkpoint(ckpt_path, mmap=True))
if format == 'gguf':  # one file, written beside dst and renamed onto it in one step: dst is never half-written
    tmp = os.path.join(os.path.dirname(os.path.abspath(dst)), f'.{os.path.basename(dst)}.tmp-{os.getpid()}')
    os.makedirs(os.path.dirname(tmp), exist_ok=True)
    try:
        write_gguf(tmp, model, meta, tok_dir, outtype, os.path.basename(os.path.abspath(out_dir)))
        os.replace(tmp, dst)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    write_card(dst, records, 'gguf', source=out_dir, outtype=outtype)
else:  # a folder, written whole or not at all (files.atomic_folder)
    with atomic_folder(dst) as tmp:
        if format == 'safetensors':  # the folder train.py exports, which sample.py and eval.py read
            write_export(tmp, model, records, tok_dir, name=dst)
        else:
            write_hf(tmp, model, tok_dir, meta)
            write_card(tmp, records, 'hf', name=dst, source=out_dir)
layout = {'safetensors': 'medslm', 'hf': 'LlamaForCausalLM' if modern else 'GPT2LMHeadModel',
          'gguf': f'llama.cpp llama, {outtype}'}[format]
print(f'wrote {dst} ({layout}, {model.get_num_params():,} parameters, tokenizer {meta["tokenizer"]})')
