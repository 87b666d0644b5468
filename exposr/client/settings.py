"""The client's remembered settings: server URL and account in a small JSON file.

The file is ``$XDG_CONFIG_HOME/exposr/config.json`` (``~/.config/exposr/config.json``
when XDG_CONFIG_HOME is unset). It is written atomically (a temporary file in the
same directory, then a rename) with mode 0600, because the account number is the
account's credential.

A value is taken from the command line first, then the environment, then the file.
The file's account belongs to the file's server: it is not used with another one.
"""

import json
import os
import tempfile
from urllib.parse import urlsplit

# key -> environment variable
KEYS = {"server": "EXPOSR_SERVER", "account": "EXPOSR_ACCOUNT"}


class SettingsError(Exception):
    pass


def config_path(environ):
    """The config file's path, or None when neither XDG_CONFIG_HOME nor HOME is known."""
    base = environ.get("XDG_CONFIG_HOME")
    if not base:
        home = environ.get("HOME")
        if not home:
            return None
        base = os.path.join(home, ".config")
    return os.path.join(base, "exposr", "config.json")


def check(key, value):
    """A clean value for `key`, or SettingsError."""
    if key not in KEYS:
        raise SettingsError(f"Unknown setting: {key} (one of {', '.join(KEYS)})")
    value = value.strip()
    if not value:
        raise SettingsError(f"Empty value for {key}")
    if key == "server":
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise SettingsError(f"Invalid server URL: {value} (use http:// or https://)")
    return value


class SettingsFile:
    def __init__(self, path):
        self.path = path

    def load(self):
        """The stored settings ({} when there is no file); SettingsError if unreadable."""
        if self.path is None:
            return {}
        try:
            with open(self.path, encoding="utf-8") as f:
                doc = json.load(f)
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as e:
            raise SettingsError(f"Cannot read {self.path}: {e}") from None
        if not isinstance(doc, dict):
            raise SettingsError(f"Cannot read {self.path}: not a JSON object")
        return {k: v for k, v in doc.items() if k in KEYS and isinstance(v, str)}

    def save(self, values):
        if self.path is None:
            raise SettingsError("No config directory: set XDG_CONFIG_HOME or HOME")
        directory = os.path.dirname(self.path)
        try:
            os.makedirs(directory, mode=0o700, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=".config-", suffix=".tmp", dir=directory)
            try:
                os.fchmod(fd, 0o600)
                with os.fdopen(fd, "w", encoding="utf-8") as f:
                    json.dump(values, f, indent=2, sort_keys=True)
                    f.write("\n")
                os.replace(tmp, self.path)
            except BaseException:
                os.unlink(tmp)
                raise
        except OSError as e:
            raise SettingsError(f"Cannot write {self.path}: {e}") from None

    def update(self, **changes):
        """Set (value) or remove (None) keys; returns the new settings."""
        values = self.load()
        for key, value in changes.items():
            if value is None:
                values.pop(key, None)
            else:
                values[key] = value
        self.save(values)
        return values


def same_server(a, b):
    """Two server URLs name the same server (case of scheme and host, trailing '/')."""
    def norm(url):
        parts = urlsplit(url.strip())
        return (parts.scheme.lower(), parts.netloc.lower(), parts.path.rstrip("/"))
    return bool(a and b) and norm(a) == norm(b)


def resolve_all(given, environ, stored):
    """{key: (value, source)}; the file's account is used only with the file's server."""
    server = resolve("server", given.get("server"), environ, stored)
    file_account = stored.get("account")
    if file_account and not same_server(server[0], stored.get("server")):
        stored = {k: v for k, v in stored.items() if k != "account"}
    return {"server": server, "account": resolve("account", given.get("account"), environ,
                                                 stored)}


def resolve(key, given, environ, stored):
    """(value, source) for `key`: command line, then environment, then file."""
    if given:
        return given, "command line"
    if environ.get(KEYS[key]):
        return environ[KEYS[key]], "environment"
    if stored.get(key):
        return stored[key], "config file"
    return None, None
