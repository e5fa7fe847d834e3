"""``mailroom templates push|pull|diff|check [NAME...]``.

- ``push``: create or update each template in SES from its folder; one line per
  template: ``created``, ``updated`` or ``unchanged``.
- ``pull``: write SES's copy of each template into its folder.
- ``diff``: a unified diff per part (SES's copy -> the files); exit 1 when any
  differ, so CI can run it.
- ``check``: render each configured template through ``TestRenderTemplate`` with
  the data of its action (``NAME (action): ...``, one line per action even when
  both use one template); exit 1 naming the template and what is missing.

Without NAMEs, ``push`` and ``diff`` take every folder of the directory,
``pull`` the two configured templates and every folder, ``check`` the two
configured templates.  ``--json`` prints one JSON array of per-template objects
instead.  SES errors are one line each on stderr (``NAME: error: ...``); exit codes: 0 all well, 1 a template
differs, does not render or SES refused, 2 usage or configuration.
"""

from __future__ import annotations

import argparse
import difflib
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mailroom import config
from mailroom._process import add_version
from mailroom.config import Settings
from mailroom.sender import render
from mailroom.templates import files, remote

EXIT_DIFFERENT = 1

_NAMES_HELP = "template names (folder names); default: {}"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``templates`` subcommand group on ``parser`` (``--version`` on each level)."""
    add_version(parser)
    sub = parser.add_subparsers(dest="templates_command", required=True, metavar="{push,pull,diff,check}")
    helps = {
        "push": ("create or update templates in SES from their folders",
                 "every folder of the templates directory"),
        "pull": ("write SES's copy of templates into their folders",
                 "the configured templates and every folder"),
        "diff": ("show how SES's copy differs from the folders (exit 1 when it does)",
                 "every folder of the templates directory"),
        "check": ("render the configured templates with the data mailroom sends (exit 1 when one fails)",
                  "both configured templates"),
    }
    for name, (text, default) in helps.items():
        command = sub.add_parser(name, help=text, description=text)
        command.add_argument("names", nargs="*", metavar="NAME", help=_NAMES_HELP.format(default))
        command.add_argument("--json", action="store_true", help="one JSON array of per-template results")
        add_version(command)
        if name != "check":
            command.add_argument("--dir", metavar="DIR",
                                 help="templates directory (default: MAILROOM_TEMPLATES_DIR, ./templates)")


def main(args: argparse.Namespace, settings: Settings) -> int:
    """Run the ``templates`` subcommand in ``args``; return the exit code."""
    directory = Path(getattr(args, "dir", None) or settings.templates_dir)
    action: Callable[[Any, Settings, Path, list[str]], list[dict[str, Any]]] = _COMMANDS[args.templates_command]
    try:
        names = _names(args.templates_command, args.names, settings, directory)
    except (files.TemplateFileError, ValueError) as exc:
        print(f"mailroom templates: {exc}", file=sys.stderr)
        return config.EXIT_CONFIG
    try:
        client = remote.make_client(settings)
    except Exception as exc:  # noqa: BLE001 - boto3 refusing its settings, e.g. a bad endpoint URL
        print(f"mailroom templates: cannot make the SES client: {remote.SesError(exc)}", file=sys.stderr)
        return config.EXIT_CONFIG
    results = action(client, settings, directory, names)
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        for result in results:
            _print(args.templates_command, result)
    return EXIT_DIFFERENT if any(not r["ok"] for r in results) else config.EXIT_OK


def _names(command: str, given: list[str], settings: Settings, directory: Path) -> list[str]:
    configured = list(render.configured(settings).values())
    if command == "check":
        unknown = [name for name in given if name not in configured]
        if unknown:
            raise ValueError(f"{', '.join(unknown)}: not a configured template (MAILROOM_SES_TEMPLATE_ACTIVATION"
                             f" is {configured[0]}, MAILROOM_SES_TEMPLATE_RECOVERY {configured[1]})")
        return given or configured
    if given:
        return list(dict.fromkeys(given))
    if command == "pull":  # into a directory that may not exist yet
        found = files.names(directory) if directory.is_dir() else []
        return list(dict.fromkeys([*configured, *found]))
    found = files.names(directory)
    if not found:
        raise ValueError(f"no templates in {directory} (one folder per template with subject.txt,"
                         " html.html, text.txt)")
    return found


def _print(command: str, result: dict[str, Any]) -> None:
    # check's lines name the action too: one template may serve both.
    name = f"{result['template']} ({result['action']})" if command == "check" else result["template"]
    if result.get("error"):
        print(f"{name}: error: {result['error']}", file=sys.stderr)
    elif command == "diff":
        if result["same"]:
            print(f"{name}: same")
        elif not result["in_ses"]:
            print(f"{name}: not in SES")
        else:
            for part in result["diff"].values():
                sys.stdout.write(part)
    elif command == "pull":
        print(f"{name}: {result['result']} {result['path']}" if result["ok"] else f"{name}: {result['result']}")
    else:
        print(f"{name}: {result['result']}")


def _per_template(names: list[str], one: Callable[[str], dict[str, Any]],
                  **failed: Any) -> list[dict[str, Any]]:
    """``one(name)`` for each template: one whose files or SES call fail is an entry
    with its error (``failed`` adds the fields that say so), and the others go on."""
    results: list[dict[str, Any]] = []
    for name in names:
        try:
            results.append({"template": name, **one(name)})
        except (files.TemplateFileError, remote.SesError) as exc:
            results.append({"template": name, "ok": False, **failed, "error": str(exc)})
    return results


def _push(client: Any, settings: Settings, directory: Path, names: list[str]) -> list[dict[str, Any]]:
    def one(name: str) -> dict[str, Any]:
        return {"ok": True, "result": remote.push(client, files.read(directory, name))}

    return _per_template(names, one, result="error")


def _pull(client: Any, settings: Settings, directory: Path, names: list[str]) -> list[dict[str, Any]]:
    def one(name: str) -> dict[str, Any]:
        template = remote.get(client, name)
        if template is None:
            return {"ok": False, "result": "not in SES"}
        return {"ok": True, "result": "written to", "path": str(files.write(directory, template))}

    return _per_template(names, one, result="error")


def _diff(client: Any, settings: Settings, directory: Path, names: list[str]) -> list[dict[str, Any]]:
    def one(name: str) -> dict[str, Any]:
        local, theirs = files.read(directory, name), remote.get(client, name)
        parts: dict[str, str] = {}
        for part, filename, _ in files.PARTS:
            before = theirs.part(part) if theirs is not None else ""
            after = local.part(part)
            if before != after:
                parts[part] = "".join(difflib.unified_diff(
                    _lines(before), _lines(after),
                    f"ses/{name}/{filename}", str(directory / name / filename)))
        same = theirs is not None and not parts
        return {"ok": same, "same": same, "in_ses": theirs is not None, "diff": parts}

    return _per_template(names, one, same=False)


def _lines(text: str) -> list[str]:
    # A last line without its newline still ends with one in the diff, marked
    # the way diff(1) marks it.
    lines = text.splitlines(keepends=True)
    if lines and not lines[-1].endswith("\n"):
        lines[-1] += "\n\\ No newline at end of file\n"
    return lines


def _check(client: Any, settings: Settings, directory: Path, names: list[str]) -> list[dict[str, Any]]:
    # Per action, not per name: one template may serve both actions, and each
    # action fills it with its own data (activation has no code), so each is
    # rendered and reported; NAMEs only pick among the configured pairs.
    results: list[dict[str, Any]] = []
    for action, name in render.configured(settings).items():
        if name not in names:
            continue
        verdict = render.render(client, name, action)
        result: dict[str, Any] = {"template": name, "action": action.db_name, "ok": verdict.ok,
                                  "result": verdict.verdict.value}
        if verdict.verdict is render.Verdict.UNKNOWN:
            # No verdict (unreachable, throttled, denied): an SES error like push's.
            result.update(result="error", error=verdict.reason)
        elif not verdict.ok:
            result["reason"] = verdict.reason
            result["result"] = verdict.reason
        results.append(result)
    return results


_COMMANDS: dict[str, Callable[[Any, Settings, Path, list[str]], list[dict[str, Any]]]] = {
    "push": _push, "pull": _pull, "diff": _diff, "check": _check}
