"""Diagnostic for docs/criteria.md: do gradient criteria need calibration data the model has not memorised?

Same network, training and fine-tuning as benchmarks/criteria.py (seeds 0 and 1, ratio 0.7, local scope):
calibrates `taylor` and `gradient` once on training batches (as the main experiment does) and once on
held-out sequences (the last 512 test sequences; accuracy is then measured on the first 488 only).

    python benchmarks/criteria_calibration.py
"""
import copy
import sys

import numpy as np
import torch

sys.path.insert(0, "benchmarks")
import criteria as C

import structprune as sp

torch.set_num_threads(1)
data = C.load_data()
out = {}
for seed in [0, 1]:
    torch.manual_seed(seed)
    base = C.Net()
    C.train(base, data["x_train"], data["y_train"], 30, C.LR, seed)
    base.eval()
    print("seed", seed, "base acc", C.accuracy(base, data["x_test"], data["y_test"]))
    train_calib = C.calibration_batches(data["x_train"], data["y_train"], seed)
    # held-out calibration: the last 512 test sequences (diagnostic only), evaluate on the first 488
    xe, ye = data["x_test"][:488], data["y_test"][:488]
    held = [(data["x_test"][488 + 64 * i: 488 + 64 * (i + 1)], data["y_test"][488 + 64 * i: 488 + 64 * (i + 1)]) for i in range(8)]
    for label, calib, mode in [("train-calib", train_calib, "eval"), ("held-out-calib", held, "eval")]:
        for crit in ["random", "l2", "taylor", "gradient"]:
            m = copy.deepcopy(base)
            small = sp.slim(m, data["x_train"][:8], 0.7, criterion=crit, data=calib, verify=False, seed=seed)
            C.train(small, data["x_train"], data["y_train"], 2, C.FINETUNE_LR, seed)
            small.eval()
            acc = C.accuracy(small, xe, ye)
            out.setdefault((label, crit), []).append(acc)
for k, v in out.items(): print(k, np.round(v, 3), round(float(np.mean(v)), 3))
