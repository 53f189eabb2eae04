"""`sqsd score`: per-sample SQSD risk scores for a dataset, resumable and shardable across processes.

For every record: the projection of the update it induces onto the danger direction (taken at the danger
anchor) and onto the safety direction (taken at the safety anchor), and risk = danger − safety (docs/design.md §2).
A term without an anchor is scored in dense mode, at the model itself; a missing term leaves its column empty
and counts as 0 in the risk.

`--method` picks SQSD and/or the baselines of `sqsd.baselines` (random, length, loss, grad-norm, self-inf-n,
gradsim, safety-influence) and `sqsd.representations` (repsim, larf, datashield): `score` holds the first method's
score (SQSD's = risk), and with several methods each gets a column named after it; the gradient baselines share
one dense pass at θ₀ per batch, the hidden-state ones one forward.

`score_records` is the core for callers that already hold a model (tests, experiments); `score` is the command:
it validates the direction files and anchors (`terms.check_files`, before any model is loaded), loads data,
model and anchors, scores in chunks and merges them into one file. The maths is `projection.project`.

Output folder:
    scores.parquet (or scores.jsonl)   one row per record, in dataset order: see COLUMNS
    chunks/NNNNN.jsonl                 the rows of chunk N (records N*chunk_size ...), each written atomically
    run.json                           config + fingerprints of model, data, direction files and anchors, the
                                       manifest, and `result` once the merged file is written (`runs.open_run`)

Resume: a rerun of the same command skips the chunks already written; once all exist they are merged. A rerun
of a finished run prints "already done"; a second command into a folder being scored refuses (a lock). Chunks, and so batch composition, depend only on the dataset and
`chunk_size`, never on which process scores them: under `torchrun --nproc_per_node W` rank r scores every W-th
missing chunk, rank 0 merges, and the file is identical to a single process's.
    torchrun --nproc_per_node 2 -m sqsd score DATA --danger D.safetensors --safety S.safetensors ...

Skipped records (no response token to score) are rows with status "skipped: <reason>" and null scores, never
NaN. risk_z z-scores each term over the ok rows of the whole pool (population standard deviation; a term
with no spread scores 0) and takes the difference.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from accelerate import PartialState
from tqdm.auto import tqdm

from sqsd.baselines import ANCHORS, GRADIENT_METHODS, anchor_features, block_linears, method_scores, theta0
from sqsd.config import ScoreConfig
from sqsd.data import Record
from sqsd.directions import Direction
from sqsd.errors import DataError, SqsdError
from sqsd.formats import RawRecord
from sqsd.projection import check_logits, project, response_losses
from sqsd.readers import read_rows
from sqsd.render import Encoded, Skip, encode_record
from sqsd.representations import HIDDEN_METHODS, hidden_scores, sample_layers, states
from sqsd.runs import open_run
from sqsd.terms import TERMS, Term, check_files, load_terms

COLUMNS = ("index", "id", "danger", "safety", "risk", "risk_z", "n_response_tokens", "loss", "status", "score")
CHUNKS_DIR = "chunks"
# The config fields that name the inputs `_inputs` fingerprints (compared by content, not by path).
INPUT_FIELDS = ("data", "model", "danger", "safety", "danger_anchor", "safety_anchor", "harmful_anchors",
                "safe_anchors")
OK = "ok"


# --- the core: records -> rows ---------------------------------------------------------------------------------

def _passes(terms: dict[str, Term]) -> list[tuple[tuple, list[str]]]:
    """[(key, term names)]: terms at the same anchor and scaling (or both dense) share a pass."""
    groups: dict[tuple, list[str]] = {}
    for name, term in terms.items():
        groups.setdefault(term.key, []).append(name)
    return list(groups.items())


def _batches(samples: Sequence[tuple[int, Encoded]], batch_size: int) -> Iterator[list[tuple[int, Encoded]]]:
    """Length-bucketed batches (the same rule as `projection.project`): sort by length, cut consecutive slices."""
    ordered = sorted(samples, key=lambda item: len(item[1].input_ids))
    for start in range(0, len(ordered), batch_size):
        yield ordered[start:start + batch_size]


def columns(methods: Sequence[str]) -> tuple[str, ...]:
    """The columns of the scores file: COLUMNS (`score` = the first method's), plus with several methods one
    column per method named after it (`loss` is already one)."""
    return COLUMNS + (tuple(m for m in methods if m not in COLUMNS) if len(methods) > 1 else ())


def method_column(methods: Sequence[str], method: str) -> str:
    """The column of a scores file scored with `methods` that holds `method`'s score (see `columns`)."""
    return method if len(methods) > 1 else "score"


def _skip_row(index: int, record_id: str, reason: str) -> dict[str, Any]:
    return {"index": index, "id": record_id, "danger": None, "safety": None, "risk": None,
            "n_response_tokens": None, "loss": None, "status": f"skipped: {reason}"}


def score_records(model: Any, tokenizer: Any, records: Sequence[Record], *, danger: Term | None = None,
                  safety: Term | None = None, metric: str = "cosine-sum", system_prompt: str | None = None,
                  max_length: int = 512, batch_size: int = 8, first_index: int = 0, bar: tqdm | None = None,
                  methods: Sequence[str] = ("sqsd",), seed: int = 0, modules: Sequence[str] | None = None,
                  anchors: dict[str, Direction] | None = None,
                  hidden: dict[str, torch.Tensor] | None = None) -> list[dict[str, Any]]:
    """Score `records` at `model` (a PeftModel holding the terms' adapters, or a plain model for dense terms)
    under each of `methods` (`sqsd`, or the baselines of `sqsd.baselines`, which use `seed` and `modules`:
    default `baselines.block_linears`; the anchored ones also `anchors`, {"harm"/"safe": ḡ} from
    `baselines.anchor_gradient` over the same modules; the hidden-state ones of `sqsd.representations` their
    anchor features `hidden`, from `representations.anchor_states`).

    Returns one row per record in order, with every column of `columns(methods)` but risk_z (a pool statistic,
    see `add_risk_z`); `index` counts from `first_index`. `bar` is advanced by the samples of each batch. The
    `loss` column is the loss at θ₀ with `--method loss`, else SQSD's (taken at the danger term's anchor, or
    the safety term's), else θ₀'s when a gradient baseline computed it, else empty (random, length alone).
    """
    terms = {name: term for name, term in (("danger", danger), ("safety", safety)) if term is not None}
    if "sqsd" not in methods:
        terms = {}
    elif not terms:
        raise SqsdError("nothing to score: give a danger and/or a safety direction")
    passes = _passes(terms)
    need_grad = any(m in GRADIENT_METHODS for m in methods)
    if terms or need_grad or "loss" in methods:
        check_logits(model)
    if need_grad:
        modules = list(modules or block_linears(model))
    device = next(model.parameters()).device
    dtype = torch.float64 if next(model.parameters()).dtype == torch.float64 else torch.float32
    directions = {name: term.direction.to(dtype, device) for name, term in terms.items()}
    loss_term = "danger" if "danger" in terms else "safety"
    anchor_names = sorted({n for m in methods for n in ANCHORS.get(m, ())})
    missing = [n for n in anchor_names if not anchors or n not in anchors] \
        + [m for m in methods if m in HIDDEN_METHODS and not any(k.startswith(f"{m}/") for k in hidden or {})]
    if missing:
        raise SqsdError(f"--method {', '.join(methods)} needs the {missing[0]} anchor features")
    hidden_methods = [m for m in methods if m in HIDDEN_METHODS]
    layers = sample_layers(hidden_methods, hidden) if hidden_methods else []
    anchor_dirs = [anchors[n].to(dtype, device) for n in anchor_names] if anchor_names else []
    anchor_norms = [math.sqrt(float(d.sq_norm())) for d in anchor_dirs]
    rows: list[dict[str, Any] | None] = [None] * len(records)
    samples: list[tuple[int, Encoded]] = []
    for i, record in enumerate(records):
        encoded = encode_record(record, tokenizer, system_prompt, max_length)
        if isinstance(encoded, Skip):
            rows[i] = _skip_row(first_index + i, record.id, encoded.reason)
        else:
            samples.append((i, encoded))
    for batch in _batches(samples, batch_size):
        values: dict[str, torch.Tensor] = {}
        loss = None
        for (adapter, scaling), names in passes:
            p = project(model, [e for _, e in batch], [directions[n] for n in names], adapter=adapter,
                        scaling=scaling, pad_token_id=tokenizer.pad_token_id, batch_size=len(batch),
                        progress=False)
            scores = p.metric(metric)
            for d, name in enumerate(names):
                values[name] = scores[:, d]
            if loss_term in names:
                loss = p.loss
        at0 = theta0(model, [e for _, e in batch], modules, tokenizer.pad_token_id, len(batch), anchor_dirs) \
            if need_grad else None
        loss0 = at0.loss if at0 is not None else response_losses(
            model, [e for _, e in batch], tokenizer.pad_token_id, len(batch)) if "loss" in methods else None
        if loss0 is not None and ("loss" in methods or loss is None):
            loss = loss0
        rep = hidden_scores(hidden_methods, states(model, [e for _, e in batch], tokenizer.pad_token_id,
                                                   len(batch), layers), hidden) if hidden_methods else {}
        for b, (i, encoded) in enumerate(batch):
            row = {"index": first_index + i, "id": records[i].id,
                   **{name: float(values[name][b]) if name in values else None for name in TERMS}}
            row["risk"] = (row["danger"] or 0.0) - (row["safety"] or 0.0) if terms else None
            row.update(n_response_tokens=encoded.n_response_tokens,
                       loss=None if loss is None else float(loss[b]), status=OK)
            scores = method_scores(methods, seed, records[i].id, encoded.n_response_tokens,
                                   None if loss0 is None else float(loss0[b]),
                                   None if at0 is None else float(at0.sq[b].sum()),
                                   {n: (float(at0.dots[b, d].sum()), anchor_norms[d])
                                    for d, n in enumerate(anchor_names)})
            scores |= {m: float(v[b]) for m, v in rep.items()}
            scores["sqsd"] = row["risk"]
            row.update({m: scores[m] for m in methods}, score=scores[methods[0]])
            bad = [k for k in row if isinstance(row[k], float) and not math.isfinite(row[k])]
            rows[i] = _skip_row(row["index"], row["id"], f"non-finite {bad[0]} ({row[bad[0]]}); the model "
                                "overflows in this dtype? try --dtype float32") if bad else row
        if bar is not None:
            bar.update(len(batch))
    return rows  # type: ignore[return-value]


def add_risk_z(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows with risk_z: each present term z-scored over the ok rows, then z(danger) − z(safety)."""
    ok = [r for r in rows if r["status"] == OK]
    stats = {}
    for term in TERMS:
        values = [r[term] for r in ok if r[term] is not None]
        if values:
            mean = math.fsum(values) / len(values)
            std = math.sqrt(math.fsum((v - mean) ** 2 for v in values) / len(values))
            stats[term] = (mean, std)

    def z(row: dict[str, Any], term: str) -> float:
        if term not in stats or row[term] is None:
            return 0.0
        mean, std = stats[term]
        return (row[term] - mean) / std if std > 0 else 0.0

    return [{**r, "risk_z": z(r, "danger") - z(r, "safety") if r["status"] == OK and r["risk"] is not None
             else None} for r in rows]


# --- score files -------------------------------------------------------------------------------------------------

def write_scores(rows: Sequence[dict[str, Any]], path: Path, cols: Sequence[str] = COLUMNS) -> Path:
    """Write rows (the columns `cols`) to `path` (.parquet or .jsonl) atomically: a temporary file, then a
    rename."""
    tmp = path.with_name(path.name + ".tmp")
    if path.suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        types = {"index": pa.int64(), "id": pa.string(), "n_response_tokens": pa.int64(), "status": pa.string()}
        schema = pa.schema([(c, types.get(c, pa.float64())) for c in cols])
        pq.write_table(pa.Table.from_pylist([{c: r.get(c) for c in cols} for r in rows], schema=schema),
                       str(tmp))
    else:
        with open(tmp, "w", encoding="utf-8") as f:
            f.writelines(json.dumps({c: r.get(c) for c in cols}) + "\n" for r in rows)
    os.replace(tmp, path)
    return path


def score_rows(path: str | Path) -> list[RawRecord]:
    """The rows of a scores file written by `sqsd score` (.parquet or .jsonl), each where it was read, checked:
    an integer `index` that no other row has, a string `id` and `status`. Anything else (a hand-edited or
    truncated file) is a DataError naming the file, the line or row and the field."""
    if not Path(path).is_file():
        raise SqsdError(f"scores file {path} does not exist")
    try:
        rows = read_rows(path, {"index": int, "id": str, "status": str})
    except DataError as e:
        if not (Path(path).parent / CHUNKS_DIR).is_dir():
            raise
        raise SqsdError(f"{e}; if `sqsd score` wrote it, delete it and rerun the same command: it is merged again "
                        f"from {CHUNKS_DIR}/") from None
    seen: dict[int, RawRecord] = {}
    for r in rows:
        first = seen.setdefault(r.fields["index"], r)
        if first is not r:
            raise r.error(f"index {r.fields['index']} is also on {first.kind} {first.row}: a sample has two rows "
                          "(the scores file was edited or written twice); rescore or remove the extra row", "index")
    return rows


def read_scores(path: str | Path) -> list[dict[str, Any]]:
    """The rows of a scores file (`score_rows`) as dicts; nulls come back as None."""
    return [r.fields for r in score_rows(path)]


def _write_chunk(path: Path, rows: Sequence[dict[str, Any]]) -> None:
    """One finished chunk, whole or not at all (a temporary file, fsync, then a rename)."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _chunk_path(folder: Path, chunk: int) -> Path:
    return folder / CHUNKS_DIR / f"{chunk:05d}.jsonl"


def _merge(folder: Path, records: Sequence[Record], n_chunks: int, output: Path,
           methods: Sequence[str]) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for chunk in range(n_chunks):
        path = _chunk_path(folder, chunk)
        if not path.exists():
            raise SqsdError(f"{path} is missing; rerun the same command to score it")
        rows += read_scores(path)
    if [r["index"] for r in rows] != list(range(len(records))) or any(
            r["id"] != rec.id for r, rec in zip(rows, records)):
        raise SqsdError(f"the chunks in {folder / CHUNKS_DIR} do not match the data (ids or order differ); rerun "
                        "with --overwrite")
    rows = add_risk_z(rows)
    write_scores(rows, output, columns(methods))
    return rows


def _summary(rows: Sequence[dict[str, Any]], output: Path) -> str:
    ok = sorted((r for r in rows if r["status"] == OK), key=lambda r: (-r["score"], r["index"]))
    skipped = [r for r in rows if r["status"] != OK]
    lines = [f"{len(rows)} record(s): {len(ok)} scored, {len(skipped)} skipped -> {output}"]
    reasons: dict[str, int] = {}
    for r in skipped:
        reasons[r["status"]] = reasons.get(r["status"], 0) + 1
    lines += [f"  {n} x {status}" for status, n in sorted(reasons.items(), key=lambda kv: -kv[1])[:3]]
    if ok:
        def fmt(v: float | None) -> str:
            return "-" if v is None else f"{v:+.4f}"
        lines.append(f"riskiest {min(5, len(ok))}:\n  {'score':>9} {'danger':>9} {'safety':>9}  id")
        lines += [f"  {fmt(r['score']):>9} {fmt(r['danger']):>9} {fmt(r['safety']):>9}  {r['id']}" for r in ok[:5]]
    return "\n".join(lines)


# --- the command -------------------------------------------------------------------------------------------------

def output_path(config: ScoreConfig) -> Path:
    return Path(config.output_dir) / f"scores.{config.format_out}"


def _inputs(config: ScoreConfig) -> dict[str, str]:
    from sqsd.fingerprints import data_fingerprints, fingerprint, model_fingerprint

    check_files(config)  # every direction file and anchor, before any model is loaded
    inputs = {"model": model_fingerprint(config.model), **data_fingerprints(config.data)}
    for term in TERMS:
        for key, value in ((term, getattr(config, term)), (f"{term}_anchor", getattr(config, f"{term}_anchor"))):
            if value:
                inputs[key] = fingerprint(value)
    for key in ("harmful_anchors", "safe_anchors"):
        if getattr(config, key):
            inputs |= {f"{key}:{k}": v for k, v in data_fingerprints(getattr(config, key)).items()}
    return inputs


def score(config: ScoreConfig) -> Path:
    """`sqsd score`: score `config.data` into `config.output_dir` (see the module docstring); returns the file.

    Under a launcher rank 0 claims the folder (`runs.open_run`) and every rank gets its decision."""
    state = PartialState(cpu=config.device == "cpu")
    output = output_path(config)
    with open_run(config.output_dir, config, lambda: _inputs(config), overwrite=config.overwrite, state=state,
                  input_fields=INPUT_FIELDS) as run:
        if run.state == "done" and output.is_file():  # a deleted scores file is merged again from the chunks
            if state.is_main_process:
                print(f"already done: {output} holds the scores of this config; pass another --output-dir (or "
                      "--overwrite) to score again")
            state.wait_for_everyone()
            return output
        _score(config, state, run)
    state.wait_for_everyone()  # no rank returns before the merged file exists
    return output


def _score(config: ScoreConfig, state: PartialState, run: Any) -> None:
    from sqsd.data import load_from_config
    from sqsd.model import load_model

    main, rank, world = state.is_main_process, state.process_index, state.num_processes
    folder, output = Path(config.output_dir), output_path(config)
    if main:
        (folder / CHUNKS_DIR).mkdir(exist_ok=True)
    loaded = load_from_config(config)
    if loaded.bad and main:
        print(f"{len(loaded.bad)} bad record(s) left out (--on-bad-record skip); `sqsd data inspect` lists them")
    records = loaded.records
    n_chunks = -(-len(records) // config.chunk_size)
    missing = [c for c in range(n_chunks) if not _chunk_path(folder, c).exists()]
    state.wait_for_everyone()  # every rank has listed the chunks before any rank writes one
    mine = missing[rank::world]
    if mine:
        device = str(state.device) if state.use_distributed and config.device != "cpu" else config.device
        model, tokenizer = load_model(config.model, config.dtype, device)
        model, terms = load_terms(config, model, run.inputs["model"])
        modules = block_linears(model)
        anchors, hidden = anchor_features(config, model, tokenizer, folder, main, modules, records) \
            if any(m in ANCHORS or m in HIDDEN_METHODS for m in config.method) else (None, None)
        todo = sum(len(records[c * config.chunk_size:(c + 1) * config.chunk_size]) for c in mine)
        if main:
            print(f"{len(records)} record(s) in {n_chunks} chunk(s) of {config.chunk_size}: "
                  f"{n_chunks - len(missing)} done, {len(missing)} to score"
                  + (f" over {world} processes" if world > 1 else ""), flush=True)
        start = time.perf_counter()
        desc = "score" if world == 1 else f"score (rank 0 of {world})"
        with tqdm(total=todo, unit="sample", desc=desc, disable=not main) as bar:
            for chunk in mine:
                first = chunk * config.chunk_size
                rows = score_records(model, tokenizer, records[first:first + config.chunk_size],
                                     danger=terms.get("danger"), safety=terms.get("safety"), metric=config.metric,
                                     system_prompt=config.system_prompt, max_length=config.max_length,
                                     batch_size=config.batch_size, first_index=first, bar=bar,
                                     methods=config.method, seed=config.seed, modules=modules, anchors=anchors,
                                     hidden=hidden)
                _write_chunk(_chunk_path(folder, chunk), rows)
        if main:
            print(f"scored {todo} sample(s) in {time.perf_counter() - start:.1f} s on this process", flush=True)
    state.wait_for_everyone()  # all chunks are written
    if main:
        rows = _merge(folder, records, n_chunks, output, config.method)
        run.finish({"rows": len(rows), "ok": sum(r["status"] == OK for r in rows), "file": output.name})
        print(_summary(rows, output), flush=True)
