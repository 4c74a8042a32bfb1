"""
Download GPT-2-tokenised FineWeb shards from the Hugging Face hub (huggingface_hub).

    python data/fineweb.py --train_shards 8          # FineWeb10B: val + 8 x 100M train tokens
    python data/fineweb.py --edu --train_shards 8    # FineWeb-Edu10B

Shards land in data/fineweb10B/ (or data/finewebedu10B/), the paths the configs read.
The val shard is always fetched. Files already present and valid are not fetched again.
Offline: copy the .bin files into that folder, or pass --source DIR holding them, or
point HF_ENDPOINT at a mirror of the hub.
"""

import argparse
import os
import shutil
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from data.shards import ShardError, read_header  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
DATASETS = {  # name -> (hub dataset, file prefix, number of train shards, local folder)
    "fineweb": ("kjj0/fineweb10B-gpt2", "fineweb", 103, "fineweb10B"),
    "finewebedu": ("kjj0/finewebedu10B-gpt2", "finewebedu", 99, "finewebedu10B"),
}


def shard_names(prefix, train_shards):
    """The val shard (index 0) and train shards 1..N, named as on the hub."""
    return [f"{prefix}_val_000000.bin"] + [f"{prefix}_train_{i:06d}.bin" for i in range(1, train_shards + 1)]


def is_valid_shard(path):
    try:
        read_header(path)
        return True
    except ShardError:
        return False


def fetch(name, repo_id, local_dir, source=None):
    """Bring one shard into local_dir from `source` (a folder) or the hub; validate it."""
    path = os.path.join(local_dir, name)
    if os.path.exists(path) and is_valid_shard(path):
        return path
    try:
        if source:
            shutil.copyfile(os.path.join(source, name), path + ".part")
            os.replace(path + ".part", path)
        else:
            from huggingface_hub import hf_hub_download
            hf_hub_download(repo_id=repo_id, filename=name, repo_type="dataset", local_dir=local_dir)
    except Exception as e:  # network, auth, missing file: all end the same way for the user
        where = source or f"https://huggingface.co/datasets/{repo_id}"
        raise SystemExit(
            f"error: could not fetch {name} from {where}: {type(e).__name__}: {e}\n"
            f"Without internet, copy {name} into {local_dir}/ yourself, pass --source DIR holding it, "
            "or set HF_ENDPOINT to a reachable mirror of the hub.") from None
    read_header(path)  # a truncated or wrong download fails here, naming the file
    return path


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--train_shards", type=int, default=8, help="number of ~100M-token train shards")
    p.add_argument("--edu", action="store_true", help="FineWeb-Edu instead of FineWeb")
    p.add_argument("--local_dir", help="destination (default data/fineweb10B or data/finewebedu10B)")
    p.add_argument("--source", help="copy from this folder instead of the hub")
    args = p.parse_args(argv)
    repo_id, prefix, n_max, folder = DATASETS["finewebedu" if args.edu else "fineweb"]
    if not 0 <= args.train_shards <= n_max:
        p.error(f"--train_shards must be in [0, {n_max}] for {repo_id}")
    local_dir = args.local_dir or os.path.join(HERE, folder)
    os.makedirs(local_dir, exist_ok=True)
    for name in shard_names(prefix, args.train_shards):
        path = fetch(name, repo_id, local_dir, args.source)
        print(f"{path}: {read_header(path):,} tokens")


if __name__ == "__main__":
    main()
