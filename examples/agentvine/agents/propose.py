#!/usr/bin/env python3
"""An AgentVine agent asking opsloop for work over HTTP, with its own key:

    agents/propose.py AGENT TEMPLATE key=value ...

The key is read from .keys/AGENT (run.sh makes them); opsloop records the proposal as
`agent:AGENT`. Prints opsloop's JSON answer; exits 0 when the proposal was accepted
(201), 3 when refused (403 out of the key's scope, 409 gated), else 1."""
import json
import os
import sys
import urllib.error
import urllib.request

if len(sys.argv) < 3:
    sys.exit("usage: propose.py AGENT TEMPLATE [key=value ...]")
agent, template, pairs = sys.argv[1], sys.argv[2], sys.argv[3:]
params = dict(p.split("=", 1) for p in pairs if "=" in p)
proposal = {"template": template, "params": params}
try:
    with open(os.path.join(".keys", agent), encoding="utf-8") as f:
        key = f.read().strip()
except OSError as e:
    sys.exit(f"no key for {agent} in .keys/ ({e.strerror}); run.sh makes them")
addr = os.environ.get("OPSLOOP_HTTP_ADDR", "127.0.0.1:18750")
body = json.dumps(proposal).encode()
req = urllib.request.Request(
    f"http://{addr}/api/proposals", data=body, method="POST",
    headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"},
)
try:
    with urllib.request.urlopen(req, timeout=30) as r:
        print(r.read().decode())
        sys.exit(0)
except urllib.error.HTTPError as e:
    print(e.read().decode())
    sys.exit(3 if e.code in (403, 409) else 1)
