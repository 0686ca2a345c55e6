# The demo: a small model that trains on 2 CPU cores on the embedded PubMed corpus in about 10 minutes.
# Prepare the data with: python prepare.py --vocab_size 8192 --out data/pubmed_8k
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
dtype = 'float32'       # no bf16 units on a typical CPU: autocast to bf16 runs ~30x slower there
compile = False
batch_size = 16
gradient_accumulation_steps = 1
max_iters = 2000
lr_decay_iters = 2000
learning_rate = 2e-3
min_lr = 2e-4
warmup_iters = 100
weight_decay = 0.1
beta2 = 0.99
eval_interval = 250
eval_iters = 20
log_interval = 10
