#!/usr/bin/env python3
"""Tweeter: adds the hashtags a Fitflow tweet carries and checks its length."""
import json
import os
import sys

text = sys.argv[1].strip()
tags = "#fitflow"
if len(text) + 1 + len(tags) > 280:
    sys.exit(f"tweet too long: {len(text)} characters")
print("::progress 100 composed")
with open(os.environ["OPSLOOP_OUTPUT"], "w", encoding="utf-8") as out:
    json.dump({"text": text, "tags": tags, "chars": len(text)}, out)
