"""The client's remembered settings: the config file, its precedence, its mode, `exposr config`."""

import io
import json
import os
import stat

from twisted.internet import defer, reactor
from twisted.trial import unittest

from exposr.client import cli, settings
from tests.test_client import ACCOUNT, _Base
from tests.test_client_fakes import real_server_and_target, within


def run(c, *argv):
    return within(c.run(list(argv)), 20).addCallback(
        lambda code: (code, c.out.getvalue(), c.err.getvalue()))


def new_cli(environ):
    return cli.Cli(reactor, io.StringIO(), io.StringIO(), environ=environ)


class PathTests(unittest.TestCase):
    def test_xdg_then_home(self):
        self.assertEqual(settings.config_path({"XDG_CONFIG_HOME": "/x", "HOME": "/h"}),
                         "/x/exposr/config.json")
        self.assertEqual(settings.config_path({"HOME": "/h"}), "/h/.config/exposr/config.json")
        self.assertIsNone(settings.config_path({}))

    def test_precedence(self):
        stored = {"server": "http://file/", "account": "FILE"}
        env = {"EXPOSR_SERVER": "http://env/"}
        self.assertEqual(settings.resolve("server", "http://cli/", env, stored),
                         ("http://cli/", "command line"))
        self.assertEqual(settings.resolve("server", None, env, stored),
                         ("http://env/", "environment"))
        self.assertEqual(settings.resolve("account", None, env, stored), ("FILE", "config file"))
        self.assertEqual(settings.resolve("account", None, {}, {}), (None, None))

    def test_the_files_account_goes_with_the_files_server(self):
        stored = {"server": "http://Tunnels.example.com", "account": "FILE"}
        same = settings.resolve_all({"server": "http://tunnels.example.com/"}, {}, stored)
        self.assertEqual(same["account"], ("FILE", "config file"))
        other = settings.resolve_all({}, {"EXPOSR_SERVER": "http://other:8080/"}, stored)
        self.assertEqual(other, {"server": ("http://other:8080/", "environment"),
                                 "account": (None, None)})
        given = settings.resolve_all({"server": "http://other/", "account": "A"}, {}, stored)
        self.assertEqual(given["account"], ("A", "command line"))

    def test_unreadable_file_is_a_clean_error(self):
        home = self.mktemp()
        os.makedirs(os.path.join(home, "exposr"))
        with open(os.path.join(home, "exposr", "config.json"), "w") as f:
            f.write("{not json")
        c = new_cli({"XDG_CONFIG_HOME": home})
        d = run(c, "tunnel", "info", "x")

        def check(result):
            code, out, err = result
            self.assertEqual(code, 1)
            self.assertEqual(len(err.splitlines()), 1)
            self.assertIn("Cannot read", err)
        return d.addCallback(check)


class ConfigCommandTests(unittest.TestCase):
    def setUp(self):
        self.home = self.mktemp()
        self.environ = {"XDG_CONFIG_HOME": self.home}
        self.path = os.path.join(self.home, "exposr", "config.json")

    @defer.inlineCallbacks
    def test_set_show_unset(self):
        code, out, err = yield run(new_cli(self.environ), "config", "set", "server",
                                   "https://tunnels.example.com/")
        self.assertEqual((code, out, err), (0, "Set server to https://tunnels.example.com/\n", ""))
        self.assertEqual(stat.S_IMODE(os.stat(self.path).st_mode), 0o600)
        yield run(new_cli(self.environ), "config", "set", "account", ACCOUNT)
        with open(self.path) as f:
            self.assertEqual(json.load(f), {"server": "https://tunnels.example.com/",
                                            "account": ACCOUNT})
        env = dict(self.environ, EXPOSR_ACCOUNT="ENV-ACCOUNT")
        code, out, err = yield run(new_cli(env), "config", "show")
        self.assertEqual(out.splitlines(), [
            f"Config file: {self.path}",
            "server: https://tunnels.example.com/ (config file)",
            "account: ENV-ACCOUNT (environment)"])
        code, out, err = yield run(new_cli(env), "-a", "CLI-ACCOUNT", "config", "show")
        self.assertIn("account: CLI-ACCOUNT (command line)", out)

        code, out, err = yield run(new_cli(self.environ), "config", "unset", "account")
        self.assertEqual((code, out), (0, "Unset account\n"))
        code, out, err = yield run(new_cli(self.environ), "config", "show")
        self.assertIn("account: <not set>", out)
        self.assertEqual(stat.S_IMODE(os.stat(self.path).st_mode), 0o600)
        self.assertEqual(os.listdir(os.path.dirname(self.path)), ["config.json"])

    @defer.inlineCallbacks
    def test_set_rejects_a_bad_server(self):
        code, out, err = yield run(new_cli(self.environ), "config", "set", "server", "nope")
        self.assertEqual((code, out), (1, ""))
        self.assertIn("Invalid server URL", err)
        self.assertFalse(os.path.exists(self.path))

    @defer.inlineCallbacks
    def test_no_account_says_how_to_get_one(self):
        code, out, err = yield run(new_cli(self.environ), "-s", "http://127.0.0.1:1/",
                                   "tunnel", "info", "x")
        self.assertEqual(code, 1)
        self.assertIn("exposr account create", err)

    @defer.inlineCallbacks
    def test_no_server_says_how_to_set_one(self):
        code, out, err = yield run(new_cli(self.environ), "tunnel", "info", "x")
        self.assertEqual(code, 1)
        self.assertIn("exposr config set server", err)


class AccountCreateRemembersTests(_Base):
    @defer.inlineCallbacks
    def test_account_create_is_remembered_and_used(self):
        home = self.mktemp()
        environ = {"XDG_CONFIG_HOME": home}
        self.api.add_recorded(self.recorded[:1])
        c = new_cli(environ)
        code, out, err = yield self.run_cli("account", "create", cli_obj=c)
        self.assertEqual((code, err), (0, ""))
        path = os.path.join(home, "exposr", "config.json")
        self.assertIn(f"Account saved in {path}", out)
        self.assertEqual(stat.S_IMODE(os.stat(path).st_mode), 0o600)
        with open(path) as f:
            self.assertEqual(json.load(f), {"server": self.api.url + "/", "account": ACCOUNT})
        # no -s, no -a: both come from the file
        self.api.add("GET", f"/v1/account/{ACCOUNT}/token", 403, {"error": "PERMISSION_DENIED"})
        code, out, err = yield run(new_cli(environ), "tunnel", "info", "t1")
        # (a server with memory storage forgets the account when it restarts: say how to go on)
        self.assertEqual((code, err), (1, f"Permission denied: the account {ACCOUNT} remembered in {path} "
                                          f"is not known to {self.api.url}/; `exposr config unset account` "
                                          "forgets it (`tunnel connect` then creates a new one)\n"))
        self.assertEqual(self.api.requests[-1]["path"], f"/v1/account/{ACCOUNT}/token")
        # the environment wins over the file (and a refusal of a given account says only that)
        self.api.add("GET", "/v1/account/ABCD/token", 403, {"error": "PERMISSION_DENIED"})
        code, out, err = yield run(new_cli(dict(environ, EXPOSR_ACCOUNT="ABCD")),
                                   "tunnel", "info", "t1")
        self.assertEqual(self.api.requests[-1]["path"], "/v1/account/ABCD/token")
        self.assertEqual((code, err), (1, "Permission denied\n"))
        # another server does not get this server's account
        sent = len(self.api.requests)
        code, out, err = yield run(new_cli(environ), "-s", "http://127.0.0.1:1/",
                                   "tunnel", "info", "t1")
        self.assertEqual(code, 1)
        self.assertIn("exposr account create", err)
        self.assertEqual(len(self.api.requests), sent)
        code, out, err = yield run(new_cli(environ), "-s", "http://127.0.0.1:1/",
                                   "config", "show")
        self.assertIn("account: <not set>", out)
        self.assertIn(f"(the config file's account is for {self.api.url}/)", out)


class ImplicitAccountTests(unittest.TestCase):
    """`tunnel connect` without an account creates one and remembers it (real server)."""

    def setUp(self):
        return real_server_and_target(self)

    @defer.inlineCallbacks
    def test_connect_remembers_the_new_account(self):
        environ = {"XDG_CONFIG_HOME": self.mktemp()}
        c = new_cli(environ)
        done = run(c, "-s", self.server_url, "tunnel", "connect", "remember-me", self.target_url)
        yield within(c.connected)
        yield within(c.shutdown(), 10)
        code, out, err = yield done
        self.assertEqual((code, err), (0, ""))
        account = out.split("Created account ")[1].split()[0]
        path = settings.config_path(environ)
        with open(path) as f:
            self.assertEqual(json.load(f), {"server": self.server_url, "account": account})
        self.assertEqual(stat.S_IMODE(os.stat(path).st_mode), 0o600)
        # later commands need neither -s nor -a, and create no other account
        code, out, err = yield run(new_cli(environ), "tunnel", "create", "second-tunnel")
        self.assertEqual((code, out, err), (0, "Created tunnel second-tunnel\n", ""))
        code, out, err = yield run(new_cli(environ), "tunnel", "info", "second-tunnel")
        self.assertIn("Tunnel: second-tunnel", out)
