# The classic GPT-2 small block (LayerNorm, learned positions, GELU, full multi-head attention, biases,
# tied head) at 12 x 768 on a 32K ByteLevel BPE trained on PubMed: 110,418,432 parameters
# (GPT-2's own 124M has the 50257 vocabulary). Evaluate perplexity with: python eval.py --split=test
# Prepare the data with: python prepare.py --vocab_size 32000 --out data/pubmed
out_dir = 'out-gpt2-120m'
data_dir = 'data/pubmed'

n_layer = 12
n_embd = 768
n_head = 12
n_kv_head = 12
vocab_size = 32000
block_size = 1024
norm = 'layernorm'
pos_embedding = 'learned'
mlp = 'gelu'
bias = True
tie_embeddings = True
dropout = 0.0

device = 'cuda'         # a GPU run: on a machine without a usable GPU it stops (--device=cpu to try it here)
batch_size = 16
gradient_accumulation_steps = 32   # 512 x 1024 tokens per step, as nanoGPT's GPT-2 run
max_iters = 20000
lr_decay_iters = 20000
learning_rate = 6e-4
min_lr = 6e-5
warmup_iters = 1000
weight_decay = 0.1
beta1 = 0.9
beta2 = 0.95
