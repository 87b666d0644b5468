"""The data model: account numbers, tunnel ids, tokens, stored records.

Everything here is pure (no I/O, no reactor): the rules of docs/protocol.rst,
"Accounts and tunnels", and the record reading rule of its "Serialisation".
"""

import base64
import copy
import hmac
import os
import re
import sys
import traceback
from datetime import datetime, timezone
from urllib.parse import urlsplit, urlunsplit

# --- Account numbers (docs/protocol.rst, "Account numbers") -----------------

ACCOUNT_ALPHABET = "CDEFHJKMNPRTVWXY2345689"
ACCOUNT_ID_LENGTH = 16
_ACCOUNT_RE = re.compile("[%s]{%d}" % (ACCOUNT_ALPHABET, ACCOUNT_ID_LENGTH))


def generate_account_id(randbytes=os.urandom):
    """A fresh canonical account number (16 draws of ``byte mod 23``)."""
    data = randbytes(ACCOUNT_ID_LENGTH)
    return "".join(ACCOUNT_ALPHABET[b % len(ACCOUNT_ALPHABET)] for b in data)


def is_valid_account_id(value):
    """True if ``value`` is a canonical account number."""
    return isinstance(value, str) and _ACCOUNT_RE.fullmatch(value) is not None


def normalize_account_id(value):
    """
    The canonical form of an account number received from outside, or None.

    ASCII spaces and dashes are removed, the rest upper-cased; anything that
    is then not 16 symbols of the alphabet is invalid (None).
    """
    if not isinstance(value, str):
        return None
    canonical = value.replace(" ", "").replace("-", "").upper()
    return canonical if is_valid_account_id(canonical) else None


def format_account_id(value):
    """Human-readable form: groups of 4 joined by ``-``, anchored at the end."""
    if value is None:
        return None
    groups = []
    end = len(value)
    while end > 0:
        groups.insert(0, value[max(0, end - 4):end])
        end -= 4
    return "-".join(groups)


def account_token(account_id):
    """The public API token: standard base64 of the canonical account number."""
    return base64.b64encode(account_id.encode("ascii")).decode("ascii")


# --- Tunnel ids (docs/protocol.rst, "Tunnel ids") ---------------------------

TUNNEL_ID_REGEX = r"^(?:[a-z0-9][a-z0-9\-]{4,63}[a-z0-9]|[a-z0-9]{4,63})$"
# As the original prints it in BAD_INPUT messages.
TUNNEL_ID_PATTERN = "/%s/" % (TUNNEL_ID_REGEX,)
_TUNNEL_ID_RE = re.compile(r"(?:[a-z0-9][a-z0-9\-]{4,63}[a-z0-9]|[a-z0-9]{4,63})")


def is_valid_tunnel_id(value):
    return isinstance(value, str) and _TUNNEL_ID_RE.fullmatch(value) is not None


#: A new tunnel's id is also a DNS label (``<id>.<ingress domain>``): at
#: most 63 characters. The pattern above admits 65, as the original does;
#: tunnels it created with 64-65 characters stay readable, updatable and
#: deletable, but no new one is created.
MAX_NEW_TUNNEL_ID = 63


def is_valid_new_tunnel_id(value):
    return is_valid_tunnel_id(value) and len(value) <= MAX_NEW_TUNNEL_ID


def tunnel_id_error(value):
    """The BAD_INPUT ``field`` message for an invalid tunnel id."""
    return '"tunnel_id" with value "%s" fails to match the required pattern: %s' % (
        value,
        TUNNEL_ID_PATTERN,
    )


# --- Connection tokens (docs/protocol.rst, "Tokens") ------------------------

TOKEN_BYTES = 64


def generate_token(randbytes=os.urandom):
    """64 random bytes, base64url without padding: 86 characters."""
    return base64.urlsafe_b64encode(randbytes(TOKEN_BYTES)).rstrip(b"=").decode("ascii")


def tokens_equal(presented, expected):
    """Constant-time comparison; any non-string or length mismatch fails."""
    if not isinstance(presented, str) or not isinstance(expected, str):
        return False
    a = presented.encode("utf-8", "surrogatepass")
    b = expected.encode("utf-8", "surrogatepass")
    return hmac.compare_digest(a, b)


# --- Logging without secrets ---------------------------------------------


def describe_error(error=None):
    """
    ``Type (file:line)`` of an exception (default: the one being handled) or
    a Failure, for log lines: exception messages may carry storage keys,
    i.e. account numbers, so they are never logged.
    """
    tb = None
    if error is None:
        _, error, tb = sys.exc_info()
    elif hasattr(error, "value") and hasattr(error, "getTracebackObject"):
        tb = error.getTracebackObject()
        error = error.value
    if error is None:
        return "unknown error"
    tb = tb or getattr(error, "__traceback__", None)
    where = ""
    if tb is not None:
        frames = traceback.extract_tb(tb)
        if frames:
            last = frames[-1]
            where = " (%s:%d)" % (os.path.basename(last.filename), last.lineno)
    return type(error).__name__ + where


# --- Time -------------------------------------------------------------------


def iso_timestamp(seconds):
    """ISO-8601 UTC with milliseconds, e.g. ``2024-02-10T12:34:56.789Z``."""
    ms = int(round(seconds * 1000))
    dt = datetime.fromtimestamp(ms // 1000, timezone.utc)
    return dt.strftime("%Y-%m-%dT%H:%M:%S") + ".%03dZ" % (ms % 1000,)


def iso_from_ms(ms):
    return None if ms is None else iso_timestamp(ms / 1000.0)


def epoch_ms(seconds):
    return int(round(seconds * 1000))


# --- Records and the default-merge on read (docs/protocol.rst, "Serialisation")


class _Optional:
    """Marks a field of a default object that has no default value."""

    def __repr__(self):
        return "OPTIONAL"


OPTIONAL = _Optional()

ACCOUNT_DEFAULT = {
    "accountId": OPTIONAL,
    "id": OPTIONAL,
    "created_at": OPTIONAL,
    "updated_at": OPTIONAL,
    "tunnels": [],
    "status": {
        "disabled": False,
        "disabled_at": OPTIONAL,
        "disabled_reason": OPTIONAL,
    },
}

TUNNEL_DEFAULT = {
    "transport": {
        "token": OPTIONAL,
        "max_connections": 1,
        "ws": {"enabled": False},
        "ssh": {"enabled": False},
    },
    "ingress": {
        "http": {"enabled": False, "url": OPTIONAL, "urls": [], "alt_names": []},
        "sni": {"enabled": False, "passthrough": OPTIONAL, "url": OPTIONAL, "urls": []},
    },
    "target": {"url": OPTIONAL},
    # beyond the original: per-tunnel access rules (exposr.access), kept
    # whole when present and absent otherwise (so records without rules
    # are stored as before)
    "access": OPTIONAL,
    "id": OPTIONAL,
    "account": OPTIONAL,
    # Kept on read (the original dropped them, losing created_at on update).
    "created_at": OPTIONAL,
    "updated_at": OPTIONAL,
}

ALTNAME_DEFAULT = {"tunnelId": OPTIONAL, "created_at": OPTIONAL}


def merge_defaults(default, stored):
    """
    Read ``stored`` through the ``default`` object.

    Only the default's fields are kept, in the default's order; nested
    objects merge recursively, arrays are replaced wholesale, ``None`` and
    missing values take the default; optional fields without a stored value
    are omitted.
    """
    if not isinstance(stored, dict):
        stored = {}
    out = {}
    for key, dflt in default.items():
        value = stored.get(key)
        if isinstance(dflt, dict):
            out[key] = merge_defaults(dflt, value)
        elif value is None:
            if dflt is not OPTIONAL:
                out[key] = copy.deepcopy(dflt)
        elif isinstance(dflt, list):
            out[key] = list(value) if isinstance(value, list) else copy.deepcopy(dflt)
        else:
            out[key] = value
    return out


def serialize(record):
    """Drop ``_``-prefixed keys and ``None`` values, recursively."""
    if isinstance(record, dict):
        return {
            k: serialize(v)
            for k, v in record.items()
            if v is not None and not (isinstance(k, str) and k.startswith("_"))
        }
    if isinstance(record, list):
        return [serialize(v) for v in record]
    return record


def read_account(stored):
    return None if stored is None else merge_defaults(ACCOUNT_DEFAULT, stored)


def read_tunnel(stored):
    return None if stored is None else merge_defaults(TUNNEL_DEFAULT, stored)


def new_account(account_id, now):
    ts = iso_timestamp(now)
    return {
        "accountId": account_id,
        "id": account_id,
        "created_at": ts,
        "updated_at": ts,
        "tunnels": [],
        "status": {"disabled": False},
    }


def new_tunnel(tunnel_id, account_id, now, token):
    record = merge_defaults(TUNNEL_DEFAULT, {})
    ts = iso_timestamp(now)
    record["transport"]["token"] = token
    record["id"] = tunnel_id
    record["account"] = account_id
    record["created_at"] = ts
    record["updated_at"] = ts
    return record


# --- Derived ingress fields (docs/protocol.rst, "Tunnel records") -----------


def _replace_host(url, host):
    parts = urlsplit(url)
    netloc = host
    if parts.port is not None:
        netloc = "%s:%d" % (host, parts.port)
    path = parts.path or "/"
    return urlunsplit((parts.scheme, netloc, path, parts.query, parts.fragment))


def ingress_http_base_url(ingress_http_url, tunnel_id, host_override=None):
    """``--ingress-http-url`` with the host replaced by ``<id>.<host>`` (or an alt name)."""
    host = urlsplit(ingress_http_url).hostname or ""
    return _replace_host(ingress_http_url, host_override or "%s.%s" % (tunnel_id, host))


def ingress_http_host(config):
    """The configured HTTP ingress host name (lower case), or None."""
    if not config.ingress_http_url:
        return None
    return urlsplit(config.ingress_http_url).hostname


def compute_ingress(tunnel, config, sni_url_for=None):
    """
    The derived ``ingress`` object of a tunnel record from its flags and the
    current configuration. ``sni_url_for(tunnel_id)`` gives the advertised
    SNI URL (or None when unknown, e.g. no certificate loaded).
    """
    tunnel_id = tunnel["id"]
    stored = tunnel.get("ingress", {})
    http_in = stored.get("http", {})
    sni_in = stored.get("sni", {})
    alt_names = list(http_in.get("alt_names") or [])

    if not config.http_ingress_enabled or not config.ingress_http_url:
        http = {"enabled": False, "urls": [], "alt_names": []}
    elif http_in.get("enabled"):
        base = ingress_http_base_url(config.ingress_http_url, tunnel_id)
        urls = [base] + [
            ingress_http_base_url(config.ingress_http_url, tunnel_id, name)
            for name in alt_names
        ]
        http = {"enabled": True, "url": base, "urls": urls, "alt_names": alt_names}
    else:
        http = {"enabled": False, "urls": [], "alt_names": alt_names}

    sni = {"enabled": False, "urls": []}
    if config.sni_ingress_enabled and sni_in.get("enabled"):
        url = sni_url_for(tunnel_id) if sni_url_for is not None else None
        sni = {"enabled": True}
        if url:
            sni["url"] = url
            sni["urls"] = [url]
        else:
            sni["urls"] = []
    if sni_in.get("passthrough"):
        # beyond the original: TLS spliced to the client untouched (kept
        # while disabled so that re-enabling keeps the mode)
        sni["passthrough"] = True
    return {"http": http, "sni": sni}
