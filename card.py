"""
The model card: README.md in every model folder that train.py, export.py and merge.py write (beside a GGUF file,
<name>.README.md), with a model hub's YAML header, written from the records a medslm folder keeps: config.json,
meta.json (prepare.py's tokenizer and data counts), training_config.json (train.py's settings, losses, wall time,
machines and the model it started from), merge.json and eval.py's eval_*.json. Nothing else goes in: what a run
did not record or measure is left out of the card, never guessed.

    refresh_card('out-tiny/export')     # after eval.py has written eval_*.json into the folder
"""
import json
import os
import re

import torch

from files import sha256, write_text
from hf_layout import hf_layout
from model import GPT, GPTConfig
from tokenizer import tokenizer_fingerprint

RECORDS = ('config.json', 'meta.json', 'training_config.json', 'merge.json')  # and eval_*.json
FILES = {'model.safetensors': 'the weights (float32)', 'config.json': 'the model shape',
         'meta.json': "the tokenizer's data: documents, tokens and bytes per split (prepare.py)",
         'training_config.json': "train.py's record of the run: its settings, losses, time and machines",
         'tokenizer.json': 'the tokenizer', 'tokenizer_config.json': "transformers' tokenizer settings",
         'vocab.json': "GPT-2's vocabulary", 'merges.txt': "GPT-2's merges",
         'optimizer.pt': "the optimizer's state, to continue training", 'loss_curves.png': 'train and val loss',
         'merge.json': "the merge: method, parameters, its inputs' sha256",
         'adapter/': "the LoRA adapters alone, in peft's layout (its own README.md)",
         'adapter_config.json': "peft's adapter settings", 'adapter_model.safetensors': 'the adapter weights'}
KIND = {'pretraining': 'Pre-trained', 'sft': 'Instruction-tuned (SFT)', 'dpo': 'Preference-tuned (DPO)'}


def read_records(folder):
    """{file name: its JSON} of the records (RECORDS, eval_*.json) that folder holds; a bad file is a one-line error."""
    records = {}
    for name in sorted(os.listdir(folder)):
        if name in RECORDS or (name.startswith('eval_') and name.endswith('.json')):
            try:
                with open(os.path.join(folder, name)) as f:
                    records[name] = json.load(f)
            except ValueError as e:
                raise SystemExit(f'error: cannot read {os.path.join(folder, name)}: {e}')
    return records


def refresh_card(folder):
    """Writes the card of a medslm model folder again from its records, as eval.py does after adding one. Any other
    folder (a training out_dir, which has no card; a transformers or peft folder, whose records are not ours) is
    left as it is. The card's path, or None."""
    records = read_records(folder)
    ours = 'n_layer' in records.get('config.json', {}) and 'meta.json' in records
    if ours and os.path.exists(os.path.join(folder, 'README.md')):
        return write_card(folder, records)


def write_card(path, records, fmt='medslm', name=None, source=None, outtype=None):
    """Writes the card of the model at path from records (read_records' form), whole (temp + rename): into the
    folder path, or for a GGUF file beside it. fmt: 'medslm' (our folder), 'hf' (transformers), 'adapter' (peft)
    or 'gguf' (of outtype). name: the path the card calls the model by (path once a temporary folder is renamed);
    source: the medslm folder it came from, which our scripts read (default name)."""
    name = name or path
    gguf = fmt == 'gguf'
    card = (os.path.splitext(path)[0] + '.README.md') if gguf else os.path.join(path, 'README.md')
    files = [path] if gguf else [os.path.join(path, f) for f in sorted(os.listdir(path)) if f != 'README.md']
    text = render(records, fmt, name, source or name, outtype, files)
    write_text(card, text)
    return card


def render(records, fmt, name, source, outtype, files):
    args = records['config.json']
    cfg = GPTConfig(**{k: v for k, v in args.items() if k in GPTConfig.__dataclass_fields__})
    with torch.device('meta'):  # the exact count without allocating the weights
        params = GPT(cfg).get_num_params()
    training, merge = records.get('training_config.json') or {}, records.get('merge.json')
    run = training.get('run') or {}
    meta = records['meta.json']
    article = 'an' if re.match(r'(8|1[18](,\d{3})*$)', f'{params:,}') else 'a'  # an 8..., an 11,000; a 110,000
    model = f'{article} {params:,}-parameter decoder-only language model of biomedical text'
    what = {'medslm': f"{model}, in medslm's folder layout (sample.py, eval.py, export.py and merge.py read it)",
            'hf': f"{model}, in transformers' "
                  f"{'LlamaForCausalLM' if hf_layout(cfg) == 'llama' else 'GPT2LMHeadModel'} layout",
            'adapter': f"LoRA adapters, in peft's layout, for {model}",
            'gguf': f'{model}, as a GGUF file for llama.cpp ({outtype} weights)'}[fmt]
    origin = (f"A {merge['method']} merge of {len(merge['models'])} models by" if merge else
              KIND.get(run.get('kind'), 'Trained') + (' from scratch' if run and not run.get('base') else '') + ' with')
    sections = [header(cfg, meta, training, merge, fmt),
                f'# {title(source)}\n\n{origin} medslm: {what}.\n',
                architecture(cfg, meta, params), data(meta, training, merge), recipe(training),
                results(training, records, fmt, outtype), usage(cfg, run, merge, fmt, name, source),
                files_table(files), limitations(params), lineage(training, merge, fmt)]
    return '\n'.join(s for s in sections if s)


def title(source):
    # train.py's out_dir/export and export.py's out_dir/<format> are named for their out_dir
    path = os.path.abspath(source)
    generic = os.path.basename(path) in ('export', 'hf', 'safetensors')
    return os.path.basename(os.path.dirname(path) if generic else path)


def yaml_list(key, values):
    # JSON strings are YAML's double-quoted scalars: paths and free text need no escaping rules of their own
    return f'{key}:\n' + ''.join(f'- {json.dumps(v, ensure_ascii=False)}\n' for v in values) if values else ''


def header(cfg, meta, training, merge, fmt):
    """The model hub's metadata block. The licence is the data's to decide, so: other."""
    run = training.get('run') or {}
    bases = [m['path'] for m in merge['models'] + [merge.get('base')] if m] if merge else \
        [run['base']['base']] if run.get('base') else []
    relation = 'adapter' if fmt == 'adapter' else 'merge' if merge else 'finetune' if bases else None
    tags = ['medslm', 'medical', 'biomedical', 'pubmed', hf_layout(cfg) or 'custom'] + \
        [t for t, on in (('gguf', fmt == 'gguf'), ('lora', bool(training.get('lora'))), ('merge', bool(merge)),
                         (run.get('kind'), run.get('kind') in ('sft', 'dpo'))) if on]
    library = {'hf': 'transformers', 'adapter': 'peft'}.get(fmt)
    return ('---\nlicense: other\n' + yaml_list('language', ['en'])
            + (f'library_name: {library}\n' if library else '') + 'pipeline_tag: text-generation\n'
            + yaml_list('tags', tags) + yaml_list('base_model', bases)
            + (f'base_model_relation: {relation}\n' if relation else '')
            + yaml_list('datasets', datasets(meta, training)) + '---\n')


def datasets(meta, training):
    """Free text naming the data the weights learnt from: the run's data folder, the corpus the tokenizer came with."""
    named = []
    if training.get('data_dir'):
        kind = (training.get('run') or {}).get('kind')
        what = {'pretraining': 'token shards', 'sft': 'conversations', 'dpo': 'preference pairs'}.get(kind, 'data')
        named.append(f"{training['data_dir']} ({what})")
    inputs = [os.path.basename(i['path']) for i in meta.get('inputs') or [] if isinstance(i, dict)]
    if inputs:
        more = f' and {len(inputs) - 3} more' if len(inputs) > 3 else ''
        named.append(f"prepare.py corpus of {', '.join(inputs[:3])}{more}")
    return named


def architecture(cfg, meta, params):
    modern = cfg.norm == 'rmsnorm' and cfg.pos_embedding == 'rope'
    block = 'modern (RMSNorm, rotary, ' if modern else 'classic (LayerNorm, learned positions, '
    block += ('SwiGLU' if cfg.mlp == 'swiglu' else 'GELU') + (', biases)' if cfg.bias else ', no biases)')
    vocab = f"{'GPT-2' if meta['tokenizer'] == 'gpt2' else 'BPE'} {cfg.vocab_size:,}"
    return ('## Model\n\n| block | layers x dim | heads (q/kv) | FFN | vocab | context | tied | parameters |\n'
            '|---|---|---|---|---|---|---|---|\n'
            f"| {block} | {cfg.n_layer} x {cfg.n_embd} | {cfg.n_head} / {cfg.n_kv_head} | "
            f"{'SwiGLU' if cfg.mlp == 'swiglu' else 'GELU'} {cfg.intermediate_size:,} | {vocab} | {cfg.block_size:,} "
            f"| {'yes' if cfg.tie_embeddings else 'no'} | {params:,} |\n")


def data(meta, training, merge):
    kind = (training.get('run') or {}).get('kind')
    lines = ['## Data\n']
    if kind == 'pretraining':
        lines.append(f"Pre-trained on `{training['data_dir']}`, token shards that prepare.py wrote:\n")
    elif kind in ('sft', 'dpo'):
        lines.append(f"Tuned on the {'conversations' if kind == 'sft' else 'preference pairs'} of "
                     f"`{training['data_dir']}` (train.jsonl; val.jsonl for the val loss), the loss on the replies "
                     "alone. The tokenizer is the base's, with the data it came with (its meta.json):\n")
    else:
        lines.append(f"The tokenizer{', which the inputs share,' if merge else ''} came with this data (meta.json):\n")
    inputs = [i for i in meta.get('inputs') or [] if isinstance(i, dict)]
    if inputs:
        shown = ', '.join(f"`{os.path.basename(i['path'])}`" for i in inputs[:5])
        lines.append(f"Source files ({len(inputs):,}): {shown}{' ...' if len(inputs) > 5 else ''} (each with its "
                     "sha256 in meta.json).\n")
    lines.append('| split | documents | tokens | bytes |\n|---|---|---|---|')
    for split, s in (meta.get('splits') or {}).items():
        lines.append(f'| {split} | ' + ' | '.join(f'{s[k]:,}' if k in s else '' for k in ('docs', 'tokens', 'bytes'))
                     + ' |')
    mix = (training.get('config') or {}).get('mix')
    if mix:
        lines.append(f'\nTraining batches also drew from other data (`mix`, folder:share): `{mix}`.')
    fingerprint = tokenizer_fingerprint(meta)
    gpt2 = meta['tokenizer'] == 'gpt2'
    tokenizer = "GPT-2's BPE (tiktoken's ranks)" if gpt2 else 'a ByteLevel BPE that prepare.py trained'
    lines.append(f"\nTokenizer: {tokenizer}, {meta['vocab_size']:,} ids"
                 + (f', fingerprint (sha256 of its vocabulary) `{fingerprint}`.' if fingerprint else '.'))
    return '\n'.join(lines) + '\n'


def recipe(training):
    c, run = training.get('config') or {}, training.get('run') or {}
    has = lambda *keys: all(c.get(k) is not None for k in keys)
    rows = []
    if has('learning_rate', 'beta1', 'beta2', 'weight_decay'):
        adamw = f"AdamW, betas ({c['beta1']}, {c['beta2']}), weight decay {c['weight_decay']}"
        optimizer = (f"Muon (its peak lr {c['muon_lr']:g}) for the blocks' matrices, {adamw} for the rest"
                     if c.get('muon_lr') else adamw)
        clip = f", gradient clipping at {c['grad_clip']}" if c.get('grad_clip') else ''
        rows.append(('optimizer', optimizer + clip))
    if has('learning_rate', 'warmup_iters', 'lr_decay_iters', 'min_lr'):
        rows.append(('schedule', f"linear warmup over {c['warmup_iters']:,} steps to {c['learning_rate']:g}, cosine "
                                 f"decay to {c['min_lr']:g} at step {c['lr_decay_iters']:,}"))
    if has('gradient_accumulation_steps', 'batch_size', 'block_size'):
        pairs = 2 if run.get('kind') == 'dpo' else 1
        tokens = pairs * c['gradient_accumulation_steps'] * c['batch_size'] * c['block_size']
        steps = c['gradient_accumulation_steps']
        rows.append(('batch', f"{tokens:,} tokens per step: {steps} micro-step{'s' * (steps != 1)} x "
                              f"{c['batch_size']} {'pairs x 2 sequences' if pairs == 2 else 'sequences'} x "
                              f"{c['block_size']:,} tokens"))
    if training.get('iter_num') is not None:
        rows.append(('steps', f"{training['iter_num']:,}"))
    if training.get('lora'):
        a = training['lora']
        rows.append(('LoRA', f"rank {a['rank']}, alpha {a['alpha']:g}, dropout {a['dropout']:g}, on {a['targets']}"
                             + (', embeddings and head trained in full' if a['train_embeddings'] else '')))
    if run.get('kind') == 'dpo' and has('dpo_beta'):
        rows.append(('DPO beta', f"{c['dpo_beta']:g}"))
    machines = run.get('machines') or []
    if machines:
        rows.append(('dtype', ', '.join(sorted({m['dtype'] + (' autocast' if m['dtype'] != 'float32' else '')
                                                for m in machines}))))
        rows.append(('hardware', '; then '.join(f"{m['processes']} x {m['device']}" for m in machines)))
    if run.get('seconds') is not None:
        rows.append(('wall time', f"{duration(run['seconds'])} (the training loop, evaluations included)"))
    if has('seed'):
        rows.append(('seed', str(c['seed'])))
    return '## Training\n\n| | |\n|---|---|\n' + ''.join(f'| {k} | {v} |\n' for k, v in rows) if rows else ''


def results(training, records, fmt, outtype):
    lines = []
    best, evals = training.get('best_val_loss'), (training.get('history') or {}).get('eval') or []
    if best is not None:
        c = training.get('config') or {}
        at = next((e for e in evals if e['val_loss'] == best), {})
        kind = (training.get('run') or {}).get('kind')
        loss = {'dpo': 'DPO loss', 'sft': 'loss (nats per reply token)'}.get(kind, 'loss (nats per token)')
        extra = ''.join(f', {label} {at[k]:.4f}' for k, label in (('val_bpb', 'bits per byte'),
                        ('val_reward_accuracy', 'reward accuracy'), ('val_margin', 'margin')) if k in at)
        where = (f"'s estimate over {c['eval_iters']} batches of {c['batch_size']} windows of the val split"
                 if c.get('eval_iters') and c.get('batch_size') else '')
        lines.append(f"Best validation {loss}: {best:.4f}{extra}" + (f" at step {at['iter']:,}" if at else '')
                     + f' (train.py{where}).\n')
    for file, e in records.items():
        if not file.startswith('eval_'):
            continue
        if 'bits_per_byte' in e:
            lines.append(f"{file}: the {e.get('split')} split of `{e.get('data_dir')}`, {e.get('tokens', 0):,} tokens "
                         f"scored exactly: loss {e['loss']:.4f}, perplexity {e['perplexity']:.2f}, "
                         f"**{e['bits_per_byte']:.4f} bits per byte**"
                         + (' (int8 weights)' if e.get('quantize') else '') + '.\n')
        elif 'summary' in e:
            lines.append(f"{file} ({e.get('tasks')}):\n\n| task | items | metric | score [95% interval] | calibrated |"
                         " balanced accuracy | chance | majority |\n|---|---|---|---|---|---|---|---|")
            for task, t in e['summary'].items():
                majority = f"{t['majority']:.3f}" if t.get('majority') is not None else ''
                lines.append(f"| {task} | {t['items']:,} | {t['metric']} | {span(t, 'score', 'low', 'high')} | "
                             f"{span(t, 'score_cal', 'low_cal', 'high_cal')} | "
                             f"{span(t, 'balanced', 'low_balanced', 'high_balanced')} | {t['chance']:.3f} | {majority} |")
            lines.append('')
        elif 'accuracy' in e:
            lines.append(f"{file} ({e.get('mcq')}): accuracy {e['accuracy']:.3f} over {e['questions']:,} questions "
                         f"(per character {e['accuracy_norm']:.3f}; chance {e['chance']:.3f}).\n")
    if not lines:
        return ''
    note = f'Measured on the weights before their conversion to {outtype}.\n\n' if fmt == 'gguf' else ''
    return '## Results\n\n' + note + '\n'.join(lines)


def span(summary, key, low, high):
    return f"{summary[key]:.3f} [{summary[low]:.3f}, {summary[high]:.3f}]" if key in summary else ''


def usage(cfg, run, merge, fmt, name, source):
    chat = run.get('kind') in ('sft', 'dpo')
    gguf_ok = hf_layout(cfg) == 'llama'
    ours = (f'python sample.py --out_dir={source} --chat\n' if chat else
            f'python sample.py --out_dir={source} --start="Metformin is" --max_new_tokens=100\n')
    if merge:  # whether the inputs were instruction-tuned is theirs to tell
        ours += f'python sample.py --out_dir={source} --chat       # if its inputs were instruction-tuned\n'
    lines = ['## How to use\n']
    if fmt == 'gguf':
        lines += ['llama.cpp (Ollama and LM Studio run the file too):\n', '```bash',
                  f'llama-cli -m {name} -no-cnv -p "Metformin is" -n 100',
                  f'llama-server -m {name} --jinja          # chat, with the template the file holds', '```\n']
    elif fmt == 'adapter':
        base = run['base']['base'] if run.get('base') else 'BASE'
        lines += ["peft, over the base in transformers' layout:\n", '```bash',
                  f'python export.py --out_dir={base} --format=hf --export_dir=base-hf', '```', '```python',
                  'from peft import PeftModel',
                  'from transformers import AutoModelForCausalLM',
                  f"model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained('base-hf'), '{name}')",
                  '```\n', f'The same model merged, `{source}`, is an ordinary medslm folder:\n']
    elif fmt == 'hf':
        lines += transformers_usage(name, chat) + [f'medslm reads the folder it was exported from, `{source}`:\n']
    lines += ['```bash', ours.rstrip('\n')]
    if fmt != 'hf':
        lines.append(f'python export.py --out_dir={source} --format=hf       # for transformers')
    if fmt != 'gguf' and gguf_ok:
        lines.append(f'python export.py --out_dir={source} --format=gguf --outtype=q8_0   # for llama.cpp, Ollama')
    return '\n'.join(lines + ['```\n'])


def transformers_usage(name, chat):
    prompt = (["inputs = tok.apply_chat_template([{'role': 'user', 'content': 'What does metformin treat?'}],",
               "                               add_generation_prompt=True, return_tensors='pt')",
               "out = model.generate(**inputs, max_new_tokens=100, eos_token_id=tok.convert_tokens_to_ids('<|end|>'))"]
              if chat else
              ['# every training document followed an EOS: a prompt starts with one',
               "ids = torch.tensor([[tok.eos_token_id] + tok.encode('Metformin is')])",
               'out = model.generate(ids, max_new_tokens=100, do_sample=True, top_k=50)'])
    return ['transformers, no custom code:\n', '```python', 'import torch',
            'from transformers import AutoModelForCausalLM, AutoTokenizer',
            f"tok, model = AutoTokenizer.from_pretrained('{name}'), AutoModelForCausalLM.from_pretrained('{name}')",
            *prompt, 'print(tok.decode(out[0]))', '```\n']


def files_table(paths):
    rows = []
    for path in paths:
        name = os.path.basename(path) + ('/' if os.path.isdir(path) else '')
        if os.path.isdir(path):
            size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)
        else:
            size = os.path.getsize(path)
        weights = name.endswith(('.safetensors', '.gguf'))
        what = FILES.get(name, 'the model, for llama.cpp' if name.endswith('.gguf') else
                         "eval.py's results" if name.startswith('eval_') else '')
        rows.append(f"| `{name}` | {human(size)} | {what} | {f'`{sha256(path)}`' if weights else ''} |")
    return '## Files\n\n| file | size | what | sha256 |\n|---|---|---|---|\n' + '\n'.join(rows) + '\n'


def duration(seconds):
    return f'{seconds:.3g} s' if seconds < 60 else f'{seconds / 60:.1f} min' if seconds < 3600 else \
        f'{seconds / 3600:,.1f} h'


def human(size):
    for unit in ('bytes', 'KB', 'MB', 'GB'):
        if size < 1000 or unit == 'GB':
            return f'{size:,} {unit}' if unit == 'bytes' else f'{size:,.1f} {unit}'
        size /= 1000


def limitations(params):
    return ('## Intended use and limitations\n\n'
            '- For research and teaching: how small language models learn biomedical text, and a base to fine-tune.\n'
            '- **Not for clinical decisions.** It writes fluent text with no guarantee that any of it is true: never '
            "use it for diagnosis, treatment or advice about anyone's health.\n"
            '- English PubMed: it knows the language of biomedical abstracts, nothing outside its data or after it, '
            'and it repeats the literature\'s biases. No safety tuning or output filter.\n'
            f'- Its size: {params:,} parameters write text in the style of the literature with the facts missing '
            'or wrong, far more often than large models do.\n'
            '- Licence: none chosen by the run (`license: other`); the weights derive from the training data, whose '
            "terms apply (PubMed/MEDLINE: NLM's terms and conditions).\n")


def lineage(training, merge, fmt):
    run, lora = training.get('run') or {}, training.get('lora')
    if merge:
        params = ', '.join(f'{k} {v}' for k, v in merge.items() if k not in ('method', 'models', 'base'))
        rows = [f"| `{m['path']}` | {'base' if m is merge.get('base') else 'model'} | `{m['sha256']}` |"
                for m in merge['models'] + [merge.get('base')] if m]
        return (f"## Lineage\n\nA {merge['method']} merge ({params}) by merge.py, of (the sha256 of each one's "
                'model.safetensors):\n\n| input | role | sha256 |\n|---|---|---|\n' + '\n'.join(rows) + '\n')
    if not run.get('base'):
        return ''
    dpo = 'DPO with the base as the reference' + (' (the adapters off)' if lora else '')
    how = {'pretraining': 'continued pre-training', 'sft': 'supervised fine-tuning (SFT)',
           'dpo': dpo}.get(run.get('kind'), 'fine-tuning')
    merged = 'these adapters' if fmt == 'adapter' else 'adapters merged into these weights'
    method = f"{how}, LoRA rank {lora['rank']} over the frozen base ({merged})" if lora else \
        f'{how}, all weights trained'
    return (f"## Lineage\n\nStarted from `{run['base']['base']}` (its weights' sha256 "
            f"`{run['base']['base_sha256']}`): {method}.\n")
