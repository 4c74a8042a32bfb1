# d24: 24 layers, 16 heads, width 1024; FineWeb10B, 512 sequences x 1024 tokens = 524,288 tokens per step.
# Learning rates: the Config defaults are for 512 sequences and scale as sqrt(batch_size / 512)
# (lr_scaling = "sqrt"), so this tier (x1.0000) trains with
#   muon_lr 0.05, embed_lr 0.3, head_lr 0.008, scalar_lr 0.04.
# device_batch_size divides batch_size / 8, so 1, 2, 4 or 8 GPUs work (fits an 80 GB H100).
# Budget: 5B tokens, evaluated every 100M tokens.
# Spectra: activation spectra (embed, every block's mlp_resid, final; 128k probe tokens) at every
# evaluation (every 100M tokens); per-example gradient and weight spectra (attn.c_proj of 5 layers,
# 512 sequences) at every 5th evaluation (every 500M tokens) and the last. Together about 2.0% of
# training time on GPUs (python train_gpt.py configs/d24_bs512.py --dry_run=1 prints the estimate).
profile = "d24"
batch_size = 512
device_batch_size = 32
train_tokens = 5_000_000_000
eval_every_tokens = 100_000_000
ckpt_every_tokens = 500_000_000
grad_spectra_every = 5
