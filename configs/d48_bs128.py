# d48: 48 layers, 25 heads, width 1600; FineWeb10B, 128 sequences x 1024 tokens = 131,072 tokens per step.
# Learning rates: the Config defaults are for 512 sequences and scale as sqrt(batch_size / 512)
# (lr_scaling = "sqrt"), so this tier (x0.5000) trains with
#   muon_lr 0.025, embed_lr 0.15, head_lr 0.004, scalar_lr 0.02.
# device_batch_size divides batch_size / 8, so 1, 2, 4 or 8 GPUs work (fits an 80 GB H100).
# Budget: 10B tokens (FineWeb10B holds 10.3B: python data/fineweb.py --train_shards 103), evaluated every 200M tokens.
# Spectra: activation spectra (embed, every block's mlp_resid, final; 128k probe tokens) at every
# evaluation (every 200M tokens); per-example gradient and weight spectra (attn.c_proj of 5 layers,
# 512 sequences) at every 3rd evaluation (every 600M tokens) and the last. Together about 1.5% of
# training time on GPUs (python train_gpt.py configs/d48_bs128.py --dry_run=1 prints the estimate).
profile = "d48"
batch_size = 128
device_batch_size = 8
train_tokens = 10_000_000_000
eval_every_tokens = 200_000_000
ckpt_every_tokens = 1_000_000_000
grad_spectra_every = 3
