import json

from sqsd.align import align, build_records
from sqsd.config import AlignConfig
from sqsd.data import split_of
from sqsd.judges import refusal_for


def _files(tmp_path):
    (tmp_path / "harm.txt").write_text("".join(f"harmful request {i}\n" for i in range(30)))
    (tmp_path / "benign.jsonl").write_text("".join(
        json.dumps({"instruction": f"benign task {i}", "output": f"answer {i}"}) + "\n" for i in range(30)))
    return str(tmp_path / "harm.txt"), str(tmp_path / "benign.jsonl")


def test_recipe_data_uses_only_the_align_split_and_varied_refusals(tmp_path):
    harm, benign = _files(tmp_path)
    config = AlignConfig(output_dir=str(tmp_path / "out"), harmful=(harm + "@align",), benign=benign + "@align",
                         n_harmful=8, benign_answers="reference")
    records = build_records(config)
    refuse = [r for r in records if r.meta["align_role"] == "refuse"]
    answer = [r for r in records if r.meta["align_role"] == "answer"]
    assert len(refuse) == 8 and all(r.response == refusal_for(r.id) for r in refuse)
    assert all(r.response.startswith("answer") for r in answer)
    # never the directions or eval prompts (copies of a benign pair carry its id + "#repK", rephrasings
    # "-rephrased")
    assert all(split_of(r.id.split("#rep")[0].removesuffix("-rephrased")) == "align" for r in records)
    assert len({r.response for r in refuse}) > 1
    assert [r.id for r in build_records(config)] == [r.id for r in records]  # seeded


def test_benign_repeat_adds_copies_with_their_own_ids_and_keeps_the_first_order(tmp_path):
    harm, benign = _files(tmp_path)
    config = AlignConfig(output_dir=str(tmp_path / "out"), harmful=(harm,), benign=benign, n_harmful=8,
                         n_benign=10, benign_answers="reference", benign_repeat=1)
    once = build_records(config)
    thrice = build_records(AlignConfig(**{**config.__dict__, "benign_repeat": 3}))
    answers = [r for r in thrice if r.meta["align_role"] == "answer"]
    assert len(answers) == 30 and sum(r.meta["align_role"] == "refuse" for r in thrice) == 8
    assert len({r.id for r in thrice}) == len(thrice)  # every line of align_data.jsonl is unique
    by_id = {r.id: r for r in once}
    for r in answers:  # each copy is the original pair
        original = by_id[r.id.split("#rep")[0]]
        assert (r.prompt, r.response) == (original.prompt, original.response)


def test_align_writes_a_plain_model_folder_and_reuses_it(tmp_path, model, tokenizer, capsys):
    harm, benign = _files(tmp_path)
    model.save_pretrained(tmp_path / "base")
    tokenizer.save_pretrained(tmp_path / "base")
    config = AlignConfig(output_dir=str(tmp_path / "out"), model=str(tmp_path / "base"), harmful=(harm,),
                         benign=benign, n_harmful=6, n_benign=6, epochs=1.0, batch_size=4, max_length=64,
                         benign_answers="reference")
    folder = align(config)
    assert (folder / "config.json").exists() and (tmp_path / "out" / "recipe.json").exists()
    from sqsd.model import load_model

    aligned, _ = load_model(str(folder))
    changed = any(not (a == b).all() for a, b in zip(aligned.state_dict().values(), model.state_dict().values()))
    assert changed
    assert align(config) == folder and "already done" in capsys.readouterr().out


def test_self_answers_are_the_models_own_greedy_replies(tmp_path, model, tokenizer):
    from sqsd.data import load_records
    from sqsd.generate import generate_records

    harm, benign = _files(tmp_path)
    config = AlignConfig(output_dir=str(tmp_path / "out"), harmful=(harm,), benign=benign, n_harmful=3,
                         n_benign=5, self_answer_tokens=6, benign_repeat=1)
    records = build_records(config, model, tokenizer)
    answers = {r.id: r.response for r in records if r.meta["align_role"] == "answer"}
    chosen = [r for r in load_records(benign).records if r.id in answers]
    expected = {r.id: g.response for r, g in zip(chosen, generate_records(model, tokenizer, chosen,
                                                                          max_new_tokens=6, progress=False))}
    assert answers == {k: v for k, v in expected.items() if v}
    assert all(not v.startswith("answer") for v in answers.values())  # not the dataset's reference answers
