"""bench/demo_sweep.py end to end on a reduced size: four batch sizes trained by the trainer's own
command, then `analyze.py compare` and `analyze.py forecast` with the target and the reading point
the script chooses itself. The trainer runs in this process (run_command, the same main() as
`python train_gpt.py`): four interpreter and torch starts would cost a third of the test; the
launch itself, run_trainer, is checked once on its own."""
import json
import re
from decimal import Decimal

import train_gpt
from conftest import DEMO, load_bench, run_command


def load_demo_sweep():
    return load_bench("demo_sweep")


def test_threshold_text_never_rounds_below_the_value():
    demo_sweep = load_demo_sweep()
    for value in (6.778432250022888, 6.7785, 6.77849999, 1e-9, 3.0, 7.123450000000001):
        text = demo_sweep.threshold_text(value)
        assert re.fullmatch(r"\d+\.\d{4}", text) and float(text) >= value
        assert Decimal(text) - Decimal(value) < Decimal("1e-4")  # and the next 4-place number up, no higher
    assert demo_sweep.threshold_text(6.778432250022888) == "6.7785"


def test_run_trainer_launches_the_trainer_and_returns_its_error():
    code, _, stderr = load_demo_sweep().run_trainer([DEMO, "--batch_size=-3"])
    assert code == 2 and "batch_size" in stderr


def test_the_demo_sweep_chooses_a_target_every_qualifying_run_reaches_and_forecasts_the_rest(
        tmp_path, capsys, monkeypatch):
    demo_sweep = load_demo_sweep()
    printed = []

    def in_process(config_args):
        before = capsys.readouterr().out  # the sweep's own lines so far, printed again after the run's
        result = run_command(train_gpt.main, config_args, capsys)
        print(before, end="")
        printed.append(result.stdout)
        return result.returncode, result.stdout, result.stderr
    monkeypatch.setattr(demo_sweep, "run_trainer", in_process)
    out = tmp_path / "sweep"
    demo_sweep.main(["--out", str(out), "--batch_sizes", "1,2,4,8", "--train_tokens", "1024", "--eval_every_tokens",
                     "512", "--grad_samples", "8", "--seq_len=32", "--n_layer=2", "--n_head=2", "--n_embd=64",
                     "--val_tokens=512", "--spectra_tokens=512", "--grad_batch_size=8"])
    text = capsys.readouterr().out
    assert len(printed) == 4 and all("val_loss" in p for p in printed)
    finals = {}
    for bs in (1, 2, 4, 8):
        lines = [json.loads(line) for line in open(out / f"bs{bs}" / "metrics.jsonl")]
        finals[f"bs{bs}"] = [r["val_loss"] for r in lines if "val_loss" in r][-1]
    target = float(re.search(r"--target-loss (\S+)", text).group(1))
    chosen = sorted(finals.values())[-2]  # the second-highest final loss: every run but the slowest reaches it
    assert chosen <= target < chosen + 1e-4
    rows = {m.group(1): m.group(2) for m in re.finditer(r"^(bs\d+) +F1 +\d+ +(yes|NOT YET)", text, re.M)}
    assert rows == {run: "yes" if loss <= target else "NOT YET" for run, loss in finals.items()}
    assert list(rows.values()).count("yes") == 3
    assert "best predictor: " in text and "no forecast" not in text
    slowest = max(finals, key=finals.get)
    forecast = re.search(rf"^{slowest} .*NOT YET.* (\d+)$", text, re.M)
    assert forecast and int(forecast.group(1)) > 1024  # forecast tokens beyond the run's budget
    for f in ("compare/compare.csv", "forecast/forecast.csv", "forecast/forecast.png"):
        assert (out / "analysis" / f).is_file(), f
