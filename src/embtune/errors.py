"""Errors that reach the user as one clear line each (exit status 2), never as a traceback."""

from __future__ import annotations

from dataclasses import dataclass

MAX_PROBLEMS = 20


@dataclass(frozen=True)
class InputProblem:
    """One problem in the user's input, located as precisely as we can."""

    file: str
    line: int | None
    field: str | None
    message: str
    # "file:line" of the rejected row this problem follows from (a judgement whose query was
    # rejected), None for a problem of its own.
    follows: str | None = None

    def __str__(self) -> str:
        where = self.file if self.line is None else f"{self.file}:{self.line}"
        return f"{where}: {self.reason()}"

    def reason(self) -> str:
        """The message with its field, without the place: ``field 'x': must be ...``."""
        what = f"field '{self.field}': " if self.field else ""
        return f"{what}{self.message}"

    def to_json(self) -> dict[str, object]:
        """One line of a rejected-rows report: file, line, field, reason (and follows)."""
        out: dict[str, object] = {
            "file": self.file,
            "line": self.line,
            "field": self.field,
            "reason": self.message,
        }
        if self.follows:
            out["follows"] = self.follows
        return out


def shorten(value: object, limit: int = 60) -> str:
    """repr() of a value from the user's file, cut so a huge one cannot flood the message."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[: limit - 6]}...{text[-3:]}"


class UsageError(Exception):
    """A bad option or an input the user must fix; the CLI prints it and exits 2."""

    def lines(self) -> list[str]:
        return [str(self)]


class TrainingStopped(Exception):
    """Training could not go on (e.g. the loss stayed NaN); the CLI prints it and exits 3.

    Unlike a UsageError this comes after work was done: the message says what was saved.
    """

    exit_status = 3

    def lines(self) -> list[str]:
        return [str(self)]


class InputError(UsageError):
    """One or more problems found while reading input files (up to MAX_PROBLEMS at once)."""

    def __init__(self, problems: list[InputProblem], truncated: bool = False) -> None:
        self.problems = problems
        self.truncated = truncated
        super().__init__("\n".join(self.lines()))

    def lines(self) -> list[str]:
        out = [str(p) for p in self.problems]
        if self.truncated:
            out.append(f"(stopped after {MAX_PROBLEMS} problems; fix these and run again)")
        return out


class ProblemCollector:
    """Gathers problems during a read pass so the user sees many at once, not one per run.

    With ``skip_bad_rows``, a problem confined to one row (reported through :meth:`reject`)
    leaves that row out instead of refusing the input; every such problem is kept, without the
    limit, in ``rejected`` for the report. Problems with a whole file (unreadable, empty, not
    UTF-8 throughout, missing) still refuse.
    """

    def __init__(self, limit: int = MAX_PROBLEMS, skip_bad_rows: bool = False) -> None:
        self.problems: list[InputProblem] = []
        self.limit = limit
        self.truncated = False
        self.skip_bad_rows = skip_bad_rows
        self.rejected: list[InputProblem] = []

    def add(self, file: str, line: int | None, field: str | None, message: str) -> None:
        """A problem that refuses the input (at most ``limit`` are kept)."""
        if len(self.problems) >= self.limit:
            self.truncated = True
            return
        self.problems.append(InputProblem(file, line, field, message))

    def reject(
        self,
        file: str,
        line: int | None,
        field: str | None,
        message: str,
        follows: str | None = None,
    ) -> None:
        """A problem of one row: the row is left out with ``skip_bad_rows``, else as :meth:`add`.

        ``follows`` names the rejected row ("file:line") this problem is a consequence of.
        """
        if self.skip_bad_rows:
            self.rejected.append(InputProblem(file, line, field, message, follows))
        else:
            self.add(file, line, field, message)

    @property
    def full(self) -> bool:
        return len(self.problems) >= self.limit

    def raise_if_any(self) -> None:
        if self.problems:
            raise InputError(self.problems, self.truncated)
