"""Consolidate a medgpt/DeepSpeed checkpoint of any ZeRO stage into a Hugging Face model folder.

    python launcher/export.py --checkpoint runs/smoke --output runs/smoke-hf [--dtype fp32|bf16|fp16]
"""
import argparse

from medgpt.errors import CliParser, run_cli
from medgpt.export import DTYPES, export_checkpoint


def main() -> None:
    parser = CliParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True,
                        help="a run's output_dir, its checkpoints/ folder, or one checkpoints/step<N> folder")
    parser.add_argument("--output", required=True, help="new folder for config.json, model.safetensors, tokenizer")
    parser.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    args = parser.parse_args()
    print(f"exported {export_checkpoint(args.checkpoint, args.output, args.dtype)}")


if __name__ == "__main__":
    run_cli(main)
