"""Checks of the documentation against the code, without running anything: every printed command that runs one of
our entry points parses with that entry point's own argument parser and config loader, and every relative link
resolves. ``check_commands`` and ``check_links`` return one message per problem, naming the file and line."""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib
import importlib.util
import io
import json
import os
import re
import shlex
import tomllib
from types import ModuleType

from helpers import REPO

SHELL_TAGS = {"bash", "sh", "shell", "console"}
ELLIPSES = {"...", "…"}
# Wrappers that start our command somewhere among their own arguments; the command begins at its interpreter.
WRAPPERS = {"srun", "mpirun", "mpiexec", "nohup", "time", "exec", "env"}
PYTHONS = re.compile(r"^(\S*/)?python(3(\.\d+)?)?$")
ASSIGNMENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")
SEPARATORS = {"&&", "||", ";", "|"}
FENCE = re.compile(r"^\s*(```+|~~~+)\s*([\w+-]*)")
HEREDOC = re.compile(r"<<-?\s*['\"]?(\w+)['\"]?")
LINK = re.compile(r"!?\[(?:[^\]\[]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")


class DocError(Exception):
    """A documented command that its entry point would refuse."""


@dataclasses.dataclass
class Command:
    path: str
    line: int
    text: str
    fragment: bool = False

    def where(self) -> str:
        return f"{os.path.relpath(self.path, REPO)}:{self.line}: `{self.text}`"


def _fenced_blocks(text: str) -> list[tuple[str, int, list[str]]]:
    """(info tag, line number of the block's first line, its lines) for every fenced block."""
    blocks, lines, i = [], text.splitlines(), 0
    while i < len(lines):
        opening = FENCE.match(lines[i])
        if not opening:
            i += 1
            continue
        fence, tag, body, i = opening.group(1), opening.group(2).lower(), [], i + 1
        start = i + 1
        while i < len(lines) and not lines[i].strip().startswith(fence):
            body.append(lines[i])
            i += 1
        blocks.append((tag, start, body))
        i += 1
    return blocks


def shell_commands(path: str, text: str) -> list[Command]:
    """The commands of shell blocks (and of untagged blocks, line by line), continuations joined, prompts and
    heredoc bodies dropped; whether a command is ours is ``invocation``'s question."""
    commands = []
    for tag, start, body in _fenced_blocks(text):
        if tag and tag not in SHELL_TAGS:
            continue
        heredoc_end, pending, pending_line = None, "", 0
        for offset, raw in enumerate(body):
            line = raw.rstrip()
            if heredoc_end is not None:
                heredoc_end = None if line.strip() == heredoc_end else heredoc_end
                continue
            if tag == "console":
                if not line.lstrip().startswith("$ ") and not pending:
                    continue  # a console block's other lines are output
            if not pending:
                pending_line = start + offset
                line = re.sub(r"^\s*\$\s+", "", line)
            if line.endswith("\\"):
                pending += line[:-1] + " "
                continue
            full, pending = (pending + line).strip(), ""
            found = HEREDOC.search(full)
            if found:
                heredoc_end = found.group(1)
            if full and not full.startswith("#") and (tag or _starts_like_ours(full)):
                commands.append(Command(path, pending_line, full))
    return commands


def _starts_like_ours(text: str) -> bool:
    """An untagged block's line (or an inline code span) is taken for a command when it starts like one of ours;
    a diagram or a path is not."""
    words = [w for w in text.split() if not ASSIGNMENT.match(w)]
    if not words:
        return False
    head = words[0]
    return bool(PYTHONS.match(head)) or head in _console_scripts() or head in WRAPPERS | {
        "deepspeed", "torchrun", "make", "bash", "sbatch"}


def inline_commands(path: str, text: str) -> list[Command]:
    """Inline code spans in prose that start like one of our commands (the benchmark tables' commands); they are
    often fragments, so options a complete command would need may be missing."""
    spans = [(number, " ".join(m.group(1).split())) for number, m in _matches(text, r"`([^`]+)`")]
    return [Command(path, number, span, fragment=True) for number, span in spans if _names_ours(span)]


def _names_ours(span: str) -> bool:
    """A span that runs something of ours, not one that only names a launcher or its flag (`deepspeed
    --num_gpus`)."""
    head = span.split()[0] if span.split() else ""
    named = bool(PYTHONS.match(head)) or head in _console_scripts() or head == "make"
    return _starts_like_ours(span) and (named or bool(re.search(r"lcr_fast[./]|benchmarks/|examples/", span)))


def _split_pipeline(tokens: list[str]) -> list[list[str]]:
    parts, current = [], []
    for token in tokens:
        if token in SEPARATORS:
            parts.append(current)
            current = []
        else:
            current.append(token)
    return [p for p in parts + [current] if p]


def _console_scripts() -> dict[str, str]:
    """``lcr-eval`` -> ``lcr_fast.eval.cli``, from pyproject.toml: the installed commands are whatever it declares."""
    with open(os.path.join(REPO, "pyproject.toml"), "rb") as f:
        scripts = tomllib.load(f)["project"]["scripts"]
    return {name: target.split(":")[0] for name, target in scripts.items()}


def _make_targets() -> set[str]:
    with open(os.path.join(REPO, "Makefile")) as f:
        return set(re.findall(r"^([\w.-]+):", f.read(), flags=re.M))


@dataclasses.dataclass
class Invocation:
    """One of our entry points and the arguments it is given: ``module`` (importable) or ``script`` (a file of
    ours that is not a module, e.g. a benchmark or a shell script), or a ``make`` target."""
    args: list[str]
    module: str | None = None
    script: str | None = None
    make_target: str | None = None
    sbatch: bool = False


def _python_invocation(tokens: list[str]) -> Invocation | None:
    """``python [-u ...] (-m MODULE | SCRIPT) ARGS``."""
    i = 1
    while i < len(tokens) and tokens[i].startswith("-"):
        if tokens[i] == "-m":
            ours = i + 1 < len(tokens) and tokens[i + 1].split(".")[0] == "lcr_fast"
            return Invocation(tokens[i + 2:], module=tokens[i + 1]) if ours else None  # not pytest, pip
        i += 1
    return _script_invocation(tokens[i], tokens[i + 1:]) if i < len(tokens) else None


def _script_invocation(script: str, args: list[str]) -> Invocation | None:
    if script.startswith("lcr_fast/") and script.endswith(".py"):
        return Invocation(args, module=script[:-3].replace("/", "."))
    if script.startswith(("benchmarks/", "examples/", ".ci/", "tests/")):
        return Invocation(args, script=script)
    return None


def _launcher_invocation(tokens: list[str]) -> Invocation:
    """``deepspeed`` and ``torchrun``: their own parsers check their flags and say where our script starts."""
    try:
        if tokens[0] == "deepspeed":
            from deepspeed.launcher.runner import parse_args
            parsed = parse_args(tokens[1:])
            target, module, args = parsed.user_script, parsed.module, parsed.user_args
        else:
            from torch.distributed.run import get_args_parser
            parsed = get_args_parser().parse_args(tokens[1:])
            target, module, args = parsed.training_script, parsed.module, parsed.training_script_args
    except DocError as exc:
        raise DocError(f"{tokens[0]}: {exc}") from exc
    if module:
        return Invocation(args, module=target)
    found = _script_invocation(target, args)
    if found is None:
        raise DocError(f"{tokens[0]} starts {target!r}, which is not one of our entry points")
    return found


def invocation(tokens: list[str]) -> Invocation | None:
    """Which of our entry points ``tokens`` (one simple command) runs, or None when it runs none."""
    while tokens and ASSIGNMENT.match(tokens[0]):
        tokens = tokens[1:]
    if not tokens:
        return None
    head = tokens[0]
    if head in WRAPPERS:
        for i, token in enumerate(tokens[1:], 1):
            if PYTHONS.match(token) or token in _console_scripts() or token in ("deepspeed", "torchrun"):
                return invocation(tokens[i:])
        return None
    if PYTHONS.match(head):
        return _python_invocation(tokens)
    if head in ("deepspeed", "torchrun"):
        return _launcher_invocation(tokens)
    if head in _console_scripts():
        return Invocation(tokens[1:], module=_console_scripts()[head])
    if head in ("bash", "sh") and len(tokens) > 1:
        return _script_invocation(tokens[1], tokens[2:])
    if head == "sbatch":
        scripts = [t for t in tokens[1:] if t.endswith(".sbatch")]
        return Invocation(tokens[tokens.index(scripts[0]) + 1:], script=scripts[0], sbatch=True) if scripts else None
    if head == "make":
        return Invocation([], make_target=tokens[1] if len(tokens) > 1 else "")
    return None


def _module_parser(name: str) -> argparse.ArgumentParser:
    """``build_parser()`` of a module, of a package's command-line module (the one its ``__main__`` calls), or
    of a benchmark loaded by path."""
    try:
        module = importlib.import_module(name)
    except ImportError as exc:
        raise DocError(f"no module {name!r}") from exc
    if not hasattr(module, "build_parser") and hasattr(module, "__path__"):
        entry = importlib.import_module(f"{name}.__main__").main
        module = importlib.import_module(entry.__module__)
    if not hasattr(module, "build_parser"):
        raise DocError(f"{name} has no build_parser(): it is not a command line")
    return module.build_parser()


def _script_module(script: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"doc_check_{os.path.basename(script)[:-3]}",
                                                  os.path.join(REPO, script))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _placeholder(value: str) -> bool:
    return bool(re.search(r"[<>$]|\.\.\.", value))


def _default_of(key: str) -> object:
    """The default at a dotted key, or KeyError when there is no such key."""
    from lcr_fast.config import DEFAULTS
    node = DEFAULTS
    for part in key.split("."):
        node = node[part]
    return node


def check_config(config: str | None, overrides: list[str]) -> None:
    """Load ``config`` with ``overrides`` as the trainer would; a placeholder value (``<path>``, ``$DATA``) is
    replaced by the key's default, so that only the key itself is checked."""
    from lcr_fast.config import load_config
    from lcr_fast.errors import UserError
    checked = []
    for item in overrides:
        key, _, value = item.partition("=")
        if _placeholder(value):
            with contextlib.suppress(KeyError, TypeError):
                value = json.dumps(_default_of(key))
        checked.append(f"{key}={value}")
    try:
        load_config(None if config is None or _placeholder(config) else config, checked)
    except (UserError, OSError) as exc:
        raise DocError(str(exc).splitlines()[0]) from exc


def _raise_instead_of_exit(self: argparse.ArgumentParser, message: str) -> None:
    raise DocError(message)


def _parse(parser: argparse.ArgumentParser, args: list[str], elided: bool) -> argparse.Namespace | None:
    """Parse as the command line would, but with every option spelt out (argparse would take ``--warm`` for
    ``--warmup``; a reader should not have to guess); a shortened command may leave required options out."""
    parser.allow_abbrev = False
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            return parser.parse_args(args)
    except SystemExit:
        return None  # --help: it prints and exits 0 (every error raises DocError instead)
    except DocError as exc:
        if elided and "required" in str(exc):
            return None
        raise


def check_invocation(call: Invocation, fragment: bool = False) -> None:
    """Raise DocError when ``call`` names a flag, config, key, script or target that does not exist; a
    ``fragment`` (or a command shortened with ``...``) may leave required options out."""
    if call.make_target is not None:
        if call.make_target and call.make_target not in _make_targets():
            raise DocError(f"no make target {call.make_target!r} in the Makefile")
        return
    args = [a for a in call.args if a not in ELLIPSES]
    elided = fragment or len(args) < len(call.args)
    if call.script is not None:
        if not os.path.isfile(os.path.join(REPO, call.script)):
            raise DocError(f"no such file {call.script!r}")
        if call.sbatch:
            check_config(None, [a for a in args if "=" in a and not a.startswith("-")])
            return
        if not call.script.endswith(".py"):
            return
        parser = _script_module(call.script).build_parser()
    else:
        parser = _module_parser(call.module)
    try:
        parsed = _parse(parser, args, elided)
    except DocError as exc:
        raise DocError(f"{call.module or call.script}: {exc}") from exc
    if parsed is None:
        return
    if call.module == "lcr_fast.train":
        from lcr_fast.train import take_override_from_resume
        take_override_from_resume(parsed)
    config = getattr(parsed, "config_file", None) or getattr(parsed, "config", None)
    overrides = getattr(parsed, "overrides", [])
    if config is not None or overrides:
        check_config(config, overrides)


def check_commands(path: str, text: str | None = None) -> list[str]:
    """One message per documented command of ours that would not start, naming the file, line and mistake."""
    if text is None:
        with open(path) as f:
            text = f.read()
    problems = []
    original_error = argparse.ArgumentParser.error
    argparse.ArgumentParser.error = _raise_instead_of_exit
    try:
        with _in_repo():
            for command in shell_commands(path, text) + inline_commands(path, text):
                try:
                    tokens = shlex.split(command.text, comments=True)
                except ValueError as exc:
                    problems.append(f"{command.where()}: not a shell command: {exc}")
                    continue
                for part in _split_pipeline(tokens):
                    try:
                        call = invocation(part)
                        if call is not None:
                            check_invocation(call, command.fragment)
                    except DocError as exc:
                        problems.append(f"{command.where()}: {exc}")
    finally:
        argparse.ArgumentParser.error = original_error
    return problems


@contextlib.contextmanager
def _in_repo():
    """The documentation's paths (``configs/demo.yaml``) are relative to the checkout's root."""
    cwd = os.getcwd()
    os.chdir(REPO)
    try:
        yield
    finally:
        os.chdir(cwd)


def heading_anchors(text: str) -> set[str]:
    """GitHub's anchors of the Markdown headings in ``text``: lower case, punctuation dropped, spaces as
    hyphens, a repeated one numbered."""
    anchors, seen = set(), {}
    in_fence = False
    for line in text.splitlines():
        if FENCE.match(line):
            in_fence = not in_fence
        if in_fence or not re.match(r"^#{1,6}\s", line):
            continue
        slug = re.sub(r"[^\w\- ]", "", line.lstrip("#").strip().lower()).replace(" ", "-")
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        anchors.add(slug if count == 0 else f"{slug}-{count}")
    return anchors


def _paragraphs(text: str) -> list[tuple[int, str]]:
    """(line number of its first line, text) of each paragraph outside fenced blocks: an inline code span or a
    link may wrap onto the next line."""
    paragraphs, current, first, in_fence = [], [], 0, False
    for number, line in enumerate(text.splitlines(), 1):
        fence = bool(FENCE.match(line))
        in_fence ^= fence
        if fence or in_fence or not line.strip():
            if current:
                paragraphs.append((first, "\n".join(current)))
            current = []
            continue
        if not current:
            first = number
        current.append(line)
    if current:
        paragraphs.append((first, "\n".join(current)))
    return paragraphs


def _without_code(paragraph: str) -> str:
    """Inline code blanked out, newlines kept: a link inside code is not a link."""
    return re.sub(r"`[^`]*`", lambda m: re.sub(r"[^\n]", " ", m.group(0)), paragraph)


def _matches(text: str, pattern: str | re.Pattern, in_code: bool = True) -> list[tuple[int, re.Match]]:
    """Each match of ``pattern`` in the paragraphs of ``text`` (outside inline code unless ``in_code``), with
    the line it starts on."""
    found = []
    for first, paragraph in _paragraphs(text):
        searched = paragraph if in_code else _without_code(paragraph)
        found += [(first + searched[:m.start()].count("\n"), m) for m in re.finditer(pattern, searched)]
    return found


def check_links(path: str, text: str | None = None) -> list[str]:
    """One message per relative link or image in ``path`` whose file, or whose ``#anchor`` in a Markdown file,
    does not exist."""
    if text is None:
        with open(path) as f:
            text = f.read()
    problems = []
    for number, match in _matches(text, LINK, in_code=False):
        target = match.group(1)
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):
            continue  # https:, mailto:: not ours to resolve offline
        file_part, _, anchor = target.partition("#")
        where = f"{os.path.relpath(path, REPO)}:{number}: link {target!r}"
        if not file_part:
            if anchor not in heading_anchors(text):
                problems.append(f"{where}: no heading #{anchor} on this page")
            continue
        resolved = os.path.normpath(os.path.join(os.path.dirname(path), file_part))
        if not os.path.exists(resolved):
            problems.append(f"{where}: no such file {os.path.relpath(resolved, REPO)}")
        elif anchor and resolved.endswith(".md"):
            with open(resolved) as f:
                if anchor not in heading_anchors(f.read()):
                    problems.append(f"{where}: no heading #{anchor} in {os.path.relpath(resolved, REPO)}")
    return problems
