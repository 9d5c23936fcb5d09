"""Answer a question with a saved model, through the training prompt.

    python launcher/generate.py --model runs/gpt2/model "Does aspirin prevent stroke?" --context "..."
"""
import sys

from medgpt.errors import CliParser, run_cli
from medgpt.inference import run_generate


def main(argv: list[str]) -> None:
    parser = CliParser(prog="generate.py", description=__doc__.splitlines()[0])
    parser.add_argument("question")
    parser.add_argument("--model", required=True, help="save_pretrained folder")
    parser.add_argument("--context", action="append", default=[], help="a context passage (repeatable)")
    parser.add_argument("--max_length", type=int, default=256, help="prompt + generated tokens")
    parser.add_argument("--tokenizer", default="", help="default: the model folder's")
    parser.add_argument("--device", default="auto", help="auto (the GPU if any), cuda or cpu")
    args = parser.parse_args(argv)
    run_generate(args.model, args.question, args.context, args.max_length, args.tokenizer, args.device)


if __name__ == "__main__":
    run_cli(lambda: main(sys.argv[1:]))
