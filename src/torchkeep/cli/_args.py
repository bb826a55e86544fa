"""Checks of option values the parser cannot make, each failing with the option's name."""
from __future__ import annotations

import re

from torchkeep.errors import TorchkeepError


def check_regex(pattern: str, option: str) -> re.Pattern:
    """``pattern`` compiled; an error naming ``option`` when it is not a regular expression."""
    try:
        return re.compile(pattern)
    except re.error as e:
        raise TorchkeepError(f"{option} {pattern!r} is not a valid regular expression: {e}",
                             hint="escape ( ) [ ] . * + ? with a backslash, and quote it for the shell") from None


def check_rules(rules: list[str], option: str) -> None:
    """Each ``REGEX=REPL`` rule has an '=' and a regular expression that compiles."""
    for rule in rules:
        pattern, eq, _ = rule.partition("=")
        if not eq:
            raise TorchkeepError(f"{option} {rule!r} has no '='",
                                 hint=f"write {option} 'REGEX=REPLACEMENT'")
        check_regex(pattern, option)


def positive(option: str, value: int, *, zero_ok: bool = False) -> int:
    """``value`` when it is > 0 (or >= 0 with ``zero_ok``); an error naming ``option`` otherwise."""
    if value < 0 or (value == 0 and not zero_ok):
        raise TorchkeepError(f"{option} must be {'>= 0' if zero_ok else '> 0'}, got {value}",
                             hint=f"see the command's --help for {option}")
    return value
