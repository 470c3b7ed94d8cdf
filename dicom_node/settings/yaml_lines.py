"""Configuration YAML with line numbers, and validation errors as ``FILE:LINE: key.path: reason``.

The settings models (:mod:`dicom_node.settings`) say what is valid; this
module finds where in the operator's file a problem is and says it in their
terms: the dotted key path as written, the line of that key, and a reason.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import yaml
from pydantic_core import ErrorDetails

from dicom_node.errors import ConfigError

#: Largest configuration file accepted (a real one is a few kB).
MAX_DOCUMENT_BYTES = 1024 * 1024
#: Most nodes the document may expand to, counting every alias at its full size: a few
#: aliases are fine, an alias bomb (aliases of aliases, 10^9 leaves) is refused before it is walked.
MAX_EXPANDED_NODES = 100_000


def parse_yaml(text: str, source: str) -> tuple[yaml.Node | None, Any]:
    """Compose (for line numbers) and construct (for values) one YAML document.

    Raises
    ------
    ConfigError
        The text is over :data:`MAX_DOCUMENT_BYTES`, expands (through aliases)
        to more than :data:`MAX_EXPANDED_NODES` nodes, or is not YAML.
    """
    size = len(text.encode("utf-8", "surrogatepass"))
    if size > MAX_DOCUMENT_BYTES:
        raise ConfigError(f"{source}: the configuration is {size} bytes; at most {MAX_DOCUMENT_BYTES} are read "
                          "(is this the right file?)")
    loader = yaml.SafeLoader(text)
    try:
        root = loader.get_single_node()
        if root is not None:
            _check_expansion(root, source)
        data = loader.construct_document(root) if root is not None else None
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"{source}:{mark.line + 1}" if mark is not None else source
        detail = f"{exc.problem} ({exc.context})" if exc.context else str(exc.problem)
        raise ConfigError(f"{where}: YAML syntax error: {detail}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{source}: YAML syntax error: {exc}") from None
    finally:
        loader.dispose()
    return root, data


def _check_expansion(root: yaml.Node, source: str) -> None:
    """Refuse a document whose aliases expand it beyond :data:`MAX_EXPANDED_NODES` nodes.

    PyYAML shares an aliased node instead of copying it, so composing is cheap;
    what explodes is every walk over the values (validation, duplicate keys).
    The expanded size is counted once per distinct node (memoised), so the
    check itself is linear in the document.
    """
    sizes: dict[int, int] = {}
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:  # post-order without recursion: a deep document cannot exhaust the stack
        node, children_done = stack.pop()
        if id(node) in sizes:
            continue
        if isinstance(node, yaml.ScalarNode):
            sizes[id(node)] = 1
            continue
        children: list[yaml.Node] = (
            [n for pair in node.value for n in pair] if isinstance(node, yaml.MappingNode) else list(node.value))
        if children_done:
            total = 1 + sum(sizes[id(child)] for child in children)
            if total > MAX_EXPANDED_NODES:
                raise ConfigError(f"{source}:{node.start_mark.line + 1}: this part of the configuration expands "
                                  f"to more than {MAX_EXPANDED_NODES} values through YAML aliases "
                                  "(an alias bomb?); write it out instead")
            sizes[id(node)] = total
        else:
            stack.append((node, True))
            stack.extend((child, False) for child in children if id(child) not in sizes)


def duplicate_keys(root: yaml.Node) -> list[tuple[int, str]]:
    """Keys given twice in one mapping (PyYAML would silently keep the last)."""
    found: list[tuple[int, str]] = []
    seen_nodes: set[int] = set()
    stack = [root]
    while stack:
        node = stack.pop()
        if id(node) in seen_nodes:
            continue
        seen_nodes.add(id(node))
        if isinstance(node, yaml.MappingNode):
            first: dict[str, int] = {}
            for key, value in node.value:
                line = key.start_mark.line + 1
                if isinstance(key, yaml.ScalarNode):
                    if key.value in first:
                        found.append((line, f"duplicate key {key.value!r} (first at line {first[key.value]})"))
                    first.setdefault(key.value, line)
                stack.append(value)
        elif isinstance(node, yaml.SequenceNode):
            stack.extend(node.value)
    return sorted(found)


def _locate(root: yaml.Node, loc: Sequence[str | int]) -> tuple[tuple[str | int, ...], int | None]:
    """Map a pydantic error location to the key path the user wrote and its YAML line.

    Pydantic adds union tags (``models.x.python.callable``) and ``[key]``
    markers, and conditions are normalised (``Modality: CT`` is validated as
    ``{equals: CT}``); such elements are dropped.  Keys that are missing from
    the document (``Field required``) are kept, at the line of their parent.
    """
    node: yaml.Node | None = root
    path: list[str | int] = []
    line: int | None = root.start_mark.line + 1
    for element in loc:
        if element == "[key]" or (isinstance(element, str) and element.startswith("~")):
            continue  # dict-key marker, or a tag of the rule-condition union (see WhenValue)
        if len(path) == 2 and path[0] in ("models", "destinations") and element in (
            "dimse", "dicomweb", "builtin", "python", "monai_bundle", "torchscript", "chain"
        ):
            continue  # discriminated-union tag
        if isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                if isinstance(key, yaml.ScalarNode) and key.value == str(element):
                    path.append(element)
                    line = key.start_mark.line + 1
                    node = value
                    break
            else:
                path.append(element)
                node = None
        elif isinstance(node, yaml.SequenceNode):
            if isinstance(element, int) and 0 <= element < len(node.value):
                node = node.value[element]
                path.append(element)
                line = node.start_mark.line + 1
            # a str element here is a normalisation artefact ({in: [...]} from a list)
        elif isinstance(node, yaml.ScalarNode):
            break  # the value itself is what is wrong
        else:
            path.append(element)  # below a missing key
    return tuple(path), line


def dotted(path: Sequence[str | int]) -> str:
    text = ""
    for element in path:
        text += f"[{element}]" if isinstance(element, int) else (f".{element}" if text else str(element))
    return text or "(top level)"


def format_problem(root: yaml.Node, source: str, loc: Sequence[str | int], msg: str) -> str:
    path, line = _locate(root, loc)
    where = f"{source}:{line}" if line is not None else source
    return f"{where}: {dotted(path)}: {msg}"


def describe(error: ErrorDetails, root: yaml.Node, source: str, operators: Sequence[str] = ()) -> str:
    """One line for one pydantic error, in the node's words."""
    kind = error["type"]
    loc = tuple(error["loc"])
    ctx = error.get("ctx") or {}
    msg = error["msg"]
    if kind == "extra_forbidden":
        path, _ = _locate(root, loc)
        if loc and loc[-2:-1] == ("~cond",) or (len(loc) > 1 and loc[-2] == "not" and "~cond" in loc):
            msg = f"unknown operator (allowed: {', '.join(operators)})"
        else:
            msg = "unknown key (check its spelling and indentation)"
    elif kind == "missing":
        msg = "required key is missing"
    elif kind == "union_tag_invalid":
        msg = f"unknown type {ctx.get('tag')!r} (valid: {ctx.get('expected_tags')})"
        loc = (*loc, "type")
    elif kind == "union_tag_not_found":
        if isinstance(error.get("input"), Mapping):
            msg = "required key 'type' is missing (valid: 'builtin', 'python', 'monai_bundle', 'torchscript', 'chain')"
        else:
            msg = "expected a mapping of settings"
    elif kind == "value_error":
        msg = str(ctx.get("error", msg))
    elif kind == "assertion_error":
        msg = msg.removeprefix("Assertion failed, ")
    elif kind in ("int_type", "float_type", "int_from_float") and isinstance(error.get("input"), bool):
        word = "yes/true/on" if error["input"] else "no/false/off"
        msg = (f"expected a number, got a boolean: YAML reads an unquoted {word} as a boolean, "
               "never as a number; write the number")
    elif kind in ("int_type", "float_type") and isinstance(error.get("input"), str):
        msg = f"expected a number, got the text {error['input']!r} (write it without quotes)"
    elif kind == "bool_type":
        msg = f"expected true or false (got {error.get('input')!r})"
    else:
        value = error.get("input")
        if isinstance(value, (str, int, float)) and len(repr(value)) <= 80:
            msg = f"{msg} (got {value!r})"
    return format_problem(root, source, loc, msg)
