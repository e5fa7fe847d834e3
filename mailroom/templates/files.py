"""Templates on disk: one folder per template, three files each.

``subject.txt`` holds the subject on one line (its trailing newline is not part
of the subject), ``html.html`` the HTML part and ``text.txt`` the text part,
byte for byte.  A part SES has empty is an empty file.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

#: (part name, file name, SES field), in the order they are shown.
PARTS = (("subject", "subject.txt", "SubjectPart"),
         ("html", "html.html", "HtmlPart"),
         ("text", "text.txt", "TextPart"))


class TemplateFileError(Exception):
    """A template folder that cannot be read or written; ``str()`` is one line
    (without the template's name: the caller puts it first)."""


@dataclasses.dataclass(frozen=True)
class Template:
    """One SES template: its name and its three parts."""

    name: str
    subject: str
    html: str
    text: str

    def part(self, name: str) -> str:
        """The part called ``name`` (``subject``, ``html`` or ``text``)."""
        value: str = getattr(self, name)
        return value

    def to_ses(self) -> dict[str, str]:
        """The ``Template`` argument of ``CreateTemplate`` / ``UpdateTemplate``."""
        return {"TemplateName": self.name, "SubjectPart": self.subject,
                "HtmlPart": self.html, "TextPart": self.text}

    @classmethod
    def from_ses(cls, data: dict[str, Any]) -> Template:
        """From a ``GetTemplate`` answer's ``Template`` (a part SES lacks is empty)."""
        return cls(data["TemplateName"], data.get("SubjectPart") or "",
                   data.get("HtmlPart") or "", data.get("TextPart") or "")


def shipped_dir() -> Path:
    """The templates this package ships (installed as ``mailroom.shipped_templates``;
    in a checkout, ``<repo>/templates``)."""
    installed = Path(__file__).resolve().parents[1] / "shipped_templates"
    if any(installed.glob("*/subject.txt")):
        return installed
    return Path(__file__).resolve().parents[2] / "templates"


def names(directory: str | Path) -> list[str]:
    """Template names found in ``directory`` (folders holding a ``subject.txt``), sorted."""
    root = Path(directory)
    if not root.is_dir():
        raise TemplateFileError(f"no templates directory at {root} (MAILROOM_TEMPLATES_DIR)")
    return sorted(p.parent.name for p in root.glob("*/subject.txt"))


def read(directory: str | Path, name: str) -> Template:
    """The template ``name`` from its folder in ``directory``."""
    folder = Path(directory) / name
    if not folder.is_dir():
        raise TemplateFileError(f"no folder {folder}")
    parts: dict[str, str] = {}
    for part, filename, _ in PARTS:
        try:
            parts[part] = (folder / filename).read_text(encoding="utf-8")
        except FileNotFoundError:
            raise TemplateFileError(f"{folder / filename} is missing") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise TemplateFileError(f"cannot read {folder / filename}: {exc}") from None
    subject = parts["subject"].rstrip("\r\n")
    if "\n" in subject or "\r" in subject:
        raise TemplateFileError(f"{folder / 'subject.txt'} must hold one line")
    return Template(name, subject, parts["html"], parts["text"])


def write(directory: str | Path, template: Template) -> Path:
    """Write ``template`` into its folder under ``directory`` (created); return the folder."""
    folder = Path(directory) / template.name
    try:
        folder.mkdir(parents=True, exist_ok=True)
        for part, filename, _ in PARTS:
            value = template.part(part)
            if part == "subject":
                value += "\n"
            (folder / filename).write_text(value, encoding="utf-8")
    except OSError as exc:
        raise TemplateFileError(f"cannot write {folder}: {exc}") from None
    return folder
