# Instruction tuning of the README's tiny_cpu model on the PubMed tasks (tasks.py), in about 5 CPU-minutes:
#     python tasks.py --data_dir=data/pubmed_4k --out=data/tasks_small --max_chars=600 --max_train_items=8000
#     python train.py config/sft_tiny_cpu.py
#     python eval.py --out_dir=out-sft-tiny --tasks=data/tasks_small/test.jsonl --max_items=200
# --max_train_items=8000 keeps 8,000 train items per task (48,885 in all: more than 400 steps read) with the
# multiple-choice answers balanced. The conversations are packed into the model's 256-token windows
# (--max_chars=600 keeps most of them whole);
# the loss is on the answers only. Same optimizers as pre-training, at half the peak rates: the weights start
# trained, and full rates undo more of the pre-training than the tasks need.
init_from = 'out-tiny'
data_dir = 'data/tasks_small'
out_dir = 'out-sft-tiny'

block_size = 256
device = 'cpu'
dtype = 'auto'
compile = False
batch_size = 16
gradient_accumulation_steps = 1
max_iters = 400
lr_decay_iters = 400
learning_rate = 2e-3    # AdamW: embeddings and norms
muon_lr = 0.02          # Muon: attention and feed-forward matrices
min_lr = 0.0
warmup_iters = 20
weight_decay = 0.1
beta2 = 0.99
eval_interval = 100
eval_iters = 8
log_interval = 20
