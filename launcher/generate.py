"""Answer a question with a saved model, through the training prompt.

    python launcher/generate.py --model runs/gpt2/export "Does aspirin prevent stroke?" --context "..."
"""
import sys

from medgpt.cli import parse_request, request_parser
from medgpt.commands import GenerateRequest
from medgpt.console import quiet_libraries
from medgpt.errors import CliParser, run_cli


def parser() -> CliParser:
    return request_parser(GenerateRequest, __doc__)


def main(argv: list[str]) -> None:
    r = parse_request(GenerateRequest, parser(), argv)
    quiet_libraries(r.verbose)
    from medgpt.inference import run_generate  # imports torch (seconds): bad flags are reported before it

    run_generate(r.model, r.question, r.context, r.max_length, r.tokenizer, r.device)


if __name__ == "__main__":
    run_cli(lambda: main(sys.argv[1:]))
