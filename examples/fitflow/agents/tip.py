#!/usr/bin/env python3
"""Coach: today's tip, the same all day (chosen by the UTC date)."""
import datetime
import os

TIPS = [
    "Warm up for five minutes before you run",
    "Drink a glass of water before every workout",
    "Rest days are training days too",
]
day = datetime.datetime.now(datetime.timezone.utc).toordinal()
with open(os.environ["OPSLOOP_OUTPUT"], "w", encoding="utf-8") as out:
    out.write("text=" + TIPS[day % len(TIPS)] + "\n")
