# HealthSLM 15M: a small LLaMA-style decoder with its own 32K BPE trained on PubMed.
# 12 layers, dim 256, 4 query / 2 KV heads, SwiGLU 512, tied embeddings: exactly 15,276,288 parameters.
# Prepare the data with: python prepare.py --vocab_size 32000 --out data/pubmed
out_dir = 'out-healthslm-15m'
data_dir = 'data/pubmed'

n_layer = 12
n_embd = 256
n_head = 4
n_kv_head = 2
intermediate_size = 512
vocab_size = 32000
block_size = 1024
tie_embeddings = True

device = 'cuda'         # a GPU run: on a machine without a usable GPU it stops (--device=cpu to try it here)
batch_size = 32
gradient_accumulation_steps = 4
max_iters = 20000
lr_decay_iters = 20000
learning_rate = 1e-3
min_lr = 1e-4
warmup_iters = 1000
weight_decay = 0.1
beta1 = 0.9
beta2 = 0.95
