#!/usr/bin/env python3
"""The summary of scripts/test.sh, read from what the passes left in its log folder.

Each Rust pass is a JUnit file of cargo-nextest (`junit-<pass>.xml`), with a line of
`passes` naming the server it ran against, and the skip log the tests wrote during that pass
(`skipped-<pass>`: the test's name, a tab, the reason). A test is counted once per pass it ran
in: the tests run again on a second nats-server are counted again, under that server. A test
that returned early for want of a service, or was built without a feature it needs, is listed
as skipped or dropped with its reason, and not counted as passed.

Usage: test-summary.py LOG_FOLDER  (exit 1 when a test failed)
"""

import sys
import xml.etree.ElementTree as ET
from pathlib import Path


def passes(folder):
    for line in (folder / "passes").read_text().splitlines():
        name, server = line.split("\t", 1)
        yield name, server


def cases(junit):
    """(binary, test, seconds, failed) for every test case of a nextest JUnit file."""
    if not junit.exists():
        return
    for case in ET.parse(junit).getroot().iter("testcase"):
        failed = case.find("failure") is not None or case.find("error") is not None
        yield case.get("classname", ""), case.get("name", ""), float(case.get("time", 0)), failed


def skips(path):
    """{test name: reason} from a skip log."""
    found = {}
    if path.exists():
        for line in path.read_text().splitlines():
            test, _, reason = line.partition("\t")
            found.setdefault(test, reason)
    return found


def main(folder):
    folder = Path(folder)
    any_failed = False
    slowest = []
    total = {"passed": 0, "failed": 0, "skipped": 0, "dropped": 0}
    print("Rust tests (cargo nextest), each counted once per server it ran against:")
    notes = []
    for name, server in passes(folder):
        run = list(cases(folder / f"junit-{name}.xml"))
        skipped = skips(folder / f"skipped-{name}")
        counts = {"passed": 0, "failed": 0, "skipped": 0, "dropped": 0}
        failures = []
        for binary, test, seconds, failed in run:
            slowest.append((seconds, f"{binary} {test}", server))
            reason = skipped.get(test)
            if failed:
                counts["failed"] += 1
                failures.append(f"{binary} {test}")
            elif reason is None:
                counts["passed"] += 1
            else:
                kind = "dropped" if reason.startswith("built without") else "skipped"
                counts[kind] += 1
                notes.append(f"  {kind}: {binary} {test} ({server}): {reason}")
        if not run:
            counts["failed"] += 1
            failures.append("(no JUnit file: the pass did not run its tests)")
        for key in total:
            total[key] += counts[key]
        any_failed |= counts["failed"] > 0
        print(
            f"  {server}: {len(run)} run: {counts['passed']} passed, {counts['failed']} failed, "
            f"{counts['skipped']} skipped for want of a service, {counts['dropped']} dropped"
        )
        for failure in failures:
            print(f"    FAILED: {failure}")
    extra = folder / "dropped"
    if extra.exists():
        for line in extra.read_text().splitlines():
            total["dropped"] += 1
            notes.append(f"  dropped: {line}")
    if notes:
        print("skipped and dropped tests, with their reasons:")
        print("\n".join(sorted(notes)))
    print("the ten slowest tests:")
    for seconds, test, server in sorted(slowest, reverse=True)[:10]:
        print(f"  {seconds:7.1f} s  {test}  ({server})")
    print(
        f"rust total: {total['passed']} passed, {total['failed']} failed, "
        f"{total['skipped']} skipped, {total['dropped']} dropped"
    )
    (folder / "rust-totals").write_text(
        f"{total['passed']} {total['failed']} {total['skipped'] + total['dropped']}\n"
    )
    return 1 if any_failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
