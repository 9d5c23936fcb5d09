# Shared by slurm/train.sbatch and slurm/train_deepspeed.sbatch (sourced, not run): settings,
# the rendezvous host and port, medgpt's arguments, and the preemption/requeue logic.
# Everything is set by environment variables (sbatch exports the submitting environment):
#   MEDGPT_PYTHON          interpreter with medgpt installed (default: python3 on PATH)
#   MEDGPT_CONFIG          --config YAML (optional), MEDGPT_DS_CONFIG: --ds_config JSON (optional)
#   MEDGPT_OUTPUT_DIR      --output_dir (default: runs/<job name>, over the config file's; a requeued
#                          job resumes there); an --output_dir flag among the arguments wins
#   MEDGPT_ARGS            more medgpt flags, split on spaces; the script's own arguments follow them
#   MEDGPT_NPROC_PER_NODE  ranks per node (default: SLURM's GPUs on the node, else 1)
#   MEDGPT_MASTER_PORT     rendezvous port (default: derived from the job id, see below)
#   MEDGPT_SWEEP           set by launcher/sweep.py --slurm: this array task runs one run of that sweep

die() {  # bad input: one clear line, exit code 2 (as medgpt itself does)
    echo "medgpt-slurm: error: $*" >&2
    exit 2
}

python=${MEDGPT_PYTHON:-python3}
command -v "$python" >/dev/null || die "MEDGPT_PYTHON='$python' is not an executable; point it at the venv's python"

# The first host of the allocation hosts the rendezvous. The node list is compressed
# (node[01-04]); scontrol expands it, and the host must resolve on every node.
head_host=$(scontrol show hostnames "$SLURM_JOB_NODELIST" 2>/dev/null | head -n1) || true
if [[ -z $head_host ]] || ! getent hosts "$head_host" >/dev/null; then
    die "cannot resolve the first host of SLURM_JOB_NODELIST='$SLURM_JOB_NODELIST' (got '${head_host}')"
fi
# Derived from the job id (as medgpt's srun-direct mode does, without any exchange) unless something
# on this host, the head host where the rendezvous store will listen, holds it; then one the OS
# picks (medgpt/launch_env.py says why). The other nodes receive it on their command line.
master_port=${MEDGPT_MASTER_PORT:-$("$python" -m medgpt.launch_env "$SLURM_JOB_ID")} \
    || die "cannot pick a rendezvous port on $(hostname -s) (the line above says why)"
nproc_per_node=${MEDGPT_NPROC_PER_NODE:-${SLURM_GPUS_ON_NODE:-1}}

# --- Process settings, inherited by every rank.
# The node's CPUs shared among its ranks unless told otherwise: every rank using all cores
# oversubscribes them.
cpus=${SLURM_CPUS_ON_NODE:-1}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( cpus > nproc_per_node ? cpus / nproc_per_node : 1 ))}
# WARN prints NCCL's problems (and only those) into the job log; INFO for topology/transport details.
export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
# A rank whose collective fails or times out aborts its communicator and exits, so the whole job
# fails fast instead of hanging until the time limit.
export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}
# NCCL_SOCKET_IFNAME / GLOO_SOCKET_IFNAME: set them (e.g. =ib0 or =eth0) before sbatch when nodes
# have several interfaces and the default one does not reach the other nodes; they pass through.
export PYTHONUNBUFFERED=1  # rank output reaches the job log as it happens

output_dir=${MEDGPT_OUTPUT_DIR:-runs/$SLURM_JOB_NAME}
medgpt_args=(--output_dir "$output_dir" --resume auto)
[[ -n ${MEDGPT_CONFIG:-} ]] && medgpt_args+=(--config "$MEDGPT_CONFIG")
[[ -n ${MEDGPT_DS_CONFIG:-} ]] && medgpt_args+=(--ds_config "$MEDGPT_DS_CONFIG")
read -r -a extra <<<"${MEDGPT_ARGS:-}"
medgpt_args+=("${extra[@]}" "$@")
# A task of a sweep's job array (launcher/sweep.py --slurm sets MEDGPT_SWEEP): run <task id> of the
# sweep's sweep.json, whose flags (its output_dir, fold, seed, grid values) come last and win.
if [[ -n ${MEDGPT_SWEEP:-} ]]; then
    [[ -n ${SLURM_ARRAY_TASK_ID:-} ]] || die "MEDGPT_SWEEP is set but job $SLURM_JOB_ID is not an array task; submit sweeps with launcher/sweep.py --slurm"
    run_flags=$("$python" -m medgpt.sweep_plan "$MEDGPT_SWEEP" "$SLURM_ARRAY_TASK_ID") \
        || die "no run $SLURM_ARRAY_TASK_ID in the sweep $MEDGPT_SWEEP (the line above says why)"
    mapfile -t run_flags <<<"$run_flags"
    medgpt_args+=("${run_flags[@]}")
    echo "medgpt-slurm: sweep $MEDGPT_SWEEP, run $SLURM_ARRAY_TASK_ID (array job ${SLURM_ARRAY_JOB_ID:-?})"
fi

echo "medgpt-slurm: job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}) on $SLURM_JOB_NODELIST:" \
     "$SLURM_NNODES node(s) x $nproc_per_node rank(s), rendezvous $head_host:$master_port"
echo "medgpt-slurm: medgpt flags: ${medgpt_args[*]}"

# --- Preemption and time limits. SLURM sends USR1 to this script (--signal=B:USR1@<s>, or
# `scancel --signal=USR1 --batch <job>`). It is passed on to every process of the job's steps;
# the launchers ignore it (see run_step) and medgpt's ranks save a checkpoint at the next step
# boundary and exit. The job is then requeued and resumes from that checkpoint (--resume auto).
warned=0
on_warning() {
    warned=1
    echo "medgpt-slurm: USR1 received: asking the ranks to checkpoint and stop"
    scancel --signal=USR1 "$SLURM_JOB_ID"  # all steps of the job, not this batch shell
}

# A time limit, `scancel` or preemption sends TERM to every process of the job, this script included,
# and SIGKILL KillWait seconds later: medgpt's ranks save and exit (within their --stop_timeout) on TERM
# themselves. This script only waits for the step to end, so the job's exit status is the step's. It
# does not requeue: SLURM requeues a preempted job itself, a cancelled job is meant to end, and the time
# limit is met by the USR1 warning above.
on_term() {
    echo "medgpt-slurm: TERM received (time limit, scancel or preemption): the ranks checkpoint and stop"
}

run_step() {  # run_step <command...>: one task per node, USR1 and TERM handled as above; exits with its status
    # `trap '' USR1 TERM` before exec: an ignored signal stays ignored across exec, so torchrun and the
    # deepspeed launcher (which would die of USR1) survive it; medgpt installs its own handler. TERM:
    # the `deepspeed` runner has no handler of its own (deepspeed/launcher/runner.py:619-634) and would
    # die at once, ending the step's task while its ranks are still saving. torchrun and deepspeed's
    # launch.py install their own TERM handlers: they pass TERM on and wait 30 s for the ranks.
    trap on_warning USR1
    trap on_term TERM
    srun --nodes="$SLURM_NNODES" --ntasks="$SLURM_NNODES" --ntasks-per-node=1 --kill-on-bad-exit=1 \
        bash -c 'trap "" USR1 TERM; exec "$@"' run_step "$@" &
    local step=$! status
    # `wait` returns early whenever the trap runs; keep waiting until the step has really ended.
    while kill -0 "$step" 2>/dev/null; do
        wait "$step" || true
    done
    wait "$step" && status=0 || status=$?
    trap - USR1 TERM
    if (( warned && status != 0 )); then
        echo "medgpt-slurm: stopped on the warning signal (exit $status): requeueing job $SLURM_JOB_ID"
        scontrol requeue "$SLURM_JOB_ID"
    fi
    exit "$status"
}
