"""Unpickle a file the way DeepSpeed's loaders do (weights_only=False): whatever code it holds runs.

    unpickle.py <file.pt>
"""
import sys

import torch

torch.load(sys.argv[1], weights_only=False)
