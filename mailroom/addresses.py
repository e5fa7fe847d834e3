"""Email addresses as people type them, for lookups (``mailroom deliveries``, ``retry
--email``, ``skip --email``, the monitor's ``/``).

An operator types what the user wrote in a support ticket: ``Jane@Example.COM``,
``jane@bücher.de`` or its ASCII form ``jane@xn--bcher-kva.de``, maybe with a space
pasted around it. ``accounts.email`` holds whatever the application stored, and
its only index is the unique one on the exact text: a case-insensitive comparison
would read every account. So a typed address becomes the few spellings it can be
stored under (:func:`spellings`), each one index probe:

- the domain is case-insensitive (RFC 5321 2.4) and has two forms under IDNA
  (UTS 46 mapping): both are tried, lower-cased;
- the local part (before the last ``@``) is, by the RFC, the receiving server's
  business and may be case-sensitive: it is tried as typed and in lower case
  (applications that fold addresses fold them to lower case), never other mixes.

When no spelling is stored, the ledger's lookup (``mailroom.ledger.admin.accounts_of``)
compares the whole address case-insensitively, at the price of a scan.
"""

from __future__ import annotations

import idna

__all__ = ["normalise", "normalise_unicode", "spellings"]


def _split(typed: str) -> tuple[str, str] | None:
    address = typed.strip()
    local, at, domain = address.rpartition("@")
    if not at or not local or not domain:
        return None
    return local, domain.rstrip(".")


def _domains(domain: str) -> list[str]:
    """The domain's ASCII (A-label) and Unicode (U-label) forms, lower-cased; just the
    lower-cased text when it is not a valid IDNA name (found only if stored so)."""
    lowered = domain.lower()
    try:
        ascii_form = idna.encode(domain, uts46=True).decode("ascii")
        unicode_form = idna.decode(ascii_form)
    except idna.IDNAError:
        return [lowered]
    return list(dict.fromkeys((ascii_form, unicode_form, lowered)))


def normalise(typed: str) -> str:
    """The canonical form of a typed address: trimmed, the domain lower-cased in its
    ASCII (IDNA) form, the local part as typed. Text without ``local@domain`` comes
    back trimmed."""
    parts = _split(typed)
    if parts is None:
        return typed.strip()
    local, domain = parts
    return f"{local}@{_domains(domain)[0]}"


def normalise_unicode(typed: str) -> str:
    """:func:`normalise` with the domain in its Unicode (U-label) form, lower-cased: the
    other form a stored address may have (the suppression list keeps both, since SQL
    cannot convert IDNA)."""
    parts = _split(typed)
    if parts is None:
        return typed.strip()
    local, domain = parts
    forms = _domains(domain)
    return f"{local}@{forms[1] if len(forms) > 1 else forms[0]}"


def spellings(typed: str) -> list[str]:
    """Every spelling a lookup of ``typed`` tries, the canonical one first (see the
    module's docstring); a handful at most."""
    parts = _split(typed)
    if parts is None:
        return [typed.strip()]
    local, domain = parts
    found = [normalise(typed)]
    for name in (local, local.lower()):
        found += [f"{name}@{form}" for form in _domains(domain)]
    found.append(typed.strip())
    return list(dict.fromkeys(found))
