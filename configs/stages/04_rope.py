# Stage 04 rope (modded-nanogpt record #2, #5): adds to stage 03 rotary positions and QK-norm; AdamW at 6e-4
# without weight decay, as the study.
# changes: pos, qk_norm, adamw_lr, weight_decay
# Batch: the study's d12 tiers: 256, 512, 1,024, 2,048 sequences of 1,024 tokens; here 512 (524,288 tokens per
# step).
# d12 sizes; other tiers by --profile=d24|d36|d48 (and --batch_size). The ladder: README, configs/stages/.
#   torchrun --standalone --nproc_per_node=8 train_gpt.py configs/stages/04_rope.py
profile = "d12"
preset = "modded"
seq_len = 1024  # tokens per sequence
batch_size = 512  # sequences per optimizer step (the study's tiers above)
device_batch_size = 64  # sequences per forward on one GPU
lr_ref_batch_size = 512  # the rates below are for this batch; sqrt scaling elsewhere
train_tokens = 5_000_000_000  # a cap: the run stops at target_val_loss
target_val_loss = 3.28  # modded-nanogpt's target
eval_every_tokens = 50_000_000
ckpt_every_tokens = 250_000_000
grad_samples = 512  # per-example gradients: one example = one sequence
grad_spectra_every = 10  # grad and weight spectra at every k-th evaluation and the last: <= 3% (--dry_run)
grad_spectra_precision = "bf16"  # bf16 passes: 512 packed 64K sequences would cost as much as training in fp32
grad_clip = 1.0
cooldown_frac = 0.1
pos = "rotary"
qk_norm = True
tied = True
softcap = 0.0
value_residual = False
x0_lambdas = False
unet_skips = False
doc_mask = False
window = 0
window_start = 0
window_block = 0
value_embeds = False
ve_layers = "3"
rope_frac = 1.0
rope_base = 10000.0
fp8_head = False
short_windows = False
attn_scale = 0.0
optimizer = "adamw"
adamw_lr = 0.0006
weight_decay = 0.0
muon_lr = 0.02
embed_lr = 0.3
head_lr = 0.008
scalar_lr = 0.04
adam_beta1 = 0.9
muon_momentum_warmup_steps = 300
lr_mults = ""
