"""JUnit XML for CI and LMS autograders: one <testsuite> per submission, one <testcase> per
check (classname = the part), FAIL/FORBIDDEN as <failure>, ERROR/TIMEOUT/NOT IMPLEMENTED as
<error>, SKIPPED as <skipped>; a submission that could not be graded is one <error> case."""

from __future__ import annotations

import xml.etree.ElementTree as ET

FAILURES = {"FAIL", "FORBIDDEN"}
ERRORS = {"ERROR", "TIMEOUT", "NOT IMPLEMENTED"}


def junit_xml(reports: list[dict]) -> str:
    root = ET.Element("testsuites")
    for report in reports:
        name = report.get("student") or report.get("notebook", "submission")
        suite = ET.SubElement(root, "testsuite", name=f"{name} ({report.get('lab', '?')})")
        cases = 0
        if report.get("status", "graded") != "graded":
            case = ET.SubElement(suite, "testcase", classname=name, name="grading")
            ET.SubElement(case, "error", message=report["message"])
            cases = 1
        for part in report.get("parts", []):
            for test in part["tests"]:
                cases += 1
                case = ET.SubElement(suite, "testcase", classname=part["part"], name=test["name"])
                status, message = test["status"], test["message"]
                if status in FAILURES:
                    ET.SubElement(case, "failure", message=f"{status}: {message}")
                elif status in ERRORS:
                    ET.SubElement(case, "error", message=f"{status}: {message}")
                elif status == "SKIPPED":
                    ET.SubElement(case, "skipped", message=message)
        suite.set("tests", str(cases))
        for kind in ("failure", "error", "skipped"):
            suite.set(
                kind + ("s" if kind != "skipped" else ""), str(len(suite.findall(f"*/{kind}")))
            )
    return ET.tostring(root, encoding="unicode", xml_declaration=True) + "\n"
