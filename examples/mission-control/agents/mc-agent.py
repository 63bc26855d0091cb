#!/usr/bin/env python3
"""A Mission Control agent: does one action (health, deploy, fence, promote) on a target,
printing progress, and reports what it cost (dollars: compute, API calls) as `cost`.
Its log of actions is out/actions.log."""
import json
import os
import sys
import time

COST = {"health": 0.01, "deploy": 0.15, "fence": 0.05, "promote": 0.25}


def main():
    if len(sys.argv) < 3 or sys.argv[1] not in COST:
        sys.exit("usage: mc-agent.py health|deploy|fence|promote TARGET [VERSION]")
    action, target, rest = sys.argv[1], sys.argv[2], sys.argv[3:]
    for pct in (25, 50, 75):
        print(f"::progress {pct} {action} {target}", flush=True)
        time.sleep(0.05)
    os.makedirs("out", exist_ok=True)
    with open(os.path.join("out", "actions.log"), "a", encoding="utf-8") as log:
        log.write(" ".join([action, target, *rest]) + "\n")
    print(f"::progress 100 {action} {target}: ok", flush=True)
    with open(os.environ["OPSLOOP_OUTPUT"], "w", encoding="utf-8") as out:
        json.dump({"action": action, "target": target, "ok": True, "cost": COST[action]}, out)


main()
