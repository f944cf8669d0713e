"""kubectl-chaos: the ``kubectl-chaos`` command (:mod:`plugin.cli`) and its Python API (:mod:`plugin.api`).

``from plugin import limit`` works too; :mod:`plugin.api` is imported only when asked for, so the
command does not pay for it.
"""

_API = ("limit", "apply", "reset", "status", "Experiment", "ApplyFailed", "RevertFailed")


def __getattr__(name: str):
    if name in _API:
        from plugin import api

        return getattr(api, name)
    raise AttributeError(f"module 'plugin' has no attribute {name!r}")
