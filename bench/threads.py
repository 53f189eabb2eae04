"""CPU thread settings under load: step times of train, generate and score on SmolLM2, quiet and next to one other
CPU-bound process, for each way of choosing PyTorch's threads.

    python bench/threads.py [--reps 3] [--options default passive free free-passive one]

PyTorch's OpenMP threads spin-wait for work; on a small machine shared with another CPU-bound process they fight
it for the cores and every step slows down several-fold. The options:
- default:      what PyTorch does by itself (one thread per core, OpenMP's active wait policy);
- passive:      the same threads with OMP_WAIT_POLICY=PASSIVE (idle threads sleep instead of spinning);
- free:         one thread per core that is idle when the command starts (`sqsd.threads.free_cores`);
- free-passive: both;
- one:          a single thread;
- sqsd:         whatever `sqsd.threads.configure` (the tool's default) chooses.
"Load" is a busy Python loop, one core's worth of work, started before each measurement and killed after.
Each (option, load) runs in its own process, since OpenMP reads its settings once. Each workload is timed
`--reps` times after one warm-up; the medians are printed. Needs `sqsd assets fetch` (smollm2).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

OPTIONS = ("default", "passive", "free", "free-passive", "one", "sqsd")


def worker(option: str, reps: int) -> dict[str, float]:
    """Runs inside the child: apply `option`, then time one train step, one generation batch, one scoring batch."""
    if option in ("free", "free-passive"):
        from sqsd.threads import free_cores

        n_threads = free_cores()
    elif option == "sqsd":
        from sqsd.threads import configure

        configure()
    import torch

    if option in ("free", "free-passive"):
        torch.set_num_threads(n_threads)
    from peft import LoraConfig, get_peft_model
    from transformers.utils import logging as hf_logging

    from sqsd.data import load_records
    from sqsd.directions import Direction, LowRank
    from sqsd.generate import generate_records
    from sqsd.model import load_model
    from sqsd.projection import lowrank_from_model, project
    from sqsd.render import Collator, encode_records

    hf_logging.set_verbosity_error()
    torch.manual_seed(0)
    model, tokenizer = load_model("smollm2")
    records = load_records("dolly-sqsd").records[:64]
    samples = [e for _, e in encode_records(records, tokenizer, max_length=128)[0]][:8]
    batch = Collator(tokenizer.pad_token_id)([{"input_ids": s.input_ids, "labels": s.labels} for s in samples])

    def timed(step) -> float:
        step()
        times = []
        for _ in range(reps):
            start = time.perf_counter()
            step()
            times.append(time.perf_counter() - start)
        return statistics.median(times)

    out = {"threads": torch.get_num_threads()}
    out["generate"] = timed(lambda: generate_records(model, tokenizer, records[:8], max_new_tokens=16,
                                                     batch_size=8, progress=False))
    lora = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear",
                                            init_lora_weights=False))
    optim = torch.optim.AdamW([p for p in lora.parameters() if p.requires_grad], lr=1e-5)

    def train_step() -> None:
        lora.train()
        lora(**batch).loss.backward()
        optim.step()
        optim.zero_grad()

    out["train"] = timed(train_step)
    g = torch.Generator().manual_seed(1)
    direction = Direction({name: LowRank(torch.randn(8, t.shape[1], generator=g) * 0.01,
                                         torch.randn(t.shape[0], 8, generator=g) * 0.01)
                           for name, t in lowrank_from_model(lora).modules.items()})
    out["score"] = timed(lambda: project(lora, samples, [direction], pad_token_id=tokenizer.pad_token_id,
                                         adapter="default", batch_size=8, progress=False))
    return out


def run(option: str, loaded: bool, reps: int) -> dict[str, float]:
    env = dict(os.environ)
    for key in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY"):
        env.pop(key, None)
    if option in ("passive", "free-passive"):
        env["OMP_WAIT_POLICY"] = "PASSIVE"
    if option == "one":
        env["OMP_NUM_THREADS"] = "1"
    load = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if loaded else None
    try:
        if load:
            time.sleep(1.0)  # let the load show up in the idle-core count, as it would for a real command
        proc = subprocess.run([sys.executable, __file__, "--worker", option, "--reps", str(reps)], env=env,
                              capture_output=True, text=True, check=True)
    finally:
        if load:
            load.kill()
            load.wait()
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--options", nargs="*", default=list(OPTIONS), choices=OPTIONS)
    parser.add_argument("--worker", choices=OPTIONS, help=argparse.SUPPRESS)
    opts = parser.parse_args()
    if opts.worker:
        print(json.dumps(worker(opts.worker, opts.reps)))
        return
    print(f"{os.cpu_count()} cores; load average before: {os.getloadavg()[0]:.2f}; median of {opts.reps} "
          f"after one warm-up; train = LoRA step batch 8 x <=128 tokens, generate = 8 prompts x 16 new tokens, "
          f"score = one batch of 8, one direction")
    print(f"{'option':<13} {'load':<7} {'threads':>7} {'train s':>8} {'generate s':>10} {'score s':>8}")
    results = {}
    for option in opts.options:
        for loaded in (False, True):
            r = run(option, loaded, opts.reps)
            results[(option, loaded)] = r
            print(f"{option:<13} {'loaded' if loaded else 'quiet':<7} {r['threads']:>7} {r['train']:>8.2f} "
                  f"{r['generate']:>10.2f} {r['score']:>8.2f}", flush=True)
    base = results.get(("default", False))
    if base:
        print("ratios to default/quiet (train, generate, score):")
        for (option, loaded), r in results.items():
            ratios = ", ".join(f"{r[k] / base[k]:.2f}" for k in ("train", "generate", "score"))
            print(f"  {option:<13} {'loaded' if loaded else 'quiet':<7} {ratios}")


if __name__ == "__main__":
    main()
