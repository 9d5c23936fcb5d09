"""Evaluate a saved model on PubMedQA: predictions.json (official format) and metrics.json.

    python launcher/evaluate.py --model runs/gpt2/model --split test
    torchrun --nproc_per_node 2 launcher/evaluate.py --model runs/gpt2/model --split dev --fold 3
    python launcher/evaluate.py --predictions runs/eval-test/predictions.json
"""
import sys

from medgpt.errors import CliParser, run_cli
from medgpt.eval_job import EvalRequest, run_evaluation


def parse(argv: list[str]) -> EvalRequest:
    defaults = EvalRequest()
    parser = CliParser(prog="evaluate.py", description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=defaults.model, help="save_pretrained folder")
    parser.add_argument("--split", default=defaults.split, help="test (official 500) or dev (CV fold)")
    parser.add_argument("--fold", type=int, default=defaults.fold, help="CV fold 0..9 (dev split)")
    parser.add_argument("--data", default=defaults.data, help="Hub id, parquet file/folder, or ori_pqal.json")
    parser.add_argument("--tokenizer", default=defaults.tokenizer, help="default: the model folder's")
    parser.add_argument("--output", default=defaults.output, help="default: runs/eval-<split>")
    parser.add_argument("--device", default=defaults.device, help="auto (this rank's GPU if any), cuda or cpu")
    parser.add_argument("--batch_size", type=int, default=defaults.batch_size)
    parser.add_argument("--seq_len", type=int, default=defaults.seq_len, help="prompt + answer token")
    parser.add_argument("--mode", default=defaults.mode, help="loglik or generate")
    parser.add_argument("--predictions", default=defaults.predictions,
                        help="rescore this predictions.json against the split's gold labels (no model)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace predictions.json / metrics.json in a non-empty --output")
    return EvalRequest(**vars(parser.parse_args(argv)))


if __name__ == "__main__":
    run_cli(lambda: run_evaluation(parse(sys.argv[1:])))
