"""Options that turn a common read-only program into one that runs or writes things.

A rule allowing ``tar -tf *`` or ``sort *`` looks harmless; ``tar --checkpoint-action=exec=…``
and ``sort -o /etc/passwd`` are not. Whatever a rule's pattern says, a use listed here makes
the command unsafe: it can only be held or blocked, never allowed. Some programs are unsafe in
any use (pagers and editors run commands from within).

Long options match as ``--opt`` or ``--opt=…``; single letters also inside a cluster of short
options (``-ro FILE`` holds ``sort`` as ``-o`` would).
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence

# program: (options as written, short option letters, why)
RISKY_OPTIONS: dict[str, tuple[frozenset[str], str, str]] = {
    "tar": (
        frozenset(
            """--checkpoint-action --to-command --use-compress-program --rsh-command
            --info-script --new-volume-script --rmt-command --index-file --create --extract
            --get --append --update --delete --remove-files -I -F""".split()
        ),
        "cxruIF",
        "runs programs or writes files",
    ),
    "find": (
        frozenset("-exec -execdir -ok -okdir -delete -fprint -fprint0 -fprintf -fls".split()),
        "",
        "runs programs, deletes or writes files",
    ),
    "git": (
        frozenset(
            """-c --config-env --exec-path --upload-pack --receive-pack -C --output
            --ext-diff --textconv --open-files-in-pager --paginate -p --git-dir --work-tree
            --namespace -O --orderfile""".split()
        )
        - {"-p"},
        "O",
        "writes files or runs configured programs (pager, diff drivers, hooks)",
    ),
    "journalctl": (
        frozenset(
            """--vacuum-time --vacuum-size --vacuum-files --rotate --flush --sync
            --relinquish-var --smart-relinquish-var --setup-keys --update-catalog
            --cursor-file --machine --directory --file --root --image -M -D""".split()
        ),
        "MD",
        "changes the journal, writes files or reads another",
    ),
    "grep": (
        frozenset("-r -R --recursive --dereference-recursive -f --file -d --directories".split()),
        "rRfd",
        "reads files other than those named (recursively, or a pattern file)",
    ),
    "systemctl": (frozenset("-H --host -M --machine".split()), "HM", "reaches another host"),
    "sort": (
        frozenset("-o --output --compress-program --files0-from -T --temporary-directory".split()),
        "oT",
        "writes files or reads files named elsewhere",
    ),
    "wc": (frozenset({"--files0-from"}), "", "reads files named elsewhere"),
    "du": (frozenset({"--files0-from"}), "", "reads files named elsewhere"),
    "zip": (frozenset("-T --test -TT --unzip-command".split()), "T", "runs programs"),
    "rsync": (frozenset("-e --rsh --rsync-path".split()), "e", "runs programs"),
    "date": (frozenset("-s --set -f --file".split()), "sf", "sets the clock or reads a file"),
    "tcpdump": (frozenset("-w -z -Z".split()), "wzZ", "writes files or runs programs"),
    "sed": (frozenset("-i --in-place -f --file".split()), "if", "edits or reads files"),
}
ALWAYS_RISKY = {
    **dict.fromkeys(
        "less more most view vi vim nvim ex ed emacs nano pico man info".split(),
        "is interactive and can run commands from within",
    ),
    "tee": "writes files",
    # reads any local file (file://, -d @file, -H @file), writes them (-o, -D, -c, --trace,
    # --libcurl, …) and reaches any host from the target: too many ways to list one by one
    "curl": "reads, writes and sends files and reaches any host",
    "wget": "writes files and reaches any host",
}
# The only sed scripts an allow rule may let through: print, delete, quit, line ranges and
# s///[gpI] substitutions — no e (execute), w/W (write) or r/R (read another file).
# (No backslash anywhere: an escaped delimiter would make sed read the script otherwise.)
_SAFE_SED = re.compile(
    r"^(?:(?:\d+|\$|/[^/\\]*/)(?:,(?:\d+|\$|/[^/\\]*/))?)?!?\s*"
    r"(?:[pdqP=]|s([^\\\s])(?:(?!\1)[^\\])*\1(?:(?!\1)[^\\])*\1[gpI0-9]*)$"
)


def _uses(word: str, options: frozenset[str], letters: str) -> bool:
    name = word.split("=", 1)[0]
    if name in options:
        return True
    if name.startswith("--") and len(name) > 2:  # GNU takes any unambiguous prefix
        return any(option.startswith(name) for option in options if option.startswith("--"))
    if not word.startswith("-") or len(word) < 2:
        return False
    return any(letter in letters for letter in word[1:].split("=", 1)[0])


def risky_use(program: str, args: Sequence[str]) -> Iterator[str]:
    """Why this use of ``program`` is unsafe (nothing when it is not)."""
    if program in ALWAYS_RISKY:
        yield f"{program} {ALWAYS_RISKY[program]}"
        return
    listed = RISKY_OPTIONS.get(program)
    if listed is not None:
        options, letters, why = listed
        if program == "tar" and args and args[0].isalpha():  # old style: `tar xvf a.tar`
            args = ["-" + args[0], *args[1:]]
        for word in args:
            if word == "--":
                break
            if _uses(word, options, letters):
                yield f"{program} {word.split('=', 1)[0]} {why}"
                return
    if program == "tar" and any(":" in word for word in args):
        yield "tar with host:path reads or writes a remote archive through a remote shell"
        return
    if program == "sed" and any(not _SAFE_SED.match(s.strip()) for s in sed_scripts(args)):
        yield "sed with a script beyond printing and substitution may run or write things"


SED_VALUES = "efl"  # short options that take a value: -e SCRIPT, -f FILE, -l N


def sed_scripts(args: Sequence[str]) -> list[str]:
    """The scripts GNU sed would run, read as its getopt reads them: ``-e SCRIPT``,
    ``-eSCRIPT``, ``-neSCRIPT``, ``--expression=SCRIPT`` and any prefix of it (``--e=``,
    ``--expr SCRIPT``); with none of these, the first word that is not an option."""
    scripts: list[str] = []
    positional: list[str] = []
    words = iter(args)
    for word in words:
        if word == "--":
            positional += words
            break
        if word.startswith("--") and len(word) > 2:
            name, has_value, value = word.partition("=")
            takes = [o for o in ("--expression", "--file", "--line-length") if o.startswith(name)]
            if takes and not has_value:
                value = next(words, "")
            if "--expression" in takes:  # an ambiguous prefix counts as a script: erring safe
                scripts.append(value)
            continue
        if word.startswith("-") and len(word) > 1:
            for i, letter in enumerate(word[1:], start=1):
                if letter in SED_VALUES:
                    value = word[i + 1 :] or next(words, "")
                    if letter == "e":
                        scripts.append(value)
                    break
            continue
        positional.append(word)
    return scripts or positional[:1]
