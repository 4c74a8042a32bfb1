# Stage 10 window_warmup (modded-nanogpt record #13): adds to stage 09 the window grows with training progress
# from 64 to 1,792 tokens; Muon at 0.05, Adam beta1 0.8, momentum warmup 300 steps (the record's other
# changes).
# changes: window, window_start, muon_lr, adam_beta1, muon_momentum_warmup_steps
# Batch: the study's tiers, sequences of 65,536 tokens: d12 at 4, 8, 16, 32; d36 at 2, 4, 8, 16; d48 at 1, 2,
# 4, 8; here 8 (524,288 tokens per step).
# d12 sizes; other tiers by --profile=d24|d36|d48 (and --batch_size). The ladder: README, configs/stages/.
#   torchrun --standalone --nproc_per_node=8 train_gpt.py configs/stages/10_window_warmup.py
profile = "d12"
preset = "modded"
seq_len = 65_536  # tokens per sequence
batch_size = 8  # sequences per optimizer step (the study's tiers above)
device_batch_size = 1  # sequences per forward on one GPU
lr_ref_batch_size = 8  # the rates below are for this batch; sqrt scaling elsewhere
train_tokens = 5_000_000_000  # a cap: the run stops at target_val_loss
target_val_loss = 3.28  # modded-nanogpt's target
eval_every_tokens = 50_000_000
ckpt_every_tokens = 250_000_000
grad_samples = 512  # per-example gradients: one example = one sequence
grad_spectra_every = 100  # grad and weight spectra at every k-th evaluation and the last: <= 3% (--dry_run)
grad_spectra_precision = "bf16"  # bf16 passes: 512 packed 64K sequences would cost as much as training in fp32
grad_clip = 1.0
cooldown_frac = 0.1
pos = "rotary"
qk_norm = True
tied = False
softcap = 30.0
value_residual = True
x0_lambdas = True
unet_skips = True
doc_mask = True
window = 1792
window_start = 64
window_block = 0
value_embeds = False
ve_layers = "3"
rope_frac = 1.0
rope_base = 10000.0
fp8_head = False
short_windows = False
attn_scale = 0.0
optimizer = "muon"
adamw_lr = 0.0006
weight_decay = 0.0
muon_lr = 0.05
embed_lr = 0.6
head_lr = 0.008
scalar_lr = 0.04
adam_beta1 = 0.8
muon_momentum_warmup_steps = 300
lr_mults = ""
