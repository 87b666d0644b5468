"""The exposrd test suite (trial).

The ``exposr`` client remembers its server and account in the XDG config
directory: the tests, and every process they start, get a directory of
their own for the run, never the user's ``~/.config``.
"""

import atexit
import os
import shutil
import tempfile

_config_home = tempfile.mkdtemp(prefix="exposr-tests-xdg-")
os.environ["XDG_CONFIG_HOME"] = _config_home
atexit.register(shutil.rmtree, _config_home, True)
