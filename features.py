"""
Feature probes for the toy task (data/modarith.py): does a hidden state encode the latent state of
the walk, m_k = (a + d k) mod c, through the Fourier modes of Z_c that the task calls for?

On the probe band (sequences with one clean component at a fixed modulus c):
- the conditional-mean table H[m] = E[h_k | m_k = m] of a point's hidden state (c x d);
- its Fourier energy over m: the share of the largest positive frequency (fourier_peak), the Gini
  concentration of the energy over the positive frequencies (fourier_gini), and the dominant
  frequency of H's leading principal component (pc_frequency);
- a causal test on the final hidden state (the head's input): project out the 2-dimensional
  subspace of H's dominant frequency (its cosine and sine directions), and a random subspace of the
  same dimension, and report how much each raises the band's loss (drop_key, drop_random). Learned
  Fourier features make drop_key large against drop_random.

Positions k in the second half of each sequence only: by then the context has shown the walk.
Pure functions over tensors, and measure_band, which runs the model in eval mode without
gradients and draws its random subspace from its own generator: training is untouched.
"""

import glob
import math
import os

import torch
import torch.nn.functional as F

from data import modarith
from data.shards import find_shards, load_prefix
from spectra import Probe


def find_band(val_files):
    """The band shard beside the val shards (<name>_band_000000.bin, which data/modarith.py writes
    with its latents), or None (missing val shards are the val data's error, not the band's)."""
    found = sorted(glob.glob(val_files))
    if not found:
        return None
    folder, name = os.path.split(found[0])
    path = os.path.join(folder, name.replace("_val_", "_band_")) if "_val_" in name else ""
    return path if path and os.path.exists(path) and os.path.exists(modarith.latents_path(path)) else None


def load_band(path, seq_len, vocab_size):
    """(tokens (n, seq_len), latents) of a band shard; modarith.ToyError (a ValueError) when it has
    no latents or its sequences are not seq_len long."""
    shard = find_shards(path)[0]
    latents = modarith.load_latents(shard)
    if int(latents["seq_len"]) != seq_len:
        raise modarith.ToyError(f"its sequences are {int(latents['seq_len'])} tokens but seq_len={seq_len}; set "
                                f"seq_len={int(latents['seq_len'])} (one window, one sequence)")
    tokens = load_prefix([shard], len(latents["c"]) * seq_len - 1, vocab_size, key="the band")
    return torch.from_numpy(tokens).view(-1, seq_len), latents


def band_states(latents, seq_len):
    """(n, seq_len) latent states m_k = (a + d k) mod c of the band's single-component sequences."""
    k = torch.arange(seq_len)
    a, d, c = (torch.as_tensor(latents[x][:, 0]).long()[:, None] for x in "adc")
    return (a + d * k) % c


def conditional_means(h, states, c):
    """(H (c, width), counts (c,)): the mean of the rows of h (..., width) at each state in [0, c)."""
    h, states = h.reshape(-1, h.size(-1)).double(), states.reshape(-1)
    counts = torch.bincount(states, minlength=c)
    sums = torch.zeros(c, h.size(-1), dtype=torch.float64).index_add_(0, states, h)
    return sums / counts.clamp(min=1)[:, None], counts


def fourier_energy(H):
    """Energy of H (c, width) at the positive frequencies 1 .. c // 2 over the state axis (the
    constant, frequency 0, is the mean and says nothing about m)."""
    spectrum = torch.fft.rfft(H.double(), dim=0)  # (c // 2 + 1, width)
    return spectrum[1:].abs().pow(2).sum(1)


def gini(x):
    """Gini concentration of non-negative x: 0 for equal mass everywhere, (n - 1) / n at one point."""
    x = torch.sort(x.double().flatten()).values
    n, total = len(x), x.sum()
    if total <= 0:
        return float("nan")
    i = torch.arange(1, n + 1, dtype=torch.float64)
    return float(2 * (i * x).sum() / (n * total) - (n + 1) / n)


def pc_frequency(H):
    """The dominant positive frequency of H's leading principal component over the states."""
    centred = H.double() - H.double().mean(0)
    u = torch.linalg.svd(centred, full_matrices=False).U[:, 0]  # the component's score at each state
    return int(torch.fft.rfft(u).abs()[1:].argmax()) + 1


def fourier_summary(H):
    """{fourier_peak, fourier_gini, key_frequency, pc_frequency} of a conditional-mean table."""
    energy = fourier_energy(H)
    return dict(fourier_peak=float(energy.max() / energy.sum()), fourier_gini=gini(energy),
                key_frequency=int(energy.argmax()) + 1, pc_frequency=pc_frequency(H))


def key_subspace(H, frequency):
    """Orthonormal (width, k) basis of the directions in which H varies at `frequency` over the
    states: the cosine and sine components of that Fourier mode (k = 2; 1 at c / 2 for even c)."""
    c = H.size(0)
    m = torch.arange(c, dtype=torch.float64)
    waves = [torch.cos(2 * math.pi * frequency * m / c), torch.sin(2 * math.pi * frequency * m / c)]
    directions = torch.stack([w @ (H.double() - H.double().mean(0)) for w in waves], 1)  # (width, 2)
    q, r = torch.linalg.qr(directions)
    keep = r.diagonal().abs() > 1e-9 * r.diagonal().abs().max()  # the sine vanishes at the Nyquist frequency
    return q[:, keep]


def random_subspace(width, k, generator):
    """Orthonormal (width, k) basis of a uniformly random k-dimensional subspace."""
    return torch.linalg.qr(torch.randn(width, k, generator=generator, dtype=torch.float64)).Q


def project_out(h, Q):
    """h with its components in span(Q) removed: h - (h Q) Q^T (Q orthonormal columns)."""
    Q = Q.to(h.dtype)
    return h - (h @ Q) @ Q.T


@torch.no_grad()
def measure_band(model, tokens, latents, point="final", seed=0, batch_size=64):
    """The probe metrics {'probe/<stat>/<point>': value} of `model` on the band: tokens (n, seq_len),
    the band's latents. The hidden state of `point` makes H (fourier_peak, fourier_gini,
    key_frequency, pc_frequency); the causal test acts on the final one (band_loss, drop_key,
    drop_random, under /final)."""
    n, T = tokens.shape
    c = int(latents["c"][0, 0])
    states = band_states(latents, T)
    first = T // 2  # positions first .. T - 2: known context, and a target inside the sequence
    device = next(model.parameters()).device
    tapped, finals = [], []
    taps = model.probe_points()
    if point not in taps:
        raise ValueError(f"probe point {point!r} is not one of the model's: {', '.join(taps)}")
    was_training = model.training
    model.eval()
    try:
        with Probe({point: taps[point]}, lambda _name, out: tapped.append(out.detach().float().cpu())):
            for i in range(0, n, batch_size):
                finals.append(model.features(tokens[i:i + batch_size].to(device)).float())
    finally:
        model.train(was_training)
    h_point = torch.cat(tapped)[:, first:T - 1]
    H, counts = conditional_means(h_point, states[:, first:T - 1], c)
    if (counts == 0).any():
        raise ValueError(f"the band visits only {int((counts > 0).sum())} of its {c} states; generate more band "
                         "sequences (python data/modarith.py --band_sequences N)")
    out = {f"probe/{k}/{point}": v for k, v in fourier_summary(H).items()}

    h = torch.cat(finals)[:, first:T - 1]
    targets = tokens[:, first + 1:T].to(h.device)
    H_final = H if point == "final" else conditional_means(h.cpu(), states[:, first:T - 1], c)[0]
    key = key_subspace(H_final, int(fourier_energy(H_final).argmax()) + 1).to(h.device)  # the final state's key mode
    rand = random_subspace(h.size(-1), key.size(1), torch.Generator().manual_seed(seed)).to(h.device)

    def loss(x):
        return float(F.cross_entropy(model.head_logits(x).flatten(0, 1), targets.flatten()))
    base = loss(h)
    out.update({"probe/band_loss/final": base, "probe/drop_key/final": loss(project_out(h, key)) - base,
                "probe/drop_random/final": loss(project_out(h, rand)) - base})
    return out


def summary_line(probes, point):
    """One console line of measure_band's metrics."""
    p = {k.split("/")[1]: v for k, v in probes.items()}
    return (f"probe ({point}): fourier_peak {p['fourier_peak']:.3f} at frequency {p['key_frequency']}, gini "
            f"{p['fourier_gini']:.3f}; dropping that mode from the final state raises the band loss "
            f"{p['band_loss']:.3f} by {p['drop_key']:+.3f} (a random subspace: {p['drop_random']:+.3f})")
