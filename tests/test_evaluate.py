import json
from pathlib import Path

import pytest

from sqsd.errors import SqsdError
from sqsd.evaluate import asr_summary, judge_file
from sqsd.judges import Judgment, KeywordJudge


def test_asr_averages_samples_then_prompts_and_reports_any_sample_and_categories():
    rows = [
        {"id": "a", "unsafe": True, "category": "bio"}, {"id": "a", "unsafe": False, "category": "bio"},
        {"id": "b", "unsafe": False, "category": "cyber"}, {"id": "b", "unsafe": False, "category": "cyber"},
        {"id": "c", "unsafe": True, "category": "cyber"}, {"id": "c", "unsafe": None, "category": "cyber"},
    ]
    s = asr_summary(rows, n_bootstrap=200, seed=0)
    assert s["rate"] == pytest.approx((0.5 + 0.0 + 1.0) / 3)  # c's unparsed sample is left out, not guessed
    assert s["any_sample"]["rate"] == pytest.approx(2 / 3)
    assert s["n"] == 3 and s["n_responses"] == 6 and s["n_unparsed"] == 1
    assert s["per_category"] == {"bio": {"rate": 0.5, "n": 1}, "cyber": {"rate": 0.5, "n": 2}}


class CountingJudge:
    """Keyword verdicts, counting how many responses it was asked about."""

    def __init__(self):
        self.seen = 0

    def judge(self, prompts, responses):
        self.seen += len(responses)
        return KeywordJudge().judge(prompts, responses)


def _generations(path, responses):
    path.write_text("".join(json.dumps({"id": f"p{i}", "sample": 0, "prompt": f"q{i}", "response": r,
                                        "meta": {"category": "x"}}) + "\n" for i, r in enumerate(responses)))


def test_judged_file_is_reused_and_only_new_responses_are_judged(tmp_path):
    gens, judged = tmp_path / "harmful.generations.jsonl", tmp_path / "harmful.keyword.jsonl"
    _generations(gens, ["Sure, here it is.", "I'm sorry, I can't."])
    judge = CountingJudge()
    rows = judge_file(gens, judged, lambda: judge, "keyword", overwrite=False)
    assert [r["label"] for r in rows] == ["unsafe", "safe"] and judge.seen == 2
    assert rows[1]["raw"] == "refusal: i'm sorry" and rows[0]["category"] == "x"
    judge_file(gens, judged, lambda: judge, "keyword", overwrite=False)
    assert judge.seen == 2  # nothing re-judged
    _generations(gens, ["Sure, here it is.", "Okay: step one."])  # one response changed
    rows = judge_file(gens, judged, lambda: judge, "keyword", overwrite=False)
    assert judge.seen == 3 and [r["label"] for r in rows] == ["unsafe", "unsafe"]


def test_a_different_judge_into_the_same_file_refuses(tmp_path):
    gens, judged = tmp_path / "g.jsonl", tmp_path / "harmful.llama-guard.jsonl"
    _generations(gens, ["Sure."])
    judge_file(gens, judged, CountingJudge, "llama-guard:guard-a", overwrite=False)

    class Unsafe:
        def judge(self, prompts, responses):
            return [Judgment(True, "unsafe\nS1", ("S1",)) for _ in responses]

    with pytest.raises(Exception, match="--overwrite"):
        judge_file(gens, judged, Unsafe, "llama-guard:guard-b", overwrite=False)
    rows = judge_file(gens, judged, Unsafe, "llama-guard:guard-b", overwrite=True)
    assert rows[0]["categories"] == ["S1"] and rows[0]["judge"] == "llama-guard:guard-b"


BAD_JUDGED = Path(__file__).parent / "bad_inputs" / "judged"


BAD_JUDGED_FILES = [("cut_line.jsonl", ":2", "invalid JSON: Unterminated string"),
                    ("missing_judge.jsonl", ":2", "field 'judge': missing required field")]


def test_every_bad_judged_file_is_tested_and_documented():
    assert {p.name for p in BAD_JUDGED.iterdir()} == {name for name, *_ in BAD_JUDGED_FILES}
    readme = (BAD_JUDGED.parent / "README.md").read_text()
    assert all(f"| judged/{name} |" in readme for name, *_ in BAD_JUDGED_FILES)


@pytest.mark.parametrize("name, where, message", BAD_JUDGED_FILES, ids=[b[0] for b in BAD_JUDGED_FILES])
def test_corrupt_judged_file_names_the_line_and_how_to_recover(name, where, message, tmp_path):
    gens, judged = tmp_path / "harmful.generations.jsonl", tmp_path / "harmful.keyword.jsonl"
    _generations(gens, ["Sure.", "No."])
    judged.write_bytes((BAD_JUDGED / name).read_bytes())
    with pytest.raises(SqsdError) as info:
        judge_file(gens, judged, CountingJudge, "keyword", overwrite=False)
    assert str(info.value).startswith(f"{judged}{where}: ") and message in str(info.value)
    assert str(info.value).endswith(f"delete {judged} to judge every response again (the generations are kept)")
    assert gens.read_text().count("\n") == 2  # nothing lost
    judged.unlink()  # the advice works
    assert len(judge_file(gens, judged, CountingJudge, "keyword", overwrite=False)) == 2


def test_evaluate_end_to_end_then_rejudge_without_regenerating(tmp_path, model, tokenizer):
    from sqsd.config import EvaluateConfig
    from sqsd.evaluate import evaluate
    from test_judges import GUARD_TEMPLATE
    from tiny import tiny_model, tiny_tokenizer

    model.save_pretrained(tmp_path / "m")
    tokenizer.save_pretrained(tmp_path / "m")
    guard_tok = tiny_tokenizer("llama3")
    guard_tok.chat_template = GUARD_TEMPLATE
    tiny_model(guard_tok, seed=5).save_pretrained(tmp_path / "guard")
    guard_tok.save_pretrained(tmp_path / "guard")
    (tmp_path / "harmful.jsonl").write_text("".join(
        json.dumps({"prompt": f"bad thing {i}?", "category": "cat" + str(i % 2)}) + "\n" for i in range(5)))
    (tmp_path / "benign.txt").write_text("hello\nname a colour\n")
    common = {"model": str(tmp_path / "m"), "output_dir": str(tmp_path / "eval"), "harmful": str(tmp_path / "harmful.jsonl"),
              "benign": str(tmp_path / "benign.txt"), "max_new_tokens": 4, "batch_size": 2, "n_bootstrap": 200}
    s = evaluate(EvaluateConfig(**common))
    k = s["judges"]["keyword"]
    assert k["n"] == 5 and 0 <= k["rate"] <= 1 and k["ci95"][0] <= k["rate"] <= k["ci95"][1]
    assert set(k["per_category"]) == {"cat0", "cat1"} and s["over_refusal"]["n"] == 2
    rows = [json.loads(x) for x in (tmp_path / "eval" / "harmful.keyword.jsonl").read_text().splitlines()]
    assert len(rows) == 5 and {r["label"] for r in rows} <= {"safe", "unsafe"}
    gens = tmp_path / "eval" / "harmful.generations.jsonl"
    before = gens.read_bytes()
    s2 = evaluate(EvaluateConfig(**common, judge="llama-guard", judge_model=str(tmp_path / "guard")))
    assert gens.read_bytes() == before  # re-judged, not regenerated
    assert set(s2["judges"]) == {"keyword", "llama-guard"}  # both judges' results kept side by side
    assert s2["judges"]["keyword"] == k
    assert (tmp_path / "eval" / "harmful.llama-guard.jsonl").exists()


def test_a_smaller_limit_in_a_reused_folder_counts_only_its_prompts(tmp_path, model, tokenizer):
    from sqsd.config import EvaluateConfig
    from sqsd.evaluate import evaluate

    model.save_pretrained(tmp_path / "m")
    tokenizer.save_pretrained(tmp_path / "m")
    (tmp_path / "harmful.txt").write_text("".join(f"bad thing {i}?\n" for i in range(6)))
    (tmp_path / "benign.txt").write_text("".join(f"nice thing {i}?\n" for i in range(6)))
    common = {"model": str(tmp_path / "m"), "harmful": str(tmp_path / "harmful.txt"),
              "benign": str(tmp_path / "benign.txt"), "max_new_tokens": 2, "n_bootstrap": 200}
    evaluate(EvaluateConfig(**common, output_dir=str(tmp_path / "reused"), limit=6))
    reused = evaluate(EvaluateConfig(**common, output_dir=str(tmp_path / "reused"), limit=3))
    fresh = evaluate(EvaluateConfig(**common, output_dir=str(tmp_path / "fresh"), limit=3))
    assert reused["judges"]["keyword"]["n"] == reused["judges"]["keyword"]["n_responses"] == 3
    assert reused["judges"] == fresh["judges"] and reused["over_refusal"] == fresh["over_refusal"]
    assert reused["over_refusal"]["n"] == 3
    # the verdicts on the other 3 responses stay in the judged file for a later, larger run
    assert len((tmp_path / "reused" / "harmful.keyword.jsonl").read_text().splitlines()) == 6
