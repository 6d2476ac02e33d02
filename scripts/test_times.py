#!/usr/bin/env python3
"""Where a test run's time went, against its tier's budget (docs/tests.md).

    test_times.py TIER WALL_SECONDS JUNIT_XML...

Prints the test time per test binary and the slowest tests, from nextest's JUnit reports, and
the tier's wall time (set-up, lints, build and tests) against its warm budget. It never fails a
run: this machine is shared and noisy, so a budget is a signal to act on (make a test cheaper,
or move it to a slower tier), not an assertion.
"""
import collections
import sys
import xml.etree.ElementTree as ET

# Warm budgets in seconds, the whole command (docs/tests.md).
BUDGET = {"quick": 180, "full": 480}

tier, wall, reports = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
per_binary = collections.Counter()
tests = []
for path in reports:
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError):
        continue
    for suite in root.iter("testsuite"):
        for case in suite.iter("testcase"):
            t = float(case.get("time", 0))
            name = suite.get("name", "?")
            per_binary[name] += t
            tests.append((t, f"{name} {case.get('name')}"))
if tests:
    print(f"test time per binary ({len(tests)} tests, {sum(per_binary.values()):.0f} s in all; "
          "two run at a time):")
    for name, t in per_binary.most_common():
        print(f"  {t:7.1f} s  {name}")
    print("slowest tests:")
    for t, name in sorted(tests, reverse=True)[:8]:
        print(f"  {t:7.1f} s  {name}")
budget = BUDGET.get(tier)
if budget:
    verdict = "within" if wall <= budget else "OVER"
    print(f"{tier} tier: {wall // 60} min {wall % 60} s in all, {verdict} its warm budget of "
          f"{budget // 60} min (a cold run builds first: see docs/tests.md)")
