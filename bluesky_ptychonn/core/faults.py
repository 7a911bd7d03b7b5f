"""Which failures are worth retrying: an outage is, a refusal is not."""

from __future__ import annotations

from ..errors import PtychoNNError

#: HTTP answers that no retry will change, and the fix to name.
PERMANENT = {
    401: "the API key is missing or wrong: set TILED_API_KEY to a key of this server",
    403: "the API key may not write there: use a key with write access (TILED_API_KEY)",
    404: "the path does not exist on this Tiled server: check the URI",
}


def permanent_error(err: BaseException) -> str | None:
    """A one-line message naming the fix when ``err`` is one that retrying cannot change, else None.

    That is an HTTP 401, 403 or 404, or one of this package's own errors (a bad key, a bad path).
    """
    if isinstance(err, PtychoNNError):
        return str(err)
    for e in (err, err.__cause__, err.__context__):
        status = getattr(getattr(e, "response", None), "status_code", None)
        if status in PERMANENT:
            return f"Tiled answered {status}: {PERMANENT[status]}"
    return None
