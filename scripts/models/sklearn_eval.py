#!/usr/bin/env python3
"""scikit-learn's IsolationForest and PCA on the feature files of `twinmesh eval --out DIR`.

Same rows, same rules as twinmesh's own table (EVALUATION.md): the threshold is a
quantile of the training scores (0.9999 for PCA, 0.99 for the isolation forest, as
twinmesh's defaults), extrapolated from the tail of the training scores where fewer than
ten rows lie above it, as twinmesh's `threshold_at` does; an alarm is raised when two of the last three windows score above
it (the latest included) and holds until three in a row are below; false alarms are
alarms raised over healthy windows, per 10,000 (and the healthy windows in alarm); the delay is counted in windows after
the onset.

    pip install -r scripts/models/requirements.txt
    twinmesh eval --out /tmp/twinmesh-eval > /tmp/ours.md
    python3 scripts/models/sklearn_eval.py /tmp/twinmesh-eval
"""

import csv
import pathlib
import sys

import numpy as np
from sklearn.decomposition import PCA
from sklearn.ensemble import IsolationForest
from sklearn.preprocessing import StandardScaler

ALARM_AFTER = 2
ALARM_WINDOW = 3
HORIZON = 100


def load(path):
    with open(path) as f:
        rows = list(csv.reader(f))
    data = np.array([[float(v) for v in r[1:]] for r in rows[1:]])
    after = np.array([r[0] == "1" for r in rows[1:]])
    return data, after


class Pca:
    """Standardised features, components keeping 95 % of the variance, score = squared
    reconstruction error (scikit-learn's PCA has no score of its own)."""

    quantile = 0.9999

    def fit(self, x):
        self.scaler = StandardScaler().fit(x)
        self.pca = PCA(n_components=0.95, svd_solver="full").fit(self.scaler.transform(x))
        return self

    def score(self, x):
        z = self.scaler.transform(x)
        back = self.pca.inverse_transform(self.pca.transform(z))
        return ((z - back) ** 2).sum(axis=1)


class Forest:
    """IsolationForest(100 trees, 256 samples); score = -score_samples (higher is more
    anomalous)."""

    quantile = 0.99

    def fit(self, x):
        self.f = IsolationForest(n_estimators=100, max_samples=256, random_state=1).fit(x)
        return self

    def score(self, x):
        return -self.f.score_samples(x)


TAIL_MIN_ROWS = 10
TAIL_SHARE = 0.02


def threshold_at(scores, q):
    """The q quantile of the training scores; beyond the last TAIL_MIN_ROWS rows, the
    excesses over the 1 - TAIL_SHARE quantile fitted with a generalised Pareto
    distribution by probability-weighted moments (twins/src/model.rs, threshold_at)."""
    s = np.sort(scores)
    n = len(s)
    empirical = np.quantile(s, q)
    if (1 - q) * n >= TAIL_MIN_ROWS:
        return empirical
    u = np.quantile(s, 1 - TAIL_SHARE)
    y = s[s > u] - u
    m = len(y)
    if m < TAIL_MIN_ROWS:
        return empirical
    a0 = y.mean()
    a1 = np.sum((m - 1 - np.arange(m)) / (m - 1) * y) / m
    d = a0 - 2 * a1
    if not (d > 0 and a0 > 0):
        return empirical
    xi = 2 - a0 / d
    sigma = 2 * a0 * a1 / d
    if not sigma > 0:
        return empirical
    p = (1 - q) * n / m
    excess = -sigma * np.log(p) if abs(xi) < 1e-9 else sigma / xi * (p ** -xi - 1)
    t = u + excess
    return max(t, empirical) if np.isfinite(t) else empirical


def statuses(scores, threshold):
    """Alarm status per window, as twinmesh's monitor computes it."""
    out, recent, alarm = [], [], False
    for s in scores:
        high = s > threshold
        recent = (recent + [high])[-ALARM_WINDOW:]
        count = sum(recent)
        alarm = (high and count >= ALARM_AFTER) or (alarm and count > 0)
        out.append(alarm)
    return np.array(out)


def raised(alarm):
    """Transitions into alarm."""
    return int(np.sum(alarm[1:] & ~alarm[:-1]) + (1 if len(alarm) and alarm[0] else 0))


def main(root):
    root = pathlib.Path(root)
    algorithms = [("pca (scikit-learn)", Pca), ("isolation_forest (scikit-learn)", Forest)]
    print("| kind | row | " + " | ".join(a for a, _ in algorithms) + " |")
    print("|---|---|" + "---|" * len(algorithms))
    for kind_dir in sorted(p for p in root.iterdir() if p.is_dir()):
        train, _ = load(kind_dir / "train.csv")
        healthy, _ = load(kind_dir / "healthy.csv")
        models = []
        for _, cls in algorithms:
            m = cls().fit(train)
            threshold = threshold_at(m.score(train), cls.quantile)
            models.append((m, threshold))
        cells, held = [], []
        for m, t in models:
            alarm = statuses(m.score(healthy), t)
            cells.append(f"{raised(alarm) * 10_000 / len(healthy):.1f}")
            held.append(f"{alarm.sum() * 10_000 / len(healthy):.1f}")
        print(f"| {kind_dir.name} | false alarms raised / 10,000 healthy windows | " + " | ".join(cells) + " |")
        print(f"| {kind_dir.name} | healthy windows in alarm / 10,000 | " + " | ".join(held) + " |")
        for fault in sorted(kind_dir.glob("fault_*.csv")):
            x, after = load(fault)
            cells = []
            for m, t in models:
                alarm = statuses(m.score(x), t)
                hits = np.nonzero(alarm & after)[0]
                if len(hits) == 0:
                    cells.append(f"missed (> {HORIZON})")
                else:
                    cells.append(str(int(after[: hits[0] + 1].sum())))
            mode = fault.stem.removeprefix("fault_")
            print(f"| {kind_dir.name} | delay, `{mode}` (windows) | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "twinmesh-eval")
