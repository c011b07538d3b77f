"""Leroux et al.'s GPT-2 small reproduction: digital baseline → convert → adapt → perplexity → lm-eval Table 1.

A flat recipe over the library (see recipes/README.md for the expected
figures).  Needs a network for the model and the lm-eval tasks, and a GPU
for the paper's sizes:

    python recipes/gpt2_leroux.py --out runs/gpt2
    python recipes/gpt2_leroux.py --out runs/gpt2 --budget 36000      # adaptation cut to 10 h of wall clock

The same script runs offline on a tiny random GPT-2 (the CI test):

    python recipes/gpt2_leroux.py --model tiny-gpt2 --preset tiny.yaml --text t.txt --context 64 \\
        --eval-tokens 256 --budget 4 --tasks local_mc --include-path tasks/ --limit 4 --out /tmp/r
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

PAPER_MODEL = "openai-community/gpt2"  # GPT-2 small: 12 layers × 12 heads, d_head 64, 1,024 positions
# Leroux et al. (PAPERS.md §1), OpenWebText validation loss → perplexity exp(loss)
PAPER_LOSS = {"digital GPT-2": 3.10, "linear hardware": 3.14, "nonlinear, initialised from linear": 3.14}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=PAPER_MODEL)
    parser.add_argument("--preset", default="leroux-gpt2")
    parser.add_argument("--out", type=Path, default=Path("runs/gpt2-leroux"))
    parser.add_argument("--text", default="hf:Salesforce/wikitext:wikitext-103-raw-v1:test",
                        help="evaluated text, 'hf:NAME[:CONFIG][:SPLIT]' or a file (the paper's losses are on OpenWebText "
                             "validation, a 0.05 %% split of a 40 GB download: WikiText-103 test is the light default)")
    parser.add_argument("--eval-tokens", type=int, default=65536)
    parser.add_argument("--context", type=int, default=1024, help="the paper's sequence = the 1,024-token window")
    parser.add_argument("--budget", type=float, default=None, help="wall-clock seconds for adaptation (default: the preset's steps)")
    parser.add_argument("--tasks", default="paper", help="lm-eval tasks ('paper' = Table 1); '' to skip")
    parser.add_argument("--include-path", type=Path, default=None)
    parser.add_argument("--limit", type=float, default=None)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    from cimattn.pipeline import RunSpec, run_pipeline

    spec = RunSpec(model=args.model, preset=args.preset, out=args.out, text=args.text, eval_tokens=args.eval_tokens,
                   context=args.context, budget_s=args.budget, seed=args.seed)
    results = run_pipeline(spec, log=print)
    summary = {"perplexity": results["metrics"]}
    if args.tasks:
        from cimattn.eval.harness import lm_eval_run

        limit = args.limit if args.limit is None or args.limit < 1 else int(args.limit)
        for label, preset, adapted in (("digital", None, None), ("hardware", None, args.out / "adapted")):
            run = lm_eval_run(model=args.model, preset=preset, adapted=adapted, tasks=args.tasks, out=args.out / f"lm-eval-{label}",
                              include_path=args.include_path, limit=limit, batch_size=args.batch_size, device=args.device, seed=args.seed)
            summary[f"lm_eval_{label}"] = run["metrics"]
    summary["paper"] = {"openwebtext_loss": PAPER_LOSS, "lm_eval_acc_mean_gpt2": 0.4302}
    print(json.dumps(summary, indent=2, default=str))
    return summary


if __name__ == "__main__":
    main()
