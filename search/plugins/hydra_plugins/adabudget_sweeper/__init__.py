"""The adabudget Hydra sweeper plugin: ``adabudget train -m hydra/sweeper=adabudget ...``.

Hydra finds it by scanning the ``hydra_plugins`` namespace package (this folder's parent has no
``__init__.py``); pyproject.toml maps that package from ``search/plugins/hydra_plugins``. The
implementation and its design notes are in ``search/sweeper.py``.
"""
