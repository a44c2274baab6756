"""Hydra finds sweepers only in the `hydra_plugins` namespace package: this registers asr.search's.
(`hydra/sweeper=optuna`, conf/hydra/sweeper/optuna.yaml; the code and its documentation: asr/search.py)"""

from asr import search


class OptunaSweeper(search.OptunaSweeper):
    pass
