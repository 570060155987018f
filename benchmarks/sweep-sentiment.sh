#!/bin/sh
# `peftkit sweep` on the sentiment recipe: the learning rate x the LoRA rank, a 2 x 2 grid sized for
# the 2-core CPU container (4000 training reviews, 125 steps of 32 a trial, validation every 25 steps
# on the whole validation split; the best trial tested once on the whole test split). Writes
# runs/sentiment-sweep-cpu/; benchmarks/results/sweep-sentiment-cpu.md and .json are its sweep.md
# and sweep.json. Extra arguments go to the sweep (e.g. --resume).
set -e
${PYTHON:-python} -m peftkit sweep sentiment-lora train.lr=1e-3,3e-3 method.r=8,16 \
    data.max_train_samples=4000 train.eval_steps=25 --name sentiment-sweep-cpu "$@"
