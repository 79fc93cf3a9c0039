"""Usage: python scripts/office_valid_split.py [../shared/data/Office]

Office: how the validation windows (the chronologically last 10% of train_10000.csv) relate to the
training windows, compared with the test windows (test_5000.csv)."""

import ast
import sys

import numpy as np
import pandas as pd

d = (sys.argv[1] if len(sys.argv) > 1 else "../shared/data/Office").rstrip("/") + "/"


def load(f):
    df = pd.read_csv(d + f)
    its = df.item_ids.map(ast.literal_eval)
    return pd.DataFrame(
        {
            "user": df.user_id,
            "ts": df.timestamp,
            "items": its,
            "hist": its.map(lambda x: tuple(x[:-1])),
            "target": its.map(lambda x: x[-1]),
        }
    )


tr = load("train_10000.csv").sort_values("ts", kind="stable").reset_index(drop=True)
te = load("test_5000.csv")
cut = int(round(len(tr) * 0.9))
train, valid = tr.iloc[:cut], tr.iloc[cut:]
print(len(train), len(valid), len(te))


def stats(name, ev):
    tu = set(train.user)
    seen = {(u, i) for u, its in zip(train.user, train["items"], strict=True) for i in its}
    seen_t = {(u, t) for u, t in zip(train.user, train.target, strict=True)}
    hist_of = {}
    for u, h in zip(train.user, train["hist"], strict=True):
        hist_of.setdefault(u, set()).update(h)
    # the eval target is in a training window's HISTORY of the same user: a later window of that user
    # was trained on, so the target (and what follows it) is known for that user
    in_later_hist = np.mean([t in hist_of.get(u, ()) for u, t in zip(ev.user, ev.target, strict=True)])
    user_in = np.mean([u in tu for u in ev.user])
    tgt_seen = np.mean([(u, t) in seen for u, t in zip(ev.user, ev.target, strict=True)])
    tgt_as_t = np.mean([(u, t) in seen_t for u, t in zip(ev.user, ev.target, strict=True)])
    ovl = np.mean([np.mean([(u, i) in seen for i in h]) for u, h in zip(ev.user, ev["hist"], strict=True)])
    tt = set(train.target)
    t_in = np.mean([t in tt for t in ev.target])
    print(
        f"{name}: n={len(ev)}; user has train windows {user_in:.3f}; target in one of the user's train windows "
        f"{tgt_seen:.3f} (in a history {in_later_hist:.3f}, as a target {tgt_as_t:.3f}); history items in the user's "
        f"train windows {ovl:.3f}; target among train targets {t_in:.3f}"
    )


stats("valid", valid)
stats("test", te)
print(
    "timestamps: train",
    train.ts.min(),
    train.ts.max(),
    "valid",
    valid.ts.min(),
    valid.ts.max(),
    "test",
    te.ts.min(),
    te.ts.max(),
)
anywhere = {i for its in train["items"] for i in its}
for name, ev in (("valid", valid), ("test", te)):
    print(
        f"{name}: target appears in any training window {np.mean([t in anywhere for t in ev.target]):.3f}; "
        f"distinct targets {ev.target.nunique()}"
    )
# a later-period validation: the last 10% of train.csv (15,400 windows) by time that are not in train_10000
full = load("train.csv").sort_values("ts", kind="stable").reset_index(drop=True)
print(
    "train.csv timestamps",
    full.ts.min(),
    full.ts.max(),
    "windows after train_10000's valid start:",
    int((full.ts >= valid.ts.min()).sum()),
)
