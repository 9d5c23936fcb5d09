"""Evaluate a saved model on PubMedQA: predictions.json (official format) and metrics.json.

    python launcher/evaluate.py --model runs/gpt2/export --split test
    torchrun --nproc_per_node 2 launcher/evaluate.py --model runs/gpt2/export --split dev --fold 3
    python launcher/evaluate.py --predictions runs/eval-test/predictions.json
"""
import sys

from medgpt.cli import parse_request, request_parser
from medgpt.commands import EvalRequest
from medgpt.console import quiet_libraries
from medgpt.errors import CliParser, run_cli


def parser() -> CliParser:
    return request_parser(EvalRequest, __doc__)


def main(argv: list[str]) -> None:
    request = parse_request(EvalRequest, parser(), argv)
    quiet_libraries(request.verbose)
    from medgpt.evaluate import run_evaluation  # imports torch (seconds): bad flags are reported before it

    run_evaluation(request)


if __name__ == "__main__":
    run_cli(lambda: main(sys.argv[1:]))
