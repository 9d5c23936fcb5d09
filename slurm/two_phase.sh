#!/usr/bin/env bash
# PubMedQA's multi-phase fine-tuning on SLURM: phase 1 on pqa_artificial, then phase 2 on pqa_labeled
# starting from phase 1's export. Two jobs of slurm/train.sbatch; the second waits in the queue until
# the first has completed with exit 0 (--dependency=afterok; --kill-on-invalid-dep: it is cancelled
# if phase 1 fails, instead of waiting forever). Run it on the login node, from the repository root:
#
#   MEDGPT_PYTHON=$PWD/.venv/bin/python slurm/two_phase.sh --ds_config ds_configs/zero2.json
#
# Its arguments are medgpt flags for both phases (e.g. --data: the Hub id or a snapshot folder that
# holds pqa_artificial/ and pqa_labeled/). MEDGPT_PHASE1_ARGS / MEDGPT_PHASE2_ARGS: flags for one
# phase only (split on spaces, they come last and win). MEDGPT_RUNS: the folder of runs/phase1 and
# runs/phase2 (default runs). sbatch options (--nodes, --gpus-per-node, --time, ...) go in
# MEDGPT_SBATCH_ARGS. Everything else as for slurm/train.sbatch (slurm/README.md): a preempted
# phase 1 requeues and resumes, and phase 2 still waits for its successful end.
set -euo pipefail

runs=${MEDGPT_RUNS:-runs}
read -r -a sbatch_args <<<"${MEDGPT_SBATCH_ARGS:-}"
read -r -a phase1_args <<<"${MEDGPT_PHASE1_ARGS:-}"
read -r -a phase2_args <<<"${MEDGPT_PHASE2_ARGS:-}"

phase1=$(MEDGPT_OUTPUT_DIR=$runs/phase1 sbatch --parsable --job-name medgpt-phase1 "${sbatch_args[@]}" \
    slurm/train.sbatch --subset pqa_artificial "$@" "${phase1_args[@]}")
phase1=${phase1%%;*}  # --parsable prints "id" or "id;cluster"
phase2=$(MEDGPT_OUTPUT_DIR=$runs/phase2 sbatch --parsable --job-name medgpt-phase2 "${sbatch_args[@]}" \
    --dependency "afterok:$phase1" --kill-on-invalid-dep yes \
    slurm/train.sbatch --subset pqa_labeled --model "$runs/phase1/export" "$@" "${phase2_args[@]}")
phase2=${phase2%%;*}
echo "medgpt-slurm: phase 1 (pqa_artificial) job $phase1 -> $runs/phase1;" \
     "phase 2 (pqa_labeled from $runs/phase1/export) job $phase2, after phase 1 succeeds -> $runs/phase2"
