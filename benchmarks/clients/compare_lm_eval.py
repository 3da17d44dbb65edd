"""Per-sample agreement of lm-eval runs written with --log_samples --output_path DIR: the first
DIR is the reference (e.g. `--model hf`), every other one is compared with it.

    python benchmarks/clients/compare_lm_eval.py OUT/hf OUT/local-completions-tokenizedFalse ...

For loglikelihood tasks: the largest |Δ loglikelihood| over every (doc, choice) and how many docs
pick the same answer; for generation tasks: how many docs generate the same text. Also prints
each run's task metrics. Standard library only (runs in lm-eval's virtualenv or anywhere).
"""

from __future__ import annotations

import glob
import json
import os
import sys
from typing import Any


def load_samples(directory: str) -> dict[str, dict[int, dict[str, Any]]]:
    """task -> doc_id -> sample, from the newest samples_<task>_*.jsonl of each task."""
    newest: dict[str, str] = {}
    for path in sorted(glob.glob(os.path.join(directory, "**", "samples_*.jsonl"), recursive=True)):
        task = os.path.basename(path)[len("samples_") :].rsplit("_", 1)[0]
        newest[task] = path  # sorted: a later timestamp wins
    samples: dict[str, dict[int, dict[str, Any]]] = {}
    for task, path in newest.items():
        with open(path) as f:
            samples[task] = {s["doc_id"]: s for s in map(json.loads, f)}
    return samples


def load_metrics(directory: str) -> dict[str, dict[str, Any]]:
    paths = sorted(glob.glob(os.path.join(directory, "**", "results_*.json"), recursive=True))
    if not paths:
        return {}
    with open(paths[-1]) as f:
        return dict(json.load(f)["results"])


def compare(reference: dict[int, dict[str, Any]], other: dict[int, dict[str, Any]]) -> str:
    docs = sorted(set(reference) & set(other))
    first = reference[docs[0]]
    if isinstance(first["resps"][0][0], list):  # loglikelihood: resps[choice][0] = [ll, is_greedy]
        worst = 0.0
        same_choice = 0
        for d in docs:
            a = [float(r[0][0]) for r in reference[d]["resps"]]
            b = [float(r[0][0]) for r in other[d]["resps"]]
            worst = max(worst, *(abs(x - y) for x, y in zip(a, b)))
            same_choice += a.index(max(a)) == b.index(max(b))
        return f"max |Δ loglikelihood| {worst:.2e}, same argmax choice {same_choice}/{len(docs)}"
    same = sum(reference[d]["resps"][0][0] == other[d]["resps"][0][0] for d in docs)
    diffs = [d for d in docs if reference[d]["resps"][0][0] != other[d]["resps"][0][0]][:3]
    detail = "".join(
        f"\n      doc {d}: {reference[d]['resps'][0][0]!r} vs {other[d]['resps'][0][0]!r}" for d in diffs
    )
    return f"identical generations {same}/{len(docs)}{detail}"


def main(directories: list[str]) -> int:
    for directory in directories:
        metrics = load_metrics(directory)
        summary = {
            task: {k: v for k, v in m.items() if k != "alias" and "stderr" not in k}
            for task, m in metrics.items()
        }
        print(f"{directory}: {json.dumps(summary)}")
    reference = load_samples(directories[0])
    for directory in directories[1:]:
        other = load_samples(directory)
        for task in sorted(set(reference) & set(other)):
            print(f"  {os.path.basename(directory)} vs {os.path.basename(directories[0])}, {task}: "
                  f"{compare(reference[task], other[task])}")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
