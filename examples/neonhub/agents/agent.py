#!/usr/bin/env python3
"""One NeonHub agent (argv[1] names it): works through a few stages, printing a
progress line for each, and appends its result to out/NAME.log. It fails while
out/break-NAME exists, as a real agent fails when its upstream is down."""
import json
import os
import sys
import time

STAGES = ["connecting", "fetching", "thinking", "writing"]


def main():
    name = sys.argv[1]
    attempt = os.environ.get("OPSLOOP_ATTEMPT", "?")
    for i, stage in enumerate(STAGES, 1):
        print(f"::progress {i * 100 // (len(STAGES) + 1)} {name}: {stage}", flush=True)
        time.sleep(0.05)
        if stage == "fetching" and os.path.exists(os.path.join("out", f"break-{name}")):
            sys.exit(f"{name}: upstream unavailable (attempt {attempt}; remove out/break-{name} to mend)")
    items = (int(os.environ.get("OPSLOOP_MISSION_ID", "0")) * 7) % 13 + 1
    with open(os.path.join("out", f"{name}.log"), "a", encoding="utf-8") as log:
        log.write(json.dumps({"mission": os.environ.get("OPSLOOP_MISSION_ID"), "items": items}) + "\n")
    print(f"::progress 100 {name}: done, {items} items", flush=True)
    with open(os.environ["OPSLOOP_OUTPUT"], "w", encoding="utf-8") as out:
        json.dump({"items": items}, out)


main()
