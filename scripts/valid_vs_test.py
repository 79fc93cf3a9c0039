"""Usage: python scripts/valid_vs_test.py PREPARED_DIR [PREPARED_DIR ...]

How a prepared folder's valid and test windows relate to its training windows: the share of
targets that are some training window's target (item novelty), that appear in any training window,
of users with training windows, and of history items seen in the same user's training windows.
A validation split that tracks test should match test on these (docs/results.md section 7)."""

import sys

import numpy as np

from bear_ds.data import load_split


def relation(train, split) -> dict[str, float]:
    train_targets = set(train["target"])
    anywhere = train_targets.union(*map(set, train["history"]))
    seen_by_user: dict[str, set[str]] = {}
    for user, history, target in zip(train["user_id"], train["history"], train["target"], strict=True):
        seen_by_user.setdefault(user, set()).update([*history, target])
    users, histories, targets = split["user_id"], split["history"], split["target"]
    return {
        "windows": len(targets),
        "target is a training target": np.mean([t in train_targets for t in targets]),
        "target in any training window": np.mean([t in anywhere for t in targets]),
        "user has training windows": np.mean([u in seen_by_user for u in users]),
        "history items in the user's training windows": np.mean(
            [
                np.mean([i in seen_by_user.get(u, ()) for i in h]) if len(h) else 0.0
                for u, h in zip(users, histories, strict=True)
            ]
        ),
    }


for folder in sys.argv[1:]:
    train = load_split(folder, "train").to_dict()
    rows = {name: relation(train, load_split(folder, name).to_dict()) for name in ("valid", "test")}
    print(f"{folder} (train: {len(train['target'])} windows)\n\n| | valid | test |\n|---|---|---|")
    for key in rows["valid"]:
        cells = [f"{rows[s][key]:.0f}" if key == "windows" else f"{100 * rows[s][key]:.1f}%" for s in ("valid", "test")]
        print(f"| {key} | {cells[0]} | {cells[1]} |")
    print()
