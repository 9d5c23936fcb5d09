"""Run a Python program as in an environment without the lora extra: ``import peft`` fails and
importlib finds no peft (``sys.modules['peft'] = None``, which transformers' availability check
sees too).

    without_peft.py <program.py> [args...]
"""
import runpy
import sys

sys.modules["peft"] = None
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
