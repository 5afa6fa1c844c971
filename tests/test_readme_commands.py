"""What the README and docs/ tell a user to type, and the counts they state, against the code: every
`wardwatch ...` command they show exists with the options they give it (a user copying one must not meet
"No such command" or "No such option"), the README's command table lists exactly the CLI's commands, and
its feature counts are those of schemas/features.py."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import typer

from schemas.features import FEATURE_NAMES, FEATURES
from tests.wardwatch.test_models import NOT_YET_TRAINED_ON
from wardwatch.cli import app

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
CLI = typer.main.get_command(app)
INVOCATION = re.compile(r"(?:^|[\s/(])wardwatch\s+([^#|;&)`]*)")


def code_texts(text: str) -> list[str]:
    """Every fenced code line and every inline code span of a markdown text."""
    found, fenced = [], False
    for line in text.splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
        elif fenced:
            found.append(line.split("#", 1)[0])  # a shell comment is prose
        else:
            found.extend(re.findall(r"`([^`]+)`", line))
    return found


def resolve(tokens: list[str]):
    """The command the tokens name (subcommands followed while they name one), its path, and the first token
    that should have named a subcommand but names none (else None)."""
    command, path = CLI, []
    for token in tokens:
        if not re.fullmatch(r"[a-z][a-z0-9-]*", token) or not hasattr(command, "commands"):
            break  # an option, an argument, or a placeholder (`wardwatch deploy ...`)
        if token not in command.commands:
            return command, path, token
        command, path = command.commands[token], [*path, token]
    return command, path, None


def options(command) -> set[str]:
    return {opt for param in command.params for opt in (*param.opts, *param.secondary_opts)} | {"--help"}


def invocations():
    for doc in DOCS:
        for code in code_texts(doc.read_text()):
            for match in INVOCATION.finditer(code):
                tokens = match.group(1).split()
                if tokens and not tokens[0].startswith("-") and tokens[0][0].islower():
                    yield pytest.param(doc.name, code, tokens, id=f"{doc.name}: wardwatch {' '.join(tokens)}"[:120])


@pytest.mark.parametrize("doc, code, tokens", list(invocations()))
def test_every_command_the_docs_show_exists_with_the_options_they_give_it(doc, code, tokens):
    command, path, unknown = resolve(tokens)
    assert unknown is None, f"{doc} shows `{code}`: `wardwatch {' '.join(path)}` has no command {unknown!r}"
    given = {token.split("=", 1)[0] for token in tokens if token.startswith("--")}
    assert given <= options(command), (
        f"{doc} shows `{code}`: `wardwatch {' '.join(path)}` has no option {sorted(given - options(command))}")


def cli_commands(command=CLI, path=()) -> set[str]:
    """Every command a user can run: the leaves, and the groups that run without a subcommand."""
    found = set()
    for name, sub in command.commands.items():
        if getattr(sub, "hidden", False):
            continue
        if hasattr(sub, "commands"):
            if sub.invoke_without_command:
                found.add(" ".join((*path, name)))
            found |= cli_commands(sub, (*path, name))
        else:
            found.add(" ".join((*path, name)))
    return found


def table_commands() -> set[str]:
    """The commands of the README's table under "Commands" (`model list|promote|rollback` is three)."""
    table = (ROOT / "README.md").read_text().split("\nCommands (", 1)[1].split("\n\n")[1]
    found = set()
    for row in table.splitlines()[2:]:
        for item in re.findall(r"`([^`]+)`", row):
            tokens = [t for t in item.replace("\\|", "|").split() if not t.startswith(("[", "-")) and not t.isupper()]
            head, rest = tokens[0], tokens[1:]
            command = CLI.commands[head]
            if rest and hasattr(command, "commands"):
                found |= {f"{head} {sub}" for sub in rest[0].split("|")}
            else:
                found.add(head)
    return found


def test_the_readme_command_table_lists_exactly_the_commands_of_the_cli():
    assert table_commands() == cli_commands()


def test_the_readme_counts_the_features_schemas_declare_and_the_shipped_model_reads():
    readme = (ROOT / "README.md").read_text().replace("\n", " ")
    assert int(re.search(r"\((\d+) window aggregations", readme).group(1)) == len(FEATURES)
    assert int(re.search(r"qSOFA: (\d+) in all\)", readme).group(1)) == len(FEATURE_NAMES)
    said = re.search(r"`NOT_YET_TRAINED_ON` \(([^)]*)\)", readme).group(1)
    assert all(f"`{name}`" in said for name in NOT_YET_TRAINED_ON) and (NOT_YET_TRAINED_ON or "none" in said)
    reads = re.search(r"The shipped model reads (?:all|the other) (\d+)", readme).group(1)
    assert int(reads) == len(FEATURE_NAMES) - len(NOT_YET_TRAINED_ON)
