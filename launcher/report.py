"""Report on a sweep (or one run): report.md with test accuracy and macro-F1 per setting (mean ± sd,
min/max over the runs), per-class scores, the majority baseline and published anchors, and PNG plots
(curves, confusion matrices, throughput and memory), all read from the runs' own files.

    python launcher/report.py runs/sweep
    python launcher/report.py runs/smoke --output_dir runs/smoke-report
"""
import sys
from pathlib import Path

from medgpt.cli import parse_request, request_parser
from medgpt.commands import ReportRequest
from medgpt.errors import CliParser, run_cli


def parser() -> CliParser:
    return request_parser(ReportRequest, __doc__)


def main(argv: list[str]) -> None:
    request = parse_request(ReportRequest, parser(), argv)
    from medgpt.report import write_report  # imports matplotlib and TensorBoard: bad flags are reported before

    print(f"medgpt: wrote {write_report(Path(request.folder), request.report_dir)}")


if __name__ == "__main__":
    run_cli(lambda: main(sys.argv[1:]))
