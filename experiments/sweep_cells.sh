#!/usr/bin/env bash
# Runs a budget sweep as one process per (model, loss, seed) cell, side by
# side, on a machine with many cores or an accelerator, and stops them all at
# a deadline.
#
#     bash experiments/sweep_cells.sh DEADLINE_S OUT BUDGET CELL...
#
# CELL is MODEL:LOSS:SEED. Each cell runs
#     python -m experiments.compare --dataset digits --sweep --resume \
#         --models MODEL --loss LOSS --seed SEED --budgets BUDGET \
#         --optimizers adam two-phase-fixed two-phase adam-lbfgs adam-cosine \
#         --out OUT/LOSS --no-progress
# (the tails before cosine Adam, so a cell stopped at the deadline has its
# second phases first), its log in OUT/LOSS/logs/; SWEEP_ARGS adds flags
# (SWEEP_ARGS="--checkpoint-every 25": on a GPU, 15 processes writing a
# checkpoint every epoch spend more time on them than on training). Cells of
# one loss share OUT/LOSS, each in its own run folders. Every run
# checkpoints as it goes, so what a stopped cell has done is kept: the same command with the same cells
# continues it, and the sweep with --read-only (all the cells' models and
# seeds at once) writes the table from the finished runs and lists the rest.
#
# Example, the paper's 1000 epochs for two cells, each stopped after an hour:
#     bash experiments/sweep_cells.sh 3600 runs/digits-1000 1000 \
#         vgg5:softmax_mse:0 vit-mlp:xent:1
set -u
if [ $# -lt 4 ]; then
    sed -n '2,23p' "$0" | sed 's/^# \{0,1\}//'
    exit 2
fi
deadline=$1 out=$2 budget=$3
shift 3
for cell in "$@"; do
    IFS=: read -r model loss seed <<<"$cell"
    mkdir -p "$out/$loss/logs"
    timeout -s TERM "$deadline" python -m experiments.compare --dataset digits \
        --sweep --resume --models "$model" --loss "$loss" --seed "$seed" \
        --budgets "$budget" --out "$out/$loss" --no-progress \
        --optimizers adam two-phase-fixed two-phase adam-lbfgs adam-cosine \
        ${SWEEP_ARGS:-} >"$out/$loss/logs/$model-seed$seed.log" 2>&1 &
done
wait
echo "sweep_cells: every cell stopped or finished"
