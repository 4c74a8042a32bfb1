"""
Text files -> GPT-2 token shards (the modded-NanoGPT format of data/shards.py).

Each input file is one document (or several, split on --doc_sep). Every document is
preceded by <|endoftext|> as in the FineWeb shards, documents are assigned whole to
train or val (a seeded draw, so no document straddles the split; a lone document is cut
at its tail instead), and each split is written as <out>/<name>_{val,train}_000000.bin,
... of at most --shard_tokens tokens.

    python data/prepare.py --input 'texts/*.txt' --out data/mytext --name mytext

Encoding: tiktoken's r50k_base, token-for-token identical to its `gpt2` encoding (on a
machine without internet point TIKTOKEN_CACHE_DIR at a cache that holds it).
"""

import argparse
import glob
import os
import random
import sys
import tempfile

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from data.shards import read_header, write_shard  # noqa: E402


def read_documents(paths, doc_sep=None):
    docs = []
    for path in paths:
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read()
        except UnicodeDecodeError as e:
            sys.exit(f"error: {path} is not UTF-8 text ({e.reason} at byte {e.start}); convert it, e.g. "
                     f"iconv -f latin1 -t utf-8 {path}")
        parts = text.split(doc_sep) if doc_sep else [text]
        docs.extend(p for p in parts if p.strip())
    return docs


class EncodingUnavailable(RuntimeError):
    """tiktoken's ranks of an encoding could be neither read from its cache nor downloaded."""


def load_encoding(encoding="r50k_base"):
    """tiktoken's encoding; EncodingUnavailable, naming the cache folder and the fix, when its ranks are
    neither in the cache nor downloadable (tiktoken itself ends in a raw network traceback)."""
    import tiktoken
    try:
        return tiktoken.get_encoding(encoding)
    except ValueError:
        raise EncodingUnavailable(f"unknown tiktoken encoding {encoding!r}; known: {tiktoken.list_encoding_names()}") \
            from None
    except Exception as e:
        cache = os.environ.get("TIKTOKEN_CACHE_DIR") or os.environ.get("DATA_GYM_CACHE_DIR") or \
            os.path.join(tempfile.gettempdir(), "data-gym-cache")
        raise EncodingUnavailable(
            f"tiktoken's {encoding} ranks are not in its cache ({cache}) and could not be downloaded "
            f"({type(e).__name__}: {str(e)[:200]}); on a machine without internet copy a tiktoken cache that holds "
            "them and point TIKTOKEN_CACHE_DIR at it, e.g. TIKTOKEN_CACHE_DIR=../shared/tiktoken_cache") from None


def tokenize_documents(docs, encoding="r50k_base"):
    """One uint16 array per document: <|endoftext|> followed by the document's tokens."""
    enc = load_encoding(encoding)
    eot = enc.eot_token
    encoded = enc.encode_ordinary_batch(docs)
    return [np.array([eot] + ids, dtype=np.uint16) for ids in encoded]


def split_documents(docs, val_fraction, seed=0):
    """(train, val): whole documents, drawn in a seeded order until val holds >= val_fraction of tokens;
    at least one document stays in train. A single document (one input.txt) is cut instead: its last
    val_fraction of tokens, after an <|endoftext|>, becomes val."""
    if not docs:
        return [], []
    if len(docs) == 1 and val_fraction > 0:
        doc = docs[0]
        cut = len(doc) - max(1, int(val_fraction * len(doc)))
        return [doc[:cut]], [np.concatenate([doc[:1], doc[cut:]])]  # doc[0] is <|endoftext|>
    total = sum(len(d) for d in docs)
    order = list(range(len(docs)))
    random.Random(seed).shuffle(order)
    val_ids, val_tokens = set(), 0
    for i in order[:-1]:
        if val_fraction <= 0 or val_tokens >= val_fraction * total:
            break
        val_ids.add(i)
        val_tokens += len(docs[i])
    train = [d for i, d in enumerate(docs) if i not in val_ids]
    val = [d for i, d in enumerate(docs) if i in val_ids]
    return train, val


def write_split(docs, out_dir, name, split, shard_tokens):
    """Concatenate documents and cut into shards; returns the written paths."""
    tokens = np.concatenate(docs) if docs else np.zeros(0, dtype=np.uint16)
    paths = []
    for k, start in enumerate(range(0, max(len(tokens), 1), shard_tokens)):
        path = os.path.join(out_dir, f"{name}_{split}_{k:06d}.bin")
        write_shard(path, tokens[start:start + shard_tokens])
        paths.append(path)
    return paths


def prepare(paths, out_dir, name, val_fraction=0.05, shard_tokens=100_000_000, encoding="r50k_base",
            doc_sep=None, seed=0):
    docs = tokenize_documents(read_documents(paths, doc_sep), encoding)
    train, val = split_documents(docs, val_fraction, seed)
    os.makedirs(out_dir, exist_ok=True)
    written = write_split(val, out_dir, name, "val", shard_tokens) if val else []
    written += write_split(train, out_dir, name, "train", shard_tokens)
    return written


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", required=True, nargs="+", help="text files or glob patterns (one document per file)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--name", required=True, help="shard name prefix, e.g. 'mytext' -> mytext_train_000000.bin")
    p.add_argument("--val_fraction", type=float, default=0.05, help="share of tokens (whole documents) for val")
    p.add_argument("--shard_tokens", type=int, default=100_000_000)
    p.add_argument("--encoding", default="r50k_base", help="tiktoken encoding (r50k_base == gpt2)")
    p.add_argument("--doc_sep", default=None, help="split each file into documents on this string")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    paths = sorted({f for pattern in args.input for f in (glob.glob(pattern) or [pattern])})
    missing = [f for f in paths if not os.path.isfile(f)]
    if missing:
        p.error(f"input file(s) not found: {missing[:5]}")
    try:
        written = prepare(paths, args.out, args.name, args.val_fraction, args.shard_tokens, args.encoding,
                          args.doc_sep, args.seed)
    except EncodingUnavailable as e:
        sys.exit(f"error: {e}")
    for path in written:
        print(f"wrote {path} ({read_header(path):,} tokens)")


if __name__ == "__main__":
    main()
