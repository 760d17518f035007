"""The X-Request-ID of a request, shared by the broker and the TEE worker: the caller's when
well-formed, else a fresh one."""

from __future__ import annotations

import re
import secrets

REQUEST_ID_HEADER = "X-Request-ID"
# 1 to 128 of letters, digits and . _ : - only: the id goes verbatim into log lines and the TEE's
# audit log, so a caller must not be able to put spaces, quotes or line breaks there.
REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}\Z")


def is_well_formed(value: str) -> bool:
    return REQUEST_ID.match(value) is not None


def new_request_id() -> str:
    """32 random hex characters: unguessable, so one caller cannot predict another's id."""
    return secrets.token_hex(16)


def request_id_from(given: str | None) -> str:
    """The caller's id if well-formed; otherwise (absent, empty, too long, odd characters) ours."""
    return given if given is not None and is_well_formed(given) else new_request_id()
