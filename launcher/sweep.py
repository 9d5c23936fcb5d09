"""Run a grid of folds x seeds (x training flag values), one medgpt run per point, each in its own
output folder <sweep>/runs/<name>/. The sweep's flags come first, training flags after "--".

    python launcher/sweep.py runs/sweep --folds 0,1 --seeds 1,2 --nproc 2 -- --config configs/smoke.yaml
    python launcher/sweep.py runs/sweep --folds 0-9 --seeds 1-3 --grid lr=1e-4,3e-4 --nproc 8 -- --max_steps 500
    python launcher/sweep.py runs/sweep --folds 0-9 --slurm --sbatch_args '--gpus-per-node 8' --nproc 8 -- --epochs 3

Locally the runs go one after another; the same command again skips finished runs and resumes the
others. --slurm submits a job array (one task a run) and the report job after it. Exit codes: 0 all
runs finished (or, with --slurm, submitted), 1 some run failed (named), 2 bad input (nothing ran),
75 stopped by a signal (rerun to resume).
"""
import sys

from medgpt.cli import parse_request, request_parser
from medgpt.errors import CliParser, UserError, check_all, run_cli
from medgpt.sweep import check_no_run_in_progress, check_slurm, run_local, submit_slurm
from medgpt.sweep_plan import SweepRequest, plan_sweep, write_sweep


def parser() -> CliParser:
    return request_parser(SweepRequest, __doc__)


def parse(argv: list[str]) -> tuple[SweepRequest, list[str]]:
    """The sweep's request and the training flags (after the first "--")."""
    cut = argv.index("--") if "--" in argv else len(argv)
    try:
        return parse_request(SweepRequest, parser(), argv[:cut]), argv[cut + 1:]
    except UserError as err:
        if any(problem.startswith("unknown flag") for problem in err.problems):
            err.problems.append("training flags go after '--': launcher/sweep.py DIR [sweep flags] -- [training flags]")
        raise


def main(argv: list[str]) -> None:
    request, train_args = parse(argv)
    sweep, _ = check_all(lambda: plan_sweep(request, train_args), lambda: request.slurm and check_slurm())
    check_no_run_in_progress(sweep)
    write_sweep(sweep)
    if request.slurm:
        submit_slurm(sweep, request)
    else:
        sys.exit(run_local(sweep, request))


if __name__ == "__main__":
    run_cli(lambda: main(sys.argv[1:]))
