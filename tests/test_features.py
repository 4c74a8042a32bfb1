import json
import math
import os

import pytest
import torch

import features
import measure
import train_gpt
from conftest import read_metrics, run_command
from train_gpt import ConfigError, load_config, train
from test_spectra import random_model
from data import modarith


def planted_table(c=17, width=24, frequency=3, noise=0.0, seed=0):
    """H[m] = mean + u cos(2 pi f m / c) + v sin(2 pi f m / c) (+ noise): one known Fourier mode."""
    g = torch.Generator().manual_seed(seed)
    m = torch.arange(c, dtype=torch.float64)[:, None]
    u, v, mean = (torch.randn(width, generator=g, dtype=torch.float64) for _ in range(3))
    phase = 2 * math.pi * frequency * m / c
    return mean + u * torch.cos(phase) + v * torch.sin(phase) + noise * torch.randn(c, width, generator=g,
                                                                                 dtype=torch.float64)


def test_the_fourier_summary_finds_a_planted_frequency_and_calls_noise_diffuse():
    for f in (1, 3, 8):
        s = features.fourier_summary(planted_table(frequency=f))
        assert s["key_frequency"] == s["pc_frequency"] == f
        assert s["fourier_peak"] == pytest.approx(1.0, abs=1e-12) and s["fourier_gini"] == pytest.approx(7 / 8)
    weak = features.fourier_summary(planted_table(frequency=5, noise=0.3))
    assert weak["key_frequency"] == weak["pc_frequency"] == 5 and weak["fourier_peak"] > 0.5
    # noise: 8 frequencies, each energy a chi-square with 2 x 64 degrees of freedom (relative sd 1/8): the
    # largest share is about (1 + 2/8) / 8 = 0.16; 0.25 lies 8 sd above a share of 1/8
    noise = features.fourier_summary(torch.randn(17, 64, generator=torch.Generator().manual_seed(1),
                                                 dtype=torch.float64))
    assert noise["fourier_peak"] < 0.25 and noise["fourier_gini"] < 0.25


def test_energy_at_each_frequency_is_the_sum_over_the_table_of_its_dft():
    H = torch.randn(12, 5, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    m = torch.arange(12, dtype=torch.float64)
    for f in range(1, 7):  # written out: |sum_m H[m] e^{-2 pi i f m / c}|^2, summed over the columns
        re = (torch.cos(2 * math.pi * f * m / 12)[:, None] * H).sum(0)
        im = (torch.sin(2 * math.pi * f * m / 12)[:, None] * H).sum(0)
        assert float(features.fourier_energy(H)[f - 1]) == pytest.approx(float((re ** 2 + im ** 2).sum()), rel=1e-12)


def test_gini_of_equal_mass_is_zero_and_of_one_point_is_n_minus_one_over_n():
    assert features.gini(torch.ones(8)) == pytest.approx(0.0, abs=1e-15)
    assert features.gini(torch.tensor([0.0, 0, 0, 5])) == pytest.approx(3 / 4)
    assert features.gini(torch.tensor([1.0, 2, 3, 4])) == pytest.approx(0.25)  # sum |x_i - x_j| / (2 n^2 mean)


def test_conditional_means_average_the_rows_of_each_state():
    g = torch.Generator().manual_seed(3)
    h, states = torch.randn(6, 10, 4, generator=g), torch.randint(0, 5, (6, 10), generator=g)
    H, counts = features.conditional_means(h, states, 5)
    for m in range(5):
        rows = h[states == m]
        assert counts[m] == len(rows) and torch.allclose(H[m], rows.double().mean(0))


def test_dropping_the_key_subspace_removes_exactly_that_mode():
    H = planted_table(frequency=4) + 0.5 * planted_table(frequency=2, seed=5)
    Q = features.key_subspace(H, 4)
    assert Q.shape == (24, 2) and torch.allclose(Q.T @ Q, torch.eye(2, dtype=torch.float64))
    dropped = features.project_out(H, Q)
    energy, before = features.fourier_energy(dropped), features.fourier_energy(H)
    assert float(energy[3]) < 1e-20 * float(before[3])  # frequency 4 is gone
    assert float(energy[1]) > 0.1 * float(before[1])  # frequency 2 is partly elsewhere: it stays
    g = torch.Generator().manual_seed(4)
    x, R = torch.randn(7, 24, dtype=torch.float64, generator=g), features.random_subspace(24, 2, g)
    out = features.project_out(x, R)
    assert torch.allclose(out @ R, torch.zeros(7, 2, dtype=torch.float64), atol=1e-12)  # nothing left in span(R)
    assert torch.allclose(features.project_out(out, R), out)  # a projection: twice is once
    assert torch.allclose((x - out) @ (torch.eye(24, dtype=torch.float64) - R @ R.T), torch.zeros(7, 24,
                                                                                                 dtype=torch.float64),
                          atol=1e-12)  # only the span of R was removed
    even = features.key_subspace(planted_table(c=16, frequency=8), 8)
    assert even.shape == (24, 1)  # the Nyquist mode has no sine


def test_band_probe_on_a_model_reads_the_band_and_leaves_the_model_as_it_was(tmp_path):
    opt = modarith.ToyOptions(vocab_size=64, seq_len=16, train_sequences=1, val_sequences=1, test_sequences=0,
                              band_sequences=40, band_modulus=7)
    modarith.write_dataset(opt, str(tmp_path))
    tokens, lat = modarith.generate_split(opt, "band")
    model = random_model("modded", vocab_size=64, seq_len=16)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.train()
    rng = torch.get_rng_state()
    out = features.measure_band(model, torch.from_numpy(tokens), lat, point="L00.mlp_resid", seed=0, batch_size=16)
    assert model.training and torch.equal(torch.get_rng_state(), rng)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    point = "L00.mlp_resid"
    assert set(out) == {f"probe/{k}/{point}" for k in ("fourier_peak", "fourier_gini", "key_frequency", "pc_frequency")
                        } | {f"probe/{k}/final" for k in ("band_loss", "drop_key", "drop_random")}
    assert 1 <= out[f"probe/key_frequency/{point}"] <= 3 and 1 / 3 <= out[f"probe/fourier_peak/{point}"] <= 1
    with torch.no_grad():  # the band loss: the head on positions 8 .. 14
        h = model.features(torch.from_numpy(tokens))[:, 8:15]
        want = torch.nn.functional.cross_entropy(model.head_logits(h).flatten(0, 1),
                                                 torch.from_numpy(tokens[:, 9:16]).flatten())
    assert out["probe/band_loss/final"] == pytest.approx(float(want), rel=1e-6)
    with pytest.raises(ValueError, match="probe point 'L09.mlp_resid' is not one of the model's"):
        features.measure_band(model, torch.from_numpy(tokens), lat, point="L09.mlp_resid")


@pytest.fixture(scope="module")
def toy_data(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("toy"))
    modarith.write_dataset(modarith.ToyOptions(vocab_size=128, seq_len=16, c_max=64, train_sequences=256,
                                               val_sequences=64, test_sequences=0, band_sequences=32), folder)
    return folder


def toy_args(out_dir, data, **overrides):
    """A seconds-long run of a tiny model on the tiny toy data."""
    args = dict(train_files=f"{data}/modarith_train_*.bin", val_files=f"{data}/modarith_val_*.bin", vocab_size=128,
                seq_len=16, n_layer=2, n_head=2, n_embd=32, batch_size=8, max_steps=6, train_tokens=0,
                eval_every_tokens=256, val_tokens=512, spectra_tokens=256, grad_samples=8, out_dir=str(out_dir),
                wandb_mode="disabled", spectra_plots=0, log_every=2, ckpt_every_tokens=-1)
    args.update(overrides)
    return ["configs/toy_modarith.py"] + [f"--{k}={v}" for k, v in args.items()]


def test_the_trainer_logs_the_probes_beside_the_val_band_and_they_change_no_loss(tmp_path, toy_data, capsys):
    on = read_metrics(train(load_config(toy_args(tmp_path, toy_data, run_name="on"))))
    off = read_metrics(train(load_config(toy_args(tmp_path, toy_data, run_name="off", probe_band=""))))
    loss = [(r["step"], r.get("train_loss"), r.get("val_loss")) for r in on]
    assert loss == [(r["step"], r.get("train_loss"), r.get("val_loss")) for r in off]  # bitwise
    evals = [r for r in on if "val_loss" in r]
    assert len(evals) == 4 and all(1 <= r["probe/key_frequency/final"] <= 8 for r in evals)
    assert not any(k.startswith("probe/") for r in off for k in r)
    assert "probe (final): fourier_peak" in capsys.readouterr().out


def test_probe_settings_that_cannot_work_are_refused_before_training(tmp_path, toy_data):
    shakespeare_val = "data/shakespeare/shakespeare_val_000000.bin"
    with pytest.raises(ConfigError, match=r"probe_band='data/shakespeare/shakespeare_val_000000.bin': .* has no latents"
                                          r".* python data/modarith.py; or set probe_band=''"):
        train(load_config(toy_args(tmp_path, toy_data, probe_band=shakespeare_val, vocab_size=50304)))
    with pytest.raises(ConfigError, match=r"its sequences are 16 tokens but seq_len=8; set seq_len=16"):
        train(load_config(toy_args(tmp_path, toy_data, probe_band=f"{toy_data}/modarith_band_000000.bin", seq_len=8)))
    with pytest.raises(ConfigError, match=r"probe_point='L07.mlp_resid' is not a probe point of this model"):
        train(load_config(toy_args(tmp_path, toy_data, probe_point="L07.mlp_resid")))
    assert not os.listdir(tmp_path)  # nothing written


def test_the_checkpoint_command_measures_what_the_trainer_logged_and_draws_the_run(tmp_path, toy_data, capsys):
    run_dir = train(load_config(toy_args(tmp_path, toy_data, run_name="ck", ckpt_every_tokens=0)))
    last = [r for r in read_metrics(run_dir) if "probe/fourier_peak/final" in r][-1]
    ckpt, = train_gpt.checkpoints(run_dir)
    r = run_command(measure.main, ["probe", "--ckpt", ckpt], capsys)
    assert r.returncode == 0, r.stderr
    written = json.load(open(os.path.join(run_dir, "measured", f"probe_{last['tokens']:012d}.json")))
    for key, value in last.items():
        if key.startswith("probe/"):
            assert written[key] == pytest.approx(value, rel=1e-6, abs=1e-9), key
    drawn = os.path.join(run_dir, "measured", "plots", "probe.png")
    assert os.path.getsize(drawn) > 0 and f"wrote {drawn}" in r.stdout
    r = run_command(measure.main, ["probe", "--ckpt", ckpt, "--band", "data/shakespeare/shakespeare_val_000000.bin"],
                    capsys)
    assert r.returncode == 2 and "has no latents" in r.stderr and "python data/modarith.py" in r.stderr
