"""bench/demo_sweep.py end to end on a reduced size: a learning-rate sweep per batch size, each
tier's choice trained to the target the script chooses, then `analyze.py compare` and
`analyze.py forecast` on those runs (trials run in this process: sweep.py --launcher inline)."""
import csv
import re
from decimal import Decimal

from conftest import load_bench
from data import modarith


def load_demo_sweep():
    return load_bench("demo_sweep")


def test_threshold_text_never_rounds_below_the_value():
    demo_sweep = load_demo_sweep()
    for value in (6.778432250022888, 6.7784, 7.0, 1e-9, 10.123456789):
        text = demo_sweep.threshold_text(value)
        assert float(text) >= value and Decimal(text) >= Decimal(value)
        assert float(text) - value < 1e-4
    assert demo_sweep.threshold_text(6.778432250022888) == "6.7785"


def test_the_demo_sweep_tunes_each_tier_trains_it_to_one_target_and_forecasts(tmp_path, capsys):
    demo_sweep = load_demo_sweep()
    out, data = tmp_path / "demo", str(tmp_path / "data")
    # reduced: a tiny model on tiny toy data (a 128-token vocabulary: the demo's 50k-row head would
    # be most of the test's time), the demo's own config and settings otherwise
    modarith.write_dataset(modarith.ToyOptions(vocab_size=128, seq_len=16, c_max=64, train_sequences=2048,
                                               val_sequences=64, test_sequences=0, band_sequences=16), data)
    demo_sweep.main(["--out", str(out), "--batch_sizes", "2,4,8", "--multipliers", "0.5,2", "--rung", "256",
                     "--train_tokens", "512", "--eval_every_tokens", "256", "--grad_samples", "8", "--seq_len=16",
                     "--n_layer=2", "--n_head=2", "--n_embd=32", "--vocab_size=128", "--val_tokens=512",
                     "--spectra_tokens=512", "--grad_batch_size=8", f"--train_files={data}/modarith_train_*.bin",
                     f"--val_files={data}/modarith_val_*.bin"])
    text = capsys.readouterr().out
    # the target: the highest of the tiers' best losses at the budget, from sweep.csv by hand, rounded up
    best = {}
    with open(out / "sweep" / "sweep.csv") as f:
        for row in csv.DictReader(f):
            if row["tokens"] == "512" and row["state"] == "finished":
                best[row["batch_size"]] = min(best.get(row["batch_size"], 99.0), float(row["val_loss"]))
    assert sorted(best) == ["2", "4", "8"]
    target = float(re.search(r"^\$ python analyze.py forecast \S+ --target-loss (\S+)", text, re.M).group(1))
    assert max(best.values()) <= target < max(best.values()) + 1e-4
    assert f"target: val_loss {target}" in text
    # every tier's choice trained to it, and the forecast ranks them
    rows = {m.group(1): m.group(2) for m in re.finditer(r"^(bs\d+_seed0) +F\d +\d+ +(yes|NOT YET)", text, re.M)}
    assert rows == {"bs2_seed0": "yes", "bs4_seed0": "yes", "bs8_seed0": "yes"}
    assert "best predictor: " in text and "no forecast" not in text
    for bs in (2, 4, 8):  # each run used its tier's chosen rate
        chosen = (out / "sweep" / f"best_bs{bs}.py").read_text()
        assert re.search(r"^lr_mult = ", chosen, re.M)
    for f in ("compare/compare.csv", "forecast/forecast.csv", "forecast/forecast.png"):
        assert (out / "analysis" / f).is_file(), f
