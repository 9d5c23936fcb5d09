"""Consolidate a medgpt/DeepSpeed checkpoint of any ZeRO stage into a Hugging Face model folder.

    python launcher/export.py --checkpoint runs/smoke --output_dir runs/smoke-hf [--dtype fp32|bf16|fp16]
"""
import sys

from medgpt.cli import parse_request, request_parser
from medgpt.commands import ExportRequest
from medgpt.console import quiet_libraries
from medgpt.errors import CliParser, run_cli


def parser() -> CliParser:
    return request_parser(ExportRequest, __doc__)


def main(argv: list[str]) -> None:
    request = parse_request(ExportRequest, parser(), argv)
    quiet_libraries(request.verbose)
    from medgpt.export import export_checkpoint  # imports DeepSpeed (seconds): bad flags are reported before it

    print(f"exported {export_checkpoint(request.checkpoint, request.output_dir, request.dtype)}")


if __name__ == "__main__":
    run_cli(lambda: main(sys.argv[1:]))
