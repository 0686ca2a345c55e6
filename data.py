"""
The batches train.py trains on, by the kind of data: random windows of prepare.py's token shards (pre-training), or
chat data rendered once, up front (chat.py): conversations packed into windows (SFT), or preference pairs, each a
chosen and a rejected sequence (DPO). Every split is checked as it is read, with a one-line error naming the file.
A mix draws each window of a batch from one of several such splits (shards and conversations), by weight.
"""
import json
import os

import numpy as np
import torch

from chat import is_pairs, pack, pair_windows, read_conversations, read_pairs, require_chat
from tokenizer import load_tokenizer, tokenizer_fingerprint


def shard_split(data_dir, meta, split, block_size):
    """A split of token shards: (files, the number of window starts in each, their token dtype)."""
    files = [os.path.join(data_dir, name) for name in meta['splits'][split]['files']]
    for path in files:
        if not os.path.exists(path):
            raise SystemExit(f"error: {path} (listed in {os.path.join(data_dir, 'meta.json')}) not found")
    token_dtype = np.dtype(meta['dtype'])
    starts = np.array([max(os.path.getsize(p) // token_dtype.itemsize - block_size, 0) for p in files])
    if starts.sum() == 0:
        raise SystemExit(f'error: the {split} split of {data_dir} has no shard longer than block_size={block_size}')
    return files, starts, token_dtype


def chat_split(path, tok, block_size, pairs=False, skip_bad=False, seed=0, verbose=True):
    """A split of chat data, every window rendered: (inputs, targets) tensors, (windows, block_size) of packed
    conversations, or with pairs (pairs, 2, block_size), each pair's chosen then rejected sequence."""
    if not os.path.exists(path):
        raise SystemExit(f'error: {path} not found: chat data needs train.jsonl and val.jsonl')
    if pairs:
        records, skipped = read_pairs(path, skip_bad)
        x, y, stats = pair_windows(records, tok, block_size)
        if verbose:
            print(f"{path}: {len(x):,} preference pairs ({skipped} bad lines skipped, {stats['dropped']} longer than "
                  f"block_size={block_size} dropped), {stats['trained']:,} reply tokens")
        if len(x) == 0:
            raise SystemExit(f'error: {path} has no pair that fits whole in block_size={block_size}')
    else:
        records, skipped = read_conversations(path, skip_bad)
        x, y, stats = pack([r['messages'] for r in records], tok, block_size, seed)
        if verbose:
            print(f"{path}: {len(records):,} conversations ({skipped} bad lines skipped, {stats['truncated']} "
                  f"truncated, {stats['dropped']} dropped) in {stats['windows']:,} windows, {stats['fill']:.0%} "
                  f"full, {stats['trained']:,} tokens trained")
        if stats['trained'] == 0:
            raise SystemExit(f'error: {path} leaves no assistant token to train on at block_size={block_size}')
    return torch.from_numpy(x), torch.from_numpy(y)


def parse_mix(mix):
    """[(folder, weight)] of a mix setting, 'folder:weight,folder:weight' (weights > 0, summing below 1)."""
    parts = []
    for item in filter(None, mix.split(',')):
        folder, _, weight = item.rpartition(':')
        try:
            parts.append((folder, float(weight)))
        except ValueError:
            raise SystemExit(f'error: mix takes folder:weight items separated by commas, got {item!r}') from None
        if not folder or not 0 < parts[-1][1] < 1:
            raise SystemExit(f'error: mix item {item!r} needs a folder and a weight between 0 and 1')
    if sum(w for _, w in parts) >= 1:
        raise SystemExit(f"error: the mix's weights sum to {sum(w for _, w in parts):g}: data_dir needs the rest")
    return parts


def mix_split(train_split, parts, tokenizer_dir, meta, block_size, skip_bad=False, seed=0, verbose=True):
    """The training split of a mix: data_dir's (train_split) and each part's train split, with their weights. A part
    is token shards of the same tokenizer or conversations, which that tokenizer renders with their loss masks."""
    splits, weights, tok = [train_split], [1 - sum(w for _, w in parts)], None
    for folder, weight in parts:
        meta_path, chat_path = os.path.join(folder, 'meta.json'), os.path.join(folder, 'train.jsonl')
        if os.path.exists(meta_path):
            with open(meta_path) as f:
                part_meta = json.load(f)
            if tokenizer_fingerprint(part_meta, folder) != tokenizer_fingerprint(meta, tokenizer_dir):
                raise SystemExit(f'error: mix folder {folder} was encoded by another tokenizer than {tokenizer_dir}')
            splits.append(shard_split(folder, part_meta, 'train', block_size))
        elif os.path.exists(chat_path) and not is_pairs(chat_path):
            tok = tok or load_tokenizer(tokenizer_dir)
            require_chat(tok)
            splits.append(chat_split(chat_path, tok, block_size, skip_bad=skip_bad, seed=seed, verbose=verbose))
        else:
            raise SystemExit(f'error: mix folder {folder} holds neither token shards (meta.json) nor conversations '
                             '(train.jsonl); preference pairs do not mix')
        weights.append(weight)
    return {'parts': splits, 'weights': torch.tensor(weights, dtype=torch.float64)}


def get_batch(split, batch_size, block_size, generator, device):
    """batch_size windows of a split drawn with generator, (inputs, targets) on device; of preference pairs,
    2 x batch_size sequences: chosen, rejected, chosen..."""
    x, y = draw(split, batch_size, block_size, generator)
    if device.startswith('cuda'):
        return x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
    return x.to(device), y.to(device)


def draw(split, batch_size, block_size, generator):
    if isinstance(split, dict):  # a mix: how many of the windows each part gives, then the windows part by part
        part = torch.multinomial(split['weights'], batch_size, replacement=True, generator=generator)
        drawn = [draw(p, int(n), block_size, generator) for p, n in zip(split['parts'], part.bincount(
                 minlength=len(split['parts'])).tolist()) if n]
        return torch.cat([x for x, _ in drawn]), torch.cat([y for _, y in drawn])
    if isinstance(split[0], torch.Tensor):  # chat data: its windows, rendered
        windows, targets = split
        ix = torch.randint(len(windows), (batch_size,), generator=generator)
        x, y = windows[ix].view(-1, block_size), targets[ix].view(-1, block_size)
    else:
        files, starts, token_dtype = split
        ends = np.cumsum(starts)
        # a uniform draw over all window starts picks each shard in proportion to its length
        ix = torch.randint(int(ends[-1]), (batch_size,), generator=generator).numpy()
        shard = np.searchsorted(ends, ix, side='right')
        offsets = ix - (ends - starts)[shard]
        # fresh memmaps every batch: a long-lived one keeps every page it ever touched resident (nanoGPT's fix)
        shards = {s: np.memmap(files[s], dtype=token_dtype, mode='r') for s in set(shard.tolist())}
        w = torch.from_numpy(np.stack([shards[s][o:o + block_size + 1]
                                       for s, o in zip(shard, offsets)]).astype(np.int64))
        x, y = w[:, :-1].contiguous(), w[:, 1:].contiguous()
    return x, y
