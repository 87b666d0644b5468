#!/usr/bin/env python3
"""Container health check: GET /ping on the admin port (EXPOSR_ADMIN_PORT, 8081)."""

import os
import sys
import urllib.request

port = os.environ.get("EXPOSR_ADMIN_PORT") or "8081"
try:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=4) as resp:
        sys.exit(0 if resp.status == 200 else 1)
except Exception as e:  # refused, timeout, non-2xx: unhealthy
    print(f"exposrd-healthcheck: {e}", file=sys.stderr)
    sys.exit(1)
