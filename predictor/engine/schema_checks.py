"""Checks a JSON schema must pass before it is compiled: its own validity, and limits on what it may cost.

Hostile schemas are refused here with a ``ValueError`` that names the problem, without recursing over them: a
depth limit, ``$schema`` of the right type (jsonschema itself raises ``TypeError`` on a list), the metaschema,
bounded ``multipleOf`` (llguidance's divisibility automaton), and ``$ref`` loops that never write anything.
"""

from __future__ import annotations

from decimal import Decimal
from typing import Any
from urllib.parse import unquote

# Hostile schemas. A schema nested deeper than this is refused before anything recurses over it (jsonschema's checker
# recurses ~7 Python frames per level and overflows at ~150; llguidance's JSON reader stops at 128).
MAX_SCHEMA_DEPTH = 64
# Groups a pattern may nest: Python's regex parser recurses per group, so how deep it can go depends on the process's
# recursion limit, which torch.compile raises (inductor sets it to 2,000): counted here instead, the same everywhere.
MAX_PATTERN_DEPTH = 100
# llguidance builds a divisibility automaton per distinct multipleOf whose cost grows with the divisor's digits read as
# an integer (0.03 s for 10,007, 0.6 s for 99,991, 193 s for 9,999,991): their sum over a schema is bounded.
MAX_MULTIPLE_OF = 50_000


def check_schema(schema: Any) -> None:
    """A JSON schema must itself be valid (draft 2020-12 unless it says otherwise), and within what this server
    compiles: at most ``MAX_SCHEMA_DEPTH`` levels deep and ``MAX_MULTIPLE_OF`` of multipleOf. ``ValueError`` names
    the problem. The checks that jsonschema cannot do on malformed input (``$schema`` not a string) come first."""
    import jsonschema

    if not isinstance(schema, dict):
        raise ValueError("a JSON schema must be an object")
    depth, multiples = _shape(schema)
    if depth > MAX_SCHEMA_DEPTH:
        raise ValueError(f"the schema is nested more than {MAX_SCHEMA_DEPTH} levels deep")
    if "$schema" in schema and not isinstance(schema["$schema"], str):
        raise ValueError(f"$schema must be a string (a metaschema URI), not {type(schema['$schema']).__name__}")
    try:
        jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator).check_schema(schema)
    except jsonschema.SchemaError as exc:
        where = "/".join(str(p) for p in exc.absolute_path)
        raise ValueError(f"not a valid JSON schema{f' at {where}' if where else ''}: {exc.message}") from None
    except RecursionError:  # a pattern nested hundreds of groups deep: Python's regex parser recurses per group
        raise ValueError("the schema has a pattern nested too deeply to check") from None
    units = sum(_multiple_of_units(value) for value in multiples)
    if units > MAX_MULTIPLE_OF:
        raise ValueError(
            f"its multipleOf values are too fine-grained to compile here: {', '.join(map(str, sorted(multiples)[:5]))} "
            f"(their digits read as integers sum to {units:,}; at most {MAX_MULTIPLE_OF:,})"
        )


def _shape(schema: dict) -> tuple[int, set]:
    """(nesting depth, stopping past ``MAX_SCHEMA_DEPTH``; the distinct numeric multipleOf values), without recursion."""
    deepest, multiples = 0, set()
    stack: list[tuple[Any, int]] = [(schema, 1)]
    while stack:
        value, depth = stack.pop()
        deepest = max(deepest, depth)
        if depth > MAX_SCHEMA_DEPTH:
            break
        if isinstance(value, dict):
            patterns = [value["pattern"]] if isinstance(value.get("pattern"), str) else []
            if isinstance(value.get("patternProperties"), dict):
                patterns += list(value["patternProperties"])
            if any(_group_depth(p) > MAX_PATTERN_DEPTH for p in patterns):
                raise ValueError("the schema has a pattern nested too deeply to check")
            multiple = value.get("multipleOf")
            if isinstance(multiple, int | float) and not isinstance(multiple, bool):
                multiples.add(multiple)
            stack.extend((child, depth + 1) for child in value.values() if isinstance(child, dict | list))
        elif isinstance(value, list):
            stack.extend((child, depth + 1) for child in value if isinstance(child, dict | list))
    return deepest, multiples


def _group_depth(pattern: str) -> int:
    """How deeply ``pattern``'s groups nest (escaped parentheses and ones inside [...] not counted)."""
    depth = deepest = 0
    escaped = in_class = False
    for char in pattern:
        if escaped:
            escaped = False
        elif char == "\\":
            escaped = True
        elif in_class:
            in_class = char != "]"
        elif char == "[":
            in_class = True
        elif char == "(":
            depth += 1
            deepest = max(deepest, depth)
        elif char == ")":
            depth = max(depth - 1, 0)
    return deepest


def _multiple_of_units(value: float) -> int:
    """The integer llguidance's divisibility automaton is built for: the value itself if integral, else its digits
    (0.25 → 25). Non-finite values count as too many (jsonschema lets ``1e400``, read as infinity, through)."""
    number = Decimal(repr(value)) if isinstance(value, float) else Decimal(value)
    if not number.is_finite():
        return MAX_MULTIPLE_OF + 1
    if number == number.to_integral_value():
        return int(number)
    return int(number.scaleb(-number.as_tuple().exponent))


def ref_cycle(schema: Any, through: tuple[str, ...] = ("allOf", "anyOf", "oneOf")) -> list[str] | None:
    """A loop of local ``$ref``s (and members of the combinators ``through``) that returns to a subschema without
    any output in between, as JSON pointers (``['#', '#/$defs/a', '#']``); None if there is none. Iterative."""
    nodes: dict[str, dict] = {}
    stack: list[tuple[str, Any]] = [("#", schema)]
    while stack:
        pointer, value = stack.pop()
        if isinstance(value, dict):
            nodes[pointer] = value
            stack.extend((f"{pointer}/{_escape(str(key))}", child) for key, child in value.items())
        elif isinstance(value, list):
            stack.extend((f"{pointer}/{index}", child) for index, child in enumerate(value))

    def in_place(pointer: str) -> list[str]:
        """The subschemas that apply at the same place in the output as ``pointer``'s."""
        node = nodes[pointer]
        targets = []
        ref = node.get("$ref")
        if isinstance(ref, str) and ref.startswith("#"):
            target = "#" + unquote(ref[1:]).rstrip("/")
            if target in nodes:
                targets.append(target)
        for key in through:
            if isinstance(node.get(key), list):
                targets += [f"{pointer}/{key}/{index}" for index, child in enumerate(node[key]) if isinstance(child, dict)]
        return targets

    state: dict[str, int] = {}  # 1: on the current path, 2: done
    for root in nodes:
        if root in state:
            continue
        path, iterators = [root], [iter(in_place(root))]
        state[root] = 1
        while path:
            target = next(iterators[-1], None)
            if target is None:
                state[path.pop()] = 2
                iterators.pop()
            elif state.get(target) == 1:
                return path[path.index(target) :] + [target]
            elif target not in state:
                state[target] = 1
                path.append(target)
                iterators.append(iter(in_place(target)))
    return None


def _escape(key: str) -> str:
    """A JSON pointer token (RFC 6901)."""
    return key.replace("~", "~0").replace("/", "~1")
