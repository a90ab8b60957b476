"""The generated parts of the documentation: docs/config.md's key tables and complete example from the config
schema (:mod:`streamcl.config`), docs/methods.md's index from the recipes and the plugin registry.

Each part sits in its document between ``<!-- generated: NAME -->`` and ``<!-- end generated -->``.
``python -m streamcl.docs`` rewrites every part in place; ``python -m streamcl.docs --check`` only says which
are out of date (exit status 1), as ``tests/test_docs.py`` does.
"""
from __future__ import annotations

import argparse
import contextlib
import inspect
import json
import re
import sys
import textwrap
from pathlib import Path
from typing import Any, Callable, Iterator

COMMAND = "python -m streamcl.docs"
END = "<!-- end generated -->"
_TYPE_NAMES = {int: "integer", float: "float", str: "string", bool: "boolean", dict: "table"}
_LIST_NAMES = {"list[int]": "list of integers", "list[number]": "list of numbers", "list[str]": "list of strings",
               "int or list[int]": "integer or list of integers"}


def _cell(text: str) -> str:
    """Text for one Markdown table cell: no line breaks, pipes escaped."""
    return " ".join(text.split()).replace("|", "\\|")


def type_name(types: Any) -> str:
    """A schema entry's accepted types in words (``(int, float)``: "number")."""
    if isinstance(types, str):
        return _LIST_NAMES[types]
    if set(types) == {int, float}:
        return "number"
    return " or ".join(_TYPE_NAMES[t] for t in sorted(types, key=lambda t: t is not bool))


def toml_value(value: Any) -> str:
    """``value`` written as TOML writes it."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    return repr(value)


def _choices(section: str, key: str) -> str:
    from streamcl.config import CHOICES

    choices = CHOICES.get((section, key))
    return ", ".join(f"`{toml_value(c)}`" for c in choices) if choices else ""


def config_table(section: str | None) -> str:
    """The Markdown table of one ``[section]`` (None: the top-level keys, ``TOP``): key, type, default, choices,
    meaning (``HELP``)."""
    from streamcl.config import HELP, SCHEMA, TOP

    rows = ["| key | type | default | choices | meaning |", "|---|---|---|---|---|"]
    keys = TOP if section is None else SCHEMA[section]
    for key, (types, default) in keys.items():
        shown = "absent" if default is None else f"`{toml_value(default)}`"
        meaning = HELP[key if section is None else f"{section}.{key}"]
        rows.append(f"| `{key}` | {type_name(types)} | {shown} | {_choices(section or '', key)} | {_cell(meaning)} |")
    return "\n".join(rows)


def config_example() -> str:
    """A config that writes every key with a default at that default (so it is SFM-5 with plain fine-tuning),
    each section ending with a comment naming its keys that are absent by default."""
    from streamcl.config import SCHEMA, TOP

    lines = ["```toml", *(f"{k} = {toml_value(d)}" for k, (_, d) in TOP.items())]
    for section, keys in SCHEMA.items():
        lines += ["", f"[{section}]"]
        lines += [f"{k} = {toml_value(d)}" for k, (_, d) in keys.items() if d is not None]
        absent = [k for k, (_, d) in keys.items() if d is None]
        if absent:
            lines += textwrap.wrap(f"absent unless given: {', '.join(absent)}", 100, initial_indent="# ",
                                   subsequent_indent="#   ")
    lines += ["", "# no plugins by default: one [[plugins]] table per plugin, in the order they run,",
              "# or a [method] table naming a recipe", "```"]
    return "\n".join(lines)


@contextlib.contextmanager
def _recording() -> Iterator[None]:
    """Inside: the recipes' ``build_plugin`` returns ``(name, kwargs)`` instead of building the plugin."""
    from streamcl import methods

    real = methods.build_plugin
    methods.build_plugin = lambda name, **kwargs: (name, kwargs)
    try:
        yield
    finally:
        methods.build_plugin = real


def recipe_plugins(name: str) -> list[tuple[str, dict]]:
    """The plugins recipe ``name`` builds with its default arguments: (registered name, the arguments it passes)."""
    from streamcl.methods import RECIPES

    with _recording():
        return list(RECIPES[name].plugins())


def _call(name: str, kwargs: dict) -> str:
    def value(v: Any) -> str:
        return json.dumps(v) if isinstance(v, str) else repr(v)

    return f"`{name}({', '.join(f'{k}={value(v)}' for k, v in kwargs.items())})`"


def first_sentence(doc: str) -> str:
    """The first sentence of a docstring's first paragraph (up to the first full stop outside parentheses; a
    paragraph that ends in a colon, before a list, ends there), in Markdown."""
    text = " ".join((doc or "").strip().split("\n\n")[0].split())
    if text.endswith(":"):
        text = text[:-1] + "."
    depth = 0
    for i, ch in enumerate(text):
        depth += 1 if ch in "([" else -1 if ch in ")]" else 0
        if ch == "." and depth <= 0 and (i + 1 == len(text) or text[i + 1] == " ") and \
                not text[max(0, i - 2):i + 1].endswith(("al.", "eq.", "e.g.", "i.e.", "vs.")):
            text = text[:i + 1]
            break
    text = re.sub(r":(?:class|func|meth|attr|mod):`~?([^`]+)`", r"`\1`", text)
    return text.replace("``", "`")


def methods_index() -> str:
    """Two tables: every recipe (name, the plugins it builds with their default arguments, summary) and every
    built-in plugin (config name, class, the first sentence of its docstring: the technique and its paper)."""
    from streamcl.methods import RECIPES
    from streamcl.registry import entries

    rows = ["| recipe | plugins it builds (default arguments) | summary |", "|---|---|---|"]
    for recipe in RECIPES.values():
        built = ", ".join(_call(n, kw) for n, kw in recipe_plugins(recipe.name)) or "none"
        if recipe.offline:
            built += "; trained once on the joined stream"
        rows.append(f"| `{recipe.name}` | {_cell(built)} | {_cell(recipe.summary)} |")
    rows += ["", "| plugin | class | technique and reference (its docstring's first sentence) |", "|---|---|---|"]
    for info in entries("plugin").values():
        if not info.builtin:
            continue
        obj = info.load()
        rows.append(f"| `{info.name}` | `{info.target.replace(':', '.')}` | "
                    f"{_cell(first_sentence(inspect.getdoc(obj) or ''))} |")
    return "\n".join(rows)


# document (relative to the repository) -> part name -> the function that makes its text
PARTS: dict[str, dict[str, Callable[[], str]]] = {
    "docs/config.md": {
        "config example": config_example,
        "config reference: seed": lambda: config_table(None),
        **{f"config reference: [{s}]": (lambda s=s: config_table(s)) for s in ("benchmark", "model", "train", "log")},
    },
    "docs/methods.md": {"methods index": methods_index},
}


def _pattern(name: str) -> re.Pattern:
    return re.compile(r"(<!-- generated: " + re.escape(name) + r" -->\n)(.*?)(" + re.escape(END) + ")", re.S)


def render(text: str, name: str, content: str, where: str = "the document") -> str:
    """``text`` with part ``name`` replaced by ``content``; a document without the part's markers is refused."""
    pattern = _pattern(name)
    found = pattern.findall(text)
    if len(found) != 1:
        raise ValueError(f"{where} has {len(found)} '<!-- generated: {name} -->' ... '{END}' parts, not one")
    return pattern.sub(lambda m: m[1] + content.rstrip("\n") + "\n" + m[3], text)


def root() -> Path:
    """The repository: the folder above this package when it holds docs/, else the current folder."""
    here = Path(__file__).resolve().parent.parent
    return here if (here / "docs" / "config.md").exists() else Path.cwd()


def regenerate(base: Path | None = None, write: bool = True) -> list[str]:
    """Bring every generated part up to date (``write=False``: only compare); the documents that were (or would
    be) changed, relative to ``base``."""
    base = root() if base is None else Path(base)
    updated = {}
    for doc, parts in PARTS.items():  # every part made before any document is written
        text = new = (base / doc).read_text()
        for name, make in parts.items():
            new = render(new, name, make(), doc)
        if new != text:
            updated[doc] = new
    for doc, new in updated.items() if write else ():
        (base / doc).write_text(new)
    return list(updated)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=COMMAND, description="Rewrite the generated parts of the documentation "
                                     "(docs/config.md from the config schema, docs/methods.md from the recipes and "
                                     "the plugin registry).")
    parser.add_argument("--check", action="store_true", help="change nothing; exit 1 when a part is out of date")
    parser.add_argument("--root", type=Path, default=None, help="the repository (default: where streamcl lives)")
    args = parser.parse_args(argv)
    try:
        changed = regenerate(args.root, write=not args.check)
    except (ValueError, OSError) as err:  # a document without its markers, or none at all
        print(f"{COMMAND}: error: {err}", file=sys.stderr)
        return 2
    for doc in changed:
        print(f"{doc}: {'out of date' if args.check else 'regenerated'}")
    if args.check and changed:
        print(f"run: {COMMAND}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
