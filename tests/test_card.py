"""
card.py: the model card (README.md) that train.py, export.py and merge.py write into every model folder, checked
against the records it is written from (training_config.json, meta.json, merge.json, eval_*.json) on tiny CPU
runs: its numbers are theirs, its YAML header is a model hub's, and what was not measured is not in it.
"""
import dataclasses
import json
import os
import shutil

import pytest
import torch
import yaml

from card import duration, refresh_card
from checkpoint import load_model
from files import sha256
from helpers import DOCS, chat_data, load_ckpt, random_model, run, sft, train, write_data, write_export
from tokenizer import tokenizer_fingerprint, train_bpe

TINY = ['--device=cpu', '--dtype=float32', '--compile=False', '--n_layer=2', '--n_head=4', '--n_kv_head=2',
        '--n_embd=32', '--multiple_of=16', '--block_size=32', '--batch_size=4', '--gradient_accumulation_steps=2',
        '--learning_rate=1e-2', '--min_lr=1e-3', '--warmup_iters=2', '--eval_iters=2', '--eval_interval=2']
pytestmark = pytest.mark.usefixtures('one_thread')


def read(folder, name):
    with open(os.path.join(folder, name)) as f:
        return json.load(f)


def card(path):
    with open(path if path.endswith('.md') else os.path.join(path, 'README.md'), encoding='utf-8') as f:
        text = f.read()
    print(text)
    return text


def header(text):
    assert text.startswith('---\n')
    return yaml.safe_load(text.split('---\n')[1])


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
    """A real BPE's shards, with what prepare.py records besides: the source files and the tokenizer's sha256."""
    folder = write_data(str(tmp_path_factory.mktemp('data')), train_bpe(DOCS, 400),
                        splits={'train': DOCS * 3, 'val': DOCS[:4], 'test': DOCS[4:]})
    meta = read(folder, 'meta.json')
    meta.update(inputs=[{'path': f'/corpus/pubmed25n000{i}.xml.gz', 'sha256': str(i) * 64} for i in (1, 2)],
                tokenizer_sha256=tokenizer_fingerprint(meta, folder))
    with open(os.path.join(folder, 'meta.json'), 'w') as f:
        json.dump(meta, f)
    return folder


@pytest.fixture(scope='module')
def pretrained(data_dir, tmp_path_factory):
    """A run from scratch in two sessions: 4 steps, then resumed to 8. (out_dir, the first session's seconds)"""
    out_dir = str(tmp_path_factory.mktemp('pretrained'))
    train(out_dir, data_dir, *TINY, '--max_iters=4', '--lr_decay_iters=8')
    first = load_ckpt(out_dir)['run']['seconds']
    train(out_dir, data_dir, *TINY, '--max_iters=8', '--lr_decay_iters=8', '--init_from=resume')
    return out_dir, first


@pytest.fixture(scope='module')
def lora_sft(base, tmp_path_factory):
    root = tmp_path_factory.mktemp('lora_sft')
    out_dir = str(root / 'out')
    sft(out_dir, chat_data(str(root / 'chat')), f'--init_from={base}', '--lora_rank=4', '--lora_alpha=8',
        '--max_iters=4', '--lr_decay_iters=4', '--eval_interval=2')
    return out_dir


def test_the_card_numbers_are_the_runs_records(pretrained):
    export = os.path.join(pretrained[0], 'export')
    text = card(export)
    config, meta = read(export, 'config.json'), read(export, 'meta.json')
    training = read(export, 'training_config.json')
    params = load_model(export).get_num_params()
    assert (f"| {config['n_layer']} x {config['n_embd']} | {config['n_head']} / {config['n_kv_head']} | SwiGLU "
            f"{config['intermediate_size']} | BPE {config['vocab_size']} | {config['block_size']} | no | {params:,} |"
            ) in text
    for split, s in meta['splits'].items():
        assert f"| {split} | {s['docs']:,} | {s['tokens']:,} | {s['bytes']:,} |" in text
    assert meta['tokenizer_sha256'] in text and '`pubmed25n0002.xml.gz`' in text
    c, run = training['config'], training['run']
    assert f"| steps | {training['iter_num']} |" in text and training['iter_num'] == 8
    tokens = c['gradient_accumulation_steps'] * c['batch_size'] * c['block_size']
    assert f"| batch | {tokens} tokens per step: 2 micro-steps x 4 sequences x 32 tokens |" in text
    assert f"| schedule | linear warmup over 2 steps to 0.01, cosine decay to 0.001 at step 8 |" in text
    assert f"| wall time | {duration(run['seconds'])} (" in text and '| dtype | float32 |' in text
    assert f"| hardware | 1 x {run['machines'][0]['device']} |" in text
    best = training['best_val_loss']
    at = next(e for e in training['history']['eval'] if e['val_loss'] == best)
    assert f"validation loss (nats per token): {best:.4f}, bits per byte {at['val_bpb']:.4f} at step {at['iter']}" \
        in text
    assert f"`{sha256(os.path.join(export, 'model.safetensors'))}`" in text
    for name in os.listdir(export):  # the files table lists every file
        if name != 'README.md':
            assert f'| `{name}` |' in text
    assert 'Pre-trained from scratch' in text and 'Not for clinical decisions' in text


def test_the_checkpoint_records_wall_time_over_sessions_and_each_machine_once(pretrained):
    out_dir, first = pretrained
    run = load_ckpt(out_dir)['run']
    print(run)
    assert run['kind'] == 'pretraining' and run['base'] is None
    assert 0 < first < run['seconds']
    assert len(run['machines']) == 1 and run['machines'][0]['processes'] == 1
    assert run['machines'][0]['dtype'] == 'float32' and 'thread' in run['machines'][0]['device']


def test_nothing_unmeasured_is_in_the_card(pretrained, data_dir, tmp_path):
    text = card(os.path.join(pretrained[0], 'export'))
    assert '| task |' not in text and 'eval_' not in text and 'base_model' not in text and 'Lineage' not in text
    # a checkpoint that recorded nothing of its run: the card says nothing of it
    bare = tmp_path / 'bare'
    bare.mkdir()
    model = random_model(data_dir)
    torch.save({'model': model.state_dict(), 'model_args': dataclasses.asdict(model.config),
                'meta': read(data_dir, 'meta.json'), 'data_dir': data_dir}, bare / 'ckpt.pt')
    run('export.py', f'--out_dir={bare}', '--format=safetensors')
    text = card(str(bare / 'safetensors'))
    for unmeasured in ('## Results', '## Training', '| wall time |', '| hardware |', '## Lineage', 'base_model',
                       'eval_', 'from scratch'):
        assert unmeasured not in text, unmeasured
    assert '## Model' in text and '## Data' in text


def test_refreshed_card_gives_evals_scores_with_their_intervals(pretrained, tmp_path):
    export = str(tmp_path / 'export')
    shutil.copytree(os.path.join(pretrained[0], 'export'), export)
    run('eval.py', f'--out_dir={export}', '--split=val')
    tasks = {'tasks': 'data/tasks/test.jsonl', 'summary': {'title_choice': dict(
        items=40, metric='accuracy', score=0.35, low=0.221, high=0.506, chance=0.25, majority=0.3),
        'publication_type': dict(items=40, metric='accuracy', score=0.8, low=0.652, high=0.895, chance=0.25,
                                 majority=0.85, score_cal=0.4, low_cal=0.264, high_cal=0.554, balanced=0.5,
                                 low_balanced=0.3, high_balanced=0.7)}}
    with open(os.path.join(export, 'eval_tasks.json'), 'w') as f:
        json.dump(tasks, f)
    refresh_card(export)
    text, val = card(export), read(export, 'eval_val.json')
    assert f"{val['tokens']:,} tokens scored exactly: loss {val['loss']:.4f}" in text
    assert f"**{val['bits_per_byte']:.4f} bits per byte**" in text
    assert '| title_choice | 40 | accuracy | 0.350 [0.221, 0.506] |  |  | 0.250 | 0.300 |' in text
    assert ('| publication_type | 40 | accuracy | 0.800 [0.652, 0.895] | 0.400 [0.264, 0.554] | 0.500 [0.300, 0.700] '
            '| 0.250 | 0.850 |') in text
    assert '| `eval_val.json` |' in text and '| `eval_tasks.json` |' in text


def test_dpo_card_gives_the_rewards_and_names_the_reference(pretrained, tmp_path):
    export = str(tmp_path / 'export')  # the pre-trained export, its records made a DPO run's
    shutil.copytree(os.path.join(pretrained[0], 'export'), export)
    training = read(export, 'training_config.json')
    training['run'].update(kind='dpo', base={'base': '/models/sft', 'base_sha256': 'ab' * 32})
    training.update(best_val_loss=0.65, history={'train_loss': [], 'eval': [
        dict(iter=2, train_loss=0.6, val_loss=0.65, val_reward_accuracy=0.75, val_margin=0.125)]})
    with open(os.path.join(export, 'training_config.json'), 'w') as f:
        json.dump(training, f)
    text = card(refresh_card(export))
    assert 'Best validation DPO loss: 0.6500, reward accuracy 0.7500, margin 0.1250 at step 2' in text
    assert '| batch | 512 tokens per step: 2 micro-steps x 4 pairs x 2 sequences x 32 tokens |' in text
    assert '| DPO beta | 0.1 |' in text and 'bits per byte' not in text
    assert f"Started from `/models/sft` (its weights' sha256 `{'ab' * 32}`): DPO with the base as the reference, " \
           'all weights trained.' in text
    assert refresh_card(str(tmp_path)) is None  # no model folder: left as it is


def test_hf_card_parses_as_a_model_hub_card_with_the_runs_numbers(pretrained, tmp_path):
    from huggingface_hub import ModelCard
    out_dir = pretrained[0]
    run('export.py', f'--out_dir={out_dir}', '--format=hf', f'--export_dir={tmp_path / "hf"}')
    hub = ModelCard.load(str(tmp_path / 'hf' / 'README.md')).data.to_dict()
    print(hub)
    assert hub['license'] == 'other' and hub['language'] == ['en'] and hub['library_name'] == 'transformers'
    assert hub['pipeline_tag'] == 'text-generation' and 'llama' in hub['tags'] and 'base_model' not in hub
    assert hub['datasets'][0].startswith(read(out_dir + '/export', 'training_config.json')['data_dir'])
    text, ours = card(str(tmp_path / 'hf')), card(os.path.join(out_dir, 'export'))
    best = next(line for line in ours.splitlines() if line.startswith('Best validation'))
    assert best in text and "AutoModelForCausalLM.from_pretrained('" + str(tmp_path / 'hf') in text
    snippet = text.split('```python\n')[1].split('```')[0]
    exec(snippet, {})  # the card's own transformers code loads the folder and generates
    assert f'sample.py --out_dir={out_dir} ' in text
    assert f"`{sha256(str(tmp_path / 'hf' / 'model.safetensors'))}`" in text


def test_gguf_file_gets_its_card_beside_it(pretrained, tmp_path):
    gguf = str(tmp_path / 'tiny-q8_0.gguf')
    run('export.py', f'--out_dir={pretrained[0]}', '--format=gguf', '--outtype=q8_0', f'--export_dir={gguf}')
    text = card(str(tmp_path / 'tiny-q8_0.README.md'))
    assert header(text)['tags'][-1] == 'gguf' and 'q8_0 weights' in text
    assert f'llama-cli -m {gguf} ' in text and f'| `tiny-q8_0.gguf` |' in text and f'`{sha256(gguf)}`' in text
    assert 'Measured on the weights before their conversion to q8_0' in text


def test_lora_finetune_cards_name_the_base_and_its_sha256(lora_sft, base):
    export = os.path.join(lora_sft, 'export')
    digest = sha256(os.path.join(base, 'model.safetensors'))
    merged, adapter = card(export), card(os.path.join(export, 'adapter'))
    for text, relation in ((merged, 'finetune'), (adapter, 'adapter')):
        head = header(text)
        assert head['base_model'] == [os.path.abspath(base)] and head['base_model_relation'] == relation
        assert f'Started from `{os.path.abspath(base)}` (its weights\' sha256 `{digest}`)' in text
        assert 'supervised fine-tuning (SFT), LoRA rank 4 over the frozen base' in text
        assert '| LoRA | rank 4, alpha 8' in text
        assert 'Instruction-tuned (SFT)' in text and 'bits per byte' not in text  # SFT measures no bits per byte
    assert header(adapter)['library_name'] == 'peft' and 'PeftModel.from_pretrained' in adapter
    assert '| `adapter/` |' in merged and '| `adapter_model.safetensors` |' in adapter
    assert f'sample.py --out_dir={export} --chat' in merged
    hf = os.path.join(lora_sft, 'hf')
    run('export.py', f'--out_dir={export}', '--format=hf', f'--export_dir={hf}')
    text = card(hf)
    assert 'apply_chat_template' in text and header(text)['base_model'] == [os.path.abspath(base)]
    exec(text.split('```python\n')[1].split('```')[0], {})  # the card's chat code runs in transformers


def test_merge_card_names_each_input_and_its_sha256(data_dir, tmp_path):
    a, b, c = [write_export(tmp_path / name, random_model(data_dir, seed=seed), data_dir)
               for seed, name in enumerate('abc')]
    out = str(tmp_path / 'merged')
    run('merge.py', f'--models={a},{b}', '--method=task_arithmetic', f'--base={c}', f'--out={out}')
    text, record = card(out), read(out, 'merge.json')
    head = header(text)
    assert head['base_model'] == [os.path.abspath(p) for p in (a, b, c)] and head['base_model_relation'] == 'merge'
    for path, role in ((a, 'model'), (b, 'model'), (c, 'base')):
        assert f"| `{os.path.abspath(path)}` | {role} | `{sha256(os.path.join(path, 'model.safetensors'))}` |" in text
    assert 'A task_arithmetic merge (weights [1.0, 1.0], scale 1.0)' in text and record['method'] == 'task_arithmetic'
    assert '## Training' not in text and '## Results' not in text
