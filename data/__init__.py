# data/ is both a folder of scripts (python data/fineweb.py, python data/prepare.py) and the
# package that holds the shard format (data.shards), shared by the scripts and the trainer.
