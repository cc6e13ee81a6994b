"""One JSON of the GPU check's test part: each test's outcome (from pytest's JUnit XML) and its error figures (the
JSON lines `tests/test_gpu.py` appends to $AAM_FAST_GPU_ERRORS), so that $OUT keeps within its file limit.

    python -m bench.gpu_tests_json gpu-tests.xml gpu-tests.jsonl --out gpu-tests.json

Either input may be missing (a time-out before pytest wrote its XML keeps the figures of the tests that ended);
both are removed once merged. Exit status 1 when a test failed or errored, or nothing was recorded.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import xml.etree.ElementTree as ElementTree


def outcomes(xml_path: str) -> list[dict]:
    """`{"test", "outcome", "seconds", "message"}` per test case of a JUnit XML file ([] when it is absent)."""
    if not os.path.exists(xml_path):
        return []
    cases = []
    for case in ElementTree.parse(xml_path).getroot().iter("testcase"):
        outcome, message = "passed", ""
        for kind in ("failure", "error", "skipped"):
            found = case.find(kind)
            if found is not None:
                outcome = {"failure": "failed", "error": "error", "skipped": "skipped"}[kind]
                message = (found.get("message") or found.text or "")[:500]
                break
        cases.append(
            {
                "test": f"{case.get('classname', '')}::{case.get('name', '')}",
                "outcome": outcome,
                "seconds": float(case.get("time") or 0.0),
                "message": message,
            }
        )
    return cases


def figures(jsonl_path: str) -> list[dict]:
    if not os.path.exists(jsonl_path):
        return []
    with open(jsonl_path) as handle:
        return [json.loads(line) for line in handle if line.strip()]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("xml", help="pytest --junitxml output")
    parser.add_argument("jsonl", help="the error figures the GPU tests appended")
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    report = {"tests": outcomes(args.xml), "figures": figures(args.jsonl)}
    with open(args.out, "w") as handle:
        json.dump(report, handle, indent=1, sort_keys=True)
    for path in (args.xml, args.jsonl):
        if os.path.exists(path):
            os.remove(path)
    counts: dict[str, int] = {}
    for case in report["tests"]:
        counts[case["outcome"]] = counts.get(case["outcome"], 0) + 1
    print(f"gpu-tests.json: {counts or 'no test outcome recorded'}, {len(report['figures'])} figure lines")
    bad = counts.get("failed", 0) + counts.get("error", 0)
    return 1 if bad or not report["tests"] else 0


if __name__ == "__main__":
    sys.exit(main())
