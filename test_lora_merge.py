"""
LoRA (lora.py, train.py's lora_* settings) and merge.py on tiny CPU models: the adapted model starts equal to its
base, only adapters train, the merged export and peft's view of the adapter match our adapter-on forward, resume
is exact, and the merge methods keep their defining properties. pytest test_lora_merge.py -s prints the figures.
"""
import copy
import json
import os

import pytest
import torch

from lora import LoRALinear, adapter_state_dict, add_lora, merge_lora
from model import GPT, GPTConfig

TINY = dict(n_layer=2, n_embd=32, n_head=4, n_kv_head=2, block_size=32, multiple_of=16, vocab_size=300)
CLASSIC = dict(norm='layernorm', pos_embedding='learned', mlp='gelu', n_kv_head=4, bias=True, tie_embeddings=True)


@pytest.fixture(autouse=True, scope='module')
def one_thread():
    # tiny models gain nothing from a second thread, and on a busy machine its spin-waits cost several times over
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def assert_close(a, b, atol, what):
    diff = (a - b).abs().max().item()
    print(f'{what}: max abs difference {diff:.3e} (largest value {a.abs().max().item():.1f})')
    assert diff <= atol, f'{what}: max abs difference {diff:.3e} > {atol:.1e}'


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
    assert len(wrapped) == 4 * TINY['n_layer'] and all(n.rsplit('.', 1)[-1] in ('wqkv', 'wo', 'w1', 'w2') for n in wrapped)
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
        optimizer = model.configure_optimizers(0.1, 1e-2, (0.9, 0.95), 'cpu', muon_lr)
        assert {id(p) for g in optimizer.param_groups for p in g['params']} == \
               {id(p) for p in model.parameters() if p.requires_grad}
        before = {n: p.clone() for n, p in adapter_state_dict(model).items()}
        for _ in range(3):
            model(IDX, IDX)[1].backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        assert len(optimizer.state) == len(trainable)
        moved = {n: (p - before[n]).abs().max().item() for n, p in adapter_state_dict(model).items()}
        print(f'muon_lr={muon_lr}: smallest adapter change {min(moved.values()):.3g}')
        assert min(moved.values()) > 0
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if not p.requires_grad)


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
    for kwargs in (dict(rank=0, alpha=8), dict(rank=4, alpha=8, targets='wqkv,output'), dict(rank=4, alpha=8, targets='')):
        with pytest.raises(SystemExit) as e:
            add_lora(tiny_model(), **kwargs)
        print(e.value.code)
        assert str(e.value.code).startswith('error: LoRA needs') and '\n' not in str(e.value.code)
