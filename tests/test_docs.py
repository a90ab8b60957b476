"""Docs that cannot drift: every code block of README.md and docs/*.md is run or checked, and the generated parts
(docs/config.md's example and key tables, docs/methods.md's index) equal what ``python -m streamcl.docs`` writes.

- ```python blocks run (in a temporary folder); a ``Plugin`` subclass a block defines trains two tiny experiences,
  a ``test_*`` function it defines is called. The README's tour trains SFM-5 and is run by tests/test_readme.py.
- ```toml blocks: a streamcl config is validated by ``config.parse`` (a GPU device as ``train.device=cpu``) and
  its plugins built (names and arguments checked); a ``pyproject.toml`` fragment names entry-point groups
  streamcl reads. A config block whose first line is ``# NAME.toml`` is the file ``NAME.toml`` commands name.
- ```bash / ```sh / ```console blocks (in a console block, the ``$ `` lines): every ``streamcl`` command (also
  ``python -m streamcl`` and under ``torchrun -m streamcl``) is parsed by the CLI's parser; ``plugins``, ``methods``,
  ``models``, ``benchmarks``, ``--help`` and ``--version`` run, and output shown under them must be rows of the
  real output; ``run`` loads its config (a repository file, a file the doc writes, or a placeholder such as
  ``CONFIG.toml``) with its ``--set`` overrides and builds its plugins; ``torchrun`` options are parsed by
  torchrun's own parser; ``make`` targets must be in the Makefile; ``pip install`` extras in pyproject.toml.
- A third party's package a doc describes (docs/plugins.md: its pyproject.toml block and the module block that
  defines its entry point's object) is made installed in this process only (a dist-info folder on sys.path).
- A block preceded by ``<!-- not run: REASON -->`` is skipped; :data:`NOT_RUN` lists them all.
Blocks without a language are text (file trees, diagrams).
"""
from __future__ import annotations

import ast
import contextlib
import importlib
import io
import re
import shlex
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from streamcl import cli, config, docs, registry
from streamcl.plugin import Plugin, init_signature

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LANGS = ("python", "toml", "bash", "sh", "console", "")
REGENERATE = ".venv/bin/python -m streamcl.docs"
# blocks marked <!-- not run: ... --> in the docs (doc, the reason): adding one is a decision, made here
NOT_RUN: list[tuple[str, str]] = []
# python blocks another test runs: (doc, a line of the block) -> that test
RUN_ELSEWHERE = {("README.md", "bench = class_incremental(train, test, n_experiences=5, class_order=list(range(10)))"):
                 ("tests/test_readme.py", "test_the_tour_runs_on_a_plain_sequential")}
LISTINGS = ("plugins", "methods", "models", "benchmarks")


@dataclass(frozen=True)
class Block:
    doc: str  # relative to the repository
    line: int  # the opening fence's line number
    lang: str
    text: str
    not_run: str | None  # the reason of a <!-- not run: ... --> comment right before it

    def __str__(self) -> str:
        return f"{self.doc}:{self.line}"


def read_blocks(path: Path) -> list[Block]:
    """Every fenced block of a Markdown file."""
    lines, out, i = path.read_text().splitlines(), [], 0
    while i < len(lines):
        fence = re.match(r"^```(\S*)\s*$", lines[i])
        if not fence:
            i += 1
            continue
        end = next((j for j in range(i + 1, len(lines)) if lines[j].rstrip() == "```"), len(lines))
        before = next((lines[k].strip() for k in range(i - 1, -1, -1) if lines[k].strip()), "")
        reason = re.fullmatch(r"<!-- not run: (.+?) -->", before)
        out.append(Block(str(path.relative_to(ROOT)), i + 1, fence[1], "\n".join(lines[i + 1:end]) + "\n",
                         reason[1] if reason else None))
        i = end + 1
    return out


BLOCKS = [b for path in DOCS for b in read_blocks(path)]


def of(*langs: str) -> list[Block]:
    return [b for b in BLOCKS if b.lang in langs and b.not_run is None]


# ----------------------------------------------------------------------------- a third party's package in a doc
def doc_pyprojects(doc: str) -> list[dict]:
    return [raw for b in BLOCKS if b.doc == doc and b.lang == "toml"
            for raw in [tomllib.loads(b.text)] if "project" in raw and "name" in raw["project"]]


@pytest.fixture(scope="module")
def doc_packages(tmp_path_factory):
    """Every package a doc describes (a complete pyproject.toml block, and for each entry point the python block of
    the same doc that defines its object), installed for this process only: a module and a dist-info folder with
    its entry points in a folder put first on sys.path."""
    site = tmp_path_factory.mktemp("doc_site")
    modules = []
    for doc in sorted({b.doc for b in BLOCKS}):
        for project in (p["project"] for p in doc_pyprojects(doc)):
            groups = project.get("entry-points", {})
            lines = []
            for group, targets in groups.items():
                lines.append(f"[{group}]")
                for name, target in targets.items():
                    module, _, attr = target.partition(":")
                    source = next((b.text for b in of("python") if b.doc == doc
                                   and re.search(rf"^(class|def) {re.escape(attr)}\b", b.text, re.M)), None)
                    assert source, f"{doc}: no python block defines {attr}, the object of entry point {target}"
                    assert f"{module}/__init__.py" in Path(ROOT / doc).read_text(), \
                        f"{doc}: the package's module {module} is not the one its file tree shows"
                    (site / module).mkdir(exist_ok=True)
                    (site / module / "__init__.py").write_text(source)
                    modules.append(module)
                    lines.append(f"{name} = {target}")
            info = site / f"{project['name'].replace('-', '_')}-{project['version']}.dist-info"
            info.mkdir()
            (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {project['name']}\n"
                                           f"Version: {project['version']}\n")
            (info / "entry_points.txt").write_text("\n".join(lines) + "\n")
    sys.path.insert(0, str(site))
    _refresh()
    yield site
    sys.path.remove(str(site))
    for module in modules:
        sys.modules.pop(module, None)
    _refresh()


def _refresh() -> None:
    importlib.invalidate_caches()
    for listing in (registry.available_plugins, registry.available_models, registry.available_benchmarks):
        listing.cache_clear()


# ----------------------------------------------------------------------------- python
def _elsewhere(block: Block):
    return next((test for (doc, line), test in RUN_ELSEWHERE.items()
                 if doc == block.doc and line in block.text), None)


def _train_briefly(plugin_class: type) -> None:
    """A plugin class a doc defines, built with its defaults and trained on two tiny experiences."""
    from streamcl import Strategy
    from tests.conftest import image_benchmark, mlp

    bench, model = image_benchmark(), mlp(4)
    strategy = Strategy(model, torch.optim.SGD(model.parameters(), lr=0.01), plugins=[plugin_class()],
                        batch_size=16, seed=0)
    for experience in bench.train_stream:
        strategy.train(experience)
    assert strategy.eval(bench.test_stream)["final_accuracy"] is not None


@pytest.mark.parametrize("block", of("python"), ids=str)
def test_python_block_runs(block, doc_packages, tmp_path, monkeypatch):
    elsewhere = _elsewhere(block)
    if elsewhere:
        module = importlib.import_module(elsewhere[0][:-3].replace("/", "."))
        assert callable(getattr(module, elsewhere[1], None)), f"{block} is said to be run by {elsewhere}, which is gone"
        return
    monkeypatch.chdir(tmp_path)
    namespace = {"__name__": "doc_block"}
    exec(compile(block.text, str(block), "exec"), namespace)
    for name, obj in list(namespace.items()):
        if isinstance(obj, type) and issubclass(obj, Plugin) and obj.__module__ == "doc_block":
            _train_briefly(obj)
        elif name.startswith("test_") and callable(obj):
            obj()


def test_run_elsewhere_blocks_exist():
    for doc, line in RUN_ELSEWHERE:
        assert any(b.doc == doc and line in b.text for b in of("python")), \
            f"RUN_ELSEWHERE names a block of {doc} with the line {line!r}, which no python block has"


# ----------------------------------------------------------------------------- toml
def _on_cpu(raw: dict, overrides: list[str]) -> list[str]:
    """The overrides with any GPU device replaced by this machine's CPU (the config is otherwise checked as is)."""
    out = [o for o in overrides if not o.startswith("train.device=")]
    device = next((o.split("=", 1)[1] for o in overrides if o.startswith("train.device=")),
                  raw.get("train", {}).get("device", "cpu"))
    return out + ([] if device == "cpu" else ["train.device=cpu"])


def check_config(raw: dict, overrides: list[str] = ()) -> dict:
    """A streamcl config as a run takes it: validated, then its plugins built."""
    from streamcl.runner import build_plugins

    cfg = config.parse(raw, _on_cpu(raw, list(overrides)))
    build_plugins(cfg)
    return cfg


def doc_files(doc: str) -> dict[str, str]:
    """The files a doc writes: a toml block whose first line is ``# NAME.toml ...``, a ``cat > NAME <<'TAG'``."""
    files = {}
    for b in BLOCKS:
        if b.doc != doc:
            continue
        first = re.match(r"# (\S+\.toml)\b", b.text)
        if b.lang == "toml" and first:
            files[first[1]] = b.text
        for name, tag, body in re.findall(r"^cat > (\S+) <<'?(\w+)'?\n(.*?)^\2$", b.text, re.M | re.S):
            files[name] = body
    return files


@pytest.mark.parametrize("block", of("toml"), ids=str)
def test_toml_block_is_valid(block, doc_packages):
    raw = tomllib.loads(block.text)
    if {"project", "build-system"} & raw.keys():  # a package's pyproject.toml, or a fragment of one
        for group, targets in raw.get("project", {}).get("entry-points", {}).items():
            assert group in registry.GROUPS.values(), f"{block}: streamcl reads no entry-point group {group!r}"
            for target in targets.values():
                assert re.fullmatch(r"[\w.]+:[\w.]+", target), f"{block}: {target!r} is not module:object"
        return
    check_config(raw)


# ----------------------------------------------------------------------------- shell
@dataclass
class Command:
    words: list[str]
    output: list[str]


def commands(block: Block) -> list[Command]:
    """The commands of a shell block (continuation lines joined, heredocs skipped), each with the output a
    console block shows under it."""
    out: list[Command] = []
    lines = block.text.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        i += 1
        if block.lang == "console" and not line.startswith("$ "):
            if out:
                out[-1].output.append(line)
            continue
        line = line[2:] if block.lang == "console" else line
        while line.endswith("\\") and i < len(lines):
            line, i = line[:-1] + " " + lines[i].strip(), i + 1
        heredoc = re.search(r"<<-?'?(\w+)'?", line)
        if heredoc:
            i = next(j for j in range(i, len(lines)) if lines[j].strip() == heredoc[1]) + 1
            line = line[:heredoc.start()]
        words = shlex.split(line, comments=True)
        while words:
            cut = next((k for k, w in enumerate(words) if w in ("&&", ";", "||")), len(words))
            out.append(Command(words[:cut], []))
            words = words[cut + 1:]
    return out


def _run_cli(args: list[str]) -> str:
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        try:
            code = cli.main(args)
        except SystemExit as exit:  # --help, --version
            code = exit.code
    assert code == 0, f"streamcl {shlex.join(args)} exited with {code}"
    return stdout.getvalue()


def _rows(lines) -> list[tuple[str, ...]]:
    return [tuple(re.split(r"\s{2,}", line.strip())) for line in lines
            if line.strip() and set(line.strip()) - set("- ")]


def check_streamcl(args: list[str], block: Block, output: list[str]) -> None:
    where = f"{block}: streamcl {shlex.join(args)}"
    with contextlib.redirect_stderr(io.StringIO()) as err, contextlib.redirect_stdout(io.StringIO()):
        try:
            ns = cli.parser().parse_args(args)
        except SystemExit as exit:
            assert exit.code == 0, f"{where}: the command line refuses it: {err.getvalue().strip()}"
            ns = None
    if ns is None or ns.command in LISTINGS:
        printed = _run_cli(args)
        if output and ns is not None:
            shown, real = _rows(output), _rows(printed.splitlines())
            assert shown[0] == real[0], f"{where}: the doc shows the columns {shown[0]}, the command {real[0]}"
            missing = [row for row in shown[1:] if row not in real[1:]]
            assert not missing, f"{where}: the doc shows rows the command does not print: {missing}"
    elif ns.command == "run":
        files = doc_files(block.doc)
        if ns.config in files:
            raw = tomllib.loads(files[ns.config])
        elif (ROOT / ns.config).is_file():
            raw = tomllib.loads((ROOT / ns.config).read_text())
        else:
            assert re.fullmatch(r"[A-Z_]+\.toml", ns.config), \
                f"{where}: {ns.config} is neither in the repository nor written by the doc"
            return
        check_config(raw, ns.overrides)
    elif ns.command == "demo":
        from streamcl.methods import RECIPES
        assert set(ns.methods) <= set(RECIPES), f"{where}: no recipe {sorted(set(ns.methods) - set(RECIPES))}"
        config.parse({}, _on_cpu({}, ns.overrides))


def _extras() -> set[str]:
    return set(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"])


def check_command(command: Command, block: Block) -> None:
    words = [w.removeprefix(".venv/bin/") for w in command.words]
    program, args = words[0], words[1:]
    if program == "python" and args[:2] == ["-m", "streamcl"]:
        program, args = "streamcl", args[2:]
    if program == "streamcl":
        check_streamcl(args, block, command.output)
    elif program == "torchrun":
        from torch.distributed.run import get_args_parser
        with contextlib.redirect_stderr(io.StringIO()) as err:
            try:
                ns = get_args_parser().parse_args(args)
            except SystemExit:
                pytest.fail(f"{block}: torchrun refuses {shlex.join(args)}: {err.getvalue().strip()}")
        if ns.module and ns.training_script == "streamcl":
            check_streamcl(ns.training_script_args, block, [])
        else:  # a script of the reader's own (my_*.py), else one of the repository
            script = Path(ns.training_script)
            assert script.name.startswith("my_") or (ROOT / script).is_file(), f"{block}: no {script}"
    elif program == "make":
        targets = re.findall(r"^([\w-]+):", (ROOT / "Makefile").read_text(), re.M)
        assert set(args) <= set(targets), f"{block}: the Makefile has no target {sorted(set(args) - set(targets))}"
    elif program == "pip" and args[:1] == ["install"]:
        for arg in (a for a in args[1:] if not a.startswith("-")):
            extra = re.fullmatch(r"streamcl\[([\w,]+)\]", arg)
            if extra:
                assert set(extra[1].split(",")) <= _extras(), f"{block}: pyproject.toml has no extra in {arg}"
            else:  # a package the doc describes, by its folder
                names = [p["project"]["name"] for p in doc_pyprojects(block.doc)]
                assert Path(arg).name in names, f"{block}: pip install {arg}, a package the doc does not describe"
    elif program == "cat" and args[:1] == [">"]:
        if args[1].endswith(".toml"):  # a config the doc writes: a run checks it
            check_config(tomllib.loads(doc_files(block.doc)[args[1]]))
    else:
        pytest.fail(f"{block}: tests/test_docs.py does not know how to check {shlex.join(command.words)!r}")


@pytest.mark.parametrize("block", of("bash", "sh", "console"), ids=str)
def test_shell_block_commands_are_valid(block, doc_packages, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    found = commands(block)
    assert found, f"{block} holds no command"
    for command in found:
        check_command(command, block)


# ----------------------------------------------------------------------------- every block, and the marked ones
def test_every_block_has_a_language_this_file_checks():
    odd = [f"{b} ```{b.lang}" for b in BLOCKS if b.lang not in LANGS]
    assert not odd, f"code blocks in a language tests/test_docs.py does not run: {odd}"


def test_blocks_not_run_are_the_listed_ones():
    marked = [(b.doc, b.not_run) for b in BLOCKS if b.not_run is not None]
    assert sorted(marked) == sorted(NOT_RUN), "a doc block marked <!-- not run: ... --> must be listed in NOT_RUN"


# ----------------------------------------------------------------------------- generated parts
def test_generated_parts_are_current():
    stale = docs.regenerate(ROOT, write=False)
    assert not stale, f"{', '.join(stale)}: the generated parts are out of date; run `{REGENERATE}` to regenerate"


def test_the_check_finds_a_stale_part(tmp_path):
    for doc in docs.PARTS:
        (tmp_path / doc).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / doc).write_text((ROOT / doc).read_text())
    config_md = tmp_path / "docs" / "config.md"
    config_md.write_text(config_md.read_text().replace("| `epochs` | integer | `2` |", "| `epochs` | integer | `3` |"))
    assert docs.regenerate(tmp_path, write=False) == ["docs/config.md"]
    assert docs.main(["--check", "--root", str(tmp_path)]) == 1
    assert docs.main(["--root", str(tmp_path)]) == 0 and docs.regenerate(tmp_path, write=False) == []
    config_md.write_text(config_md.read_text().replace("<!-- generated: config reference: [train] -->\n", ""))
    with pytest.raises(ValueError, match=r"config reference: \[train\]"):
        docs.regenerate(tmp_path, write=False)


def test_every_config_key_has_help():
    keys = {*config.TOP, *(f"{s}.{k}" for s, keys in config.SCHEMA.items() for k in keys)}
    assert not keys - config.HELP.keys(), f"streamcl.config.HELP lacks {sorted(keys - config.HELP.keys())}"
    assert not config.HELP.keys() - keys, f"streamcl.config.HELP has keys the schema lacks: " \
                                          f"{sorted(config.HELP.keys() - keys)}"
    short = [k for k, text in config.HELP.items() if not text.strip() or "\n" in text]
    assert not short, f"empty or multi-line HELP: {short}"


# ----------------------------------------------------------------------------- methods.md's hand-written tables
def _section(text: str, heading: str) -> str:
    start = text.index(f"\n## {heading}\n")
    end = text.find("\n## ", start + 1)
    return text[start:end if end >= 0 else len(text)]


def test_methods_doc_has_a_row_for_every_recipe_and_plugin():
    """The hand-written tables of docs/methods.md: a row per recipe naming the classes it builds, in order, and a
    row ``Class (name)`` per built-in plugin but the metrics (every one of them is in the generated index)."""
    text = (ROOT / "docs" / "methods.md").read_text()
    from streamcl.methods import RECIPES
    plugins = {n: i for n, i in registry.entries("plugin").items() if i.builtin}
    class_of = {n: i.target.split(":")[1] for n, i in plugins.items()}
    recipes = _section(text, "Recipes")
    problems = []
    for name in RECIPES:
        row = re.search(rf"^\| `{name}` \| (.*?) \|", recipes, re.M)
        if not row:
            problems.append(f"recipe {name}: no row in ## Recipes")
            continue
        shown = re.findall(r"`([A-Z]\w*)\(", row[1])
        built = [class_of[n] for n, _ in docs.recipe_plugins(name)]
        if shown != built:
            problems.append(f"recipe {name}: the row names {shown}, the recipe builds {built}")
    table = _section(text, "Plugins")
    for name, info in plugins.items():
        if getattr(info.load(), "metric", False):  # a metric ([log] metrics) only observes: the index has it
            continue
        if not re.search(rf"^\| `{class_of[name]}` \(`{name}`\) \|", table, re.M):
            problems.append(f"plugin {name}: no row `{class_of[name]}` (`{name}`) in ## Plugins")
    assert not problems, "docs/methods.md:\n  " + "\n  ".join(problems)


def test_the_demo_methods_are_documented():
    methods = cli.DEMO_METHODS
    text = " ".join((ROOT / "docs" / "config.md").read_text().split())
    assert f"(default: `{' '.join(methods)}`)" in text, \
        f"docs/config.md's streamcl demo does not give the default --methods {' '.join(methods)}"
    words = {5: "five", 6: "six", 7: "seven", 8: "eight"}
    assert f"SFM-5 with {words.get(len(methods), len(methods))} methods" in (ROOT / "README.md").read_text()


# ----------------------------------------------------------------------------- methods.md's departures name their switch
DEPARTURES = "Departures from the papers, measured"
NO_SWITCH = "No switch:"  # a departure no option switches, and why
# a switch: `Class(opt=value, ...)` (a registered plugin class) or `recipe name(opt=value, ...)` (streamcl.methods)
SWITCH = re.compile(r"(recipe )?([A-Za-z_]\w*)\((.*)\)", re.S)
TOML_WORDS = {"true": True, "false": False, "null": None}
EXTRAS = {"gem": "quadprog", "coil": "ot"}  # registered plugin -> the optional package it cannot be built without


def departure_bullets(section: str) -> list[str]:
    """The bullets (``- **Name** ...``) of a departures section, each with its lines joined by one space."""
    bullets: list[str] = []
    for line in section.splitlines():
        if line.startswith("- "):
            bullets.append(line[2:].strip())
        elif bullets and line.strip() and not line.startswith("#"):
            bullets[-1] += " " + line.strip()
    return bullets


def _title(bullet: str) -> str:
    found = re.match(r"\*\*(.+?)\*\*(?!\*)", bullet)
    return found[1] if found else bullet[:40]


def switches(bullet: str) -> list[str]:
    """The switches a bullet names: backticked spans that are a plugin class's call (a capitalised name) or a
    recipe's (``recipe name(...)``)."""
    return [span.strip() for span in re.findall(r"`([^`]+)`", bullet)
            if (m := SWITCH.fullmatch(span.strip())) and (m[1] or m[2][0].isupper())]


def without_switch(section: str) -> list[str]:
    """The bullets that name neither a switch with an option nor ``No switch:``, by title."""
    return [_title(b) for b in departure_bullets(section)
            if NO_SWITCH not in b and not any(SWITCH.fullmatch(s)[3].strip() for s in switches(b))]


def parse_switch(form: str) -> tuple[str, str, dict]:
    """``("recipe" | "plugin", name, options)``; every argument must be ``option=literal`` (Python's, or TOML's
    true / false / null)."""
    m = SWITCH.fullmatch(form)
    try:
        call = ast.parse(f"_({m[3]})", mode="eval").body
        assert isinstance(call, ast.Call) and not call.args and all(k.arg for k in call.keywords), \
            f"`{form}`: name each option, as option=value"
        options = {k.arg: TOML_WORDS[k.value.id] if isinstance(k.value, ast.Name) and k.value.id in TOML_WORDS
                   else ast.literal_eval(k.value) for k in call.keywords}
    except (SyntaxError, ValueError) as err:
        raise AssertionError(f"`{form}`: not option=literal arguments ({err})") from None
    return "recipe" if m[1] else "plugin", m[2], options


def _options(factory, passes_to=()) -> set[str]:
    """The options ``factory`` takes by name; with ``**kwargs``, also those of what it passes them to."""
    params = init_signature(factory).parameters.values()
    named = {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    if any(p.kind is p.VAR_KEYWORD for p in params):
        named |= {o for target in passes_to for o in _options(target)}
    return named


def check_switch(form: str) -> None:
    """A switch names a plugin class or recipe that takes its options, and the code builds it with them."""
    from streamcl.methods import RECIPES, build_method

    kind, name, options = parse_switch(form)
    plugins = registry.entries("plugin")
    if kind == "recipe":
        assert name in RECIPES, f"`{form}`: there is no recipe {name}"
        factory = RECIPES[name].plugins
        needs = [n for n, _ in docs.recipe_plugins(name)]
        passes_to = [plugins[n].load() for n in needs]
    else:
        classes = {info.target.rpartition(":")[2]: (n, info) for n, info in plugins.items()}
        assert name in classes, f"`{form}`: no registered plugin class is named {name}"
        needs, factory = [classes[name][0]], classes[name][1].load()
        passes_to = [c for c in factory.__mro__[1:] if "__init__" in vars(c) and c is not object]
    unknown = sorted(set(options) - _options(factory, passes_to))
    assert not unknown, f"`{form}`: {name} has no option {', '.join(unknown)}"
    for plugin in needs:
        if plugin in EXTRAS:
            pytest.importorskip(EXTRAS[plugin])
    try:
        build_method(name, **options) if kind == "recipe" else factory(**options)
    except Exception as err:  # noqa: BLE001 - whatever the code refuses it with
        raise AssertionError(f"`{form}`: the code refuses it: {type(err).__name__}: {err}") from None


METHODS_DOC = (ROOT / "docs" / "methods.md").read_text()
SWITCHES = [(_title(b), form) for b in departure_bullets(_section(METHODS_DOC, DEPARTURES)) for form in switches(b)]


def test_every_departure_names_its_switch():
    """Each bullet of docs/methods.md's departures names the option that switches it (`Class(option=value)`,
    `recipe name(option=value)`) or says ``No switch:`` and why."""
    section = _section(METHODS_DOC, DEPARTURES)
    assert len(departure_bullets(section)) >= 40
    missing = without_switch(section)
    assert not missing, f"docs/methods.md's departures without a switch or `{NO_SWITCH}`: {missing}"


@pytest.mark.parametrize("form", [form for _, form in SWITCHES], ids=[f"{t}: {f}" for t, f in SWITCHES])
def test_a_departure_switch_is_an_option_the_code_takes(form):
    check_switch(form)


def test_the_departure_check_finds_a_stale_bullet():
    section = _section("\n## Departures from the papers, measured\n\n"
                       "- **SI** uses c = 2: c = 1 (`SI(c=1)`) gives\n  0.960.\n"
                       "- **HAT** keeps one head (No switch: the protocol's single head is the model's).\n\n"
                       "- **LUCIR** `recipe lucir(freeze_old=false)` and `BiasCorrection(weighting=\n  \"paper\")`.\n"
                       "- **GNR** `GenerativeNegativeReplay(latent=4)` (an option it passes on).\n"
                       "- **MAS** names no option: `MAS()`, `mas`, `[Replay, MAS]`.\n"
                       "## Index\n", DEPARTURES)
    assert [_title(b) for b in departure_bullets(section)] == ["SI", "HAT", "LUCIR", "GNR", "MAS"]
    assert without_switch(section) == ["MAS"]
    good = [f for b in departure_bullets(section) for f in switches(b)]
    assert good == ["SI(c=1)", "recipe lucir(freeze_old=false)", "BiasCorrection(weighting= \"paper\")",
                    "GenerativeNegativeReplay(latent=4)", "MAS()"]
    for form in good:
        check_switch(form)
    for form, why in [("MAS(lamda_=1)", "has no option lamda_"), ("SupSup(infer=\"never\")", "refuses"),
                      ("recipe mir(subsample=0)", "refuses"), ("recipe nothing(memory=1)", "no recipe"),
                      ("Vanished(x=1)", "no registered plugin class"), ("SI(1)", "name each option"),
                      ("SI(c=one)", "option=literal"), ("recipe wa(distil_on=\"new\")", "has no option distil_on"),
                      ("GenerativeNegativeReplay(latnt=4)", "has no option latnt")]:
        with pytest.raises(AssertionError, match=re.escape(why)):
            check_switch(form)


# ----------------------------------------------------------------------------- nothing points outside
SOURCES = [*DOCS, *sorted(p for d in ("streamcl", "plugins", "benchmarks", "tests")
                          for p in (ROOT / d).rglob("*.py") if "__pycache__" not in p.parts), ROOT / "Makefile",
           ROOT / "pyproject.toml"]
REPO_PATH = re.compile(r"(?<![\w/.])((?:docs|streamcl|plugins|benchmarks|tests|configs)/[\w./-]*\w\."
                       r"(?:md|py|toml|json))\b")


def test_docs_point_only_inside_the_repository():
    """No doc, docstring or comment names a file outside the repository (../shared, a session's notes), a
    Markdown link resolves to a file of the repository, and every repository path named (docs/x.md,
    streamcl/x.py, benchmarks/x.py, tests/x.py, configs/x.toml) exists."""
    problems = []
    for path in SOURCES:
        if path == Path(__file__):  # its examples of wrong commands name missing files on purpose
            continue
        text, name = path.read_text(), path.relative_to(ROOT)
        for bad in ("../shared", "/work/", "notes/close"):
            if bad in text:
                problems.append(f"{name}: points outside the repository ({bad})")
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text) if path.suffix == ".md" else ():
            resolved = (path.parent / target).resolve()
            if not re.match(r"https?://", target) and not (resolved.is_relative_to(ROOT) and resolved.exists()):
                problems.append(f"{name}: link to {target}, which is not a file of the repository")
        for target in set(REPO_PATH.findall(text)):  # streamcl.plugins lives in plugins/
            if not (ROOT / target).exists() and not (ROOT / target.replace("streamcl/plugins/", "plugins/")).exists():
                problems.append(f"{name}: names {target}, which is not in the repository")
    assert not problems, "\n  ".join(["", *problems])


def test_cited_protocols_are_defined_in_protocols_md():
    protocols = (ROOT / "docs" / "protocols.md").read_text()
    defined = set(re.findall(r"^## ((?:PT-|O)?[SP]FM-\d+(?:-[A-Z]+)*) —", protocols, re.M)) | \
        set(re.findall(r"\*\*((?:PT-|O)?[SP]FM-\d+(?:-[A-Z]+)*)\*\*", protocols))
    assert set(config.PROTOCOLS) <= defined, f"config.PROTOCOLS not in docs/protocols.md: " \
                                             f"{sorted(set(config.PROTOCOLS) - defined)}"
    cited = {(p.relative_to(ROOT), name) for p in SOURCES
             for name in re.findall(r"\b((?:PT-|O)?[SP]FM-\d+(?:-[A-Z]+)*)\b", p.read_text())}
    unknown = sorted(f"{where}: {name}" for where, name in cited if name not in defined)
    assert not unknown, f"protocols cited but not defined in docs/protocols.md: {unknown}"


# ----------------------------------------------------------------------------- the checks can fail
BAD_COMMANDS = {
    "an unknown subcommand": "streamcl runn configs/pfm5.toml",
    "an unknown option": "streamcl run configs/pfm5.toml --seed 1",
    "a config that is not there": "streamcl run configs/nowhere.toml",
    "an override the config refuses": "streamcl run configs/pfm5.toml --set train.lr_decay=0.1",
    "an unknown plugin argument": "streamcl run configs/sfm5-replay.toml --set plugins.0.size=10",
    "an unknown demo method": "streamcl demo --methods naive nothing",
    "a torchrun option torchrun lacks": "torchrun --nproc=2 -m streamcl run CONFIG.toml",
    "a make target the Makefile lacks": "make docs-everything",
    "an extra pyproject.toml lacks": "pip install 'streamcl[everything]'",
    "a program the test does not know": "streamcl-train run configs/pfm5.toml",
}


@pytest.mark.parametrize("what", sorted(BAD_COMMANDS))
def test_a_wrong_command_is_caught(what, doc_packages, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    block = Block("README.md", 0, "bash", BAD_COMMANDS[what] + "\n", None)
    with pytest.raises((AssertionError, pytest.fail.Exception, config.ConfigError)):
        for command in commands(block):
            check_command(command, block)


def test_output_the_command_does_not_print_is_caught():
    block = Block("docs/config.md", 0, "console", "", None)
    check_streamcl(["methods"], block, ["method  what it does", "------  ------------", "naive   fine-tune on each "
                                        "experience in turn, nothing against forgetting (lower bound)"])
    with pytest.raises(AssertionError, match="rows the command does not print"):
        check_streamcl(["methods"], block, ["method  what it does", "------  ------------", "naive   does nothing"])
