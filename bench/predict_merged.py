#!/usr/bin/env python
"""Merged mode on the paper model: the predicted decode-step fraction kept with one adapter merged into
the base weights, against the same traffic unmerged (kernels v2, grids by adapter bucket, PDL).

The model is bench/predict.py's, calibrated at run time on ../shared/perf/anchor_rows.json and
anchor_step_peers.json (Llama-3-8B linear modules, bf16, H200 anchors, this tree's kernels compiled for
sm_90). What merged mode changes in it:
  - the merged adapter M's tokens take no slot: a step of only M runs vLLM's no-LoRA graph, the base
    step itself (no LoRA node at all);
  - another adapter X's tokens run X's slot with M's correction appended: rank r_X + r_M (32 for two
    rank-16 adapters) over the same launches;
  - base-model tokens run the correction alone (rank r_M);
  - a step's grids follow the adapters that hold a slot (M does not).
At one token per step a 90/10 mix is a mix of steps: 90 % of the steps carry M's token, 10 % another's;
the figure is base time over the mean step time.

    python bench/predict_merged.py [--after TABLE] [--out DIR]     (also: python bench/predict.py --merged)
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import paper_loraplex as lp  # noqa: E402
import paper_model as pm  # noqa: E402
import predict  # noqa: E402

TOKENS = (1, 32, 128, 256)
R = 16  # every adapter's rank (the merged one's too)


def kept_counts(T, counts, facts, P, base, rank):
    """Fraction kept for a step of T tokens where counts are the tokens of each adapter that holds a slot
    (the other tokens are the merged adapter's: no LoRA path)."""
    if not counts:
        return pm.kept_fraction(base[T], {}, P)
    modules = {n: lp.layer(n, T, rank, counts, predict.bucket(len(counts)), facts, True, True) for n in pm.LAYERS}
    return pm.kept_fraction(base[T], modules, P)


def mix(T, share, minority, merged, facts, P, base, minority_rank=None):
    """Fraction kept with `share` of the tokens on adapter M and the rest spread over `minority` others
    (minority_rank: their slot's rank when M is merged; default R + R, the correction)."""
    rank_other = minority_rank or (R + R if merged else R)
    if T == 1:  # one token per step: a mix of steps
        t_m = base[1] / kept_counts(1, [] if merged else [1], facts, P, base, R)
        t_x = base[1] / kept_counts(1, [1], facts, P, base, rank_other)
        return base[1] / (share * t_m + (1 - share) * t_x)
    m = round((1 - share) * T) if share < 1 else 0
    m = max(1, m) if share < 1 else 0
    others = pm.even_counts(m, min(minority, m)) if m else []
    if merged:  # M's tokens hold no slot; the others' slots carry the correction
        return kept_counts(T, others, facts, P, base, rank_other)
    return kept_counts(T, [T - m, *others], facts, P, base, R)  # unmerged: every token at rank R


def scenarios(P, base, facts) -> list[tuple[str, list[float]]]:
    rows = [("1 adapter, unmerged", [mix(T, 1.0, 1, False, facts, P, base) for T in TOKENS]),
            ("1 adapter, merged", [mix(T, 1.0, 1, True, facts, P, base) for T in TOKENS])]
    for n in (1, 7):
        for merged in (False, True):
            rows.append((f"90 % one adapter + 10 % over {n} other{'s' if n > 1 else ''}, "
                         f"{'merged (others at r32)' if merged else 'unmerged'}",
                         [mix(T, 0.9, n, merged, facts, P, base) for T in TOKENS]))
    rows.append(("90 % merged adapter + 10 % base model (correction at r16)",
                 [mix(T, 0.9, 1, True, facts, P, base, minority_rank=R) for T in TOKENS]))
    return rows


def main(argv=None, calibrated=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shared", default=str(HERE.parent / ".." / "shared" / "perf"))
    ap.add_argument("--after", help="aot_compile --table of these kernels (default: compile now)")
    ap.add_argument("--out", default=str(HERE / "results"))
    a = ap.parse_args(argv)
    P, base, facts, cal = calibrated or predict.calibrated(a.shared, a.after)
    print(f"calibration: {cal['rows']} vLLM rows, |err| median {cal['median']:.0%}; step |err| median "
          f"{cal['step_median']:.1%}")
    rows = scenarios(P, base, facts)
    print("\n| decode step kept (Llama-3-8B linear, r16) | " + " | ".join(f"T={T}" for T in TOKENS) + " |")
    print("|---|" + "---|" * len(TOKENS))
    for label, ks in rows:
        print(f"| {label} | " + " | ".join(f"{k:.3f}" for k in ks) + " |")
    out = dict(params=P, calibration=cal, tokens=list(TOKENS), rank=R,
               rows=[dict(label=label, kept=ks) for label, ks in rows])
    path = Path(a.out) / "predict_merged.json"
    path.write_text(json.dumps(out, indent=1, default=float))
    print("wrote", path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
