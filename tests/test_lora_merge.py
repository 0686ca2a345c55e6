"""
LoRA (lora.py, train.py's lora_* settings) and merge.py on tiny CPU models: the adapted model starts equal to its
base, only adapters train, the merged export and peft's view of the adapter match our adapter-on forward, resume
is exact, and the merge methods keep their defining properties. pytest tests/test_lora_merge.py -s prints the figures.
"""
import copy
import dataclasses
import json
import os
import shutil

import pytest
import torch

from safetensors.torch import save_model

from checkpoint import load_lora, load_model
from files import sha256
from helpers import (DOCS, assert_close, chat_data, load_ckpt, max_diff, random_model, read_log, run, sft, train,
                     write_data, write_export)
from lora import LoRALinear, adapter_state_dict, add_lora, merge_lora, save_peft
from model import GPT, GPTConfig
from optim import configure_optimizers
from tokenizer import train_bpe

TINY = dict(n_layer=2, n_embd=32, n_head=4, n_kv_head=2, block_size=32, multiple_of=16, vocab_size=300)
CLASSIC = dict(norm='layernorm', pos_embedding='learned', mlp='gelu', n_kv_head=4, bias=True, tie_embeddings=True)
pytestmark = pytest.mark.usefixtures('one_thread')


def tiny_model(seed=0, **kwargs):
    torch.manual_seed(seed)
    return GPT(GPTConfig(**{**TINY, **kwargs})).eval()


def logits(model, idx):
    with torch.no_grad():
        return model.hidden(idx) @ model.output.weight.t()


def randomize_adapters(model, seed=1):
    """B is zero at the start, so the adapters would change nothing: give them values that show."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, LoRALinear):
                module.lora_B.copy_(torch.randn(module.lora_B.shape, generator=g) * 0.1)
    return model


IDX = torch.randint(0, TINY['vocab_size'], (2, 24), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize('block', [{}, CLASSIC], ids=['modern', 'classic'])
def test_lora_at_step_zero_equals_the_base_bit_for_bit(block):
    base = tiny_model(**block)
    adapted = add_lora(copy.deepcopy(base), rank=4, alpha=8)
    wrapped = [n for n, m in adapted.named_modules() if isinstance(m, LoRALinear)]
    assert len(wrapped) == 4 * TINY['n_layer']
    assert all(n.rsplit('.', 1)[-1] in ('wqkv', 'wo', 'w1', 'w2') for n in wrapped)
    a, b = logits(base, IDX), logits(adapted, IDX)
    print(f'max |logits difference| at step 0: {(a - b).abs().max().item()}')
    assert torch.equal(a, b)
    assert all(m.lora_A.abs().sum() > 0 and not m.lora_B.any() for m in adapted.modules() if isinstance(m, LoRALinear))


def test_only_adapters_take_gradients_and_optimizer_state():
    model = add_lora(tiny_model(), rank=4, alpha=8, targets='wqkv,w2')
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f'layers.{i}.{m}.lora_{ab}' for i in range(2) for m in ('attention.wqkv', 'feed_forward.w2')
                         for ab in 'AB'}
    assert set(adapter_state_dict(model)) == trainable
    frozen = {n: p.clone() for n, p in model.named_parameters() if not p.requires_grad}
    for muon_lr in (None, 0.02):  # AdamW; Muon (for the adapter matrices, which live in the blocks) + AdamW
        model.train()
        optimizer = configure_optimizers(model, 0.1, 1e-2, (0.9, 0.95), 'cpu', muon_lr)
        assert {id(p) for g in optimizer.param_groups for p in g['params']} == \
               {id(p) for p in model.parameters() if p.requires_grad}
        before = {n: p.clone() for n, p in adapter_state_dict(model).items()}
        for _ in range(3):
            model(IDX, IDX)[1].backward()
            assert all(p.grad is None for p in model.parameters() if not p.requires_grad)  # the head's too
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        assert len(optimizer.state) == len(trainable)
        moved = {n: (p - before[n]).abs().max().item() for n, p in adapter_state_dict(model).items()}
        print(f'muon_lr={muon_lr}: smallest adapter change {min(moved.values()):.3g}')
        assert min(moved.values()) > 0
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if not p.requires_grad)


def test_fused_loss_gives_a_frozen_head_the_same_input_gradients():
    # the fused loss skips the head's weight gradient when the head is frozen; the rest must not change
    model = randomize_adapters(add_lora(tiny_model(), rank=4, alpha=8))
    model(IDX, IDX)[1].backward()
    fused = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    h = model.hidden(IDX)
    torch.nn.functional.cross_entropy((h @ model.output.weight.t()).flatten(0, 1), IDX.flatten()).backward()
    plain = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    diff = max((fused[n] - plain[n]).abs().max().item() for n in fused)
    print(f'adapter gradients, fused vs plain loss: max abs difference {diff:.3g}')
    assert diff < 1e-6


def test_train_embeddings_unfreezes_the_embeddings_and_head_only():
    tied = add_lora(tiny_model(tie_embeddings=True), rank=2, alpha=2, targets='wo', train_embeddings=True)
    assert {n for n, p in tied.named_parameters() if p.requires_grad and 'lora' not in n} == {'tok_embeddings.weight'}
    classic = add_lora(tiny_model(**{**CLASSIC, 'tie_embeddings': False}), rank=2, alpha=2, train_embeddings=True)
    assert {n for n, p in classic.named_parameters() if p.requires_grad and 'lora' not in n} == \
           {'tok_embeddings.weight', 'pos_embeddings.weight', 'output.weight'}


@pytest.mark.parametrize('block', [{}, CLASSIC], ids=['modern', 'classic'])
def test_merged_model_equals_the_adapter_forward(block):
    adapted = randomize_adapters(add_lora(tiny_model(**block), rank=4, alpha=8))
    merged = merge_lora(copy.deepcopy(adapted))
    assert type(merged) is GPT and not any(isinstance(m, LoRALinear) for m in merged.modules())
    assert set(merged.state_dict()) == set(tiny_model(**block).state_dict())  # the base's names: an ordinary GPT
    a, b = logits(adapted, IDX), logits(merged, IDX)
    assert (a - logits(tiny_model(**block), IDX)).abs().max() > 1e-2  # the adapters do change the output
    assert_close(a, b, 1e-5, 'merged vs adapter-on logits')


def test_decoding_with_adapters_matches_the_merged_model():
    # setup_caches re-lays every nn.Linear's weight for decoding; LoRALinear is one, and its adapters stay as they are
    adapted = randomize_adapters(add_lora(tiny_model(), rank=4, alpha=8))
    merged = merge_lora(copy.deepcopy(adapted))
    prompt = IDX[:, :8]
    a, b = adapted.generate(prompt, 16, temperature=0), merged.generate(prompt, 16, temperature=0)
    assert torch.equal(a, b)
    assert_close(logits(adapted, a[:, :-1]), logits(merged, a[:, :-1]), 1e-5, 'after decoding: adapter vs merged')


def test_bad_lora_settings_are_a_one_line_error():
    for kwargs in (dict(rank=0, alpha=8), dict(rank=4, alpha=8, targets='wqkv,output'),
                   dict(rank=4, alpha=8, targets='')):
        with pytest.raises(SystemExit) as e:
            add_lora(tiny_model(), **kwargs)
        print(e.value.code)
        assert str(e.value.code).startswith('error: LoRA needs') and '\n' not in str(e.value.code)


# ----------------------------------------------------------------------------- train.py with LoRA

LORA = ['--device=cpu', '--dtype=float32', '--compile=False', '--block_size=32', '--batch_size=4',
        '--gradient_accumulation_steps=2', '--learning_rate=1e-2', '--min_lr=1e-3', '--warmup_iters=2',
        '--eval_iters=2', '--log_interval=1', '--lora_rank=4', '--lora_alpha=8']


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
    """A real (tiny) BPE and its shards: export.py's Hugging Face folder needs a real tokenizer."""
    return write_data(str(tmp_path_factory.mktemp('data')), train_bpe(DOCS, 400),
                      splits={'train': DOCS * 3, 'val': DOCS[:4]})


@pytest.fixture(scope='module')
def lora_run(data_dir, base, tmp_path_factory):
    global RUN
    RUN = [f'--init_from={base}', '--gradient_accumulation_steps=4', '--max_iters=6', '--lr_decay_iters=6',
           '--eval_interval=3']
    out_dir = str(tmp_path_factory.mktemp('lora'))
    result = train(out_dir, data_dir, *LORA, *RUN)
    assert 'LoRA on' in result.stdout
    return out_dir


def test_lora_run_checkpoints_only_the_adapters_and_names_its_base(lora_run, base):
    ckpt = load_ckpt(lora_run)
    assert set(ckpt['model']) == {f'layers.{i}.{m}.lora_{ab}' for i in range(2) for ab in 'AB'
                                  for m in ('attention.wqkv', 'attention.wo', 'feed_forward.w1', 'feed_forward.w2')}
    assert ckpt['lora']['base'] == os.path.abspath(base) and len(ckpt['lora']['base_sha256']) == 64
    assert ckpt['lora']['adapters'] == dict(rank=4, alpha=8.0, dropout=0.0, targets='wqkv,wo,w1,w2',
                                            train_embeddings=False)
    assert len(ckpt['optimizer']['state']) == len(ckpt['model'])  # optimizer state only for the adapters
    assert all(ckpt['model'][f'layers.{i}.attention.wo.lora_B'].abs().max() > 0 for i in range(2))  # B moved
    _, evals = read_log(lora_run)
    print(f"val loss {evals[0]['val_loss']:.3f} -> {evals[-1]['val_loss']:.3f}")
    assert evals[-1]['val_loss'] < evals[0]['val_loss']


def test_lora_export_is_the_merged_model_and_leaves_the_base_as_it_was(lora_run, base):
    export = os.path.join(lora_run, 'export')
    assert {'model.safetensors', 'config.json', 'meta.json', 'tokenizer.json', 'adapter'} <= set(os.listdir(export))
    assert sorted(os.listdir(os.path.join(export, 'adapter'))) == ['README.md', 'adapter_config.json',
                                                                   'adapter_model.safetensors']
    adapted, merged, base_model = load_lora(load_ckpt(lora_run)), load_model(export), load_model(base)
    for name, tensor in merged.state_dict().items():  # untouched, bit for bit, except the adapted weights
        adapted_weight = any(name.endswith(f'{m}.weight') for m in ('wqkv', 'wo', 'w1', 'w2'))
        assert torch.equal(tensor, base_model.state_dict()[name]) != adapted_weight, name
    for name, module in adapted.named_modules():  # ... and the frozen weights under the adapters are the base's
        if isinstance(module, LoRALinear):
            assert torch.equal(module.weight, base_model.get_submodule(name).weight)
    idx = torch.randint(0, merged.config.vocab_size, (2, 32), generator=torch.Generator().manual_seed(0))
    a = logits(adapted, idx)
    # float32 rounds W + B A * scale once, the adapter-on forward its two products: ~1e-6 of the logits' size
    assert_close(a, logits(merged, idx), 1e-5 * a.abs().max().item(), 'merged export vs adapter-on logits')
    exact = logits(merge_lora(copy.deepcopy(adapted).double()), idx.clone())
    assert_close(logits(adapted.double(), idx), exact, 1e-10, 'in float64, merged vs adapter-on logits')
    assert_close(logits(load_model(lora_run), idx), logits(merged, idx), 0, 'load_model(out_dir) vs export')


def test_peft_loads_the_exported_adapter_onto_our_hf_export_with_our_logits(lora_run, base, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    run('export.py', f'--out_dir={base}', '--format=hf', f'--export_dir={tmp_path / "hf"}')
    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path / 'hf'))
    peft_model = PeftModel.from_pretrained(hf, os.path.join(lora_run, 'export', 'adapter')).eval()
    adapted = load_lora(load_ckpt(lora_run))
    idx = torch.randint(0, adapted.config.vocab_size, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert_close(logits(adapted, idx), peft_model(idx).logits, 1e-5, 'peft vs our adapter-on logits')


@pytest.mark.parametrize('block, train_embeddings', [(CLASSIC, False), ({'tie_embeddings': False}, True)],
                         ids=['gpt2-fused-conv1d', 'llama-untied-trained-embeddings'])
def test_peft_layout_fits_gpt2_and_trained_embeddings_too(data_dir, tmp_path, block, train_embeddings):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    base_dir = write_export(tmp_path / 'base', random_model(data_dir, **block), data_dir)
    run('export.py', f'--out_dir={base_dir}', '--format=hf', f'--export_dir={tmp_path / "hf"}')
    adapted = randomize_adapters(add_lora(load_model(base_dir), rank=4, alpha=8, train_embeddings=train_embeddings))
    if train_embeddings:
        with torch.no_grad():
            adapted.output.weight.mul_(1.5)
    adapters = dict(rank=4, alpha=8, dropout=0.0, targets='wqkv,wo,w1,w2', train_embeddings=train_embeddings)
    assert save_peft(adapted, {'base': base_dir, 'adapters': adapters}, str(tmp_path / 'adapter')) is None
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(tmp_path / 'hf')),
                                           str(tmp_path / 'adapter')).eval()
    idx = torch.randint(0, adapted.config.vocab_size, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert_close(logits(adapted.eval(), idx), peft_model(idx).logits, 1e-5, f'{block} peft vs adapter-on logits')


def test_lora_resume_is_exact(data_dir, base, lora_run, tmp_path):
    # the same 6 steps as lora_run, in two halves; eval_interval=3 puts an evaluation at the seam
    halves = str(tmp_path / 'halves')
    train(halves, data_dir, *LORA, *RUN, '--max_iters=3')
    train(halves, data_dir, *LORA, *RUN, '--init_from=resume')
    a, b = read_log(lora_run)[0], read_log(halves)[0]
    print('losses, 6 iterations :', [s['loss'] for s in a])
    print('losses, 3 + 3 resumed:', [s['loss'] for s in b])
    assert [s['loss'] for s in a] == [s['loss'] for s in b] and len(b) == 6
    whole_ckpt, halves_ckpt = load_ckpt(lora_run), load_ckpt(halves)
    assert set(halves_ckpt['model']) == set(whole_ckpt['model']) and halves_ckpt['lora'] == whole_ckpt['lora']
    diff = max((whole_ckpt['model'][k] - halves_ckpt['model'][k]).abs().max().item() for k in whole_ckpt['model'])
    print(f'max |adapter difference| {diff}')
    assert diff == 0.0


def test_lora_under_ddp_matches_one_process(data_dir, lora_run, tmp_path):
    # lora_run's 4 micro-batches per step: 2 on each of 2 ranks (gloo), its only trainable tensors the adapters
    two = str(tmp_path / 'two')
    train(two, data_dir, *LORA, *RUN, nproc=2)
    a, b = load_ckpt(lora_run)['model'], load_ckpt(two)['model']
    diff = max((a[k] - b[k]).abs().max().item() for k in a)
    print(f'max |adapter difference|, 1 vs 2 processes: {diff:.3g}')
    assert set(a) == set(b) and diff < 1e-5


def test_lora_from_scratch_is_a_one_line_error(data_dir, tmp_path):
    result = train(str(tmp_path / 'out'), data_dir, *LORA, '--max_iters=2', check=False)
    print(result.stderr)
    assert result.returncode != 0 and len(result.stderr.strip().splitlines()) == 1
    assert result.stderr.startswith('error: LoRA adapts a pre-trained model')


def test_a_changed_base_is_refused_by_resume_and_load(lora_run, base, data_dir, tmp_path):
    checkpoint = load_ckpt(lora_run)
    moved = str(tmp_path / 'base')
    shutil.copytree(base, moved)
    checkpoint['lora']['base'] = moved
    load_lora(checkpoint)  # an identical copy is fine
    save_model(random_model(data_dir, seed=1), os.path.join(moved, 'model.safetensors'))
    with pytest.raises(SystemExit) as e:
        load_lora(checkpoint)  # what train.py's resume, its export and load_model call
    print(e.value.code)
    assert 'changed since training' in str(e.value.code) and '\n' not in str(e.value.code)


# ----------------------------------------------------------------------------- merge.py


@pytest.fixture(scope='module')
def exports(data_dir, tmp_path_factory):
    """Three exports of one architecture and tokenizer: a (base) and b, c (as if fine-tuned from it)."""
    folder = tmp_path_factory.mktemp('exports')
    return [write_export(folder / name, random_model(data_dir, seed=seed), data_dir)
            for seed, name in enumerate('abc')]


def tensors(path):
    from safetensors.torch import load_file
    return load_file(os.path.join(path, 'model.safetensors'))


def merge(tmp_path, *args):
    out = str(tmp_path / 'merged')
    run('merge.py', *args, f'--out={out}')
    return out


@pytest.mark.parametrize('method, args', [
    ('linear', []), ('slerp', ['--t=0.3']), ('task_arithmetic', ['--weights=0.7,0.8']), ('ties', ['--density=0.5'])])
def test_merging_a_model_with_itself_is_the_identity(exports, tmp_path, method, args):
    a = exports[0]
    base = [f'--base={a}'] if method in ('task_arithmetic', 'ties') else []
    out = merge(tmp_path, f'--models={a},{a}', f'--method={method}', *base, *args)
    diff = max_diff(tensors(a), tensors(out))
    print(f'{method} of a model with itself: max |weight difference| {diff:.3g}')
    assert diff <= 1e-6 * max(t.abs().max().item() for t in tensors(a).values())


def test_slerp_at_t_0_and_1_gives_the_inputs_and_between_follows_the_arc(exports, tmp_path):
    a, b = exports[:2]
    ta, tb = tensors(a), tensors(b)
    for t, expected in ((0, ta), (1, tb)):
        out = tensors(merge(tmp_path, f'--models={a},{b}', '--method=slerp', f'--t={t}'))
        assert all(torch.equal(out[k], expected[k]) for k in out), f't={t}'
    mid = tensors(merge(tmp_path, f'--models={a},{b}', '--method=slerp', '--t=0.5'))
    name = 'layers.0.attention.wqkv.weight'
    x, y = ta[name].double(), tb[name].double()
    omega = torch.arccos((x * y).sum() / (x.norm() * y.norm()))  # two random matrices: nearly orthogonal
    reference = (torch.sin(omega / 2) * (x + y) / torch.sin(omega)).float()
    assert_close(mid[name], reference, 1e-6, 'slerp midway vs the formula in float64')
    assert mid[name].norm() > ((ta[name] + tb[name]) / 2).norm() * 1.3  # the arc, not the chord


def test_linear_of_two_is_their_mean_and_weights_are_normalised(exports, tmp_path):
    a, b = exports[:2]
    ta, tb = tensors(a), tensors(b)
    out = tensors(merge(tmp_path, f'--models={a},{b}'))
    assert all(torch.equal(out[k], (ta[k] + tb[k]) / 2) for k in out)
    out = tensors(merge(tmp_path, f'--models={a},{b}', '--weights=3,1'))
    assert max_diff(out, {k: 0.75 * ta[k] + 0.25 * tb[k] for k in ta}) < 1e-6


def test_task_arithmetic_adds_the_weighted_task_vectors_to_the_base(exports, tmp_path):
    a, b, c = exports
    ta, tb, tc = tensors(a), tensors(b), tensors(c)
    out = tensors(merge(tmp_path, f'--models={b},{c}', f'--base={a}', '--method=task_arithmetic',
                        '--weights=0.5,0.25', '--scale=2'))
    expected = {k: ta[k] + 2 * (0.5 * (tb[k] - ta[k]) + 0.25 * (tc[k] - ta[k])) for k in ta}
    assert max_diff(out, expected) < 1e-5


def test_ties_with_one_model_and_density_1_is_the_base_plus_its_task_vector(exports, tmp_path):
    a, b = exports[:2]
    ta, tb = tensors(a), tensors(b)
    out = tensors(merge(tmp_path, f'--models={b}', f'--base={a}', '--method=ties', '--density=1'))
    assert all(torch.equal(out[k], ta[k] + (tb[k] - ta[k])) for k in out)


def test_ties_trims_elects_the_sign_and_averages_the_agreeing_entries(data_dir, tmp_path):
    # task vectors on the first 3 entries of the final norm (32 entries); density 2/32 keeps each one's top 2:
    # (4, -2, .), (., -3, 2), (-2, 6, .); the sums (2, 1, 2) elect +, +, +; the agreeing means are 4, 6, 2
    base = random_model(data_dir)
    with torch.no_grad():
        base.norm.weight.fill_(1.0)  # integers: the task vectors come back exactly
    paths = [write_export(tmp_path / 'base', base, data_dir)]
    for i, tau in enumerate([[4, -2, 1], [-1, -3, 2], [-2, 6, 0.5]]):
        model = copy.deepcopy(base)
        with torch.no_grad():
            model.norm.weight[:3] += torch.tensor(tau)
        paths.append(write_export(tmp_path / f'm{i}', model, data_dir))
    folder = merge(tmp_path, f'--models={",".join(paths[1:])}', f'--base={paths[0]}', '--method=ties',
                   f'--density={2 / 32}')
    with open(os.path.join(folder, 'merge.json')) as f:
        record = json.load(f)
    assert record['base']['path'] == paths[0] and len(record['models']) == 3 and record['density'] == 2 / 32
    out = tensors(folder)
    print('merged task vector:', (out['norm.weight'][:4] - 1).tolist())
    assert (out['norm.weight'] - 1).tolist() == [4, 6, 2] + [0] * 29
    assert all(torch.equal(out[k], v) for k, v in tensors(paths[0]).items() if k != 'norm.weight')


def test_merged_folder_is_an_export_with_a_record_of_its_inputs(exports, tmp_path):
    a, b = exports[:2]
    out = merge(tmp_path, f'--models={a},{b}', '--method=slerp')
    assert sorted(os.listdir(out)) == ['README.md', 'config.json', 'merge.json', 'meta.json', 'model.safetensors',
                                       'tokenizer.json']
    with open(os.path.join(out, 'merge.json')) as f:
        record = json.load(f)
    assert record['method'] == 'slerp' and record['t'] == 0.5
    assert [m['path'] for m in record['models']] == [os.path.abspath(a), os.path.abspath(b)]
    assert record['models'][0]['sha256'] == sha256(os.path.join(a, 'model.safetensors'))
    model = load_model(out)  # what sample.py, eval.py and export.py call
    assert model.config == load_model(a).config and not any(n.startswith('.merge') for n in os.listdir(tmp_path))


def test_bad_merge_inputs_are_a_one_line_error_before_any_work(exports, data_dir, tmp_path):
    a, b, c = exports
    other_shape = write_export(tmp_path / 'deep', random_model(data_dir, n_layer=3), data_dir)
    other_tok = str(tmp_path / 'tok')
    shutil.copytree(b, other_tok)
    train_bpe(DOCS[:5], 300).save(os.path.join(other_tok, 'tokenizer.json'))
    out = tmp_path / 'merged'
    for args, words in [
        ([f'--models={a},{other_shape}'], 'another config'),
        ([f'--models={a},{other_tok}'], 'another tokenizer'),
        ([f'--models={a},{tmp_path}'], 'not a medslm export'),
        ([f'--models={a},{b},{c}', '--method=slerp'], 'slerp merges two'),
        ([f'--models={a},{b}', '--method=ties'], 'need it'),
        ([f'--models={a},{b}', f'--base={c}'], 'take none'),
        ([f'--models={a},{b}', '--weights=1'], '1 weights'),
        ([f'--models={a},{b}', '--method=ties', f'--base={c}', '--density=0'], 'density'),
        ([f'--models={a},{b}', '--method=dare'], '--method must be'),
    ]:
        with pytest.raises(SystemExit) as e:
            run('merge.py', *args, f'--out={out}')
        message = str(e.value.code)
        print(message)
        assert message.startswith('error: ') and '\n' not in message and words in message, message
        assert not out.exists() and not any(p.name.startswith('.merge') for p in tmp_path.iterdir())
    with pytest.raises(SystemExit) as e:
        run('merge.py', f'--models={a},{b}', f'--out={a}')
    assert 'one of the inputs' in str(e.value.code)


def test_lora_sft_on_a_gpt2_vocabulary_base_trains_the_grown_embeddings(tmp_path):
    # GPT-2's 50,257 ids have no chat tokens: SFT adds four rows, which must train, and resume / export regrow them
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=48, vocab_size=50257, tie_embeddings=True))
    base = str(tmp_path / 'base')
    os.makedirs(base)
    save_model(model, os.path.join(base, 'model.safetensors'))
    with open(os.path.join(base, 'config.json'), 'w') as f:
        json.dump(dataclasses.asdict(model.config), f)
    with open(os.path.join(base, 'meta.json'), 'w') as f:
        json.dump(dict(tokenizer='gpt2', vocab_size=50257, dtype='uint16', eos_id=50256, tokenizer_file=None), f)
    data, out_dir = chat_data(str(tmp_path / 'chat')), str(tmp_path / 'out')
    args = [f'--init_from={base}', '--max_iters=2', '--eval_interval=2', '--lr_decay_iters=2', '--lora_rank=4']
    result = sft(out_dir, data, *args, check=False)
    assert result.returncode != 0 and result.stderr.startswith('error:') and 'lora_train_embeddings' in result.stderr
    sft(out_dir, data, *args, '--lora_train_embeddings=True')
    ckpt = load_ckpt(out_dir)
    assert ckpt['model']['tok_embeddings.weight'].shape == (50261, 16) and ckpt['model_args']['vocab_size'] == 50261
    merged, adapted = load_model(os.path.join(out_dir, 'export')), load_lora(ckpt)
    idx = torch.tensor([[50257, 11, 50258, 50260]])
    assert_close(logits(adapted, idx), logits(merged, idx), 1e-5, 'grown vocabulary: merged vs adapter-on')
    with open(os.path.join(out_dir, 'export', 'adapter', 'adapter_config.json')) as f:
        assert json.load(f)['modules_to_save'] == ['embed_tokens', 'lm_head']
