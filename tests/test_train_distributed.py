"""`torchrun --nproc_per_node 2 -m sqsd train` on CPU (gloo) trains the same adapter as one process with the same
global batch.

Why the two runs must agree, and what this test relies on:
- Data order: the Trainer's sampler is accelerate's SeedableRandomSampler seeded with `data_seed` (= --seed), so
  every rank and the single process draw the same permutation of the dataset each epoch. Under DDP, accelerate's
  BatchSamplerShard deals the per-device batches of that permutation out round-robin (rank 0 gets batches 0, 2,
  ..., rank 1 gets 1, 3, ...), so optimizer step k sees permutation[k*2B:(k+1)*2B] split over the two ranks:
  exactly the samples the single process with batch 2B sees at step k. This needs the dataset size to be a
  multiple of the global batch (8 records, global batch 4), or the last, short batch would be padded by
  wrapping around on the DDP side only.
- Loss normalisation: the Trainer gathers the number of response tokens across ranks (average_tokens_across
  _devices) and each rank divides its token-sum by that global count, so the DDP-averaged gradient is the
  gradient of the mean over all response tokens of the global batch, the same quantity the single process
  computes. Records of very different lengths make a per-rank mean (the classic mistake) fail this test.
- What remains are float32 summation-order differences (gradients reduced across ranks vs inside one batch,
  differently padded matmuls), amplified a little by Adam's normalisation; see the tolerance below.
"""

import json
import os
import shutil
import subprocess
import sys

import torch
from safetensors.torch import load_file

from tiny import tiny_model, tiny_tokenizer

ANSWERS = ["Yes.", "Paris is the capital of France, and has been for a long time.", "Four.",
           "Water boils at 100 degrees Celsius at sea level, less on a mountain.", "No.",
           "Blue, mostly, because of Rayleigh scattering of sunlight.", "Seven.", "Spiders have eight legs."]


def run(args, cwd, nproc=None, command=("train",)):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)] \
        if nproc else [sys.executable]
    cmd = [*launcher, "-m", "sqsd", *command, *args]
    result = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"{' '.join(cmd)}\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
    return result


def test_two_process_ddp_equals_one_process_with_the_same_global_batch(tmp_path):
    tok = tiny_tokenizer()
    model_dir = tmp_path / "model"
    tiny_model(tok).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)  # every process reads this tokenizer.json: same ids everywhere
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"instruction": f"Question {i}?", "output": a}) + "\n"
                            for i, a in enumerate(ANSWERS)))
    common = [str(data), "--model", str(model_dir), "--max-steps", "6", "--learning-rate", "1e-2",
              "--warmup-ratio", "0", "--max-length", "96", "--seed", "3"]

    run([*common, "--output-dir", str(tmp_path / "ddp"), "--batch-size", "2"], tmp_path, nproc=2)
    run([*common, "--output-dir", str(tmp_path / "single"), "--batch-size", "4"], tmp_path)

    ddp_run = json.loads((tmp_path / "ddp" / "run.json").read_text())["result"]
    single_run = json.loads((tmp_path / "single" / "run.json").read_text())["result"]
    assert (ddp_run["world_size"], ddp_run["global_batch"]) == (2, 4)
    assert (single_run["world_size"], single_run["global_batch"]) == (1, 4)
    assert ddp_run["steps"] == single_run["steps"] == 6
    # rank 0 alone wrote the log: one line per step
    ddp_log = [json.loads(line) for line in (tmp_path / "ddp" / "train_log.jsonl").read_text().splitlines()]
    single_log = [json.loads(line) for line in (tmp_path / "single" / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in ddp_log] == [1, 2, 3, 4, 5, 6]
    for a, b in zip(ddp_log, single_log):
        assert abs(a["loss"] - b["loss"]) < 1e-4 * b["loss"]

    ddp = load_file(str(tmp_path / "ddp" / "adapter_model.safetensors"))
    single = load_file(str(tmp_path / "single" / "adapter_model.safetensors"))
    assert ddp.keys() == single.keys() and len(ddp) == 28
    assert all(v.abs().max() > 0 for k, v in ddp.items() if "lora_B" in k)  # B started at 0: it was trained
    # Tolerance: measured max difference 1.4e-7 (float32 reduction order); one process with batch 2 instead of 4
    # (a different global batch) differs by 6.6e-2, and Adam moves an entry by up to lr = 1e-2 per step, so any
    # batch-composition or loss-normalisation mismatch lands orders of magnitude above 1e-5.
    for key in single:
        torch.testing.assert_close(ddp[key], single[key], rtol=0, atol=1e-5)


def test_two_process_directions_build_writes_one_file_equal_to_a_single_process_build(tmp_path):
    """Under torchrun every rank trains, rank 0 alone writes the direction file. Built again by one process
    from the same training folder, the file is bit-identical (tensors and metadata)."""
    from safetensors import safe_open

    tok = tiny_tokenizer()
    model_dir = tmp_path / "model"
    tiny_model(tok).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"instruction": f"Question {i}?", "output": a}) + "\n"
                            for i, a in enumerate(ANSWERS)))
    args = [str(data), "--model", str(model_dir), "--kind", "danger", "--output-dir", "out", "--max-steps", "2",
            "--batch-size", "2", "--lora-r", "4", "--max-length", "64", "--seed", "3"]
    (tmp_path / "ddp").mkdir()
    result = run(args, tmp_path / "ddp", nproc=2, command=("directions", "build"))
    # written once, by rank 0 (were rank 1 to write too, it would print this line again or find the file there)
    assert result.stdout.count("danger direction:") == 1 and "already done" not in result.stdout
    ddp = tmp_path / "ddp" / "out"
    assert sorted(p.name for p in ddp.glob("danger*")) == ["danger.json", "danger.safetensors"]
    assert json.loads((ddp / "run.json").read_text())["result"]["world_size"] == 2

    single = tmp_path / "single" / "out"  # the same relative --output-dir: the same recorded config
    shutil.copytree(ddp, single, ignore=shutil.ignore_patterns("danger.*"))
    result = run(args, tmp_path / "single", command=("directions", "build"))
    assert "already done: out holds a finished run" in result.stdout  # only the file was written here
    assert (ddp / "danger.json").read_text() == (single / "danger.json").read_text()
    with safe_open(str(ddp / "danger.safetensors"), "pt") as a, \
            safe_open(str(single / "danger.safetensors"), "pt") as b:
        keys = sorted(a.keys())
        assert a.metadata() == b.metadata() and keys == sorted(b.keys()) and len(keys) == 28
        for key in keys:
            assert torch.equal(a.get_tensor(key), b.get_tensor(key))
    assert (ddp / "danger.safetensors").read_bytes() == (single / "danger.safetensors").read_bytes()
