import glob
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

import train_gpt
from conftest import DEMO, REPO
from data import fineweb, prepare
from data.shards import HEADER_BYTES, MAGIC, ShardError, find_shards, load_prefix, load_tokens, read_header, write_shard

SHAKESPEARE = os.path.join(REPO, "data", "shakespeare")


def gpt2_encoding():
    """tiktoken's r50k_base (== gpt2), or a skip where its ranks can be neither read nor downloaded."""
    import tiktoken
    try:
        return tiktoken.get_encoding("r50k_base")
    except Exception as e:  # no cache and no network
        pytest.skip(f"tiktoken r50k_base unavailable ({type(e).__name__}); set TIKTOKEN_CACHE_DIR")


def test_shard_round_trip(tmp_path):
    tokens = np.random.default_rng(0).integers(0, 50257, 1000)
    path = str(tmp_path / "x_train_000000.bin")
    write_shard(path, tokens)
    header = np.fromfile(path, dtype=np.int32, count=256)
    assert list(header[:3]) == [MAGIC, 1, 1000] and not header[3:].any()
    assert os.path.getsize(path) == HEADER_BYTES + 2 * 1000
    assert np.array_equal(load_tokens(path), tokens)


def test_truncated_shard_is_named(tmp_path):
    path = str(tmp_path / "cut.bin")
    write_shard(path, np.arange(100))
    with open(path, "r+b") as f:
        f.truncate(HEADER_BYTES + 150)
    with pytest.raises(ShardError, match=rf"{re.escape(path)}: header promises 100 tokens .* truncated"):
        read_header(path)
    with open(path, "r+b") as f:
        f.truncate(100)
    with pytest.raises(ShardError, match=rf"{re.escape(path)}: 100 bytes is shorter than the 1024-byte"):
        load_tokens(path)


def test_wrong_magic_and_version_are_named(tmp_path):
    path = str(tmp_path / "bad.bin")
    write_shard(path, np.arange(10))
    header = np.fromfile(path, dtype=np.int32, count=256)
    for index, value, message in ((0, 1234, "magic number 1234 is not 20240520"), (1, 7, "shard version 7")):
        bad = header.copy()
        bad[index] = value
        with open(path, "r+b") as f:
            f.write(bad.tobytes())
        with pytest.raises(ShardError, match=rf"{re.escape(path)}: {message}"):
            read_header(path)


def test_missing_shards_name_the_fetch_command():
    with pytest.raises(ShardError, match=r"fetch or build them with: python data/fineweb.py --train_shards"):
        find_shards("data/fineweb10B/fineweb_nothing_*.bin")
    with pytest.raises(ShardError, match=r"python data/fineweb.py --edu"):
        find_shards("data/finewebedu10B/finewebedu_val_*.bin")


def test_token_ids_beyond_the_vocabulary_are_named(tmp_path):
    path = str(tmp_path / "v_val_000000.bin")
    write_shard(path, [1, 2, 60000, 3])
    with pytest.raises(ShardError, match=rf"{re.escape(path)}: token id 60000 is outside the model's vocab_size"):
        load_prefix([path], 3, 50304)


def test_embedded_corpus_is_small_valid_gpt2_shakespeare():
    files = sorted(glob.glob(os.path.join(SHAKESPEARE, "*.bin")))
    assert [os.path.basename(f) for f in files] == ["shakespeare_train_000000.bin", "shakespeare_val_000000.bin"]
    assert sum(os.path.getsize(f) for f in files) <= 5 * 2 ** 20
    train, val = (load_tokens(f) for f in files)
    assert len(train) > 1_000_000 and len(val) > 50_000
    assert train.max() < 50257 and val.max() < 50257
    assert train[0] == 50256 and val[0] == 50256  # every document starts with <|endoftext|>
    text = gpt2_encoding().decode(train[:2000].tolist())
    assert "<|endoftext|>" in text and re.search(r"\b(thou|thee|thy|lord)\b", text, re.I)


def test_prepare_tokenizes_whole_documents_into_train_and_val(tmp_path):
    enc = gpt2_encoding()
    docs = [f"Document {i}: " + "the quick brown fox jumps over the lazy dog. " * (5 + i) for i in range(10)]
    for i, d in enumerate(docs):
        (tmp_path / f"doc{i}.txt").write_text(d)
    out = tmp_path / "out"
    prepare.main(["--input", str(tmp_path / "doc*.txt"), "--out", str(out), "--name", "toy", "--val_fraction", "0.2",
                  "--shard_tokens", "300"])
    train = np.concatenate([load_tokens(f) for f in find_shards(str(out / "toy_train_*.bin"))])
    val = np.concatenate([load_tokens(f) for f in find_shards(str(out / "toy_val_*.bin"))])
    assert len(glob.glob(str(out / "toy_train_*.bin"))) > 1  # split into shards of <= 300 tokens
    expected = {tuple([enc.eot_token] + enc.encode_ordinary(d)) for d in docs}

    def split_docs(tokens):
        cuts = np.flatnonzero(tokens == enc.eot_token).tolist() + [len(tokens)]
        return {tuple(tokens[a:b].tolist()) for a, b in zip(cuts, cuts[1:])}
    train_docs, val_docs = split_docs(train), split_docs(val)
    assert train_docs | val_docs == expected and not train_docs & val_docs
    assert 0.2 <= len(val) / (len(train) + len(val)) < 0.5


def test_prepare_cuts_a_single_document_at_its_tail(tmp_path):
    enc = gpt2_encoding()
    text = "To be, or not to be, that is the question. " * 50
    (tmp_path / "input.txt").write_text(text)
    prepare.main(["--input", str(tmp_path / "input.txt"), "--out", str(tmp_path), "--name", "one",
                  "--val_fraction", "0.1"])
    train, val = (load_tokens(str(tmp_path / f"one_{s}_000000.bin")) for s in ("train", "val"))
    ids = [enc.eot_token] + enc.encode_ordinary(text)
    assert train.tolist() + val[1:].tolist() == ids and val[0] == enc.eot_token
    assert len(val) - 1 == int(0.1 * len(ids))


def test_fineweb_copies_from_a_local_source_and_validates(tmp_path):
    src, dst = tmp_path / "mirror", tmp_path / "fineweb10B"
    src.mkdir()
    for name in fineweb.shard_names("fineweb", 2):
        write_shard(str(src / name), np.arange(50))
    fineweb.main(["--train_shards", "2", "--source", str(src), "--local_dir", str(dst)])
    assert sorted(os.listdir(dst)) == ["fineweb_train_000001.bin", "fineweb_train_000002.bin", "fineweb_val_000000.bin"]
    assert all(np.array_equal(load_tokens(str(dst / n)), np.arange(50)) for n in os.listdir(dst))
    with open(src / "fineweb_train_000003.bin", "wb") as f:
        f.write(b"not a shard")
    with pytest.raises(ShardError, match="fineweb_train_000003.bin"):
        fineweb.main(["--train_shards", "3", "--source", str(src), "--local_dir", str(dst)])


def test_fineweb_asks_the_hub_for_the_modded_nanogpt_files(tmp_path, monkeypatch):
    import huggingface_hub
    asked = []

    def fake_download(repo_id, filename, repo_type, local_dir):
        asked.append((repo_id, filename, repo_type))
        write_shard(os.path.join(local_dir, filename), np.arange(5))
        return os.path.join(local_dir, filename)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    fineweb.main(["--edu", "--train_shards", "1", "--local_dir", str(tmp_path)])
    assert asked == [("kjj0/finewebedu10B-gpt2", "finewebedu_val_000000.bin", "dataset"),
                     ("kjj0/finewebedu10B-gpt2", "finewebedu_train_000001.bin", "dataset")]
    fineweb.main(["--edu", "--train_shards", "1", "--local_dir", str(tmp_path)])
    assert len(asked) == 2  # valid files already present are not fetched again


def test_fineweb_without_network_says_which_file_and_how_to_work_offline(tmp_path, monkeypatch):
    import huggingface_hub

    def offline(**kw):
        raise OSError("Network is unreachable")
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", offline)
    with pytest.raises(SystemExit, match=r"(?s)could not fetch fineweb_val_000000.bin from "
                                         r"https://huggingface.co/datasets/kjj0/fineweb10B-gpt2.*--source DIR"):
        fineweb.main(["--train_shards", "1", "--local_dir", str(tmp_path)])


def windows_seen(files, world, rank, steps, grad_accum):
    dbs = 8 // world // grad_accum
    cfg = train_gpt.load_config([DEMO, "--seq_len=16", "--batch_size=8", f"--device_batch_size={dbs}"])
    loader = train_gpt.TrainLoader(files, cfg, rank, world, torch.device("cpu"), 50304)
    return [torch.cat([x for x, _ in loader.next_step(grad_accum)]) for _ in range(steps)], loader


def test_loader_gives_every_process_its_own_share_of_the_same_global_batch(tmp_path):
    for i in range(2):
        write_shard(str(tmp_path / f"t_train_{i:06d}.bin"), np.arange(1000) + 1000 * i)
    files = find_shards(str(tmp_path / "t_train_*.bin"))
    one, loader = windows_seen(files, world=1, rank=0, steps=20, grad_accum=2)
    two = [windows_seen(files, world=2, rank=r, steps=20, grad_accum=1)[0] for r in range(2)]
    for s in range(20):
        # micro-step m of rank r holds windows (m * world + r) * dbs ...: interleave the ranks back together
        merged = torch.cat([two[0][s], two[1][s]])
        assert torch.equal(one[s], merged)
    x0 = one[0]
    assert torch.equal(x0[0], torch.arange(16)) and torch.equal(x0[1], torch.arange(16, 32))
    # 8 x 16 + 1 = 129 tokens per step: 7 steps per 1000-token shard, then the next shard, then wrap around
    assert one[7][0, 0] == 1000 and one[14][0, 0] == 0 and loader.state["epoch"] == 1
    # the position is the whole state: a fresh loader set to it continues identically
    again, fresh = windows_seen(files, world=1, rank=0, steps=0, grad_accum=2)
    fresh.load_state_dict({"shard": 1, "offset": 0, "epoch": 0})
    assert torch.equal(torch.cat([x for x, _ in fresh.next_step(2)]), one[7])


def test_loader_resumes_inside_a_shorter_shard(tmp_path):
    write_shard(str(tmp_path / "u_train_000000.bin"), np.arange(1000))
    write_shard(str(tmp_path / "u_train_000001.bin"), np.arange(300) + 5000)
    files = find_shards(str(tmp_path / "u_train_*.bin"))
    steps, loader = windows_seen(files, world=1, rank=0, steps=9, grad_accum=1)
    state = loader.state_dict()
    assert state == {"shard": 1, "offset": 2 * 128, "epoch": 0}  # 7 steps in shard 0, 2 in shard 1
    following = torch.cat([x for x, _ in loader.next_step(1)])
    _, fresh = windows_seen(files, world=1, rank=0, steps=0, grad_accum=1)
    fresh.load_state_dict(state)
    resumed = torch.cat([x for x, _ in fresh.next_step(1)])
    assert torch.equal(resumed, following) and resumed.shape == (8, 16)
    assert resumed[0, 0] == 0  # shard 1 had no room for a third step: wrapped to shard 0


def test_missing_tiktoken_ranks_name_the_cache_and_the_fix(tmp_path):
    """No cache and no network (a proxy that refuses): one error line instead of a requests traceback,
    and nothing written."""
    (tmp_path / "a.txt").write_text("hello world")
    env = {**os.environ, "TIKTOKEN_CACHE_DIR": str(tmp_path / "empty_cache"), "HTTPS_PROXY": "http://127.0.0.1:9",
           "HTTP_PROXY": "http://127.0.0.1:9"}
    r = subprocess.run([sys.executable, os.path.join(REPO, "data", "prepare.py"), "--input", str(tmp_path / "a.txt"),
                        "--out", str(tmp_path / "out"), "--name", "t"], capture_output=True, text=True, env=env)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert r.stderr.startswith(f"error: tiktoken's r50k_base ranks are not in its cache ({tmp_path}/empty_cache)")
    assert "point TIKTOKEN_CACHE_DIR at it" in r.stderr
    assert not (tmp_path / "out").exists()
