"""data/wikitext.py against a fake Salesforce/wikitext: small parquet files written here, read through
the real pyarrow path, served by a local mirror (--local) or by a faked huggingface_hub."""

import os
import re
import sys

import numpy as np
import pytest

from data import wikitext
from data.shards import load_tokens

# Articles as they read in the raw text: a top-level heading, sections, blank lines between paragraphs.
ARTICLES = {
    "train": [
        " = Alpha Centauri = \n\n Alpha Centauri is a star system .\n\n = = Components = = \n\n"
        " It has three stars , the = sign aside .\n\n",
        " = Bread = \n\n Bread is a staple food .\n\n = = History = = \n\n = = = Early bread = = = \n\n"
        " Early bread was flat .\n\n\n",
        " = Copper = \n\n Copper is a metal with the symbol Cu .\n",
    ],
    "validation": [
        " = Delta ( river ) = \n\n A delta forms at a river mouth .\n\n",
        " = Elm = \n\n Elms are trees .\n",
    ],
    "test": [
        " = Fjord = \n\n A fjord is a long inlet .\n\n = = Formation = = \n\n Glaciers carve them .\n",
    ],
}
SHARD_SPLIT = {"train": "train", "validation": "val", "test": "test"}


def rows_of(articles):
    """The parquet rows of a split as the hub stores them: one line per row, a blank line an empty row,
    and a blank line before the first heading."""
    text = "\n" + "".join(articles)
    return [line + "\n" if line.strip() else "" for line in text.split("\n")[:-1]]


def write_parquet(path, rows):
    import pyarrow as pa
    import pyarrow.parquet as pq
    os.makedirs(os.path.dirname(path), exist_ok=True)
    pq.write_table(pa.table({"text": pa.array(rows, type=pa.string())}), path)


@pytest.fixture
def enc():
    """tiktoken's r50k_base (== gpt2), or a skip where its ranks can be neither read nor downloaded."""
    pytest.importorskip("pyarrow")
    import tiktoken
    try:
        return tiktoken.get_encoding("r50k_base")
    except Exception as e:  # no cache and no network
        pytest.skip(f"tiktoken r50k_base unavailable ({type(e).__name__}); set TIKTOKEN_CACHE_DIR")


def wikitext2_mirror(root):
    """root/wikitext-2-raw-v1/{train,validation,test}-00000-of-00001.parquet, as on the hub."""
    for split, articles in ARTICLES.items():
        write_parquet(str(root / "wikitext-2-raw-v1" / f"{split}-00000-of-00001.parquet"), rows_of(articles))
    return root


def documents(tokens, enc):
    """Split a shard's tokens at <|endoftext|> (every document starts with one) and decode each document."""
    tokens = tokens.tolist()
    assert tokens[0] == enc.eot_token
    cuts = [i for i, t in enumerate(tokens) if t == enc.eot_token] + [len(tokens)]
    return [enc.decode(tokens[a + 1:b]) for a, b in zip(cuts, cuts[1:])]


def check_shards(out, prefix, articles, enc):
    assert sorted(os.listdir(out)) == [f"{prefix}_{s}_000000.bin" for s in ("test", "train", "val")]
    for split, docs in articles.items():
        tokens = load_tokens(str(out / f"{prefix}_{SHARD_SPLIT[split]}_000000.bin"))
        assert documents(tokens, enc) == docs
        assert enc.decode(tokens.tolist()) == "".join("<|endoftext|>" + d for d in docs)
        assert tokens.tolist() == [t for d in docs for t in [enc.eot_token] + enc.encode_ordinary(d)]


def test_articles_are_split_at_top_level_headings_with_the_raw_text_kept():
    lines = ["\n", "\n", " = A = \n", "\n", " text = with sign .\n", "\n", " = = Sub = = \n", " more .\n", "\n",
             " = B = \n", " b .\n"]
    assert wikitext.split_articles(lines) == [" = A = \n\n text = with sign .\n\n = = Sub = = \n more .\n\n",
                                              " = B = \n b .\n"]
    assert wikitext.split_articles([" preface .\n", " = A = \n"]) == [" preface .\n", " = A = \n"]
    assert wikitext.split_articles(["\n", "\n"]) == []


def test_local_mirror_gives_train_val_test_shards_of_whole_articles(tmp_path, enc, capsys):
    mirror, out = wikitext2_mirror(tmp_path / "mirror"), tmp_path / "out"
    wikitext.main(["--name", "wikitext-2", "--local", str(mirror), "--out", str(out)])
    check_shards(out, "wikitext2", ARTICLES, enc)
    printed = capsys.readouterr().out
    for split, docs in ARTICLES.items():
        n = len(load_tokens(str(out / f"wikitext2_{SHARD_SPLIT[split]}_000000.bin")))
        assert re.search(rf"^{SHARD_SPLIT[split]}: {n:,} tokens in {len(docs)} articles?", printed, re.M)


def test_wikitext103_train_spans_two_parquet_files_and_stale_shards_go(tmp_path, enc):
    # a flat folder (DIR/*.parquet) also works; the hub cuts train into two files, here inside an article
    mirror, out = tmp_path / "flat", tmp_path / "out"
    rows = rows_of(ARTICLES["train"])
    write_parquet(str(mirror / "train-00000-of-00002.parquet"), rows[:12])
    write_parquet(str(mirror / "train-00001-of-00002.parquet"), rows[12:])
    write_parquet(str(mirror / "validation-00000-of-00001.parquet"), rows_of(ARTICLES["validation"]))
    write_parquet(str(mirror / "test-00000-of-00001.parquet"), rows_of(ARTICLES["test"]))
    result = wikitext.prepare("wikitext-103", str(out), local=str(mirror), shard_tokens=40, log=lambda s: None)
    train = sorted(f for f in os.listdir(out) if f.startswith("wikitext103_train_"))
    assert len(train) > 2 and train == [f"wikitext103_train_{i:06d}.bin" for i in range(len(train))]
    assert [os.path.basename(p) for p in result["train"][0]] == train
    tokens = np.concatenate([load_tokens(str(out / f)) for f in train])
    assert documents(tokens, enc) == ARTICLES["train"] and result["train"][1:] == (len(tokens), 3)
    wikitext.prepare("wikitext-103", str(out), local=str(mirror), log=lambda s: None)
    check_shards(out, "wikitext103", ARTICLES, enc)  # the 40-token shards of the first run are gone


def test_hub_download_asks_for_the_raw_config_files(tmp_path, monkeypatch, enc):
    import huggingface_hub
    mirror = wikitext2_mirror(tmp_path / "mirror")
    listed = ["README.md", "wikitext-2-v1/train-00000-of-00001.parquet",  # other configs are not asked for
              "wikitext-103-raw-v1/test-00000-of-00001.parquet"]
    listed += sorted(f"wikitext-2-raw-v1/{f}" for f in os.listdir(mirror / "wikitext-2-raw-v1"))
    asked = []

    def fake_list(repo_id, repo_type=None, **kw):
        assert (repo_id, repo_type) == ("Salesforce/wikitext", "dataset")
        return listed

    def fake_download(repo_id, filename, repo_type=None, **kw):
        asked.append((repo_id, filename, repo_type))
        return str(mirror / filename)
    monkeypatch.setattr(huggingface_hub, "list_repo_files", fake_list)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    wikitext.main(["--name", "wikitext-2", "--out", str(tmp_path / "out")])
    assert asked == [("Salesforce/wikitext", f"wikitext-2-raw-v1/{s}-00000-of-00001.parquet", "dataset")
                     for s in ("train", "validation", "test")]
    check_shards(tmp_path / "out", "wikitext2", ARTICLES, enc)


@pytest.fixture
def no_ranks_needed(monkeypatch):
    """These errors come before tokenizing: main's early check of tiktoken's ranks is not under test."""
    monkeypatch.setattr(wikitext, "load_encoding", lambda encoding: None)


def test_hub_failure_names_the_file_and_suggests_local(tmp_path, monkeypatch, no_ranks_needed):
    pytest.importorskip("pyarrow")
    import huggingface_hub

    def offline(*args, **kw):
        raise OSError("Network is unreachable")

    def not_cached(repo_id, filename, repo_type=None, local_files_only=False, **kw):
        assert local_files_only  # the listing failed already: only the cache is asked, no second wait
        raise FileNotFoundError(filename)
    monkeypatch.setattr(huggingface_hub, "list_repo_files", offline)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", not_cached)
    with pytest.raises(SystemExit, match=r"(?s)could not fetch wikitext-103-raw-v1/train-00000-of-00002\.parquet "
                                         r"from https://huggingface\.co/datasets/Salesforce/wikitext: OSError: "
                                         r"Network is unreachable.*--local DIR"):
        wikitext.main(["--name", "wikitext-103", "--out", str(tmp_path / "out")])
    assert not os.path.exists(tmp_path / "out")
    # the listing works but a download fails: that download's error is the one shown
    listed = [f"wikitext-2-raw-v1/{f}" for f in wikitext.KNOWN_FILES["wikitext-2-raw-v1"]]
    monkeypatch.setattr(huggingface_hub, "list_repo_files", lambda *args, **kw: listed)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", offline)
    with pytest.raises(SystemExit, match=r"(?s)could not fetch wikitext-2-raw-v1/train-00000-of-00001\.parquet "
                                         r"from .*OSError: Network is unreachable.*--local DIR"):
        wikitext.main(["--name", "wikitext-2", "--out", str(tmp_path / "out")])


def test_offline_with_the_files_in_the_hub_cache(tmp_path, monkeypatch, enc):
    import huggingface_hub
    mirror = wikitext2_mirror(tmp_path / "cache")

    def offline(*args, **kw):
        raise OSError("Network is unreachable")

    def cached(repo_id, filename, repo_type=None, local_files_only=False, **kw):
        assert local_files_only
        return str(mirror / filename)
    monkeypatch.setattr(huggingface_hub, "list_repo_files", offline)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", cached)
    wikitext.main(["--name", "wikitext-2", "--out", str(tmp_path / "out")])
    check_shards(tmp_path / "out", "wikitext2", ARTICLES, enc)


def test_unknown_name_lists_the_known_ones(capsys):
    with pytest.raises(SystemExit) as e:
        wikitext.main(["--name", "wikitext-3"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "'wikitext-3'" in err and "wikitext-2" in err and "wikitext-103" in err
    with pytest.raises(ValueError, match=r"unknown WikiText dataset 'wikitext-3'; choose one of: "
                                         r"wikitext-2, wikitext-103"):
        wikitext.prepare("wikitext-3")


def test_local_mirror_without_a_split_says_which(tmp_path, no_ranks_needed):
    pytest.importorskip("pyarrow")
    mirror = wikitext2_mirror(tmp_path / "mirror")
    os.remove(mirror / "wikitext-2-raw-v1" / "test-00000-of-00001.parquet")
    with pytest.raises(SystemExit, match=r"--local .*mirror: no \{test\}-\*\.parquet in .*wikitext-2-raw-v1"):
        wikitext.main(["--name", "wikitext-2", "--local", str(mirror), "--out", str(tmp_path / "out")])


def test_missing_pyarrow_names_the_install_command(tmp_path, monkeypatch, no_ranks_needed):
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # makes `import pyarrow...` raise ImportError
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(SystemExit, match=r"needs pyarrow: pip install pyarrow"):
        wikitext.main(["--name", "wikitext-2", "--local", str(tmp_path), "--out", str(tmp_path / "out")])
