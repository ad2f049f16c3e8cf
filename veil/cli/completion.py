"""`veil completion bash|zsh`: a shell completion script generated from the parser itself, so
every command and option is completed without another dependency.

    source <(veil completion bash)          # bash
    source <(veil completion zsh)           # zsh (through bashcompinit)
"""

from __future__ import annotations

import argparse
import shlex
from typing import TYPE_CHECKING

from veil.cli.common import bind, example

if TYPE_CHECKING:
    from veil.cli.common import Subcommands

_BASH = """_veil_complete() {{
    local known={known} path="" word next words
    for word in "${{COMP_WORDS[@]:1:COMP_CWORD-1}}"; do
        next="${{path:+$path }}$word"
        case "$known" in *"|$next|"*) path="$next" ;; esac
    done
    case "$path" in
{cases}
        *) words="" ;;
    esac
    COMPREPLY=($(compgen -W "$words" -- "${{COMP_WORDS[COMP_CWORD]}}"))
}}
complete -o default -F _veil_complete veil
"""
_ZSH = "autoload -U +X bashcompinit && bashcompinit\n"


def words_by_path(parser: argparse.ArgumentParser) -> dict[str, list[str]]:
    """For each command path ("", "token", "token transfer"...): what may follow it."""
    table: dict[str, list[str]] = {}

    def walk(node: argparse.ArgumentParser, path: str) -> None:
        words: list[str] = []
        for action in node._actions:
            if isinstance(action, argparse._SubParsersAction):
                for word, sub in action.choices.items():
                    words.append(word)
                    walk(sub, f"{path} {word}".strip())
            else:
                words.extend(action.option_strings)
        table[path] = sorted(set(words))

    walk(parser, "")
    return table


def script(shell: str, parser: argparse.ArgumentParser) -> str:
    empty = '""'
    cases = "\n".join(
        f"        {shlex.quote(path) if path else empty}) words={shlex.quote(' '.join(words))} ;;"
        for path, words in sorted(words_by_path(parser).items())
    )
    known = shlex.quote("|" + "|".join(words_by_path(parser)) + "|")
    bash = _BASH.format(cases=cases, known=known)
    return bash if shell == "bash" else _ZSH + bash


def register(commands: Subcommands) -> None:
    completion = commands.add_parser(
        "completion",
        help="print a shell completion script (bash or zsh)",
        epilog=example("source <(veil completion bash)"),
    )
    completion.add_argument("shell", choices=("bash", "zsh"))
    bind(completion, completion_command)


def completion_command(args: argparse.Namespace) -> int:
    from veil.cli.main import build_parser  # the whole tree, this command included

    print(script(args.shell, build_parser()), end="")
    return 0
