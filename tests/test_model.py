"""Model rules (docs/protocol.rst, "Accounts and tunnels"): account numbers, tunnel ids, tokens, records."""

import itertools
import os

from twisted.trial import unittest

from exposr import model
from tests.support import make_config


class AccountNumberTests(unittest.TestCase):
    def test_generated_ids_match_alphabet(self):
        for _ in range(1000):
            account_id = model.generate_account_id()
            self.assertEqual(len(account_id), 16)
            self.assertTrue(set(account_id) <= set(model.ACCOUNT_ALPHABET))
            self.assertTrue(model.is_valid_account_id(account_id))

    def test_generation_uses_byte_mod_23(self):
        account_id = model.generate_account_id(lambda n: bytes(range(n)))
        self.assertEqual(account_id, "".join(model.ACCOUNT_ALPHABET[i % 23] for i in range(16)))
        account_id = model.generate_account_id(lambda n: bytes([255] * n))
        self.assertEqual(account_id, model.ACCOUNT_ALPHABET[255 % 23] * 16)

    def test_format(self):
        self.assertEqual(model.format_account_id("MPW4YDYVNPFXVV2D"), "MPW4-YDYV-NPFX-VV2D")
        self.assertEqual(model.format_account_id("XDF"), "XDF")
        self.assertEqual(model.format_account_id("XXXXXX"), "XX-XXXX")

    def test_normalise(self):
        for spelling in (
            "MPW4YDYVNPFXVV2D",
            "MPW4-YDYV-NPFX-VV2D",
            "MPW4 YDYV NPFX VV2D",
            "mpw4-ydyv-npfx-vv2d",
            "MPW4  YDYV  NPFX VV2D",
            "MPW4-YDYV - NPFX--VV2D",
        ):
            self.assertEqual(model.normalize_account_id(spelling), "MPW4YDYVNPFXVV2D", spelling)

    def test_normalise_rejects(self):
        for bad in (
            "",
            "MPW4YDYVNPFXVV2",  # 15
            "MPW4YDYVNPFXVV2DD",  # 17
            "MPW4YDYVNPFXVV2A",  # A not in alphabet
            "MPW4\tYDYVNPFXVV2D",  # other whitespace is kept
            "MPW4YDYVNPFXVV2D\n",
            None,
            12,
        ):
            self.assertIsNone(model.normalize_account_id(bad), repr(bad))

    def test_token(self):
        self.assertEqual(model.account_token("MPW4YDYVNPFXVV2D"), "TVBXNFlEWVZOUEZYVlYyRA==")


class TunnelIdTests(unittest.TestCase):
    TABLE = [
        ("abcd", True),
        ("abc", False),
        ("ab-cd", False),
        ("ab-cde", True),
        ("my-tunnel-identifier-14", True),
        ("4abc", True),
        ("-abcde", False),
        ("abcde-", False),
        ("MyTunnel", False),
        (os.urandom(20).hex(), True),
        ("a" * 64, True),
        ("a" * 65, True),
        ("a-" * 32 + "a", True),  # 65 with dashes
        ("a" * 66, False),
        ("a--b-c", True),
        ("abcde", True),
        ("ab_cd", False),
        ("abcd\n", False),
        ("", False),
        ("abc.d", False),
    ]

    def test_table(self):
        for value, valid in self.TABLE:
            self.assertEqual(model.is_valid_tunnel_id(value), valid, repr(value))

    def test_lengths(self):
        for n in range(1, 70):
            alnum = "a" * n
            dashed = "a" + "-" * (n - 2) + "a" if n >= 2 else "a"
            self.assertEqual(model.is_valid_tunnel_id(alnum), 4 <= n <= 65, n)
            self.assertEqual(model.is_valid_tunnel_id(dashed), 6 <= n <= 65, n)

    def test_error_message(self):
        self.assertEqual(
            model.tunnel_id_error("AB"),
            '"tunnel_id" with value "AB" fails to match the required pattern: '
            "/^(?:[a-z0-9][a-z0-9\\-]{4,63}[a-z0-9]|[a-z0-9]{4,63})$/",
        )


class TokenTests(unittest.TestCase):
    def test_shape(self):
        seen = set()
        for _ in range(200):
            token = model.generate_token()
            self.assertEqual(len(token), 86)
            self.assertRegex(token, r"^[A-Za-z0-9_-]{86}$")
            seen.add(token)
        self.assertEqual(len(seen), 200)

    def test_compare(self):
        token = model.generate_token()
        self.assertTrue(model.tokens_equal(token, token))
        self.assertFalse(model.tokens_equal(token[:-1], token))
        self.assertFalse(model.tokens_equal(token + "A", token))
        self.assertFalse(model.tokens_equal("", token))
        self.assertFalse(model.tokens_equal(None, token))
        self.assertFalse(model.tokens_equal(token, None))
        self.assertFalse(model.tokens_equal("é" * 3, token))


class TimeTests(unittest.TestCase):
    def test_iso(self):
        self.assertEqual(model.iso_timestamp(1707568496.789), "2024-02-10T12:34:56.789Z")
        self.assertEqual(model.iso_timestamp(0), "1970-01-01T00:00:00.000Z")
        self.assertEqual(model.iso_timestamp(1.9996), "1970-01-01T00:00:02.000Z")
        self.assertEqual(model.iso_from_ms(1707568496789), "2024-02-10T12:34:56.789Z")
        self.assertIsNone(model.iso_from_ms(None))
        self.assertEqual(model.epoch_ms(1707568496.789), 1707568496789)


class RecordTests(unittest.TestCase):
    def test_account_defaults(self):
        self.assertEqual(
            model.read_account({"accountId": "X", "id": "X"}),
            {"accountId": "X", "id": "X", "tunnels": [], "status": {"disabled": False}},
        )

    def test_merge_rules(self):
        stored = {
            "id": "X",
            "tunnels": ["a", "b"],
            "status": {"disabled": True, "disabled_reason": "spam", "extra": 1},
            "created_at": None,
            "unknown": 5,
        }
        self.assertEqual(
            model.read_account(stored),
            {
                "id": "X",
                "tunnels": ["a", "b"],
                "status": {"disabled": True, "disabled_reason": "spam"},
            },
        )

    def test_key_order_is_the_defaults(self):
        stored = {"status": {"disabled": False}, "tunnels": [], "id": "X", "accountId": "X"}
        self.assertEqual(list(model.read_account(stored)), ["accountId", "id", "tunnels", "status"])

    def test_tunnel_keeps_timestamps(self):
        record = model.new_tunnel("abcd", "ACC", 1707568496.789, "tok")
        read = model.read_tunnel(record)
        self.assertEqual(read["created_at"], "2024-02-10T12:34:56.789Z")
        self.assertEqual(read["updated_at"], "2024-02-10T12:34:56.789Z")
        self.assertEqual(
            list(read), ["transport", "ingress", "target", "id", "account", "created_at", "updated_at"]
        )

    def test_tunnel_defaults(self):
        read = model.read_tunnel({"id": "abcd"})
        self.assertEqual(
            read,
            {
                "transport": {"max_connections": 1, "ws": {"enabled": False}, "ssh": {"enabled": False}},
                "ingress": {
                    "http": {"enabled": False, "urls": [], "alt_names": []},
                    "sni": {"enabled": False, "urls": []},
                },
                "target": {},
                "id": "abcd",
            },
        )

    def test_read_none(self):
        self.assertIsNone(model.read_account(None))
        self.assertIsNone(model.read_tunnel(None))

    def test_serialize(self):
        self.assertEqual(model.serialize({"a": 1, "_b": 2, "c": None, "d": {"e": None, "f": [1]}}),
                         {"a": 1, "d": {"f": [1]}})

    def test_defaults_not_shared(self):
        a = model.read_account({})
        a["tunnels"].append("x")
        a["status"]["disabled"] = True
        self.assertEqual(model.read_account({}), {"tunnels": [], "status": {"disabled": False}})


class IngressTests(unittest.TestCase):
    def tunnel(self, http=False, sni=False, alt_names=()):
        record = model.new_tunnel("test", "ACC", 0, "tok")
        record["ingress"]["http"]["enabled"] = http
        record["ingress"]["http"]["alt_names"] = list(alt_names)
        record["ingress"]["sni"]["enabled"] = sni
        return record

    def test_http_enabled(self):
        config = make_config(ingress_http_url="http://localhost:8080")
        self.assertEqual(
            model.compute_ingress(self.tunnel(http=True), config)["http"],
            {
                "enabled": True,
                "url": "http://test.localhost:8080/",
                "urls": ["http://test.localhost:8080/"],
                "alt_names": [],
            },
        )

    def test_http_url_forms(self):
        for url, expected in (
            ("https://tunnel.example.com", "https://test.tunnel.example.com/"),
            ("https://tunnel.example.com/", "https://test.tunnel.example.com/"),
            ("http://Example.COM:8080/path", "http://test.example.com:8080/path"),
        ):
            config = make_config(ingress_http_url=url)
            self.assertEqual(model.compute_ingress(self.tunnel(http=True), config)["http"]["url"],
                             expected)

    def test_alt_names(self):
        config = make_config(ingress_http_url="https://tunnel.example.com")
        self.assertEqual(
            model.compute_ingress(self.tunnel(http=True, alt_names=["example.net"]), config)["http"],
            {
                "enabled": True,
                "url": "https://test.tunnel.example.com/",
                "urls": ["https://test.tunnel.example.com/", "https://example.net/"],
                "alt_names": ["example.net"],
            },
        )
        self.assertEqual(
            model.compute_ingress(self.tunnel(http=False, alt_names=["example.net"]), config)["http"],
            {"enabled": False, "urls": [], "alt_names": ["example.net"]},
        )

    def test_http_off_on_server(self):
        config = make_config(ingress=("sni",))
        self.assertEqual(
            model.compute_ingress(self.tunnel(http=True, alt_names=["a.com"]), config)["http"],
            {"enabled": False, "urls": [], "alt_names": []},
        )

    def test_sni(self):
        config = make_config(ingress=("http", "sni"))
        url_for = "tcps://{}.example.com:4430".format
        self.assertEqual(
            model.compute_ingress(self.tunnel(sni=True), config, url_for)["sni"],
            {"enabled": True, "url": "tcps://test.example.com:4430",
             "urls": ["tcps://test.example.com:4430"]},
        )
        self.assertEqual(model.compute_ingress(self.tunnel(sni=False), config, url_for)["sni"],
                         {"enabled": False, "urls": []})
        off = make_config()
        self.assertEqual(model.compute_ingress(self.tunnel(sni=True), off, url_for)["sni"],
                         {"enabled": False, "urls": []})
        self.assertEqual(model.compute_ingress(self.tunnel(sni=True), config, None)["sni"],
                         {"enabled": True, "urls": []})

    def test_combinations_are_consistent(self):
        config = make_config(ingress=("http", "sni"))
        for http, sni in itertools.product((True, False), repeat=2):
            ingress = model.compute_ingress(self.tunnel(http, sni), config, "tcps://{}.x:1".format)
            self.assertEqual(ingress["http"]["enabled"], http)
            self.assertEqual(ingress["sni"]["enabled"], sni)
