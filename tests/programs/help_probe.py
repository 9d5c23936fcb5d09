"""Run a launcher's --help in this process, then print (JSON) its exit code and which of the
heavy modules named after it were imported: ``help_probe.py <launcher.py> <module> [<module> ...]``."""
import json
import runpy
import sys

script, heavy = sys.argv[1], sys.argv[2:]
sys.argv = [script, "--help"]
code = None
try:
    runpy.run_path(script, run_name="__main__")
except SystemExit as end:
    code = end.code
print(json.dumps({"exit": code, "heavy": [m for m in heavy if m in sys.modules]}))
