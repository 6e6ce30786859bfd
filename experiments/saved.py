"""A run's saved config as an experiment: train (or keep training) from any `config.json`.

    python -m paxlike.train --config=experiments/saved.py:runs/btm/experts/a_to_l/config.json \
        --workdir=runs/btm/experts/a_to_l [--config.steps=400 ...]

The argument after the colon is the path of a `config.json` that a run wrote into its workdir
(local or gs://). `python -m paxlike.btm branch` prints such a command for every expert it makes:
an expert is an ordinary run, and this is how it runs anywhere on its own. Overrides work as with
any experiment file; the run then writes the overridden config back into its workdir's
config.json, so the next run of the same command sees it.
"""

import json

import ml_collections


def get_config(path: str = ""):
    if not path:
        raise ValueError("experiments/saved.py needs the config file: "
                         "--config=experiments/saved.py:RUN_DIR/config.json")
    from paxlike import storage
    try:
        text = storage.read_text(path)
    except FileNotFoundError:
        raise FileNotFoundError(2, "no such config.json", path) from None
    return ml_collections.ConfigDict(json.loads(text))
