"""A pqa_artificial stand-in: N rows in the Hub's parquet layout, resampled from pqa_labeled.

    python bench/make_pqa_artificial.py --rows 211269 --out /tmp/pqa-bench

writes ``<out>/pqa_artificial/train-00000-of-00001.parquet`` (the path inside a snapshot of the
Hub's qiaojin/PubMedQA, so ``--data <out> --subset pqa_artificial`` reads it). Offline there is no
copy of the real 211,269 machine-labelled questions; lengths and texts are realistic because
every piece is a real pqa_labeled one: each row takes the contexts (with their labels and MeSH
terms) of one random question, the question of another, the long answer of a third, and a
decision drawn with pqa_artificial's published shares (196,144 yes / 15,125 no, no maybe).
pubids are 40,000,000 + row: unique, and none is a pqa_labeled PMID. Seeded: the same file for
the same --rows and --seed. Never write it into the repository.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

LABELED = Path(__file__).resolve().parents[2] / "shared" / "data" / "pubmedqa" / "hf" / "pqa_labeled"
ROWS = 211_269  # pqa_artificial on the Hub
YES_SHARE = 196_144 / ROWS
FIRST_PUBID = 40_000_000


def resampled(labeled: pa.Table, rows: int, seed: int) -> pa.Table:
    """``rows`` rows of pqa_labeled's pieces, each column drawn independently."""
    rng = np.random.default_rng(seed)

    def draw(column: str) -> pa.ChunkedArray:
        return labeled.column(column).take(rng.integers(0, len(labeled), rows))

    context = draw("context").combine_chunks()
    # pqa_artificial's context struct holds contexts, labels and meshes (no reasoning_*_pred).
    context = pa.StructArray.from_arrays([pc.struct_field(context, name) for name in ("contexts", "labels", "meshes")],
                                         names=["contexts", "labels", "meshes"])
    decisions = np.where(rng.random(rows) < YES_SHARE, "yes", "no")
    return pa.table({"pubid": pa.array(np.arange(FIRST_PUBID, FIRST_PUBID + rows), pa.int32()),
                     "question": draw("question"), "context": context, "long_answer": draw("long_answer"),
                     "final_decision": pa.array(decisions, pa.string())})


def write(out: Path, rows: int, seed: int = 0, labeled: Path = LABELED) -> Path:
    """Write the file under ``out`` and return its path."""
    table = resampled(pq.read_table(sorted(labeled.glob("*.parquet"))), rows, seed)
    path = out / "pqa_artificial" / "train-00000-of-00001.parquet"
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path)
    return path


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=ROWS, help=f"rows to write (default {ROWS:,}, as on the Hub)")
    parser.add_argument("--out", type=Path, required=True, help="folder to write into (outside the repository)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the resampling")
    parser.add_argument("--labeled", type=Path, default=LABELED, help="pqa_labeled parquet folder to resample")
    return parser.parse_args(argv)


def main() -> None:
    args = parse_args(sys.argv[1:])
    print(write(args.out, args.rows, args.seed, args.labeled))


if __name__ == "__main__":
    main()
