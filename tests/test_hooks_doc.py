"""docs/hooks.md must document exactly the hooks of streamcl/hookspecs.py, with their exact signatures.

Every ``### `name(param, ...) -> Annotation` `` heading of the document is compared with the
hook specification of the same name: the set of hooks (both directions), the parameter names
and their order, the return annotation as written in the source, and the group (``## Events``,
``## Contributions``, ``## Transforms``) against ``EVENTS`` / ``CONTRIBUTIONS`` / ``TRANSFORMS``.
The checker is itself tested on altered copies of the document, so it is known to fail.
"""
from __future__ import annotations

import inspect
import re
from pathlib import Path
from typing import NamedTuple

import pluggy
import pytest

from streamcl import hookspecs

DOC = Path(__file__).resolve().parent.parent / "docs" / "hooks.md"
GROUPS = {"Events": "events", "Contributions": "contributions", "Transforms": "transforms"}
HEADING = re.compile(r"^### `(?P<name>\w+)\((?P<params>[^()]*)\) -> (?P<ret>[^`]+)`$")


class Sig(NamedTuple):
    params: tuple[str, ...]
    ret: str
    group: str | None


def _norm(text: str) -> str:
    return " ".join(text.split())


def spec_hooks() -> dict[str, Sig]:
    """Every hook specification in streamcl.hookspecs, found the way pluggy finds them."""
    pm = pluggy.PluginManager("streamcl")
    group_of = {n: "events" for n in hookspecs.EVENTS}
    group_of.update({n: "contributions" for n in hookspecs.CONTRIBUTIONS})
    group_of.update({n: "transforms" for n in hookspecs.TRANSFORMS})
    out = {}
    for name in dir(hookspecs):
        if pm.parse_hookspec_opts(hookspecs, name) is None:
            continue
        sig = inspect.signature(getattr(hookspecs, name))
        ret = sig.return_annotation
        if ret is inspect.Signature.empty:
            ret = "<no annotation>"
        elif not isinstance(ret, str):
            ret = inspect.formatannotation(ret)
        out[name] = Sig(tuple(sig.parameters), _norm(ret), group_of.get(name))
    return out


def doc_hooks(text: str) -> tuple[dict[str, Sig], list[str]]:
    """The hook headings of a document, and the problems found while reading it."""
    hooks: dict[str, Sig] = {}
    problems: list[str] = []
    group = None
    in_code = False
    for lineno, line in enumerate(text.splitlines(), 1):
        if line.lstrip().startswith("```"):
            in_code = not in_code
            continue
        if in_code:
            continue
        if line.startswith("## "):
            group = GROUPS.get(line[3:].strip())
            continue
        if not line.startswith("### "):
            continue
        match = HEADING.match(line.rstrip())
        if not match:
            problems.append(f"line {lineno}: heading {line!r} is not of the form ### `name(param, ...) -> Annotation`")
            continue
        name = match["name"]
        params = tuple(p.strip() for p in match["params"].split(",")) if match["params"].strip() else ()
        if name in hooks:
            problems.append(f"line {lineno}: hook '{name}' is documented twice")
        hooks[name] = Sig(params, _norm(match["ret"]), group)
    return hooks, problems


def compare(text: str) -> list[str]:
    """Every disagreement between the document ``text`` and streamcl.hookspecs (empty when they agree)."""
    doc, problems = doc_hooks(text)
    spec = spec_hooks()
    for name in sorted(spec.keys() - doc.keys()):
        problems.append(f"hook '{name}' is in streamcl/hookspecs.py but not documented in docs/hooks.md")
    for name in sorted(doc.keys() - spec.keys()):
        problems.append(f"docs/hooks.md documents '{name}', which is not a hook in streamcl/hookspecs.py")
    for name in sorted(doc.keys() & spec.keys()):
        d, s = doc[name], spec[name]
        if d.params != s.params:
            problems.append(f"'{name}': docs/hooks.md has parameters ({', '.join(d.params)}), "
                            f"hookspecs.py has ({', '.join(s.params)})")
        if d.ret != s.ret:
            problems.append(f"'{name}': docs/hooks.md returns '{d.ret}', hookspecs.py returns '{s.ret}'")
        if s.group is None:
            problems.append(f"'{name}' is a hook spec but in none of EVENTS, CONTRIBUTIONS, TRANSFORMS")
        elif d.group != s.group:
            problems.append(f"'{name}' is one of the {s.group} but docs/hooks.md lists it under "
                            f"{d.group or 'no hook section'}")
    return problems


# ----------------------------------------------------------------------------- the real document
def test_doc_matches_hookspecs():
    problems = compare(DOC.read_text())
    assert not problems, "docs/hooks.md disagrees with streamcl/hookspecs.py:\n  " + "\n  ".join(problems)


def test_groups_cover_every_spec_once():
    spec = spec_hooks()
    grouped = [*hookspecs.EVENTS, *hookspecs.CONTRIBUTIONS, *hookspecs.TRANSFORMS]
    assert sorted(grouped) == sorted(spec), "EVENTS + CONTRIBUTIONS + TRANSFORMS must list every hook spec once"


# ----------------------------------------------------------------------------- the checker can fail
def _heading(name: str, params: str, ret: str) -> str:
    return f"### `{name}({params}) -> {ret}`"


def _drop_heading(text: str, name: str) -> str:
    return "\n".join(line for line in text.splitlines() if not line.startswith(f"### `{name}("))


MUTATIONS = {
    "hook missing from the doc": lambda t: _drop_heading(t, "loss_terms"),
    "doc heading for a hook that does not exist": lambda t: t.replace(
        "## Transforms\n", "## Transforms\n\n" + _heading("adapt_optimizer", "strategy, optimizer", "Optimizer") + "\n"),
    "renamed parameter": lambda t: t.replace("loss_terms(strategy, batch, output)", "loss_terms(strategy, batch, out)"),
    "parameters in another order": lambda t: t.replace("adapt_logits(strategy, logits, features, batch)",
                                                       "adapt_logits(strategy, features, logits, batch)"),
    "missing parameter": lambda t: t.replace("replay_batch(strategy, batch)", "replay_batch(strategy)"),
    "extra parameter": lambda t: t.replace("before_update(strategy)", "before_update(strategy, optimizer)"),
    "changed return annotation": lambda t: t.replace("train_data(strategy, experience) -> Dataset | None",
                                                     "train_data(strategy, experience) -> Dataset"),
    "hook under the wrong group": lambda t: _drop_heading(t, "param_groups").replace(
        "## Transforms\n", "## Transforms\n\n" + _heading("param_groups", "strategy, model", "list[dict] | None") + "\n"),
    "hook documented twice": lambda t: t + "\n" + _heading("after_update", "strategy", "None") + "\n",
    "malformed heading": lambda t: t.replace("### `after_eval(strategy) -> None`", "### after_eval(strategy)"),
}


@pytest.mark.parametrize("what", sorted(MUTATIONS))
def test_checker_catches(what):
    text = DOC.read_text()
    altered = MUTATIONS[what](text)
    assert altered != text, f"the mutation '{what}' did not apply; update it to the current document"
    assert compare(altered), f"compare() missed: {what}"
