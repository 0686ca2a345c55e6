# The CPU hour: the best model that 60 minutes of training on the slower machine kind (2 CPU cores, AVX2 only,
# float32) reaches on the embedded PubMed corpus, in validation bits per byte. Prepare the data with:
#     python prepare.py --vocab_size=4096 --out=data/pubmed_4k
#
# The budget is 3.5x tiny_cpu's training (its 1,900 steps take ~17 minutes of the README's 18 on that kind),
# counted in each shape's float32 step time relative to tiny_cpu's (one thread, medians; SwiGLU hidden 8/3 of the
# width, rounded to 32): 4x96 1.00, 4x128 1.41, 6x128 1.89, 4x192 2.38, 8x128 2.52, 6x160 2.62.
# What won, and why (docs/RESULTS.md, "The CPU-hour model"):
# - at a quarter of the budget the smallest shape won (val bits per byte: 4x96 1.700, 4x128 1.734, 6x128 1.745),
#   but over the whole budget 4 x 128 (1.33M parameters, 4,723 steps, 19.3M tokens: 15 a parameter, 1.7 passes
#   over the train split) beat tiny_cpu's shape at the same cost (6,650 steps): 1.590 against 1.604. A larger
#   model wants the longer run, as Chinchilla's ~20 tokens a parameter says (~1.4M parameters at this budget).
# - tiny_cpu's rates (Muon 0.04, AdamW 4e-3; AdamW at 2e-3 was 0.05 worse), batch 16 x 256, cosine to 0.
out_dir = 'out-small'
data_dir = 'data/pubmed_4k'

n_layer = 4
n_embd = 128
n_head = 2
n_kv_head = 2
multiple_of = 32        # SwiGLU hidden 352 (the default 256 would round it up to 512)
block_size = 256
vocab_size = 4096
tie_embeddings = True

device = 'cpu'
dtype = 'auto'
compile = False
batch_size = 16
gradient_accumulation_steps = 1
max_iters = 4723        # 1,900 x 3.5 / 1.41: ~60 minutes on the 2-core AVX2 kind (projected from the step-time ratio);
                        # 37 minutes measured on one bf16 thread of a 2-core AVX512-BF16 Xeon shared with another run
lr_decay_iters = 4723
learning_rate = 4e-3    # AdamW: embeddings and norms
muon_lr = 0.04          # Muon: attention and feed-forward matrices
min_lr = 0.0
warmup_iters = 20
weight_decay = 0.1
beta2 = 0.99
eval_interval = 500
eval_iters = 4
log_interval = 10
