#!/usr/bin/env python3
"""wait_ready.py HOST:PORT [SECONDS]: wait until opsloop's /healthz answers 200."""
import sys
import time
import urllib.request

addr = sys.argv[1]
deadline = time.time() + float(sys.argv[2] if len(sys.argv) > 2 else 120)
while time.time() < deadline:
    try:
        with urllib.request.urlopen(f"http://{addr}/healthz", timeout=2) as r:
            if r.status == 200:
                sys.exit(0)
    except OSError:
        pass
    time.sleep(0.2)
sys.exit(f"opsloop did not answer on http://{addr}/healthz")
