# The demo: the best model 10 minutes of 2 CPU cores can train on the embedded PubMed corpus, measured in
# validation bits per byte. Prepare the data with: python prepare.py --vocab_size=8192 --out=data/pubmed_8k
#
# What wins at this budget (~1.3M tokens, ~6e13 FLOPs), and why:
# - a 8192-token BPE: the output head is the biggest matmul of a model this small; 8K keeps it at a third of
#   the FLOPs while a token still covers ~4.2 bytes of PubMed text.
# - 4 layers x 256, RoPE + SwiGLU, tied embeddings (5.5M parameters): every FLOP goes into the few steps there are.
# - Muon for the matrices inside the blocks (AdamW for embeddings and norms): at equal steps it was 0.12 nats
#   ahead of AdamW at step 200 in our runs, for ~10% more time per step.
# - a short warmup and a cosine decay to ~0: a 10-minute run has no use for a high final learning rate.
# - float32 and no compile: CPU bf16 autocast runs ~30x slower without bf16 units, and compile's minute of
#   warm-up is a tenth of the budget.
out_dir = 'out-tiny'
data_dir = 'data/pubmed_8k'

n_layer = 4
n_embd = 256
n_head = 4
n_kv_head = 4
block_size = 256
vocab_size = 8192
tie_embeddings = True

device = 'cpu'
dtype = 'float32'
compile = False
batch_size = 16
gradient_accumulation_steps = 1
max_iters = 320         # ~10 minutes at ~2,300 tokens/s on a 2-core EPYC
lr_decay_iters = 320
learning_rate = 2e-3    # AdamW: embeddings and norms
muon_lr = 0.02          # Muon: attention and feed-forward matrices
min_lr = 2e-5
warmup_iters = 30
weight_decay = 0.1
beta2 = 0.99
eval_interval = 40
eval_iters = 4
log_interval = 10
