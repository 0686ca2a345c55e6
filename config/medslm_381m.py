# MedSLM 381M: a LLaMA-style decoder pre-trained on PubMed with the GPT-2 tokenizer.
# 24 layers, dim 1024, 16 query / 8 KV heads, SwiGLU 2752, untied head: exactly 381,373,440 parameters.
# Prepare the data with: python prepare.py --tokenizer gpt2 --out data/pubmed_gpt2
out_dir = 'out-medslm-381m'
data_dir = 'data/pubmed_gpt2'

n_layer = 24
n_embd = 1024
n_head = 16
n_kv_head = 8
multiple_of = 64        # derives the SwiGLU hidden size 2/3 * 4 * 1024 -> 2752
vocab_size = 50257      # GPT-2 BPE, unpadded
block_size = 1024
tie_embeddings = False

# 256 sequences x 1024 tokens = 262,144 tokens per optimizer step, however many GPUs share it
# (gradient_accumulation_steps is divided by the world size)
device = 'cuda'         # a GPU run: on a machine without a usable GPU it stops (--device=cpu to try it here)
batch_size = 16
gradient_accumulation_steps = 16
max_iters = 20000
lr_decay_iters = 20000
learning_rate = 3e-4
min_lr = 3e-5
warmup_iters = 1000
weight_decay = 0.1
beta1 = 0.9
beta2 = 0.95
grad_clip = 1.0
dtype = 'bfloat16'
compile = True
eval_interval = 500
eval_iters = 100
