"""Train the DIA-source reliability model from simulated runs apfast makes itself.

Usage::

    python tools/train_reliability.py OUT.npz RUN [RUN ...] [--holdout 0.3] [--seed 0]

Each ``RUN`` is a folder holding ``sim/`` (``apfast simulate`` output with its truth) and
``repo/rerun/<name>/`` (``apfast process`` output), as ``tools/sim_run.sh`` leaves it, or
``SIM_DIR:RERUN_DIR`` explicitly. Every DIA source of every processed CCD-visit is labelled
against the truth: *real* when it lies within 2" of a simulated transient of that visit
(hosted, hostless, variable star, mover) or within 2.5" of a variable or proper-motion
star; *bogus* otherwise (cosmic-ray remnants, bright-star residuals, noise). Features come
from :func:`apfast.dia.reliability.features`, the same code that scores sources in a run.

CCD-visits are split at random into training and held-out parts (``--holdout``); the
model (scikit-learn ``HistGradientBoostingClassifier``, fixed seed) is fitted on the first,
its trees exported to flat arrays, and purity/completeness on the held-out part (all
sources, and sources that pass the default DIA filtering) written into the model's
metadata and printed. Needs scikit-learn (``pip install scikit-learn``); scoring does not.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np


def _runs(specs: list[str]) -> list[tuple[Path, Path]]:
    out = []
    for s in specs:
        if ":" in s:
            a, b = s.split(":", 1)
            out.append((Path(a), Path(b)))
            continue
        root = Path(s)
        reruns = sorted(p for p in (root / "repo" / "rerun").iterdir() if p.is_dir())
        if len(reruns) != 1:
            sys.exit(f"{root}: expected one rerun under repo/rerun, found {[p.name for p in reruns]}; give SIM:RERUN")
        out.append((root / "sim", reruns[0]))
    return out


def _sep_arcsec(ra1: np.ndarray, dec1: np.ndarray, ra2: float, dec2: float) -> np.ndarray:
    d = np.radians
    c = np.sin(d(dec1)) * np.sin(d(dec2)) + np.cos(d(dec1)) * np.cos(d(dec2)) * np.cos(d(ra1 - ra2))
    return np.degrees(np.arccos(np.clip(c, -1.0, 1.0))) * 3600.0


def label_sources(truth: object, ra: np.ndarray, dec: np.ndarray, visit: int, ccdnum: int) -> np.ndarray:
    """1 for a DIA source a simulated change explains, 0 for an artefact."""
    tr = truth.transients  # type: ignore[attr-defined]
    here = (np.asarray(tr["visit"]).astype(int) == visit) & (np.asarray(tr["ccdnum"]).astype(int) == ccdnum)
    tra, tdec = np.asarray(tr["ra"], float)[here], np.asarray(tr["dec"], float)[here]
    src = truth.sources  # type: ignore[attr-defined]
    pm = np.hypot(np.asarray(src["pmra"], float), np.asarray(src["pmdec"], float))
    change = np.asarray(src["variable"]).astype(bool) | (pm >= 20.0)
    sra, sdec = np.asarray(src["ra"], float)[change], np.asarray(src["dec"], float)[change]
    out = np.zeros(len(ra), np.int8)
    for k in range(len(ra)):
        near_t = tra.size > 0 and _sep_arcsec(tra, tdec, ra[k], dec[k]).min() < 2.0
        near_s = sra.size > 0 and _sep_arcsec(sra, sdec, ra[k], dec[k]).min() < 2.5
        out[k] = int(near_t or near_s)
    return out


def collect(runs: list[tuple[Path, Path]]) -> dict[str, np.ndarray]:
    """Features, labels, CCD-visit keys and whether default filtering keeps each source."""
    from apfast.dia.filtering import filter_dia_sources
    from apfast.dia.reliability import features
    from apfast.repo.butler import Butler
    from apfast.sim.simulate import load_truth

    X, y, key, kept = [], [], [], []
    for i, (sim, rerun) in enumerate(runs):
        truth = load_truth(sim)
        butler = Butler(rerun)
        files = sorted((rerun / "deepDiff").glob("v*/diaSrc-*.fits"))
        for f in files:
            visit, ccd = int(f.parent.name[1:]), int(f.stem.split("-")[1])
            did = {"visit": visit, "ccdnum": ccd}
            t = butler.get("deepDiff_diaSrc", did)
            cols = {c: np.asarray(t[c]) for c in t.colnames}
            if not len(t):
                continue
            diff = butler.get("deepDiff_differenceExp", did)
            calexp = butler.get("calexp", did)
            X.append(features(cols, diff))
            y.append(label_sources(truth, cols["ra"].astype(float), cols["dec"].astype(float), visit, ccd))
            key.append(np.full(len(t), i * 10**9 + visit * 100 + ccd, np.int64))
            kept.append(filter_dia_sources(cols, diff, calexp).keep)
        print(f"{sim}: {len(files)} CCD-visits", flush=True)
    return {"X": np.vstack(X), "y": np.concatenate(y), "key": np.concatenate(key), "kept": np.concatenate(kept)}


def export(clf: object, names: tuple[str, ...], meta: dict) -> dict[str, np.ndarray]:
    """Flatten a fitted binary HistGradientBoostingClassifier into the arrays ReliabilityModel reads."""
    parts, roots, off = [], [], 0
    for (pred,) in clf._predictors:  # type: ignore[attr-defined]
        nodes = pred.nodes
        if nodes["is_categorical"].any():
            raise SystemExit("categorical splits are not supported by the exporter")
        roots.append(off)
        parts.append((nodes, off))
        off += len(nodes)
    cat = np.concatenate([p for p, _ in parts])
    shift = np.concatenate([np.full(len(p), o) for p, o in parts])
    meta = {**meta, "baseline": float(np.ravel(clf._baseline_prediction)[0]), "features": list(names)}  # type: ignore[attr-defined]
    return {
        "roots": np.asarray(roots, np.int32),
        "feature": cat["feature_idx"].astype(np.int16),
        "threshold": cat["num_threshold"].astype(np.float64),
        "left": (cat["left"] + shift).astype(np.int32),
        "right": (cat["right"] + shift).astype(np.int32),
        "is_leaf": cat["is_leaf"].astype(bool),
        "missing_left": cat["missing_go_to_left"].astype(bool),
        "value": cat["value"].astype(np.float64),
        "meta": np.array(json.dumps(meta)),
    }


def curve(p: np.ndarray, y: np.ndarray) -> list[dict[str, float]]:
    """Purity and completeness of 'real' at a grid of thresholds."""
    rows = []
    for th in np.round(np.arange(0.05, 1.0, 0.05), 2):
        sel = p >= th
        tp = int((sel & (y == 1)).sum())
        rows.append({"threshold": float(th), "purity": tp / max(int(sel.sum()), 1),
                     "completeness": tp / max(int((y == 1).sum()), 1), "bogus_kept": int((sel & (y == 0)).sum())})
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", type=Path, help="model file to write (.npz)")
    ap.add_argument("runs", nargs="+", help="RUN folders (sim/ + repo/rerun/NAME) or SIM:RERUN pairs")
    ap.add_argument("--holdout", type=float, default=0.3, help="fraction of CCD-visits held out (default 0.3)")
    ap.add_argument("--seed", type=int, default=0, help="split and model seed (default 0)")
    ap.add_argument("--version", default=None, help="model version string (<= 7 characters)")
    args = ap.parse_args(argv)
    from sklearn.ensemble import HistGradientBoostingClassifier

    from apfast.dia.reliability import FEATURES, MODEL_VERSION

    version = args.version or MODEL_VERSION
    if len(version) > 7:
        sys.exit(f"--version {version!r} is longer than the APDB's reliabilityVersion column (7 characters)")
    t0 = time.perf_counter()
    data = collect(_runs(args.runs))
    rng = np.random.default_rng(args.seed)
    keys = np.unique(data["key"])
    held = set(rng.choice(keys, size=max(1, int(round(args.holdout * len(keys)))), replace=False).tolist())
    test = np.isin(data["key"], list(held))
    X, y = data["X"], data["y"]
    clf = HistGradientBoostingClassifier(max_iter=150, learning_rate=0.08, max_leaf_nodes=15, min_samples_leaf=10,
                                         l2_regularization=1.0, random_state=args.seed)
    clf.fit(X[~test], y[~test])
    p = clf.predict_proba(X[test])[:, 1]
    meta = {
        "version": version, "trained": time.strftime("%Y-%m-%d"), "runs": [str(r) for r in args.runs],
        "n_train": int((~test).sum()), "n_train_real": int(y[~test].sum()), "n_holdout": int(test.sum()),
        "n_holdout_real": int(y[test].sum()), "holdout_all": curve(p, y[test]),
        "holdout_filtered": curve(p[data["kept"][test]], y[test][data["kept"][test]]),
    }
    arrays = export(clf, FEATURES, meta)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(args.out, **arrays)
    from apfast.dia.reliability import ReliabilityModel

    check = ReliabilityModel(version, FEATURES, arrays["roots"].astype(np.int64), arrays["feature"].astype(np.int64),
                             arrays["threshold"], arrays["left"].astype(np.int64), arrays["right"].astype(np.int64),
                             arrays["is_leaf"], arrays["missing_left"], arrays["value"], meta=meta,
                             baseline=float(json.loads(str(arrays["meta"]))["baseline"])).predict(X[test])
    assert np.allclose(check, p, atol=1e-9), "exported trees disagree with scikit-learn"
    print(f"{len(y)} sources ({int(y.sum())} real) from {len(keys)} CCD-visits; held out {len(held)} "
          f"({int(test.sum())} sources); wrote {args.out} ({args.out.stat().st_size / 1e3:.0f} kB) in "
          f"{time.perf_counter() - t0:.0f} s")
    print("held-out, after default filtering: threshold purity completeness bogus_kept")
    for r in meta["holdout_filtered"]:
        print(f"  {r['threshold']:.2f} {r['purity']:.3f} {r['completeness']:.3f} {r['bogus_kept']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
