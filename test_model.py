"""Tests of model.py and configurator.py on tiny CPU models: pytest test_model.py"""
import copy
import dataclasses
import math
import os
import runpy
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from configurator import configure
from model import GPT, GPTConfig, apply_rope, rope_cache, sample_logits
from optim import configure_optimizers, orthogonalize

MODEL_FIELDS = {f.name for f in dataclasses.fields(GPTConfig)}
MODERN = dict(n_layer=2, n_embd=64, n_head=4, n_kv_head=2, vocab_size=97, block_size=64)
CLASSIC = dict(n_layer=2, n_embd=64, n_head=4, vocab_size=97, block_size=64, norm='layernorm',
               pos_embedding='learned', mlp='gelu', bias=True, tie_embeddings=True)


def assert_close(a, b, atol, what):
    diff = (a - b).abs().max().item()
    print(f'{what}: max abs difference {diff:.3e}')
    assert diff <= atol, f'{what}: max abs difference {diff:.3e} > {atol:.1e}'


def tiny(seed=0, **kwargs):
    torch.manual_seed(seed)
    return GPT(GPTConfig(**kwargs)).eval()


def full_logits(model, idx):
    return model.output(model.hidden(idx))


@pytest.mark.parametrize('config_file, expected', [
    ('config/medslm_381m.py', 381_373_440),
    ('config/healthslm_15m.py', 15_276_288),
    # 32000*768 tied embedding + 1024*768 positions + 12 * 7,087,872 per block + final LayerNorm
    ('config/gpt2_120m.py', 32000 * 768 + 1024 * 768 + 12 * 7_087_872 + 2 * 768),
    ('config/tiny_cpu.py', 836_448),
    ('config/small_cpu.py', 1_328_256),
])
def test_seed_configs_have_exact_parameter_counts(config_file, expected):
    settings = {k: v for k, v in runpy.run_path(config_file).items() if k in MODEL_FIELDS}
    with torch.device('meta'):
        model = GPT(GPTConfig(**settings))
    assert model.get_num_params() == expected


def test_swiglu_hidden_size_is_derived_llama_style():
    assert GPTConfig(n_embd=1024, n_head=16, multiple_of=64).intermediate_size == 2752
    assert GPTConfig(n_embd=4096, n_head=32, multiple_of=256).intermediate_size == 11008  # LLaMA-7B
    assert GPTConfig(n_embd=768, mlp='gelu').intermediate_size == 3072


@pytest.mark.parametrize('kwargs', [MODERN, CLASSIC], ids=['modern', 'classic'])
def test_changing_a_future_token_never_changes_earlier_logits(kwargs):
    model = tiny(**kwargs)
    idx = torch.randint(0, 97, (2, 20))
    changed = idx.clone()
    changed[:, 12:] = (changed[:, 12:] + 1) % 97
    a, b = full_logits(model, idx), full_logits(model, changed)
    assert_close(a[:, :12], b[:, :12], 1e-6, 'logits before the change')
    assert (a[:, 12] - b[:, 12]).abs().max() > 1e-3  # the changed position itself does move


@pytest.mark.parametrize('kwargs', [MODERN, CLASSIC], ids=['modern', 'classic'])
def test_kv_cache_decoding_equals_full_forward(kwargs):
    model = tiny(**kwargs)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    prompt = torch.randint(0, 97, (2, 7))
    out = model.generate(prompt, 30, temperature=0)
    # decoding lays the weights out column-major and keeps that layout for the next call; values unchanged,
    # and train() puts them back row-major, as training expects
    assert not all(p.is_contiguous() for p in model.parameters())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    model.train()
    assert all(p.is_contiguous() for p in model.parameters())
    model.eval()
    seq = prompt
    for _ in range(30):  # greedy decoding without a cache: the whole sequence every step
        seq = torch.cat([seq, full_logits(model, seq)[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out, seq)
    # and the cached logits themselves, for a multi-token chunk after a prefill
    model.setup_caches(2, 37)
    model(seq[:, :20], pos=0)
    chunk = model.output(model.hidden(seq[:, 20:37], pos=20))
    model.clear_caches()
    assert_close(chunk, full_logits(model, seq[:, :37])[:, 20:], 1e-5, 'cached vs full logits')


@pytest.mark.parametrize('kwargs', [MODERN, CLASSIC], ids=['modern', 'classic'])
@pytest.mark.parametrize('dtype', [torch.bfloat16, torch.float16], ids=['bf16', 'fp16'])
def test_kv_cache_decoding_under_autocast_follows_float32(kwargs, dtype):
    # sample.py --dtype=bfloat16 (and eval.py's task generation) decode under autocast: the cache must take the
    # half-precision keys and values attention makes there
    model = tiny(**kwargs).eval()
    prompt = torch.randint(0, 97, (2, 7))
    reference = model.generate(prompt, 20, temperature=0)
    with torch.autocast('cpu', dtype=dtype):
        steps = model.stream(prompt, 20, temperature=0)
        first = next(steps)
        assert model.layers[0].attention.kv_cache.k.dtype == dtype
        out = torch.cat([prompt, first[:, None]] + [t[:, None] for t in steps], dim=1)
        logits = model(reference[:, :-1])[0]
    agree = (out[:, 7:] == reference[:, 7:]).float().mean().item()
    print(f'greedy tokens equal to float32: {agree:.3f}')
    assert agree >= 0.9
    assert_close(logits, model(reference[:, :-1])[0], 1e-2, f'last-position logits under {dtype}')


def test_gqa_with_as_many_kv_heads_equals_multi_head_attention():
    model = tiny(**{**MODERN, 'n_kv_head': 4, 'n_layer': 1})
    x = torch.randn(2, 10, 64)
    attn = model.layers[0].attention
    q, k, v = attn.wqkv(x).split(64, dim=-1)
    heads = lambda t: t.view(2, 10, 4, 16).transpose(1, 2)
    rope = model.rope[:10]
    q, k, v = apply_rope(heads(q), rope), apply_rope(heads(k), rope), heads(v)
    scores = (q @ k.transpose(-1, -2)) / math.sqrt(16)
    scores = scores.masked_fill(torch.ones(10, 10, dtype=torch.bool).triu(1), float('-inf'))
    reference = attn.wo((scores.softmax(-1) @ v).transpose(1, 2).reshape(2, 10, 64))
    assert_close(attn(x, rope, 0), reference, 1e-5, 'multi-head attention')


def test_grouped_query_heads_share_their_groups_kv_head():
    # a 4-head model with 2 KV heads equals a 4-KV-head model whose KV heads are copies per group
    gqa = tiny(**{**MODERN, 'n_layer': 1})
    mha = tiny(**{**MODERN, 'n_layer': 1, 'n_kv_head': 4})
    state = gqa.state_dict()
    q, k, v = state['layers.0.attention.wqkv.weight'].split([64, 32, 32])
    repeat = lambda w: w.view(2, 16, 64).repeat_interleave(2, dim=0).reshape(64, 64)
    state['layers.0.attention.wqkv.weight'] = torch.cat([q, repeat(k), repeat(v)])
    mha.load_state_dict(state)
    idx = torch.randint(0, 97, (2, 15))
    assert_close(full_logits(gqa, idx), full_logits(mha, idx), 1e-5, 'GQA vs repeated-KV MHA')


def test_rope_attention_scores_depend_only_on_relative_position():
    torch.manual_seed(0)
    q, k = torch.randn(1, 1, 1, 32), torch.randn(1, 1, 1, 32)
    rope = rope_cache(64, 32, 10000.0)
    score = lambda m, n: (apply_rope(q, rope[m:m + 1]) * apply_rope(k, rope[n:n + 1])).sum()
    assert_close(score(3, 1), score(40, 38), 1e-5, 'score at (3,1) vs (40,38)')
    assert abs(score(3, 1) - score(3, 2)) > 1e-3  # but it does depend on the distance
    assert_close(apply_rope(q, rope[:1]), q, 1e-7, 'position 0 is the identity')


def test_top_k_and_top_p_never_sample_a_filtered_token():
    torch.manual_seed(0)
    logits = torch.randn(4, 50)
    g = torch.Generator().manual_seed(0)
    top5 = logits.topk(5).indices
    probs = logits.softmax(-1)
    for _ in range(200):
        assert (sample_logits(logits, 1.0, top_k=5, generator=g)[:, None] == top5).any(1).all()
        token = sample_logits(logits, 1.0, top_p=0.5, generator=g)
        sorted_probs, order = probs.sort(-1, descending=True)
        # the nucleus: tokens whose preceding mass (in descending order) is still below top_p
        rank = (order == token[:, None]).float().argmax(-1)
        mass_before = (sorted_probs.cumsum(-1) - sorted_probs).gather(1, rank[:, None]).squeeze(1)
        assert (mass_before < 0.5).all()
        token = sample_logits(logits, 1.0, top_k=10, top_p=0.3, generator=g)
        assert (token[:, None] == logits.topk(10).indices).any(1).all()


def test_top_k_keeps_every_token_tied_with_the_kth():
    logits = torch.tensor([[5.0, 3.0, 3.0, 3.0, 1.0]])
    g = torch.Generator().manual_seed(0)
    seen = {sample_logits(logits, 10.0, top_k=2, generator=g).item() for _ in range(300)}
    assert seen == {0, 1, 2, 3}


def test_top_p_always_keeps_the_most_likely_token():
    logits = torch.tensor([[0.0, 9.0, 1.0]])
    g = torch.Generator().manual_seed(0)
    assert all(sample_logits(logits, 1.0, top_p=0.01, generator=g).item() == 1 for _ in range(50))


def test_temperature_zero_is_argmax_and_seeded_sampling_is_deterministic():
    model = tiny(**MODERN)
    prompt = torch.randint(0, 97, (1, 5))
    assert torch.equal(sample_logits(torch.tensor([[0.1, 2.0, -1.0]]), 0), torch.tensor([1]))
    runs = [model.generate(prompt, 20, temperature=0.8, top_k=20,
                           generator=torch.Generator().manual_seed(7)) for _ in range(2)]
    assert torch.equal(runs[0], runs[1])
    other = model.generate(prompt, 20, temperature=0.8, top_k=20, generator=torch.Generator().manual_seed(8))
    assert not torch.equal(runs[0], other)


def test_generate_stops_at_eos():
    model = tiny(**MODERN)
    prompt = torch.randint(0, 97, (1, 5))
    greedy = model.generate(prompt, 20, temperature=0)
    eos = greedy[0, 8].item()  # make the 4th generated token the end of document
    out = model.generate(prompt, 20, temperature=0, eos_id=eos)
    first = (greedy[0, 5:] == eos).nonzero()[0].item()
    assert out.size(1) == 5 + first + 1 and out[0, -1].item() == eos


def test_generate_refuses_to_run_past_block_size():
    model = tiny(**MODERN)
    with pytest.raises(ValueError, match='block_size'):
        model.generate(torch.zeros(1, 60, dtype=torch.long), 10)


def test_fused_cross_entropy_matches_reference_loss_and_gradients():
    model = tiny(**MODERN).train()
    idx = torch.randint(0, 97, (3, 40))
    targets = torch.randint(0, 97, (3, 40))
    targets[0, :10] = -1  # ignored positions
    _, loss = model(idx, targets)
    loss.backward()
    fused = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    reference = F.cross_entropy(full_logits(model, idx).flatten(0, 1), targets.flatten(), ignore_index=-1)
    reference.backward()
    assert_close(loss, reference, 1e-5, 'loss')
    for name, p in model.named_parameters():
        assert_close(fused[name], p.grad, 1e-6, f'grad {name}')
    with torch.no_grad():
        assert_close(model(idx, targets)[1], reference, 1e-5, 'no-grad loss')


@pytest.mark.parametrize('kwargs', [MODERN, CLASSIC], ids=['modern', 'classic'])
def test_tiny_model_overfits_one_batch(kwargs):
    model = tiny(**kwargs).train()
    idx = torch.randint(0, 97, (4, 32))
    optimizer = configure_optimizers(model, 0.0, 3e-3, (0.9, 0.95), 'cpu')
    for step in range(150):
        _, loss = model(idx[:, :-1], idx[:, 1:])
        if step == 0:
            first = loss.item()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    print(f'loss {first:.3f} -> {loss.item():.4f}')
    assert first > 4.0 and loss.item() < 0.05


def test_weight_decay_only_on_matrices():
    model = tiny(**CLASSIC)
    decay, no_decay = configure_optimizers(model, 0.1, 1e-3, (0.9, 0.95), 'cpu').param_groups
    assert decay['weight_decay'] == 0.1 and all(p.dim() == 2 for p in decay['params'])
    assert no_decay['weight_decay'] == 0.0 and all(p.dim() == 1 for p in no_decay['params'])
    assert len(decay['params']) + len(no_decay['params']) == len(list(model.parameters()))


def test_bf16_autocast_forward_and_backward_run_on_cpu():
    model = tiny(**MODERN).train()
    idx = torch.randint(0, 97, (2, 16))
    with torch.autocast('cpu', dtype=torch.bfloat16):
        _, loss = model(idx, idx)
    loss.backward()
    assert torch.isfinite(loss) and all(torch.isfinite(p.grad).all() for p in model.parameters())


def test_configurator_applies_files_and_arguments(tmp_path):
    cfg = tmp_path / 'cfg.py'
    cfg.write_text("import math\nlearning_rate = 1\nname = 'from-file'\n")
    settings = {'learning_rate': 0.5, 'name': 'default', 'compile': True, 'n_kv_head': None}
    configure(settings, [str(cfg), '--compile=False', '--n_kv_head=2', '--name=123'])
    assert settings['learning_rate'] == 1.0 and isinstance(settings['learning_rate'], float)
    assert settings['compile'] is False and settings['n_kv_head'] == 2 and settings['name'] == '123'


@pytest.mark.parametrize('argv, message', [
    (['--batch_size=3.5'], 'batch_size must be int'),
    (['--bogus=1'], "unknown key 'bogus'"),
    (['--compile=1'], 'compile must be bool'),
    (['missing.py'], 'config file missing.py not found'),
])
def test_configurator_errors_are_one_line(argv, message):
    with pytest.raises(SystemExit, match=message) as e:
        configure({'batch_size': 8, 'compile': True}, argv)
    assert '\n' not in str(e.value)


def test_configurator_help_lists_keys_with_comments(tmp_path):
    script = tmp_path / 'script.py'
    script.write_text(f"import sys\nsys.path.insert(0, {os.path.dirname(os.path.abspath(__file__))!r})\n"
                      "from configurator import configure\nbatch_size = 8  # sequences per micro-step\n"
                      "configure(globals())\n")
    out = subprocess.run([sys.executable, str(script), '--help'], capture_output=True, text=True)
    assert out.returncode == 0 and '--batch_size=8  # sequences per micro-step' in out.stdout


def test_orthogonalize_flattens_the_singular_values():
    torch.manual_seed(0)
    for rows, cols in [(64, 64), (192, 64), (64, 192)]:
        k = min(rows, cols)  # singular values spread over two decades, as in a real gradient
        u, v = torch.linalg.qr(torch.randn(rows, k))[0], torch.linalg.qr(torch.randn(cols, k))[0]
        g = u @ torch.diag(torch.logspace(-1, 1, k)) @ v.t()
        s = torch.linalg.svdvals(orthogonalize(g))
        print(f'{rows}x{cols}: singular values 0.1..10 -> {s.min():.2f}..{s.max():.2f}')
        assert s.min() > 0.5 and s.max() < 1.3


def test_muon_optimizer_trains_and_its_state_round_trips():
    model = tiny(**MODERN).train()
    optimizer = configure_optimizers(model, 0.1, 3e-3, (0.9, 0.95), 'cpu', muon_lr=0.02)
    muon_groups = [g for g in optimizer.param_groups if g['muon']]
    assert len(muon_groups) == 1 and all(p.dim() == 2 for p in muon_groups[0]['params'])
    assert not any(p is model.tok_embeddings.weight for p in muon_groups[0]['params'])
    idx = torch.randint(0, 97, (4, 32))
    for step in range(60):
        _, loss = model(idx[:, :-1], idx[:, 1:])
        first = loss.item() if step == 0 else first
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    print(f'loss {first:.3f} -> {loss.item():.4f}')
    assert loss.item() < 0.5 * first
    # a copy restored from the state dict takes exactly the same next step
    twin = tiny(**MODERN).train()
    twin.load_state_dict(model.state_dict())
    twin_optimizer = configure_optimizers(twin, 0.1, 3e-3, (0.9, 0.95), 'cpu', muon_lr=0.02)
    twin_optimizer.load_state_dict(copy.deepcopy(optimizer.state_dict()))  # as from disk: no shared buffers
    for m, opt in ((model, optimizer), (twin, twin_optimizer)):
        opt.zero_grad()
        m(idx[:, :-1], idx[:, 1:])[1].backward()
        opt.step()
    for (name, a), b in zip(model.named_parameters(), twin.parameters()):
        assert torch.equal(a, b), name
