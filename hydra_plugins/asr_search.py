"""Hydra finds sweepers only in the `hydra_plugins` namespace package: this registers asr.run.search's.
(`hydra/sweeper=optuna`, conf/hydra/sweeper/optuna.yaml; the code and its documentation: asr/run/search.py)"""

from asr.run import search


class OptunaSweeper(search.OptunaSweeper):
    pass
