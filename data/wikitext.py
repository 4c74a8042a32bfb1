"""
WikiText-2 / WikiText-103 (raw) -> GPT-2 token shards, official splits kept.

    python data/wikitext.py --name wikitext-2                  # -> data/wikitext2/wikitext2_{train,val,test}_000000.bin
    python data/wikitext.py --name wikitext-103                # -> data/wikitext103/wikitext103_{train,val,test}_*.bin
    python data/wikitext.py --name wikitext-2 --local DIR      # parquet files from a local mirror, no hub

Source: the parquet files of the Hugging Face dataset Salesforce/wikitext, configs
wikitext-2-raw-v1 and wikitext-103-raw-v1 (one row per line of the raw text, column `text`),
fetched with huggingface_hub into its cache (HF_HOME, HF_ENDPOINT and HF_HUB_OFFLINE apply).
--local DIR reads the same files from DIR/<config>/*.parquet or DIR/*.parquet instead.

Each article (a top-level heading line " = Title = " and every line up to the next one) is
one document; lines keep their raw text, an empty row is a blank line. Every document is
preceded by <|endoftext|> and encoded with tiktoken's r50k_base (== gpt2), as in
data/prepare.py. The splits train / validation / test are written as <prefix>_train_*.bin,
<prefix>_val_*.bin and <prefix>_test_*.bin in the shard format of data/shards.py.
Reading parquet needs pyarrow.
"""

import argparse
import glob
import os
import posixpath
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from data.prepare import EncodingUnavailable, load_encoding, tokenize_documents, write_split  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
REPO_ID = "Salesforce/wikitext"
HUB_URL = f"https://huggingface.co/datasets/{REPO_ID}"
DATASETS = {  # --name -> (hub config, shard name prefix == default output folder under data/)
    "wikitext-2": ("wikitext-2-raw-v1", "wikitext2"),
    "wikitext-103": ("wikitext-103-raw-v1", "wikitext103"),
}
SPLITS = (("train", "train"), ("validation", "val"), ("test", "test"))  # hub split -> shard split
# The files as the hub holds them; used only when the hub cannot list its files (offline), to look them
# up in the huggingface_hub cache, and to name the first one missing.
KNOWN_FILES = {
    "wikitext-2-raw-v1": ["train-00000-of-00001.parquet", "validation-00000-of-00001.parquet",
                          "test-00000-of-00001.parquet"],
    "wikitext-103-raw-v1": ["train-00000-of-00002.parquet", "train-00001-of-00002.parquet",
                            "validation-00000-of-00001.parquet", "test-00000-of-00001.parquet"],
}
TOKENIZE_CHARS = 8_000_000  # text per tokenizer call: bounds the memory of the Python token lists


def dataset(name):
    """(hub config, shard prefix) of a --name; a ValueError listing the known names otherwise."""
    if name not in DATASETS:
        raise ValueError(f"unknown WikiText dataset {name!r}; choose one of: {', '.join(DATASETS)}")
    return DATASETS[name]


def split_files(names, config):
    """{hub split: sorted file names} among `names` (paths like 'wikitext-2-raw-v1/train-00000-of-00001.parquet');
    a split without files gets an empty list."""
    return {split: sorted(n for n in names if posixpath.dirname(n) == config
                          and re.fullmatch(rf"{split}-.*\.parquet", posixpath.basename(n)))
            for split, _ in SPLITS}


def missing_splits(files):
    return [split for split, found in files.items() if not found]


def fetch_hub(config):
    """{hub split: local paths} of the config's parquet files, downloaded into the huggingface_hub cache.
    Where the hub cannot list its files (offline), the known file names are looked up in that cache only."""
    from huggingface_hub import hf_hub_download, list_repo_files
    try:
        names, offline = list_repo_files(REPO_ID, repo_type="dataset"), None
    except Exception as e:  # no network (or HF_HUB_OFFLINE=1): a filled cache still serves the files
        names, offline = [f"{config}/{n}" for n in KNOWN_FILES[config]], e
    files = split_files(names, config)
    if missing_splits(files):
        raise SystemExit(f"error: {HUB_URL} holds no {config}/{{{','.join(missing_splits(files))}}}-*.parquet; "
                         f"its {config}/ files: {sorted(n for n in names if n.startswith(config + '/'))}")
    paths = {}
    for split, names_of_split in files.items():
        paths[split] = []
        for name in names_of_split:
            try:
                paths[split].append(hf_hub_download(repo_id=REPO_ID, filename=name, repo_type="dataset",
                                                    local_files_only=offline is not None))
            except Exception as e:  # network, auth, missing file: all end the same way for the user
                cause = offline if offline is not None else e  # not in the cache: the hub's error says why
                raise SystemExit(
                    f"error: could not fetch {name} from {HUB_URL}: {type(cause).__name__}: {cause}\n"
                    f"Without internet, copy the files of {HUB_URL}/tree/main/{config} into a folder DIR "
                    f"(as DIR/{config}/*.parquet or DIR/*.parquet) and pass --local DIR, "
                    "or set HF_ENDPOINT to a reachable mirror of the hub.") from None
    return paths


def find_local(config, local_dir):
    """{hub split: paths} of the parquet files in local_dir/<config>/ or, failing that, local_dir/."""
    if not os.path.isdir(local_dir):
        raise SystemExit(f"error: --local {local_dir}: no such directory")
    folder = os.path.join(local_dir, config)
    folder = folder if os.path.isdir(folder) else local_dir
    names = [f"{config}/{os.path.basename(p)}" for p in glob.glob(os.path.join(folder, "*.parquet"))]
    files = split_files(names, config)
    if missing_splits(files):
        raise SystemExit(f"error: --local {local_dir}: no {{{','.join(missing_splits(files))}}}-*.parquet in {folder}; "
                         f"expected the files of {HUB_URL}/tree/main/{config} there or in {local_dir}/{config}/ "
                         f"(found: {sorted(os.listdir(folder))[:10]})")
    return {split: [os.path.join(folder, posixpath.basename(n)) for n in found] for split, found in files.items()}


def parquet_module():
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise SystemExit("error: reading WikiText's parquet files needs pyarrow: pip install pyarrow") from None
    return pq


def read_lines(paths):
    """The `text` column of the parquet files, in order, as one list of lines (each ending in a newline)."""
    pq = parquet_module()
    lines = []
    for path in paths:
        try:
            column = pq.read_table(path, columns=["text"]).column("text")
        except Exception as e:  # not parquet, truncated, no `text` column
            raise SystemExit(f"error: {path}: cannot read the `text` column of this parquet file: "
                             f"{type(e).__name__}: {e}") from None
        lines.extend(line if line.endswith("\n") else line + "\n" for line in (t or "" for t in column.to_pylist()))
    return lines


def is_title(line):
    """A top-level heading ' = Title = ' (sections are ' = = Section = = ')."""
    s = line.strip()
    return len(s) > 4 and s.startswith("= ") and s.endswith(" =") and not s.startswith("= =")


def split_articles(lines):
    """Documents: each top-level heading line with all lines up to the next one, text unchanged.
    Blank lines before the first heading are dropped; other text before it is a document of its own."""
    starts = [i for i, line in enumerate(lines) if is_title(line)]
    if not starts or starts[0] > 0:
        starts.insert(0, 0)  # text before the first heading
    docs = ["".join(lines[a:b]) for a, b in zip(starts, starts[1:] + [len(lines)])]
    return [d for d in docs if d.strip()]


def tokenize(docs, encoding="r50k_base"):
    """data/prepare.py's tokenize_documents, a few million characters at a time (WikiText-103 is 0.5 GB)."""
    out, start, chars = [], 0, 0
    for i, doc in enumerate(docs):
        chars += len(doc)
        if chars >= TOKENIZE_CHARS or i == len(docs) - 1:
            out.extend(tokenize_documents(docs[start:i + 1], encoding))
            start, chars = i + 1, 0
    return out


def remove_stale(out_dir, prefix, split, written):
    """Shards of this split left by an earlier run with a smaller --shard_tokens would be read by a glob."""
    for path in glob.glob(os.path.join(out_dir, f"{prefix}_{split}_*.bin")):
        if re.fullmatch(rf"{re.escape(prefix)}_{split}_\d{{6}}\.bin", os.path.basename(path)) and path not in written:
            os.remove(path)


def prepare(name, out_dir=None, local=None, shard_tokens=100_000_000, encoding="r50k_base", log=print):
    """Fetch (or find) the parquet files, write the three splits; returns {shard split: (paths, tokens, documents)}."""
    config, prefix = dataset(name)
    parquet_module()  # before any download
    out_dir = out_dir or os.path.join(HERE, prefix)
    files = find_local(config, local) if local else fetch_hub(config)
    # every split read and parsed before any is written: a bad file leaves no partial set of shards
    articles = {split: split_articles(read_lines(files[hub_split])) for hub_split, split in SPLITS}
    os.makedirs(out_dir, exist_ok=True)
    result = {}
    for _, split in SPLITS:
        docs = tokenize(articles.pop(split), encoding)
        paths = write_split(docs, out_dir, prefix, split, shard_tokens)
        remove_stale(out_dir, prefix, split, paths)
        n_tokens = sum(len(d) for d in docs)
        result[split] = (paths, n_tokens, len(docs))
        log(f"{split}: {n_tokens:,} tokens in {len(docs):,} article{'s' * (len(docs) != 1)} -> "
            f"{os.path.join(out_dir, f'{prefix}_{split}_*.bin')} ({len(paths)} shard{'s' * (len(paths) > 1)})")
    return result


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--name", required=True, choices=list(DATASETS), help="which WikiText")
    p.add_argument("--out", help="output directory (default data/wikitext2 or data/wikitext103)")
    p.add_argument("--local", metavar="DIR", help="read the parquet files from DIR (a mirror) instead of the hub")
    p.add_argument("--shard_tokens", type=int, default=100_000_000, help="most tokens per shard file")
    p.add_argument("--encoding", default="r50k_base", help="tiktoken encoding (r50k_base == gpt2)")
    args = p.parse_args(argv)
    if args.shard_tokens < 1:
        p.error("--shard_tokens must be positive")
    try:
        load_encoding(args.encoding)  # before any download: without the ranks nothing can be written
    except EncodingUnavailable as e:
        sys.exit(f"error: {e}")
    prepare(args.name, args.out, args.local, args.shard_tokens, args.encoding)


if __name__ == "__main__":
    main()
