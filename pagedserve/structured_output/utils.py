"""Constraint helpers shared by the backends."""

from __future__ import annotations

import json
import re

# An EBNF rule definition ("name ::= ..."); Lark writes "name: ...".
_EBNF_RULE = re.compile(r"^\s*[A-Za-z_][\w-]*\s*::=", re.MULTILINE)


def grammar_is_likely_lark(grammar: str) -> bool:
    """EBNF (GBNF, xgrammar's dialect) defines rules with `::=`; anything else is taken as Lark."""
    return _EBNF_RULE.search(grammar) is None


def choice_as_grammar(choice: list[str]) -> str:
    """An EBNF grammar whose only sentences are the choices.

    JSON string escapes (\\n, \\", \\\\, \\uXXXX) are EBNF string escapes too."""
    return "root ::= " + " | ".join(json.dumps(c, ensure_ascii=False) for c in choice)
