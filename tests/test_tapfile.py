"""exposrd-mktap: the tap file it writes, and its --help."""

import io
import os
import stat
import sys

from twisted.application import service
from twisted.trial import unittest

from exposr import tapfile
from exposr.options import OPTIONS

URL = "http://example.com"


class MktapTests(unittest.TestCase):
    def run_main(self, *argv):
        out, err = io.StringIO(), io.StringIO()
        self.patch(sys, "stdout", out)
        self.patch(sys, "stderr", err)
        e = self.assertRaises(SystemExit, tapfile.main, list(argv))
        return e.code, out.getvalue(), err.getvalue()

    def test_tap_file_is_readable_by_its_owner_only(self):
        """It holds secrets: mode 0600 whatever the umask, also when it replaces a file."""
        path = self.mktemp() + ".tap"
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            f.write("old")
        os.chmod(path, 0o644)
        old = os.umask(0)
        self.addCleanup(os.umask, old)
        code, out, err = self.run_main(
            path, "--ingress-http-url", URL, "--admin-api-enable", "--admin-api-key", "s3cret"
        )
        self.assertEqual((code, err), (0, ""))
        self.assertIn(f"wrote {path}", out)
        self.assertEqual(stat.S_IMODE(os.stat(path).st_mode), 0o600)
        self.assertEqual(os.listdir(os.path.dirname(path)), [os.path.basename(path)])
        application = service.loadApplication(path, "pickle")
        (configured,) = list(service.IServiceCollection(application))
        self.assertEqual(configured.config.admin_api_key, "s3cret")

    def test_unwritable_path_is_one_line(self):
        code, out, err = self.run_main(
            os.path.join(self.mktemp(), "missing", "x.tap"), "--ingress-http-url", URL
        )
        self.assertEqual(code, 1)
        self.assertTrue(err.startswith("exposrd-mktap: cannot write "), err)
        self.assertEqual(len(err.splitlines()), 1)

    def test_help(self):
        for flag in ("--help", "-h"):
            code, out, err = self.run_main(flag)
            self.assertEqual((code, err), (0, ""))
            self.assertTrue(out.startswith("usage: exposrd-mktap FILE [exposrd options]\n"), out)
            for opt in OPTIONS:
                self.assertIn(f"--{opt.name}", out)
            self.assertEqual([line for line in out.splitlines() if len(line) > 100], [])

    def test_no_file(self):
        code, out, err = self.run_main("--ingress-http-url", URL)
        self.assertEqual((code, err), (2, "usage: exposrd-mktap FILE [exposrd options]\n"))
