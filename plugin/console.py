"""The installed commands' entry points: ``kubectl-chaos`` and ``kubectl_complete-chaos``.

They set Python's cyclic garbage collector for a short-lived command before anything else is
loaded. With the default threshold (a collection every 700 new container objects) loading the
command line and a backend (click, ssl, json, our records) sets off some forty collections that
find next to nothing to free: 3.5-4.5 ms of a cluster-mode run of ~90 ms (A/B of the imports
alone, 60 starts each). At 50,000 it runs a handful of times; the collector stays on, so a long
``top -w`` still collects its own garbage, only in larger batches.

This module imports nothing else at its top: everything the command loads is loaded after the
threshold is set. The Python API (:mod:`plugin.api`) leaves the host process's collector alone.
"""

from __future__ import annotations

import gc

# New container objects between two youngest-generation collections (CPython's default: 700).
GC_THRESHOLD_OBJECTS = 50_000


def _load_cli():
    _, older, oldest = gc.get_threshold()
    gc.set_threshold(GC_THRESHOLD_OBJECTS, older, oldest)
    from plugin import cli

    return cli


def main() -> None:
    """``kubectl-chaos``: :func:`plugin.cli.console_main`."""
    _load_cli().console_main()


def complete() -> None:
    """``kubectl_complete-chaos``: :func:`plugin.cli.complete_main`."""
    _load_cli().complete_main()
