#!/usr/bin/env python3
"""Strategist: chooses an angle on a topic and a working title for the writer."""
import json
import os
import sys

ANGLES = ["what nobody tells you about", "a field guide to", "three mistakes in"]


def main():
    topic = sys.argv[1]
    n = int(os.environ.get("OPSLOOP_MISSION_ID", "0"))
    angle = ANGLES[n % len(ANGLES)]
    print("::progress 50 weighing angles")
    title = f"{angle} {topic}".capitalize()
    with open(os.environ["OPSLOOP_OUTPUT"], "w", encoding="utf-8") as out:
        json.dump({"angle": angle, "title": title}, out)
    print("::progress 100 " + title)


main()
