"""The GPU path's arithmetic and choices, pinned on a CPU: ranks x accumulation steps, the peak-FLOPS table, a GPU
config on a machine without one, dtype 'auto'."""
import ast
import os

import pytest
import torch

import hardware
from helpers import ROOT


def config_settings(name):
    tree = ast.parse(open(os.path.join(ROOT, 'config', name)).read())
    return {node.targets[0].id: ast.literal_eval(node.value) for node in tree.body if isinstance(node, ast.Assign)}


@pytest.mark.parametrize('name', ['medslm_381m.py', 'healthslm_15m.py', 'gpt2_120m.py'])
def test_every_power_of_two_up_to_64_ranks_keeps_the_configs_tokens_per_step(name):
    cfg = config_settings(name)
    steps, batch = cfg['gradient_accumulation_steps'], cfg['batch_size']
    for world in (1, 2, 4, 8, 16, 32, 64):
        per_rank_steps, per_rank_batch = hardware.split_batch(steps, batch, world)
        assert per_rank_steps * per_rank_batch * world == steps * batch, (world, per_rank_steps, per_rank_batch)
        assert 1 <= per_rank_batch <= batch and per_rank_steps >= 1


def test_world_size_arithmetic_for_1_to_64_ranks():
    for steps, batch in ((16, 16), (4, 32), (1, 12), (3, 5)):
        for world in range(1, 65):
            if steps * batch % world:
                with pytest.raises(SystemExit, match=f'does not divide among {world} processes'):
                    hardware.split_batch(steps, batch, world)
                continue
            s, b = hardware.split_batch(steps, batch, world)
            assert s * b * world == steps * batch and b <= batch
            if steps % world == 0:  # the old split: every rank keeps batch_size, the same global batch
                assert (s, b) == (steps // world, batch)


def test_mfu_peak_table_knows_the_common_gpus_and_nothing_else():
    expect = {'NVIDIA A100-SXM4-80GB': 312e12, 'NVIDIA H100 80GB HBM3': 989e12, 'NVIDIA H100 PCIe': 756e12,
              'NVIDIA H200': 989e12, 'NVIDIA L40S': 362e12, 'NVIDIA L4': 121e12, 'NVIDIA L40': 181e12,
              'NVIDIA GeForce RTX 4090': 165e12, 'NVIDIA GeForce RTX 3090': 71e12, 'Tesla V100-SXM2-16GB': 125e12,
              'NVIDIA A10G': 70e12, 'NVIDIA A10': 125e12}
    for name, flops in expect.items():
        assert hardware.peak_flops(name) == flops, name
    assert hardware.peak_flops('Some Future Accelerator') is None


def test_a_gpu_device_without_cuda_stops_in_one_line(monkeypatch):
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: False)
    with pytest.raises(SystemExit, match=r"device='cuda' but CUDA is not usable here.*--device=cpu"):
        hardware.check_device('cuda')
    hardware.check_device('cpu')


def test_auto_dtype_takes_fp16_on_gpus_that_only_emulate_bf16(monkeypatch):
    calls = []

    def bf16_supported(including_emulation=True):
        calls.append(including_emulation)
        return including_emulation  # a V100: emulated only
    monkeypatch.setattr(torch.cuda, 'is_bf16_supported', bf16_supported)
    assert hardware.resolve_dtype('auto', 'cuda') == 'float16' and calls == [False]
    assert hardware.resolve_dtype('bfloat16', 'cuda') == 'bfloat16'
    with pytest.raises(SystemExit, match="dtype must be"):
        hardware.resolve_dtype('fp8', 'cpu')
