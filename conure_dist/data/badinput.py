"""Bad input rows: stop with file and line by default, or skip and count with ``--skip-bad``.

Converters never drop data silently. Each problem goes through :meth:`BadRows.report`, which
either raises :class:`BadInputError` naming ``file:line`` or counts the row under its reason.

Example::

    bad = BadRows(skip=False)
    bad.report("u.data", 17, "non-integer rating", "'x'")   # raises BadInputError
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field


class BadInputError(ValueError):
    """Raw input that a converter cannot use; the message starts with ``file:line``."""


@dataclass
class BadRows:
    """Collects skipped rows per (file, reason) when ``skip`` is set."""

    skip: bool = False
    counts: Counter = field(default_factory=Counter)  # (file, reason) -> rows
    first_line: dict = field(default_factory=dict)  # (file, reason) -> first line number

    def report(self, path: str, line: int | None, reason: str, detail: str = "") -> None:
        where = f"{path}:{line}" if line is not None else path
        if not self.skip:
            suffix = f": {detail}" if detail else ""
            raise BadInputError(f"{where}: {reason}{suffix} (use --skip-bad to skip such rows)")
        key = (path, reason)
        self.counts[key] += 1
        self.first_line.setdefault(key, line)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def summary(self) -> str:
        """One line per (file, reason), for the prepare command's output."""
        if not self.counts:
            return "skipped rows: none"
        lines = [f"skipped rows: {self.total}"]
        for (path, reason), n in sorted(self.counts.items()):
            lines.append(f"  {n:>8}  {reason}  ({path}, first at line {self.first_line[(path, reason)]})")
        return "\n".join(lines)


def convert_from(raw: str, convert):
    """``convert(local_dir)`` on the raw inputs at ``raw`` (a directory, or a URI downloaded to a
    temporary directory first); bad input is reported under ``raw``, not the temporary copy."""
    from conure_dist import storage

    with storage.local_copy(raw) as local:
        try:
            return convert(local)
        except BadInputError as e:
            raise BadInputError(str(e).replace(local, raw.rstrip("/"))) from None
