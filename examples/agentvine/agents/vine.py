#!/usr/bin/env python3
"""AgentVine's agents as one script: `triage ISSUE`, `fix ISSUE`, `release VERSION`.
The coder (`fix`) asks a person a clarification question in the middle of its work
with `opsloop ask`, which waits for the answer and prints it. Results go to out/."""
import json
import os
import subprocess
import sys


def write_output(values):
    with open(os.environ["OPSLOOP_OUTPUT"], "w", encoding="utf-8") as out:
        json.dump(values, out)


def log(line):
    os.makedirs("out", exist_ok=True)
    with open(os.path.join("out", "vine.log"), "a", encoding="utf-8") as f:
        f.write(line + "\n")


def triage(issue):
    size = ["small", "medium", "large"][int(issue) % 3]
    print(f"::progress 100 issue {issue}: bug, {size}", flush=True)
    log(f"triaged {issue} {size}")
    write_output({"label": "bug", "size": size})


def fix(issue):
    print(f"::progress 30 issue {issue}: reading the code", flush=True)
    # The issue does not say whether callers may break: ask, and wait for the answer.
    asked = subprocess.run(
        ["opsloop", "ask", f"Issue {issue}: keep the old API working, or break it for a cleaner fix?",
         "--choice", "keep", "--choice", "break", "--timeout", "2h", "--default", "keep"],
        capture_output=True, text=True, check=False,
    )
    if asked.returncode != 0:
        sys.exit(f"no answer to the clarification: {asked.stderr.strip()}")
    compat = asked.stdout.strip()
    print(f"::progress 80 issue {issue}: writing the {compat} variant", flush=True)
    patch = f"fix-{issue}-{compat}.patch"
    log(f"fixed {issue} {compat}")
    print(f"::progress 100 issue {issue}: {patch}", flush=True)
    write_output({"compat": compat, "patch": patch})


def release(version):
    print(f"::progress 100 shipped {version}", flush=True)
    log(f"released {version}")
    write_output({"version": version})


ACTIONS = {"triage": triage, "fix": fix, "release": release}
if len(sys.argv) != 3 or sys.argv[1] not in ACTIONS:
    sys.exit("usage: vine.py triage|fix|release ARG")
ACTIONS[sys.argv[1]](sys.argv[2])
