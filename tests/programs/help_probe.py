"""Run a launcher's --help in this process, then print (JSON) which of the heavy modules named after
it were imported: ``help_probe.py <launcher.py> <module> [<module> ...]``. The launcher ends the
process itself (medgpt.shutdown.exit_process: its exit code is the process's), after running the
atexit handlers: the report is one of them."""
import atexit
import json
import runpy
import sys

script, heavy = sys.argv[1], sys.argv[2:]
sys.argv = [script, "--help"]
atexit.register(lambda: print(json.dumps({"heavy": [m for m in heavy if m in sys.modules]})))
runpy.run_path(script, run_name="__main__")
