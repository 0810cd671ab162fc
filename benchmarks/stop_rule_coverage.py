"""Does the interleaved bench's stopping rule keep its 95 % intervals honest? (issue 23 follow-up)

A simulation of ``quantship bench``'s rule with the package's own pieces: per-round ratios of an identical copy
(true ratio 1.0) drawn log-normal at several round-to-round noise levels, ``StopRule.decide`` after every round
(``--ratio-precision``, ``--min-rounds``, and a time limit expressed as a round count), the interval of
``stability.median_interval``. Per noise level and rule: how often the final interval contains 1.0 (overall), how
many runs stop early on precision, how often *those* contain 1.0, and the mean round count.

Rules compared (only ``every`` is the bench's; the others were candidate fixes for the early stops' coverage):
* ``every``: the bench's rule, precision checked after every round;
* ``spaced``: precision checked only at round counts growing by half (10, 15, 22, ...): fewer looks;
* ``confirm``: once the precision is met at round n, run to round 1.5 n and report the interval of all rounds;
* ``strict``: stop on the 99 % interval's half-width, report the 95 % one.

    python benchmarks/stop_rule_coverage.py            # 3000 runs per row (about a minute)
    python benchmarks/stop_rule_coverage.py --smoke    # 100 runs per row: seconds
"""

from __future__ import annotations

import argparse
import math

import numpy as np

from quantship.evaluate.stability import StopReason, StopRule, median_interval


def half_width(x: np.ndarray, confidence: float) -> float:
    """As ``RatioEstimate.half_width``: half the interval's width relative to the median."""
    lo, hi, _ = median_interval(x, confidence)
    return (hi - lo) / 2 / float(np.median(x))


def run(x: np.ndarray, rule: str, stop: StopRule, checks: set[int]) -> tuple[bool, bool, int]:
    """(the final 95 % interval contains 1.0, stopped early on precision, rounds) for one run of ratios ``x``
    (``len(x)``: the rounds the time limit allows)."""
    most = len(x)
    n = 2
    early = False
    while n < most:
        if rule != "spaced" or n in checks:
            widths = [half_width(x[:n], 0.99 if rule == "strict" else 0.95)]
            if stop.decide(n, 0.0, widths) is StopReason.PRECISION:
                early = True
                if rule == "confirm":
                    n = min(most, math.ceil(1.5 * n))
                break
        n += 1
    lo, hi, _ = median_interval(x[:n])
    return bool(lo <= 1.0 <= hi), early, n


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, default=3000, help="simulated runs per row (3000)")
    p.add_argument("--noise", default="0.03,0.05,0.08,0.12", help="round-to-round noise (log-normal sigma)")
    p.add_argument("--precision", type=float, default=0.03, help="--ratio-precision (0.03)")
    p.add_argument("--min-rounds", type=int, default=10, help="--min-rounds (10)")
    p.add_argument("--max-rounds", type=int, default=25, help="rounds the time limit allows (25)")
    p.add_argument("--rules", default="every,spaced,confirm,strict")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--smoke", action="store_true", help="100 runs per row, two noise levels: seconds")
    args = p.parse_args()
    if args.smoke:
        args.runs, args.noise = 100, "0.03,0.08"
    stop = StopRule(ratio_precision=args.precision, min_rounds=args.min_rounds, max_seconds=1.0)
    checks, c = set(), float(args.min_rounds)
    while c <= args.max_rounds:
        checks.add(int(c))
        c *= 1.5
    rng = np.random.default_rng(args.seed)
    print(
        f"{args.runs} runs per row; true ratio 1.0; precision +-{args.precision:.0%}, {args.min_rounds} to "
        f"{args.max_rounds} rounds; spaced checks at {sorted(checks)}"
    )
    print(f"{'noise':>6s} {'rule':8s} {'coverage':>9s} {'early':>7s} {'early covering':>15s} {'rounds':>7s}")
    for sigma in (float(v) for v in args.noise.split(",")):
        x = np.exp(rng.normal(0.0, sigma, (args.runs, args.max_rounds)))
        for rule in args.rules.split(","):
            rows = [run(r, rule, stop, checks) for r in x]
            cover = np.mean([a for a, _, _ in rows])
            early = [a for a, e, _ in rows if e]
            early_cover = f"{np.mean(early):.3f}" if early else "-"
            rounds = np.mean([n for _, _, n in rows])
            print(
                f"{sigma:6.2f} {rule:8s} {cover:9.3f} {len(early) / args.runs:7.1%} {early_cover:>15s} {rounds:7.1f}",
                flush=True,
            )


if __name__ == "__main__":
    main()
