# The demo: the best model 10 minutes of 2 CPU cores can train on the embedded PubMed corpus, measured in
# validation bits per byte. Prepare the data with: python prepare.py --vocab_size=4096 --out=data/pubmed_4k
#
# What won at this budget (~7.8M tokens), compared at equal wall clock, and why:
# - a small model that sees many tokens: at 4 layers, widths 256 -> 192 -> 128 -> 96 kept improving (1.764,
#   1.721, 1.715 at equal time on one core; 96 reached 1.684 on two). Chinchilla puts ~8M tokens at ~0.4M
#   parameters (20 tokens each); small widths also lose least to per-op overheads on a CPU.
# - a 4096-token BPE (3.7 bytes a token; 8K: 4.25): the output head is the biggest matmul of a model this
#   small, and halving it buys more steps than longer tokens give back.
# - Muon for the matrices inside the blocks (AdamW for the embeddings and norms), both at twice the rates we
#   started from (-0.053 bits/byte; twice again was worse), a short warmup and a cosine decay to 0.
# - batch 16 x 256: 8 and 32 were worse at equal time (by 0.02 and 0.05).
# - dtype 'auto': bf16 autocast where the CPU runs it faster (this EPYC has AVX512-BF16: 1.4x faster steps, the
#   same loss per step), float32 where it does not. No compile: its minute of warm-up is a tenth of the
#   budget, and it needs a C++ compiler that a first run should not depend on.
out_dir = 'out-tiny'
data_dir = 'data/pubmed_4k'

n_layer = 4
n_embd = 96
n_head = 2
n_kv_head = 2
block_size = 256
vocab_size = 4096
tie_embeddings = True

device = 'cpu'
dtype = 'auto'
compile = False
batch_size = 16
gradient_accumulation_steps = 1
max_iters = 1900        # ~9.6 minutes at ~0.3 s per step on a 2-core EPYC with bf16 (evaluations included)
lr_decay_iters = 1900
learning_rate = 4e-3    # AdamW: embeddings and norms
muon_lr = 0.04          # Muon: attention and feed-forward matrices
min_lr = 0.0
warmup_iters = 20
weight_decay = 0.1
beta2 = 0.99
eval_interval = 190
eval_iters = 4
log_interval = 10
