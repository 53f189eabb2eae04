"""Scoring speed on SmolLM2: fast path vs reference path vs the floor, on the same samples, in one run.

    python bench/score_speed.py [--n 48] [--batch-size 8] [--max-length 512] [--repeats 3]

The samples are a seeded random draw from the whole `dolly-sqsd` pool (all three windows), so their lengths are
those a real scoring run sees.
- fast: `projection.project` (batched, hooks, factor space), two low-rank directions;
- reference: `reference.reference_scores` (batch 1, plain autograd, dense δW) on the same samples;
- floor: a plain batched forward + backward over the same batches with the same trainable parameters (the LoRA
  factors) and no scoring — the unavoidable cost.

Each phase runs in its own subprocess so its peak resident memory is its own. Rates are medians over
`--repeats` passes (after one warm-up batch). Needs `sqsd assets fetch`.
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import statistics
import subprocess
import sys
import time


def setup(n: int, max_length: int):
    import torch
    from peft import LoraConfig, get_peft_model

    from sqsd.data import load_records
    from sqsd.directions import Direction, LowRank
    from sqsd.model import load_model
    from sqsd.projection import lowrank_from_model
    from sqsd.render import encode_records

    torch.manual_seed(0)
    model, tokenizer = load_model("smollm2")
    anchor = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear",
                                              init_lora_weights=False)).eval()
    pool = load_records("dolly-sqsd").records
    records = [pool[i] for i in random.Random(0).sample(range(len(pool)), n)]
    samples = [e for _, e in encode_records(records, tokenizer, max_length=max_length)[0]]
    g = torch.Generator().manual_seed(1)
    directions = []
    for _ in range(2):
        terms = {}
        for name, t in lowrank_from_model(anchor).modules.items():
            out, inp = t.shape
            terms[name] = LowRank(torch.randn(8, inp, generator=g) * 0.01, torch.randn(out, 8, generator=g) * 0.01)
        directions.append(Direction(terms))
    return anchor, tokenizer, samples, directions


def phase(name: str, args: argparse.Namespace) -> dict:
    import torch

    from sqsd.projection import project
    from sqsd.reference import reference_scores
    from sqsd.render import Collator

    anchor, tokenizer, samples, directions = setup(args.n, args.max_length)
    pad = tokenizer.pad_token_id
    tokens = sum(len(s.input_ids) for s in samples)
    times = []
    if name == "fast":
        project(anchor, samples[: args.batch_size], directions, pad_token_id=pad, adapter="default",
                batch_size=args.batch_size, progress=False)
        for _ in range(args.repeats):
            t = time.perf_counter()
            project(anchor, samples, directions, pad_token_id=pad, adapter="default", batch_size=args.batch_size,
                    progress=False)
            times.append(time.perf_counter() - t)
        n = len(samples)
    elif name == "reference":
        reference_scores(anchor, samples[:1], directions, adapter="default")
        for _ in range(args.repeats):
            t = time.perf_counter()
            reference_scores(anchor, samples, directions, adapter="default")
            times.append(time.perf_counter() - t)
        n = len(samples)
    else:  # floor: same batches (length-sorted), LoRA factors trainable, HF forward + loss + backward
        for p_name, p in anchor.named_parameters():
            p.requires_grad_("lora_" in p_name)
        order = sorted(range(len(samples)), key=lambda i: len(samples[i].input_ids))
        collate = Collator(pad)
        batches = [collate([{"input_ids": samples[i].input_ids, "labels": samples[i].labels}
                            for i in order[s:s + args.batch_size]]) for s in range(0, len(order), args.batch_size)]
        anchor(**batches[0]).loss.backward()
        for _ in range(args.repeats):
            t = time.perf_counter()
            for batch in batches:
                anchor.zero_grad(set_to_none=True)
                anchor(**batch).loss.backward()
            times.append(time.perf_counter() - t)
        n = len(samples)
    median = statistics.median(times)
    return {"phase": name, "samples": n, "tokens_all": tokens, "median_s": median, "samples_per_s": n / median,
            "times_s": times, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "threads": torch.get_num_threads()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=48)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--phase", choices=["fast", "reference", "floor"])
    args = parser.parse_args()
    if args.phase:
        print(json.dumps(phase(args.phase, args)))
        return
    results = {}
    for name in ("floor", "fast", "reference"):
        cmd = [sys.executable, __file__, "--phase", name, "--n", str(args.n),
               "--batch-size", str(args.batch_size), "--max-length", str(args.max_length),
               "--repeats", str(args.repeats)]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
        results[name] = json.loads(out)
        r = results[name]
        print(f"{name:9s} {r['samples_per_s']:7.2f} samples/s  (median {r['median_s']:.2f}s over {r['samples']} "
              f"samples, runs {', '.join(f'{t:.2f}' for t in r['times_s'])})  peak RSS {r['peak_rss_mb']:.0f} MB",
              flush=True)
    fast, ref, floor = (results[k]["samples_per_s"] for k in ("fast", "reference", "floor"))
    print(f"fast / floor     = {fast / floor:.2f}x   (target >= 0.8)")
    print(f"fast / reference = {fast / ref:.2f}x   (target >= 1.3)")


if __name__ == "__main__":
    main()
