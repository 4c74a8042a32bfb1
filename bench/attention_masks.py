"""
What the ladder's attention masks cost, as ratios against baselines timed in the same run.

    python bench/attention_masks.py [--seq_len=4096] [--window=512] [--reps=5] [--device=cpu]

A forward and backward of a small model (2 layers, width 256, 4 heads: attention is most of the
work at this length) built from two stage files at one sequence of seq_len tokens:

  stage 12 / stage 08          stage 12 (document mask, block window of `window` tokens) against
                               stage 08 (plain causal SDPA): the windowed stage does less work,
                               so the goal is a ratio < 1
  stage 08 with the mask at    stage 08 with the document mask and a window as long as the sequence
  window = seq_len / stage 08  (one document, so the same function): what the explicit mask itself
                               costs; goal <= 1.2
  masked_sdpa / causal SDPA    the attention call alone, window = seq_len: the same question
                               without the rest of the model

Times are medians of --reps runs (7), the variants interleaved so drift of the machine hits all alike.
"""

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from model import GPT, AttnMask, make_config, masked_sdpa  # noqa: E402
from train_gpt import MODEL_KEYS, read_config_file  # noqa: E402

STAGES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "stages")
SMALL = dict(n_layer=2, vocab_size=1024, eot_token=0)  # d12 width and heads; a small head and depth


def stage_model(name, device, **overrides):
    values = read_config_file(os.path.join(STAGES, name))
    keys = {k: v for k, v in values.items() if k in MODEL_KEYS}
    cfg = make_config(values["preset"], values["profile"], **{**keys, **SMALL, **overrides})
    torch.manual_seed(0)
    model = GPT(cfg).to(device)
    model.set_progress(1.0)
    return model


def time_it(fn, device):
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def forward_backward(model, idx):
    def run():
        model.zero_grad(set_to_none=True)
        _, loss = model(idx, idx)
        loss.backward()
    return run


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[1])
    ap.add_argument("--seq_len", type=int, default=4096)
    ap.add_argument("--window", type=int, default=512)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    T = args.seq_len
    idx = torch.randint(1, SMALL["vocab_size"], (1, T), device=device)  # no eot: one document
    variants = {
        "stage 08": forward_backward(stage_model("08_unet.py", device, seq_len=T), idx),
        "stage 12": forward_backward(stage_model("12_block_window.py", device, seq_len=T, window=args.window,
                                                 window_start=0), idx),
        "stage 08, mask at window = seq_len": forward_backward(stage_model("08_unet.py", device, seq_len=T,
                                                                           doc_mask=True, window=T), idx),
    }
    q, k, v = (torch.randn(1, 6, T, 128, device=device, requires_grad=True) for _ in range(3))  # d12: 6 x 128
    whole = AttnMask(torch.zeros(1, T, dtype=torch.long, device=device), 0, 0)

    def attention(fn):
        def run():
            out = fn()
            out.sum().backward()
        return run
    variants["causal SDPA"] = attention(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v,
                                                                                                  is_causal=True))
    variants["masked_sdpa, window = seq_len"] = attention(lambda: masked_sdpa(q, k, v, whole, None, 0.0))
    for fn in variants.values():  # warm-up: allocator, kernels
        fn()
    times = {name: [] for name in variants}
    for _ in range(args.reps):
        for name, fn in variants.items():
            times[name].append(time_it(fn, device))
    med = {name: statistics.median(t) for name, t in times.items()}
    print(f"{device.type}, torch {torch.__version__}, {torch.get_num_threads()} threads, seq_len {T}, "
          f"window {args.window}, median of {args.reps}")
    for name, t in med.items():
        print(f"  {name:32s} {t * 1e3:9.1f} ms")
    print(f"stage 12 / stage 08 (forward + backward)                 {med['stage 12'] / med['stage 08']:.3f}x"
          f"   goal < 1")
    print(f"stage 08 with the mask at window = seq_len / stage 08     "
          f"{med['stage 08, mask at window = seq_len'] / med['stage 08']:.3f}x   goal <= 1.2")
    print(f"masked_sdpa / causal SDPA (attention alone, window = T)   "
          f"{med['masked_sdpa, window = seq_len'] / med['causal SDPA']:.3f}x   goal <= 1.2")


if __name__ == "__main__":
    main()
