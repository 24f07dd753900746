"""What a shell command line would run, from bashlex's parse tree, never from text matching.

The line is split into its simple commands (across ``;``, ``&&``, ``||``, pipes, subshells,
compound commands and substitutions) and every feature that lets one command run another or
touch files behind a pattern's back is named in ``unsafe``. Rules match patterns against each
simple command; an ``allow`` needs every command matched and nothing unsafe.
"""

from __future__ import annotations

import os.path
import re
from dataclasses import dataclass, field
from typing import Any

import bashlex
import bashlex.errors

from keyturn.classify.budget import budget, spend
from keyturn.classify.options import risky_use
from keyturn.errors import TooComplex

# Commands whose job is to run another command (its policy would never be checked).
WRAPPERS = frozenset(
    """
    sudo su doas env nohup timeout xargs exec eval nice ionice setsid stdbuf chroot watch time
    command builtin strace ltrace ssh busybox flock unbuffer script runuser systemd-run
    parallel nsenter unshare chrt taskset sg newgrp
    """.split()
)
# Interpreters: given -c, -e or a script on stdin they run arbitrary code.
INTERPRETERS = frozenset(
    """
    sh bash dash zsh ksh csh tcsh fish python python2 python3 perl ruby node nodejs php lua
    awk gawk mawk nawk tclsh expect psql mysql sqlite3 osascript pwsh
    """.split()
)
SHELLS = frozenset({"sh", "bash", "dash", "zsh", "ksh", "csh", "tcsh", "fish"})
GLOB_CHARS = frozenset("*?[]{}")


@dataclass
class ShellAnalysis:
    parsed: bool
    commands: list[list[str]] = field(default_factory=list)
    reasons: list[str] = field(default_factory=list)
    unsafe: list[str] = field(default_factory=list)
    # Commands run *by* other commands (sudo X, bash -c 'X'): only block/hold rules look here.
    inner: list[list[str]] = field(default_factory=list)

    def flag(self, reason: str) -> None:
        if reason not in self.unsafe:
            self.unsafe.append(reason)


class _Walker:
    def __init__(self, analysis: ShellAnalysis) -> None:
        self.a = analysis
        self.operators: set[str] = set()

    def visit(self, node: Any, nested: bool = False) -> None:
        spend()
        kind = node.kind
        if kind == "command":
            self._command(node, nested)
        elif kind == "operator":
            self.operators.add(node.op)
            if node.op == "&":
                self.a.flag("runs a command in the background (&)")
        elif kind == "pipe":
            self.operators.add("|")
        elif kind in ("list", "pipeline"):
            for part in node.parts:
                self.visit(part, nested)
        elif kind == "compound":
            words = [getattr(p, "word", "") for p in node.list if p.kind == "reservedword"]
            self.a.flag(
                "uses a subshell or group"
                if words[:1] in (["("], ["{"])
                else "uses shell control flow"
            )
            for part in node.list:
                self.visit(part, True)
        elif kind in ("if", "for", "while", "until", "function"):
            self.a.flag(f"uses shell control flow ({kind})")
            for part in getattr(node, "parts", []):
                self.visit(part, True)
        elif kind in ("reservedword", "word"):
            self._word(node)
        else:
            self.a.flag(f"uses an unsupported shell construct ({kind})")

    def _word(self, node: Any) -> None:
        for part in getattr(node, "parts", []) or []:
            if part.kind == "commandsubstitution":
                self.a.flag("uses command substitution ($(…) or backticks)")
                self.visit(part.command, True)
            elif part.kind == "processsubstitution":
                self.a.flag("uses process substitution (<(…) or >(…))")
                self.visit(part.command, True)
            elif part.kind == "parameter":
                self.a.flag(f"expands a variable (${part.value})")
            elif part.kind == "tilde":
                continue
            else:
                self.a.flag(f"uses word expansion ({part.kind})")

    def _command(self, node: Any, nested: bool) -> None:
        words: list[str] = []
        for part in node.parts:
            if part.kind == "assignment":
                self.a.flag(f"sets an environment variable ({part.word.split('=', 1)[0]}=…)")
                self._word(part)
            elif part.kind == "redirect":
                target = part.output
                where = getattr(target, "word", str(target))
                self.a.flag(f"redirects {part.type} {where}")
                if hasattr(target, "kind"):
                    self._word(target)
            elif part.kind == "word":
                words.append(part.word)
                self._word(part)
            else:
                self.visit(part, True)
        if not words:
            return
        self.a.commands.append(words)
        program = os.path.basename(words[0])
        if program in WRAPPERS:
            self.a.flag(f"{program} runs another command")
            # we cannot know where its own options end: every tail may be the wrapped command
            spend(len(words) * len(words) // 2)  # that many words copied, and matched later
            self.a.inner += [words[i:] for i in range(1, len(words))]
        if program in INTERPRETERS or program.startswith(("python", "perl", "ruby", "php")):
            self.a.flag(f"{program} can run arbitrary code")
            if program in SHELLS and "-c" in words[1:-1]:
                script = analyze_shell(words[words.index("-c", 1) + 1])
                self.a.inner += script.commands + script.inner
        for reason in risky_use(program, words[1:]):
            self.a.flag(reason)
        if any(set(word) & GLOB_CHARS for word in words[1:]):
            self.a.flag("an argument has glob or brace characters the shell would expand")
        if nested:
            self.a.reasons.append(f"nested command: {' '.join(words)}")


# bashlex parses in Python, and each quote, backtick, $ or brace may start a nested parse: a
# line of 64 KiB of backticks took 2.5 s. Past this many words and special characters (each
# counted alone), a line is refused unparsed; at the cap bashlex takes well under 0.1 s.
# Quotes are not understood here: a quoted script counts its words, erring towards refusal.
MAX_TOKENS = 2_000
_TOKENS = re.compile(r"[^\s|;&()<>`$'\"\\{}]+|[|;&()<>`$'\"\\{}]")


def analyze_shell(line: str) -> ShellAnalysis:
    """Raises TooComplex for a line of more than :data:`MAX_TOKENS` words and special
    characters."""
    if not line.strip():
        return ShellAnalysis(parsed=False, reasons=["empty command"])
    if "\n" in line.strip() or "\r" in line:
        return ShellAnalysis(parsed=False, reasons=["multi-line shell input is not accepted"])
    if len(_TOKENS.findall(line)) > MAX_TOKENS:  # counted in C before bashlex's Python parse
        raise TooComplex(
            f"the shell command has more than {MAX_TOKENS:,} words and special characters; "
            "split it up"
        )
    try:
        with budget():
            spend(len(line))  # bashlex's parse: linear in the line
            trees = bashlex.parse(line)
            analysis = ShellAnalysis(parsed=True)
            walker = _Walker(analysis)
            for tree in trees:
                walker.visit(tree)
    except (bashlex.errors.ParsingError, NotImplementedError, IndexError, AttributeError) as exc:
        return ShellAnalysis(parsed=False, reasons=[f"not parseable as a shell command: {exc}"])
    except RecursionError:
        raise TooComplex(
            "the shell command nests too deeply for keyturn to analyse; simplify it"
        ) from None
    if not analysis.commands:
        return ShellAnalysis(parsed=False, reasons=["no command found"])
    if len(analysis.commands) > 1:
        ops = ", ".join(sorted(walker.operators)) or "nesting"
        analysis.reasons.append(f"{len(analysis.commands)} commands ({ops})")
    analysis.reasons.extend(analysis.unsafe)
    return analysis
