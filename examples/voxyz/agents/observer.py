#!/usr/bin/env python3
"""Observer: reads opsloop's /metrics text (argv[1]) and reports dead letters and the
share of finished missions that failed."""
import os
import re
import sys


def metric(text, name, labels=None):
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name):
            continue
        m = re.match(r"^([a-z_]+)(\{[^}]*\})?\s+([0-9.eE+-]+)$", line.strip())
        if not m or m.group(1) != name:
            continue
        if labels and not all(f'{k}="{v}"' in (m.group(2) or "") for k, v in labels.items()):
            continue
        total += float(m.group(3))
    return total


def main():
    text = sys.argv[1] if len(sys.argv) > 1 else ""
    if "opsloop_" not in text:
        sys.exit("observer: no opsloop metrics in the input")
    dead = int(metric(text, "opsloop_dead_letters"))
    failed = metric(text, "opsloop_missions_finished_total", {"status": "failed"})
    finished = metric(text, "opsloop_missions_finished_total")
    rate = failed / finished if finished else 0.0
    verdict = "healthy" if dead == 0 and rate < 0.2 else "needs a look"
    print(f"::progress 100 {dead} dead letters, {rate:.0%} of missions failed: {verdict}")
    with open(os.environ["OPSLOOP_OUTPUT"], "w", encoding="utf-8") as out:
        out.write(f"dead_letters={dead}\nfailure_rate={rate:.3f}\nverdict={verdict}\n")


main()
