#!/usr/bin/env python3
"""Writer: drafts a post for a title (kept in out/drafts/)."""
import json
import os
import sys


def main():
    title = sys.argv[1]
    paragraphs = [f"{title}.", "Here is what we saw this week, and why it matters.", "More soon."]
    for i, _ in enumerate(paragraphs, 1):
        print(f"::progress {i * 100 // len(paragraphs)} paragraph {i}/{len(paragraphs)}")
    text = "\n\n".join(paragraphs)
    drafts = os.path.join("out", "drafts")
    os.makedirs(drafts, exist_ok=True)
    path = os.path.join(drafts, f"mission-{os.environ.get('OPSLOOP_MISSION_ID', '0')}.md")
    with open(path, "w", encoding="utf-8") as f:
        f.write(text + "\n")
    with open(os.environ["OPSLOOP_OUTPUT"], "w", encoding="utf-8") as out:
        json.dump({"title": title, "words": len(text.split()), "file": path}, out)


main()
