# The offline CPU demo: a tiny modded-NanoGPT trained on the embedded Shakespeare corpus in about
# three minutes on 2 CPU cores; val loss falls from 10.8 (uniform over the vocabulary) to about 6.
#   python train_gpt.py configs/cpu_demo.py
preset = "modded"
n_layer = 4
n_head = 4
n_embd = 128
train_files = "data/shakespeare/shakespeare_train_*.bin"
val_files = "data/shakespeare/shakespeare_val_*.bin"
seq_len = 128
batch_size = 8
device_batch_size = 0  # the whole batch in one pass per process (1 or 2 processes)
train_tokens = 160_000
val_tokens = 8_192
eval_every_tokens = 40_000
ckpt_every_tokens = 0    # one checkpoint, at the end (315 MB: weights and the Adam state of embeddings and head)
log_every = 10
spectra_tokens = 16_384  # activation spectra at every evaluation on 128 val sequences
grad_samples = 48        # per-example gradient spectra of attn.c_proj in every layer from 48 sequences ...
grad_spectra_every = 2   # ... at every other evaluation (each costs about 6 training steps here)
lr_scaling = "none"  # the default learning rates as they are, at this small batch
lr_ref_batch_size = 8  # ... which they suit: a sweep (bench/demo_sweep.py) centres other batches on them by sqrt
