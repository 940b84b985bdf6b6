"""What a YAML document holds, and on which line each of its values is: read safely and within bounds.

The document is read from the parser's events with the safe constructor's
own table (a tag like ``!!python/object`` is refused, never constructed),
and a document may come from someone else's repository, so reading it is
bounded: aliases may copy at most `MAX_ALIAS_VALUES` values (or
`ALIAS_RATIO` times the values written out, if more; a "billion laughs"
document is refused at its alias), and values nest at most `MAX_DEPTH`
deep. A document past a bound, or not YAML at all, raises `ManifestError`.
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, NoReturn

import yaml

from ..errors import ManifestError, Problem
from .problems import YamlPath, field_name, shorten

__all__ = ["ALIAS_RATIO", "MAX_ALIAS_VALUES", "MAX_DEPTH", "LocatedYaml", "Skimmed"]

MAX_ALIAS_VALUES = 1_000_000
"""The most values YAML aliases may copy, or `ALIAS_RATIO` times the values written out if more."""
ALIAS_RATIO = 10
MAX_DEPTH = 50
"""The deepest a value may nest (a manifest needs a handful); deeper would exhaust Python's stack."""

# libyaml's loader where PyYAML was built with it: the same safe constructor, ~10x faster.
_SafeLoader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class LocatedYaml:
    """A YAML document turned into plain data, remembering each value's line.

    Built from the parser's events, not from a composed node tree: a tree of
    a 100,000-job file holds millions of nodes and marks at once, where the
    events pass one at a time. The list under the top-level key `stream`
    (a manifest's ``jobs``) is not kept at all: it is skimmed (counted) on
    the first read and `items` parses it again one item at a time, so a long
    list costs no memory past the item at hand. (A list that uses YAML
    anchors or aliases is kept whole instead.)

    Problems that do not stop the reading (a duplicate key, a key that is not
    text, a bad merge) are passed on, not raised: those of the first read are
    kept in `found`, those inside a streamed list go to `items`'s report.
    """

    def __init__(self, text: str, file: str, *, stream: str | None = None) -> None:
        self.file = file
        self.text = text
        self.lines: dict[YamlPath, int] = {}
        """The line of each value read and kept (a streamed list's items only while `items` is at them)."""
        self.found: list[Problem] = []
        self._report: Callable[[Problem], None] = self.found.append
        self._anchors: dict[str, _Anchor] = {}
        self._stream = stream
        # The first characters an implicit resolver looks at (bool, int, float, null…): a plain scalar starting
        # with any other is a string. Every character counts as one when a resolver matches anything.
        resolvers = _SafeLoader.yaml_implicit_resolvers
        wildcard = None in resolvers or bool(_SafeLoader.yaml_path_resolvers)
        self._resolved_first: _Everything | frozenset[str] = _Everything() if wildcard else frozenset(resolvers)
        try:
            try:
                self.data = self._read()
            except _CannotStream:
                self._stream = None
                self.lines.clear()
                self.found.clear()
                self._anchors.clear()
                self.data = self._read()
        except yaml.YAMLError as exc:
            raise _invalid_yaml(file, text, exc) from exc

    def _read(self) -> Any:
        # What bounds alias expansion: values built (aliases at their expanded size), values
        # written out in the file, values copied by aliases, and the deepest path reached.
        self._built = self._written = self._copied = self._deepest = 0
        loader = _SafeLoader(self.text)
        try:
            loader.get_event()  # stream start
            if loader.check_event(yaml.StreamEndEvent):
                return None
            loader.get_event()  # document start
            data = self._value(loader, ())
            loader.get_event()  # document end
            if not loader.check_event(yaml.StreamEndEvent):
                mark = loader.peek_event().start_mark
                raise yaml.composer.ComposerError(
                    "expected a single document", None, "but found another document", mark
                )
            return data
        finally:
            loader.dispose()

    def items(self, path: YamlPath, report: Callable[[Problem], None] | None = None) -> Iterator[tuple[int, Any]]:
        """The items of the list at path, each with its lines recorded while it is being looked at.

        Problems found reading a streamed list's items go to report (default: `found`) as each is read.
        """
        found = self.data
        for part in path:
            found = found[part]
        if not isinstance(found, Skimmed):
            yield from enumerate(found)
            return
        self._report = report or self.found.append
        loader = _SafeLoader(self.text)
        try:
            for _ in range(3):  # stream, document and top-level mapping starts
                loader.get_event()
            while True:  # to the list of the top-level key the first read skimmed
                key = loader.get_event()
                start: Any = key.start_mark
                if isinstance(key, yaml.ScalarEvent) and key.value == path[0] and start.line + 1 == found.key_line:
                    break
                self._skip(loader, refuse_anchors=False)
            loader.get_event()
            index = 0
            lines = self.lines
            while not loader.check_event(yaml.SequenceEndEvent):
                kept = len(lines)
                item = self._value(loader, (*path, index))
                yield index, item
                # The item's lines were added after the rest (dicts keep insertion order): let them go.
                for added in list(itertools.islice(lines, kept, None)):
                    del lines[added]
                index += 1
        except yaml.YAMLError as exc:  # the first read skimmed this list: its errors surface here
            raise _invalid_yaml(self.file, self.text, exc) from exc
        finally:
            loader.dispose()

    @staticmethod
    def _skip(loader: Any, *, refuse_anchors: bool = True) -> int:
        """Consume one value's events; returns how many items a collection had."""
        # The hottest loop of a long manifest's first read (every event of its jobs list): exact type tests.
        depth = 0
        items = 0
        get_event = loader.get_event
        while True:
            event = get_event()
            kind = type(event)
            if kind in _ENDS:
                depth -= 1
            else:
                if refuse_anchors and event.anchor is not None:
                    raise _CannotStream  # an anchor or alias: the list must be read whole
                if depth == 1:
                    items += 1
                if kind in _STARTS:
                    depth += 1
            if depth == 0:
                return items

    def _value(self, loader: Any, path: YamlPath, event: Any = None) -> Any:
        """The value whose events come next (event: its first, already taken), its line noted under path."""
        if event is None:
            event = loader.get_event()
        start: Any = event.start_mark  # the C parser's marks are not yaml.Mark to the type stubs
        self.lines[path] = start.line + 1
        depth = len(path)
        if depth > MAX_DEPTH:
            self._refuse(start, f"nested more than {MAX_DEPTH} levels deep")
        if type(event) is yaml.ScalarEvent and event.anchor is None:  # most values: the short way
            self._built += 1
            self._written += 1
            if depth > self._deepest:
                self._deepest = depth
            if event.tag is None:  # `_plainly_text`, inlined: 400,000 scalars in a 100,000-job list
                text: str = event.value
                if not event.implicit[0] or (text and text[0] not in self._resolved_first):
                    return text
            return self._scalar(loader, event, start)
        if isinstance(event, yaml.AliasEvent):
            return self._alias(str(event.anchor), len(path), start)
        if event.anchor is not None:  # measure the anchored value, for the aliases that will copy it
            outer_deepest, self._deepest = self._deepest, len(path)
            first = self._built
        self._built += 1
        self._written += 1
        self._deepest = max(self._deepest, len(path))
        if isinstance(event, yaml.ScalarEvent):
            value = self._scalar(loader, event, start)
        elif isinstance(event, yaml.SequenceStartEvent | yaml.MappingStartEvent):
            plain = "tag:yaml.org,2002:seq" if isinstance(event, yaml.SequenceStartEvent) else "tag:yaml.org,2002:map"
            if event.tag not in (None, "!", plain, "tag:yaml.org,2002:omap"):
                # Safe loading: a tag like !!python/object is refused, never constructed.
                raise yaml.constructor.ConstructorError(None, None, f"unsupported YAML tag {event.tag!r}", start)
            value = self._sequence(loader, path) if plain.endswith("seq") else self._mapping(loader, path)
        else:  # pragma: no cover - the parser yields nothing else here
            raise yaml.composer.ComposerError(None, None, f"unexpected {event}", start)
        if event.anchor is not None:
            self._anchors[event.anchor] = _Anchor(value, self._built - first, self._deepest - len(path))
            self._deepest = max(outer_deepest, self._deepest)
        return value

    def _alias(self, name: str, depth: int, start: Any) -> Any:
        """A copy of the anchored value, unless copying it passes the alias budget or the depth limit."""
        anchor = self._anchors.get(name)
        if anchor is None:
            raise yaml.composer.ComposerError(None, None, f"found undefined alias {name!r}", start)
        # Counted before copying: a few hundred bytes of nested aliases can stand for billions of values.
        self._copied += anchor.size
        budget = max(MAX_ALIAS_VALUES, ALIAS_RATIO * self._written)
        if self._copied > budget:
            self._refuse(
                start,
                f"the alias *{name} would make aliases copy more than {budget:,} values, the most a manifest may "
                "(a 'billion laughs' document?); write the values out, or share fields through 'defaults'",
            )
        if depth + anchor.height > MAX_DEPTH:
            self._refuse(start, f"nested more than {MAX_DEPTH} levels deep (through the alias *{name})")
        self._built += anchor.size
        self._deepest = max(self._deepest, depth + anchor.height)
        return copy.deepcopy(anchor.value)

    def _refuse(self, start: Any, message: str) -> NoReturn:
        """Stop reading: the document is built to exhaust memory or the stack."""
        raise ManifestError([Problem(self.file, start.line + 1, "", message)])

    def _scalar(self, loader: Any, event: Any, start: Any) -> Any:
        if event.tag is None and _plainly_text(loader, event):
            return event.value  # what the resolver and construct_yaml_str would make of it, ~5x sooner
        node = self._scalar_node(loader, event)
        # The safe constructor's own table, called directly: construct_object would keep every node.
        construct = loader.yaml_constructors.get(node.tag)
        if construct is None:
            raise yaml.constructor.ConstructorError(None, None, f"unsupported YAML tag {node.tag!r}", start)
        try:
            return construct(loader, node)
        except (ValueError, TypeError, OverflowError) as exc:  # 5,000 digits, a 13th month: not a traceback
            kind = node.tag.rsplit(":", 1)[-1]
            raise yaml.constructor.ConstructorError(
                None, None, f"cannot read {shorten(event.value)} as {kind}", start
            ) from exc

    @staticmethod
    def _scalar_node(loader: Any, event: Any) -> yaml.ScalarNode:
        tag = event.tag
        if tag is None or tag == "!":
            tag = loader.resolve(yaml.ScalarNode, event.value, event.implicit)
        return yaml.ScalarNode(tag, event.value, event.start_mark, event.end_mark, style=event.style)

    def _sequence(self, loader: Any, path: YamlPath) -> list[Any]:
        items: list[Any] = []
        while not loader.check_event(yaml.SequenceEndEvent):
            items.append(self._value(loader, (*path, len(items))))
        loader.get_event()
        return items

    def _mapping(self, loader: Any, path: YamlPath) -> dict[Any, Any]:
        result: dict[Any, Any] = {}
        merged: list[dict[Any, Any]] = []
        get_event = loader.get_event
        while True:
            head = get_event()  # taken, not peeked: one call a key instead of three, for 100,000 jobs
            if type(head) is yaml.MappingEndEvent:
                break
            line = head.start_mark.line + 1
            if (
                type(head) is yaml.ScalarEvent
                and (head.value == "<<" or head.tag is not None)  # what can be a merge key; resolving is slow
                and self._scalar_node(loader, head).tag == "tag:yaml.org,2002:merge"
            ):
                merged.extend(self._merge_source(loader, path, line))
                continue
            key = self._value(loader, (*path, "\0key"), head)
            del self.lines[(*path, "\0key")]
            if not isinstance(key, str):
                # `1: x` reads as a number key; every key of a manifest is a name, and later steps count on it.
                self._report(Problem(self.file, line, "", f"keys must be text, got {key!r} (quote it)"))
                self._value(loader, (*path, "\0skipped"))
                self.lines.pop((*path, "\0skipped"), None)
                continue
            if key in result:
                self._report(
                    Problem(
                        self.file,
                        line,
                        field_name((*path, key)),
                        f"duplicate key (also on line {self.lines[(*path, key)]})",
                    )
                )
            if path == () and key == self._stream and loader.check_event(yaml.SequenceStartEvent):
                self.lines[(key,)] = loader.peek_event().start_mark.line + 1
                result[key] = Skimmed(self._skip(loader), line)
                continue
            result[key] = self._value(loader, (*path, key))
        for source in merged:  # "<<" merge keys: the mapping's own keys win, then earlier sources
            for key, value in source.items():
                result.setdefault(key, value)
        return result

    def _merge_source(self, loader: Any, path: YamlPath, line: int) -> list[dict[Any, Any]]:
        value = self._value(loader, (*path, "<<"))
        sources = value if isinstance(value, list) else [value]
        if not all(isinstance(source, dict) for source in sources):
            self._report(
                Problem(self.file, line, field_name((*path, "<<")), "a merge key takes a mapping or a list of mappings")
            )
            return []
        return sources

    def line(self, path: YamlPath) -> int | None:
        """The line of the value at path, or of the nearest value holding it that has one."""
        while path not in self.lines and path:
            path = path[:-1]
        return self.lines.get(path)


_STARTS = (yaml.SequenceStartEvent, yaml.MappingStartEvent)
_ENDS = (yaml.SequenceEndEvent, yaml.MappingEndEvent)


def _plainly_text(loader: Any, event: Any) -> bool:
    """Whether an untagged scalar is a string without asking the resolver: quoted or block scalars always
    are, and a plain one is when no implicit resolver (bool, int, float, null, timestamp, merge…) starts
    with its first character."""
    if not event.implicit[0]:
        return True
    value = event.value
    resolvers = loader.yaml_implicit_resolvers
    return bool(value) and value[0] not in resolvers and None not in resolvers and not loader.yaml_path_resolvers


class _Everything:
    """Contains every character."""

    def __contains__(self, item: object) -> bool:
        return True


class _CannotStream(Exception):
    """The streamed list uses anchors or aliases: read it whole."""


@dataclass(frozen=True, slots=True)
class _Anchor:
    """An anchored value, with what each alias of it costs: its values counted, and its depth."""

    value: Any
    size: int
    height: int


@dataclass(frozen=True, slots=True)
class Skimmed:
    """A list counted on the first read, to be parsed again item by item (`LocatedYaml.items`)."""

    count: int
    key_line: int


def _invalid_yaml(file: str, text: str, exc: yaml.YAMLError) -> ManifestError:
    """The parser's complaint as a problem at its cause: the bracket or quote left open, else where it stopped.

    PyYAML notices an unclosed ``[`` only at the next line's ``-`` (its problem
    mark); its context mark is the bracket itself, where the fix is.
    """
    if not isinstance(exc, yaml.MarkedYAMLError):
        return ManifestError([Problem(file, None, "", f"invalid YAML: {exc}")])
    problem, context = exc.problem_mark, exc.context_mark
    what = exc.problem or exc.context or "invalid YAML"
    if exc.context and context is None and exc.problem:
        what = f"{exc.context}, {exc.problem}"  # ours: "expected a single document, but found another document"
    if problem is None:
        problem, context = context, None
    if problem is None:
        return ManifestError([Problem(file, None, "", f"invalid YAML: {what}")])
    there = f"{what} at line {problem.line + 1}, column {problem.column + 1}"
    opener = _char_at(text, context) if context is not None else ""
    if context is not None and opener in _OPENERS:
        message = f"invalid YAML: this {_OPENERS[opener]} is not closed ({there})"
        return ManifestError([Problem(file, context.line + 1, "", message, context.column + 1)])
    quoted = _quote_running_into(text, problem)
    if quoted is not None:
        start, end = quoted
        message = (
            f"invalid YAML: the quoted value opened here runs on to line {end.line + 1}, column {end.column}; "
            f"is its closing {_char_at(text, start)} missing? ({there})"
        )
        return ManifestError([Problem(file, start.line + 1, "", message, start.column + 1)])
    message = f"invalid YAML: {what}"
    if exc.context and context is not None and context.line != problem.line:
        message += f" ({exc.context} at line {context.line + 1}, column {context.column + 1})"
    return ManifestError([Problem(file, problem.line + 1, "", message, problem.column + 1)])


_OPENERS = {"[": "'['", "{": "'{'", '"': 'quote (")', "'": "quote (')"}
_MAX_RESCANNED = 1_000_000
"""The longest document scanned again, on an error, for a quoted value that ran on too far."""


def _char_at(text: str, mark: Any) -> str:
    """The character at a parser's mark (its index counts characters, in both parsers)."""
    index = getattr(mark, "index", None)
    return text[index] if isinstance(index, int) and 0 <= index < len(text) else ""


def _quote_running_into(text: str, problem: Any) -> tuple[Any, Any] | None:
    """The start and end of a quoted value spanning lines that ends just before the problem, if one does.

    ``prompt: "a cat`` with no closing quote swallows the next lines up to the
    next quote, and the parser complains only after that, lines later.
    """
    if len(text) > _MAX_RESCANNED:
        return None
    scanner: Any = yaml.SafeLoader(text)  # its tokens only (the pure-Python scanner: this is the error path)
    last = None
    try:
        while True:
            token = scanner.get_token()
            if token is None or (token.start_mark.line, token.start_mark.column) >= (problem.line, problem.column):
                break
            last = token
    except yaml.YAMLError:
        pass
    finally:
        scanner.dispose()
    if (
        isinstance(last, yaml.ScalarToken)
        and last.style in ('"', "'")
        and last.start_mark.line < last.end_mark.line == problem.line
    ):
        return last.start_mark, last.end_mark
    return None
