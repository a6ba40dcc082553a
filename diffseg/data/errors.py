"""The one exception the data layer raises for bad input."""
from __future__ import annotations

from collections.abc import Iterable


class DataError(ValueError):
    """Bad data or data configuration.

    The message names the file (or config key), what was expected and what was found. When several
    problems are found they are collected into ONE exception: ``problems`` holds them, and the message
    lists them one per line under ``message``.
    """

    def __init__(self, message: str, problems: Iterable[str] = ()) -> None:
        self.problems = [str(p) for p in problems]
        text = message.rstrip()
        if self.problems:
            text += "\n" + "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(text)

    @classmethod
    def raise_if(cls, problems: list[str], message: str) -> None:
        """Raise one DataError listing ``problems`` when there are any."""
        if problems:
            raise cls(f"{message} ({len(problems)} problem{'s' if len(problems) > 1 else ''}):",
                      problems)
