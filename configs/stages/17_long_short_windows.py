# Stage 17 long_short_windows (modded-nanogpt record #20): adds to stage 16 long and short (half) windows
# alternating across layers.
# changes: short_windows
# Batch: the study's tiers, sequences of 65,536 tokens: d12 at 4, 8, 16, 32; d36 at 2, 4, 8, 16; d48 at 1, 2,
# 4, 8; here 8 (524,288 tokens per step).
# d12 sizes; other tiers by --profile=d24|d36|d48 (and --batch_size). The ladder: README, configs/stages/.
#   torchrun --standalone --nproc_per_node=8 train_gpt.py configs/stages/17_long_short_windows.py
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
softcap = 15.0
value_residual = False
x0_lambdas = True
unet_skips = True
doc_mask = True
window = 1792
window_start = 128
window_block = 128
value_embeds = True
ve_layers = "depth"
rope_frac = 0.5
rope_base = 1024.0
fp8_head = True
short_windows = True
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
