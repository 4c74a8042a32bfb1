# d12: 12 layers, 6 heads, width 768; FineWeb10B, 64 sequences x 1024 tokens = 65,536 tokens per step.
# Learning rates: the Config defaults are for 512 sequences and scale as sqrt(batch_size / 512)
# (lr_scaling = "sqrt"), so this tier (x0.3536) trains with
#   muon_lr 0.01768, embed_lr 0.1061, head_lr 0.002828, scalar_lr 0.01414.
# device_batch_size divides batch_size / 8, so 1, 2, 4 or 8 GPUs work (fits an 80 GB H100).
# Budget: 2.5B tokens, evaluated every 50M tokens.
# Spectra: activation spectra (embed, every block's mlp_resid, final; 128k probe tokens) at every
# evaluation (every 50M tokens); per-example gradient and weight spectra (attn.c_proj of 5 layers,
# 512 sequences) at every 10th evaluation (every 500M tokens) and the last. Together about 2.7% of
# training time on GPUs (python train_gpt.py configs/d12_bs64.py --dry_run=1 prints the estimate).
profile = "d12"
batch_size = 64
device_batch_size = 8
train_tokens = 2_500_000_000
eval_every_tokens = 50_000_000
ckpt_every_tokens = 250_000_000
grad_spectra_every = 10
