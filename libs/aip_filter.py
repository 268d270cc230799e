"""AIP-160 filters and AIP-132 orderings, parsed by a lark grammar into SQLAlchemy.

A list method declares the fields a client may use (`Field`: a name, a type and the
SQL expression it stands for) and calls `compile_filter` and `parse_order_by`. The
request's text never reaches SQL: it is parsed by a grammar into a tree, each field
is looked up in the allow-list, each literal is checked against the field's type and
converted to a Python value, and SQLAlchemy binds the values as parameters. Anything
else is INVALID_ARGUMENT naming `filter` (or `order_by`) with what is wrong.

The subset of AIP-160 supported:

    filter      = expression
    expression  = factor { "AND" factor }          -- AND binds loosest, as in AIP-160
    factor      = term { "OR" term }
    term        = ("NOT" | "-") term | "(" expression ")" | field comparator value
    comparator  = "=" | "!=" | "<" | "<=" | ">" | ">="
    value       = "a string in double quotes" (\\" and \\\\ escape) | 42 | -1.5 | 2e3

Timestamps are strings in RFC 3339 (`"2025-03-01T00:00:00Z"`). Keywords are upper
case. Not supported (INVALID_ARGUMENT): the has operator `:`, wildcards, functions,
field traversal (`a.b`), bare words as values, implicit AND between terms.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal, InvalidOperation
from enum import Enum
from typing import Any

from lark import Lark, Token, Tree
from lark.exceptions import UnexpectedCharacters, UnexpectedInput, UnexpectedToken
from sqlalchemy import ColumnElement, and_, not_, or_

from libs.errors import InvalidArgument

MAX_FILTER_LENGTH = 2000
MAX_ORDER_BY_LENGTH = 500
# Parentheses and NOTs nested deeper than this are refused: no client needs them, and
# deep trees cost stack in the compiler and in the database's parser.
MAX_NESTING = 32
# Numbers beyond this magnitude are refused rather than overflowing a SQL integer.
MAX_MAGNITUDE = 10**15


class FieldKind(Enum):
    STRING = "a string"
    INTEGER = "a whole number"
    NUMBER = "a number"
    TIMESTAMP = "a timestamp"
    # One of named values (`Field.values`), written bare as AIP-160 enum values are
    # (`status = ENROLLED`) or in double quotes; only = and != compare them.
    ENUM = "one of named values"


@dataclass(frozen=True)
class Field:
    """A field clients may filter and order on, and the SQL expression it stands for."""

    name: str
    kind: FieldKind
    expression: ColumnElement[Any]
    sortable: bool = True
    # ENUM fields: each name a client may write (several may name one value) -> the stored value.
    values: Mapping[str, str] | None = None


@dataclass(frozen=True)
class OrderKey:
    field: Field
    descending: bool = False


_FILTER_GRAMMAR = r"""
    ?start: expression
    ?expression: factor (_AND factor)*
    ?factor: term (_OR term)*
    ?term: _NOT term            -> negation
         | _MINUS term          -> negation
         | _LPAR expression _RPAR -> group
         | restriction
    restriction: FIELD COMPARATOR (STRING | NUMBER | FIELD)

    _AND: "AND"
    _OR: "OR"
    _NOT: "NOT"
    _MINUS: "-"
    _LPAR: "("
    _RPAR: ")"
    COMPARATOR: "<=" | ">=" | "!=" | "<" | ">" | "="
    FIELD: /[A-Za-z_][A-Za-z0-9_]*/
    STRING: /"(?:[^"\\\x00-\x1f\x7f]|\\.)*"/
    NUMBER: /-?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?/
    %ignore /[ \t\r\n]+/
"""

_ORDER_BY_GRAMMAR = r"""
    start: order ("," order)*
    order: FIELD DIRECTION?
    FIELD: /[A-Za-z_][A-Za-z0-9_]*/
    DIRECTION: "asc" | "desc"
    %ignore /[ \t\r\n]+/
"""

_filter_parser = Lark(_FILTER_GRAMMAR, parser="lalr", lexer="contextual")
_order_by_parser = Lark(_ORDER_BY_GRAMMAR, parser="lalr", lexer="contextual")

_TERMINAL_NAMES = {
    "FIELD": "a field name",
    "STRING": "a string in double quotes",
    "NUMBER": "a number",
    "COMPARATOR": "a comparison (=, !=, <, <=, >, >=)",
    "_AND": "AND",
    "_OR": "OR",
    "_NOT": "NOT",
    "_MINUS": "'-'",
    "_LPAR": "'('",
    "_RPAR": "')'",
    "DIRECTION": "asc or desc",
    "COMMA": "','",
    "$END": "the end",
}
_CONTROL_CHARACTERS = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
_RFC_3339 = re.compile(
    r"\d{4}-\d{2}-\d{2}[Tt ]\d{2}:\d{2}:\d{2}(?:\.(?P<fraction>\d{1,9}))?(?:[Zz]|[+-]\d{2}:\d{2})"
)
_COMPARISONS: dict[str, Callable[[Any, Any], ColumnElement[bool]]] = {
    "=": lambda left, right: left == right,
    "!=": lambda left, right: left != right,
    "<": lambda left, right: left < right,
    "<=": lambda left, right: left <= right,
    ">": lambda left, right: left > right,
    ">=": lambda left, right: left >= right,
}


def compile_filter(text: str, fields: Iterable[Field], argument: str = "filter") -> ColumnElement[bool] | None:
    """The SQL condition a filter stands for; None for an empty filter (everything)."""
    if not text.strip():
        return None
    _check_text(text, argument, MAX_FILTER_LENGTH)
    tree = _parse(_filter_parser, text, argument)
    _check_nesting(tree, argument)
    return _Compiler({field.name: field for field in fields}, argument).condition(tree)


def parse_order_by(
    text: str, fields: Iterable[Field], default: Sequence[OrderKey], argument: str = "order_by"
) -> list[OrderKey]:
    """The sort keys an AIP-132 order_by names, or `default` when it is empty."""
    if not text.strip():
        return list(default)
    _check_text(text, argument, MAX_ORDER_BY_LENGTH)
    allowed = {field.name: field for field in fields if field.sortable}
    keys: list[OrderKey] = []
    for order in _parse(_order_by_parser, text, argument).children:
        assert isinstance(order, Tree)
        name = str(order.children[0])
        field = allowed.get(name)
        if field is None:
            raise InvalidArgument.single(
                argument, f"cannot order by {_quote(name)}; sortable fields: {', '.join(sorted(allowed))}"
            )
        if any(key.field.name == name for key in keys):
            raise InvalidArgument.single(argument, f"{name} appears twice")
        descending = len(order.children) > 1 and str(order.children[1]) == "desc"
        keys.append(OrderKey(field, descending))
    return keys


# parsing -----------------------------------------------------------------------------


def _check_text(text: str, argument: str, limit: int) -> None:
    if len(text) > limit:
        raise InvalidArgument.single(argument, f"must be at most {limit} characters")
    if _CONTROL_CHARACTERS.search(text):
        raise InvalidArgument.single(argument, "must not contain control characters")


def _parse(parser: Lark, text: str, argument: str) -> Tree[Token]:
    try:
        return parser.parse(text)
    except UnexpectedInput as error:
        raise InvalidArgument.single(argument, _syntax_error(error)) from None


def _syntax_error(error: UnexpectedInput) -> str:
    where = f"at position {error.column}" if error.column and error.column > 0 else "at the end"
    if isinstance(error, UnexpectedCharacters):
        if error.char == ":":
            return f"the ':' (has) operator is not supported ({where}); use = or another comparison"
        if error.char in "'":
            return f"unexpected {error.char!r} {where}; strings go in double quotes"
        return f"unexpected character {error.char!r} {where}"
    if isinstance(error, UnexpectedToken):
        token = error.token
        expected = sorted({_TERMINAL_NAMES.get(name, name) for name in error.expected})
        wanted = f"expected {' or '.join(expected)}" if expected else "the expression is incomplete"
        if token.type == "$END":
            return f"the text ends too early; {wanted}"
        hint = "; string values go in double quotes" if token.type == "FIELD" and "STRING" in error.expected else ""
        return f"unexpected {_quote(str(token))} at position {token.column}; {wanted}{hint}"
    return f"cannot be parsed {where}"


def _check_nesting(tree: Tree[Token], argument: str) -> None:
    # Iterative, so that no input can exhaust Python's stack before being refused.
    stack: list[tuple[Tree[Token] | Token, int]] = [(tree, 0)]
    while stack:
        node, depth = stack.pop()
        if not isinstance(node, Tree):
            continue
        if node.data in ("negation", "group"):
            depth += 1
            if depth > MAX_NESTING:
                raise InvalidArgument.single(argument, f"nests parentheses or NOT deeper than {MAX_NESTING} levels")
        stack.extend((child, depth) for child in node.children)


def _quote(text: str) -> str:
    return repr(text if len(text) <= 40 else text[:40] + "...")


# compiling ---------------------------------------------------------------------------


class _Compiler:
    def __init__(self, fields: Mapping[str, Field], argument: str) -> None:
        self.fields = fields
        self.argument = argument

    def condition(self, node: Tree[Token] | Token) -> ColumnElement[bool]:
        assert isinstance(node, Tree), node
        children = node.children
        if node.data == "expression":
            return and_(*(self.condition(child) for child in children))
        if node.data == "factor":
            return or_(*(self.condition(child) for child in children))
        if node.data == "negation":
            return not_(self.condition(children[0]))
        if node.data == "group":
            return self.condition(children[0])
        if node.data == "restriction":
            name, comparator, literal = (child for child in children if isinstance(child, Token))
            return self.restriction(str(name), str(comparator), literal)
        raise AssertionError(f"unexpected node {node.data}")

    def restriction(self, name: str, comparator: str, literal: Token) -> ColumnElement[bool]:
        field = self.fields.get(name)
        if field is None:
            raise self.invalid(f"unknown field {_quote(name)}; filterable fields: {', '.join(sorted(self.fields))}")
        value = self.value(field, literal)
        if field.kind is FieldKind.ENUM and comparator not in ("=", "!="):
            raise self.invalid(f"{field.name} is compared with = or != only")
        return _COMPARISONS[comparator](field.expression, value)

    def value(self, field: Field, literal: Token) -> Any:
        text = str(literal)
        if field.kind is FieldKind.ENUM:
            return self.enum_value(field, literal)
        if literal.type == "FIELD":  # a bare word is only an enum value
            raise self.invalid(f"unexpected {_quote(text)} at position {literal.column}; expected a number or "
                               "a string in double quotes; string values go in double quotes")
        if field.kind in (FieldKind.STRING, FieldKind.TIMESTAMP):
            if literal.type != "STRING":
                raise self.invalid(f"{field.name} is {field.kind.value}: compare it with a string in double quotes")
            string = _unescape(text)
            if string is None:
                raise self.invalid(f"the string {_quote(text)} has an escape other than \\\" or \\\\")
            return string if field.kind is FieldKind.STRING else self.timestamp(field, string)
        if literal.type != "NUMBER":
            raise self.invalid(f"{field.name} is {field.kind.value}: compare it with a number, not a string")
        try:
            number = Decimal(text)
        except InvalidOperation:  # pragma: no cover - the grammar only lets numbers through
            raise self.invalid(f"{_quote(text)} is not a number") from None
        if not number.is_finite() or abs(number) > MAX_MAGNITUDE:
            raise self.invalid(f"{_quote(text)} is out of range (at most {MAX_MAGNITUDE:.0e} in magnitude)")
        if field.kind is FieldKind.INTEGER:
            if number != number.to_integral_value():
                raise self.invalid(f"{field.name} is {field.kind.value}: {_quote(text)} is not one")
            return int(number)
        return float(number)

    def enum_value(self, field: Field, literal: Token) -> str:
        values = field.values or {}
        name = _unescape(str(literal)) if literal.type == "STRING" else str(literal)
        if name is None or name not in values:
            raise self.invalid(f"{field.name} is one of {', '.join(sorted(values))}, not {_quote(str(literal))}")
        return values[name]

    def timestamp(self, field: Field, text: str) -> datetime:
        match = _RFC_3339.fullmatch(text)
        fraction = (match.group("fraction") or "") if match else ""
        if match is None or fraction[6:].strip("0"):
            raise self.invalid(
                f"{field.name} is {field.kind.value}: write it in RFC 3339 with at most microseconds, "
                'e.g. "2025-03-01T09:30:00Z"'
            )
        try:
            moment = datetime.fromisoformat(text.upper().replace(" ", "T"))
            # Stored times are UTC; SQLite keeps them without an offset, so compare in
            # UTC. A moment at the calendar's edge may have no UTC time in Python's
            # range ("9999-12-31T23:59:59-23:59"): OverflowError.
            return moment.astimezone(UTC)
        except ValueError:
            raise self.invalid(f"{_quote(text)} is not a valid date and time") from None
        except OverflowError:
            raise self.invalid(f"{_quote(text)} is out of range: in UTC it falls outside years 1 to 9999") from None

    def invalid(self, description: str) -> InvalidArgument:
        return InvalidArgument.single(self.argument, description)


def _unescape(quoted: str) -> str | None:
    body = quoted[1:-1]
    result: list[str] = []
    index = 0
    while index < len(body):
        char = body[index]
        if char == "\\":
            following = body[index + 1]
            if following not in "\"\\":
                return None
            result.append(following)
            index += 2
        else:
            result.append(char)
            index += 1
    return "".join(result)
