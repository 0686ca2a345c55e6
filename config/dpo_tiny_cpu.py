# DPO of the README's SFT model (config/sft_tiny_cpu.py) on preference pairs from the corpus, in about 3 CPU-minutes:
#     python tasks.py --data_dir=data/pubmed_4k --out=data/pairs --max_chars=600 --pairs
#     python train.py config/dpo_tiny_cpu.py
# Each pair is an item's prompt, its answer (chosen) and a wrong option or another document's answer to the same
# task (rejected). The reference is the starting model (a frozen copy; with --lora_rank, the adapters off).
init_from = 'out-sft-tiny'
data_dir = 'data/pairs'
out_dir = 'out-dpo-tiny'

block_size = 256        # pairs longer than this (4% of them) are dropped, not cut
device = 'cpu'
dtype = 'auto'
compile = False
batch_size = 8          # pairs per step: 16 sequences of 256, as in SFT
gradient_accumulation_steps = 1
max_iters = 200
lr_decay_iters = 200
dpo_beta = 0.1
learning_rate = 1e-3    # AdamW: embeddings and norms
muon_lr = 0.01          # Muon: attention and feed-forward matrices
min_lr = 0.0
warmup_iters = 10
weight_decay = 0.0      # pull towards the reference is DPO's job (beta), not decay's towards zero
beta2 = 0.99
eval_interval = 100
eval_iters = 20         # 160 val pairs of 306 per evaluation, the same ones every time
log_interval = 10
