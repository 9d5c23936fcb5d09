#!/usr/bin/env bash
# How often a finished multi-rank program aborts at exit ("terminate called without an active
# exception", issue: the suite's random red; medgpt/shutdown.py). Runs one program N times in a row
# and counts the runs whose output has the abort, and the runs that exited non-zero.
#   bench/exit_stress.sh probe N   tests/programs/engine_probe.py, ZeRO-3 bf16, 2 ranks under torchrun
#   bench/exit_stress.sh train N   launcher/train.py end to end (configs/smoke.yaml, 2 steps), 2 ranks
# Results and the load beside them: docs/layout.md#tests.
set -uo pipefail
cd "$(dirname "$0")/.."
what=${1:?probe or train} n=${2:?how many runs}
python=${MEDGPT_PYTHON:-.venv/bin/python}
work=$(mktemp -d)
aborts=0 failed=0
for i in $(seq 1 "$n"); do
    port=$("$python" -c "from medgpt.distributed import free_port; print(free_port())")
    torchrun=(env OMP_NUM_THREADS=1 "$python" -m torch.distributed.run --nproc_per_node 2 --master_port "$port")
    if [ "$what" = probe ]; then
        "${torchrun[@]}" tests/programs/engine_probe.py ds_configs/zero3.json bf16 configs/models/tiny.json \
            > "$work/$i.log" 2>&1
    else
        "${torchrun[@]}" launcher/train.py --config configs/smoke.yaml --max_steps 2 \
            --output_dir "$work/run$i" --cache_dir "$work/cache" > "$work/$i.log" 2>&1
    fi
    code=$?
    grep -q "terminate called" "$work/$i.log" && aborts=$((aborts + 1))
    [ "$code" -ne 0 ] && failed=$((failed + 1))
    echo "$(date +%T) $what run $i: exit $code; $aborts abort(s), $failed non-zero exit(s) so far"
done
echo "$what: $n runs, $aborts abort(s), $failed non-zero exit(s) (logs: $work)"
