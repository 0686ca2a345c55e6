"""
The tokenizers a dataset is encoded with, and how to get one back from a dataset or model folder:

- bpe: a ByteLevel BPE (Hugging Face tokenizers) trained on the train split by prepare.py, its four special
  tokens at ids 0..3 and the chat markers at 4..7, saved as tokenizer.json beside the shards;
- gpt2: tiktoken's GPT-2 encoding, read offline from a local ranks file, the chat markers at ids 50257..50260.

load_tokenizer(folder) reads meta.json and gives one interface for both; tokenizer_fingerprint names a tokenizer
by its vocabulary, so a model is never trained on ids of another tokenizer of the same size.
"""
import hashlib
import importlib.metadata
import json
import os
import sys
from types import SimpleNamespace

import tiktoken
import tiktoken.load
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

SPECIALS = ["[PAD]", "[UNK]", "[BOS]", "[EOS]"]  # ids 0..3 in the bpe vocab
# the chat template's turn markers (chat.py): ids 4..7 of a bpe vocab, reserved before any instruction tuning;
# GPT-2's 50,257 ids have no room for them, so they take ids 50257..50260 there (see load_tokenizer)
CHAT_TOKENS = ["<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
GPT2_PAT = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
# tokenizer_fingerprint of GPT-2's ranks (any copy: whisper's, tiktoken's download): for metas written before
# meta.json recorded one
GPT2_SHA256 = "5b3947a7c5b089aed20bb6123355c8cc9115b2c578f511d26d83252eede5ca3f"


def gpt2_encoding(ranks_path=None):
    """tiktoken's GPT-2 encoding, offline from a local GPT-2 .tiktoken ranks file: the given path, else the one
    the openai-whisper package ships, else tiktoken's own download (or cache)."""
    if ranks_path is None:
        try:
            files = importlib.metadata.files("openai-whisper") or []
        except importlib.metadata.PackageNotFoundError:
            files = []
        ranks_path = next((str(f.locate()) for f in files if str(f).endswith("whisper/assets/gpt2.tiktoken")), None)
    if ranks_path is None:
        try:
            return tiktoken.get_encoding("gpt2")
        except Exception as e:  # offline: any of requests' or urllib's errors
            sys.exit(f"error: no GPT-2 ranks file and no download ({type(e).__name__}): "
                     "pip install --no-deps openai-whisper, or pass --gpt2_ranks PATH/gpt2.tiktoken")
    if not os.path.isfile(ranks_path):
        sys.exit(f"error: {ranks_path}: no such GPT-2 ranks file (pip install --no-deps openai-whisper has one)")
    specials = {"<|endoftext|>": 50256, **{t: 50257 + i for i, t in enumerate(CHAT_TOKENS)}}
    return tiktoken.Encoding(name="gpt2", pat_str=GPT2_PAT, mergeable_ranks=tiktoken.load.load_tiktoken_bpe(ranks_path),
                             special_tokens=specials)


def train_bpe(texts, vocab_size):
    tok = Tokenizer(models.BPE(unk_token="[UNK]"))
    # ByteLevel both ways and no normalizer: decode(encode(text)) == text for any text
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS + CHAT_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    tok.encode_special_tokens = True  # a literal "[EOS]" in a text is text, never the EOS id (not saved: see load_tokenizer)
    return tok


def read_bpe(path):
    tok = Tokenizer.from_file(path)
    tok.encode_special_tokens = True  # as in train_bpe: tokenizer.json does not keep it
    return tok


def load_tokenizer(folder, gpt2_ranks=None):
    """The tokenizer of a prepared dataset: .encode(str) -> ids (no specials added), .encode_batch([str]) -> [ids]
    (on parallel threads), .decode(ids) -> str, .eos_id, .vocab_size (the data's ids), .kind, and .chat: the ids
    of CHAT_TOKENS by name (system, user, assistant, end), or None for a bpe vocabulary trained before them."""
    with open(os.path.join(folder, "meta.json")) as f:
        meta = json.load(f)
    if meta["tokenizer"] == "bpe":
        tok = read_bpe(os.path.join(folder, meta["tokenizer_file"]))
        encode = lambda s: tok.encode(s, add_special_tokens=False).ids
        encode_batch = lambda texts: [e.ids for e in tok.encode_batch(texts, add_special_tokens=False)]
        decode = lambda ids: tok.decode(list(ids), skip_special_tokens=False)
        chat_ids = [tok.token_to_id(t) for t in CHAT_TOKENS]
    else:
        enc = gpt2_encoding(gpt2_ranks)
        encode, decode = enc.encode_ordinary, lambda ids: enc.decode(list(ids))
        encode_batch = lambda texts: enc.encode_ordinary_batch(texts, num_threads=os.cpu_count() or 1)
        chat_ids = [enc._special_tokens.get(t) for t in CHAT_TOKENS]  # tiktoken's own download has none
    chat = None if None in chat_ids else dict(zip(["system", "user", "assistant", "end"], chat_ids))
    return SimpleNamespace(kind=meta["tokenizer"], encode=encode, encode_batch=encode_batch, decode=decode,
                           eos_id=meta["eos_id"], vocab_size=meta["vocab_size"], chat=chat)


def gpt2_fingerprint(enc):
    # the ranks alone decide which ids a text gets: copies with or without the chat tokens are the same tokenizer
    tokens = [b""] * len(enc._mergeable_ranks)  # in rank order: a list, not a sorted copy of the dict's items
    for token, rank in enc._mergeable_ranks.items():
        tokens[rank] = token
    h = hashlib.sha256()
    for rank, token in enumerate(tokens):
        h.update(rank.to_bytes(4, "big") + len(token).to_bytes(2, "big") + token)
    return h.hexdigest()


def bpe_fingerprint(path):
    """sha256 of a tokenizer.json's vocabulary, merges and added tokens, in a canonical form (tokenizers versions
    spell merges differently); None if the file holds no BPE vocabulary."""
    with open(path, encoding="utf-8") as f:
        spec = json.load(f)
    model = spec.get("model") or {}
    if not isinstance(model.get("vocab"), dict) or "merges" not in model:
        return None
    vocab = sorted(model["vocab"].items(), key=lambda kv: kv[1])
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    added = sorted((t["id"], t["content"]) for t in spec.get("added_tokens", []))
    return hashlib.sha256(json.dumps([vocab, merges, added], ensure_ascii=False).encode()).hexdigest()


def tokenizer_fingerprint(meta, folder=None):
    """What names the tokenizer of a dataset or model folder: meta.json's tokenizer_sha256, else (a folder prepared
    before it was recorded) computed from its tokenizer file; None where neither can be had."""
    if meta.get("tokenizer_sha256"):
        return meta["tokenizer_sha256"]
    if meta["tokenizer"] == "gpt2":
        return GPT2_SHA256
    path = os.path.join(folder, meta.get("tokenizer_file") or "tokenizer.json") if folder else None
    return bpe_fingerprint(path) if path and os.path.isfile(path) else None
