"""The plugin's errors. Each carries a one-line message and the exit status the CLI uses.

Exit statuses: 0 done, 1 the request failed (backend, agent, cluster), 2 usage error (bad flag or
value; nothing was sent).
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2


def one_line(text: str) -> str:
    """Collapse ``text`` to one line: the CLI prints every error as exactly one line."""
    return " ".join(part.strip() for part in str(text).splitlines() if part.strip())


class ChaosError(Exception):
    """Base of the plugin's errors; ``str()`` is the one-line message printed to stderr."""

    exit_code = EXIT_FAILED

    def __init__(self, message: str) -> None:
        super().__init__(one_line(message))

    @property
    def message(self) -> str:
        return str(self)


class UsageError(ChaosError):
    """A flag or value the plugin cannot accept; raised before anything is sent (exit 2)."""

    exit_code = EXIT_USAGE


class BackendError(ChaosError):
    """The backend (agent or cluster) could not carry out the request (exit 1)."""

    exit_code = EXIT_FAILED
