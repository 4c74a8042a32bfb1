# The toy task: next-token prediction on banded modular-arithmetic sequences (data/modarith.py), where
# the features a model must learn are known (Fourier modes of Z_c). A 2-layer, 128-wide modded model
# that reaches val_loss 1.1 in about 2 minutes on 2 CPU cores (~1.8M tokens at ~22k tokens/s), with
# activation spectra at every evaluation and gradient spectra at every 4th.
#   python data/modarith.py && python train_gpt.py configs/toy_modarith.py
preset = "modded"
n_layer = 2
n_head = 4
n_embd = 128
vocab_size = 1024  # the generator's --vocab_size
train_files = "data/modarith/modarith_train_*.bin"
val_files = "data/modarith/modarith_val_*.bin"
seq_len = 64  # one window = one sequence: the generator's --seq_len
batch_size = 32
device_batch_size = 0  # the whole batch in one pass
lr_ref_batch_size = 32  # the default rates suit this batch; other batches scale them by sqrt
train_tokens = 3_145_728  # a cap: the run stops at the target (the schedule is planned for the cap)
target_val_loss = 1.1
val_tokens = 32_768  # 512 val sequences
eval_every_tokens = 131_072
ckpt_every_tokens = 0  # one checkpoint, at the end
log_every = 32
spectra_tokens = 16_384  # 256 val sequences
grad_samples = 64
grad_spectra_every = 4
