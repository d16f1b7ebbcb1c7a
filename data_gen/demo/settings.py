"""The demo's shared constants: where each stage's tile-sum items start, the file the metrics go to, the SFT band and
the targets the report judges. Imports nothing, so every module of `data_gen.demo` may import it.

Items are deterministic in (split, index) (`task.TileSumTask`); the stages draw disjoint index ranges:

    test split   TEST_START ..          held-out test questions (the evaluate stage, Best-of-k, held-out labels)
    train split  0 ..                   SFT training items (made on the fly, `num_train_items` of them)
                 ROLLOUT_START ..       training questions rolled out for pairs and Monte Carlo labels
                 VALIDATION_START ..    validation items of the SFT early stop
"""

TEST_START = 0  # test items are their own split; train questions start after the SFT items (no overlap)
ROLLOUT_START = 1_000_000
VALIDATION_START = 2_000_000  # validation items of the early stop: train split, far from training and rollout items

METRICS_FILE = "metrics.json"  # the evaluate stage's numbers (in its folder); the whole run's (in output_dir)

# the SFT policy's greedy accuracy where MPO and Best-of-N have room to show a gain (validation items)
SFT_BAND = (0.35, 0.65)
# targets of the issue, shown in the report
TARGETS = {"mpo_gain": 0.10, "bon_vs_majority": 0.05, "bon_vs_random": 0.08, "prm_step_f1_exact": 0.80,
           "reading_auc": 0.80, "sum_auc": 0.90, "ablated_reading_auc_max": 0.60, "bon_vs_ablated": 0.05,
           "full_minutes": 20.0, "quick_minutes": 3.0}
