#!/usr/bin/env python3
"""Scout: looks at a beat and reports the strongest signal (a stand-in: no network)."""
import os
import sys

TOPICS = {
    "ai-agents": ["agent memory", "tool use at scale", "evals for agents"],
    "devops": ["postgres as a queue", "cron drift", "lease based workers"],
}


def main():
    beat = sys.argv[1] if len(sys.argv) > 1 else "ai-agents"
    topics = TOPICS.get(beat, [beat.replace("-", " ")])
    n = int(os.environ.get("OPSLOOP_MISSION_ID", "0"))
    print("::progress 20 scanning " + beat)
    topic = topics[n % len(topics)]
    score = 50 + (n * 17) % 50
    print(f"::progress 100 found {topic!r} (score {score})")
    with open(os.environ["OPSLOOP_OUTPUT"], "a", encoding="utf-8") as out:
        out.write(f"topic={topic}\nscore={score}\n")


main()
