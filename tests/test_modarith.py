import math
import os

import numpy as np
import pytest

from conftest import run_command
from data import modarith
from data.modarith import ToyError, ToyOptions
from data.shards import load_tokens

SMALL = dict(train_sequences=512, val_sequences=256, test_sequences=64, band_sequences=32, seq_len=24)


def written(tmp_path, name="d", **options):
    opt = ToyOptions(**{**SMALL, **options})
    modarith.write_dataset(opt, str(tmp_path / name))
    return opt, str(tmp_path / name)


def split_of(folder, split, seq_len):
    shard = modarith.shard_path(folder, split)
    return np.asarray(load_tokens(shard), dtype=np.int64).reshape(-1, seq_len), modarith.load_latents(shard)


def test_single_component_sequences_follow_their_recurrence(tmp_path):
    opt, folder = written(tmp_path)
    k = np.arange(opt.seq_len)
    for split in modarith.SPLITS:
        tokens, lat = split_of(folder, split, opt.seq_len)
        assert len(tokens) == getattr(opt, f"{split}_sequences") and int(lat["seq_len"]) == opt.seq_len
        c, o, d, a = (lat[x][:, 0] for x in "coda")
        for i in range(len(tokens)):  # t_k = o + ((a + d k) mod c), written out per sequence
            assert list(tokens[i]) == [o[i] + (a[i] + d[i] * j) % c[i] for j in k]
        assert (c >= opt.c_min).all() and (c <= opt.vocab_size).all() and (o >= 0).all()
        assert (o + c <= opt.vocab_size).all()  # the band fits the vocabulary
        assert ((0 <= a) & (a < c)).all() and ((d >= 1) & (d < c)).all()
        assert (d >= np.minimum(np.maximum(1, (opt.min_step_frac * c).astype(int)), c - 1)).all()
    band_c = split_of(folder, "band", opt.seq_len)[1]["c"]
    assert band_c.shape[1] == 1 and (band_c == opt.band_modulus).all()


def test_steps_share_a_factor_with_the_modulus_at_the_asked_rate(tmp_path):
    opt, folder = written(tmp_path, train_sequences=4000, noncoprime_prob=0.3)
    lat = split_of(folder, "train", opt.seq_len)[1]
    c, d = lat["c"][:, 0], lat["d"][:, 0]
    composite = np.array([any(ci % q == 0 for q in range(2, math.isqrt(int(ci)) + 1)) for ci in c])
    shared = np.gcd(c, d) > 1
    assert not shared[~composite].any()  # a prime modulus has no such step
    n, rate = composite.sum(), shared[composite].mean()
    assert abs(rate - 0.3) < 4 * math.sqrt(0.3 * 0.7 / n)  # a binomial share, 4 standard errors


def test_moduli_follow_the_zipf_law(tmp_path):
    opt, folder = written(tmp_path, train_sequences=8000)
    c = split_of(folder, "train", opt.seq_len)[1]["c"][:, 0]
    values = np.arange(opt.c_min, opt.vocab_size + 1)
    p = values ** -opt.zipf_c / (values ** -opt.zipf_c).sum()
    for ci in (5, 6, 10, 20):  # each frequency within 4 binomial standard errors of its probability
        q = p[ci - opt.c_min]
        assert abs((c == ci).mean() - q) < 4 * math.sqrt(q * (1 - q) / len(c)), ci


def test_mixtures_and_noise_are_the_rounded_weighted_mean(tmp_path):
    opt, folder = written(tmp_path, components=(1, 3), pareto_alpha=1.5, noise_std=2.0, noise_df=3.0)
    tokens, lat = split_of(folder, "train", opt.seq_len)
    assert set(lat["count"]) == {1, 2, 3}
    for i in range(len(tokens)):
        m = lat["count"][i]
        w, c, o, d, a = (lat[x][i, :m] for x in ("weights", "c", "o", "d", "a"))
        assert (w >= 1).all() and (lat["c"][i, m:] == -1).all() and (lat["weights"][i, m:] == 0).all()
        mean = sum(w[j] * (o[j] + (a[j] + d[j] * np.arange(opt.seq_len)) % c[j]) for j in range(m)) / w.sum()
        want = np.clip(np.rint(mean + lat["noise"][i].astype(np.float64)), 0, opt.vocab_size - 1)
        assert np.array_equal(tokens[i], want), i  # (float32 noise rounds the same: the test reads what was saved)
    noise = split_of(written(tmp_path, "gauss", noise_std=2.0)[1], "train", opt.seq_len)[1]["noise"]
    assert abs(noise.std() - 2.0) < 4 * 2.0 / math.sqrt(2 * noise.size)  # 4 standard errors of a Gaussian's std


def test_the_same_seed_writes_the_same_files_and_splits_do_not_depend_on_each_other(tmp_path):
    _, a = written(tmp_path, "a")
    _, b = written(tmp_path, "b")
    _, c = written(tmp_path, "c", train_sequences=100)
    _, other = written(tmp_path, "other", seed=1)
    for split in modarith.SPLITS:
        name = os.path.basename(modarith.shard_path(a, split))
        same = open(os.path.join(a, name), "rb").read()
        assert same == open(os.path.join(b, name), "rb").read()
        assert same != open(os.path.join(other, name), "rb").read()
        if split != "train":
            assert same == open(os.path.join(c, name), "rb").read()


@pytest.mark.parametrize("options, match", [
    (dict(vocab_size=4), r"--c_min=5, --c_max=4\] is empty \(vocab_size=4 is too small for c_min\); use --c_min <= 4"),
    (dict(c_min=40, c_max=30), r"\[--c_min=40, --c_max=30\] is empty"),
    (dict(c_max=2000), r"--c_max=2000: .* raise --vocab_size to 2000"),
    (dict(c_min=1), r"--c_min=1: .* use --c_min >= 2"),
    (dict(band_modulus=3), r"--band_modulus=3 is outside \[c_min, c_max\] = \[5, 1024\]; use e.g. --band_modulus=17"),
    (dict(components=(2, 1)), r"--components=2,1"),
    (dict(noise_std=1.0, noise_df=2.0), r"noise_df > 2"),
    (dict(vocab_size=70000), r"--vocab_size=70000: .*uint16"),
])
def test_bad_options_are_refused_before_anything_is_written(tmp_path, options, match):
    with pytest.raises(ToyError, match=match):
        modarith.write_dataset(ToyOptions(**{**SMALL, **options}), str(tmp_path / "d"))
    assert not os.path.exists(tmp_path / "d")


def test_the_command_writes_shards_and_latents_and_reports_errors(tmp_path, capsys):
    out = str(tmp_path / "cli")
    r = run_command(modarith.main, ["--out", out, "--train_sequences", "16", "--val_sequences", "8",
                                    "--test_sequences", "0", "--band_sequences", "4", "--components", "1,2"], capsys)
    assert r.returncode == 0 and "modarith_train_000000.bin (1,024 tokens)" in r.stdout
    assert sorted(os.listdir(out)) == ["modarith.json", "modarith_band_000000.bin", "modarith_band_latents.npz",
                                       "modarith_train_000000.bin", "modarith_train_latents.npz",
                                       "modarith_val_000000.bin", "modarith_val_latents.npz"]
    r = run_command(modarith.main, ["--out", out, "--vocab_size", "4"], capsys)
    assert r.returncode == 1 and "error: the modulus range" in r.stderr
    with pytest.raises(ToyError, match="has no latents .* python data/modarith.py"):
        modarith.load_latents(str(tmp_path / "x_val_000000.bin"))
