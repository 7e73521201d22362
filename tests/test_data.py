"""Tests for fedrl_lightning.data: reasoning-gym and file-backed federated partitions, and ClientSampler."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import reasoning_gym

from fedrl_lightning.data import DEFAULT_SYSTEM_PROMPT, ClientSampler, FederatedData

SMALL = {"train_size": 16, "eval_size": 4}
TASKS = ["basic_arithmetic", "leg_counting", "letter_counting", "spell_backward"]
# leg_counting with one animal of one instance has only ~37 distinct questions: forces repeats and refills
TINY_LEGS = {"leg_counting": {"min_animals": 1, "max_animals": 1, "min_instances": 1, "max_instances": 1}}


def questions(examples: list[dict]) -> list[str]:
    return [ex["prompt"] if isinstance(ex["prompt"], str) else ex["prompt"][-1]["content"] for ex in examples]


def write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def write_parquet(path: Path, rows: list[dict]) -> str:
    pq.write_table(pa.Table.from_pylist(rows), path)
    return str(path)


def qa_rows(n: int, tasks: tuple[str, ...] = ("add", "mul"), start: int = 0) -> list[dict]:
    return [
        {"prompt": f"q{i}?", "answer": str(i), "kind": tasks[i % len(tasks)], "level": i % 3}
        for i in range(start, start + n)
    ]


# ---------------------------------------------------------------- reasoning-gym partitions


def test_by_task_gives_each_client_one_family() -> None:
    data = FederatedData(tasks=TASKS[:2], num_clients=4, partition="by_task", **SMALL)
    for cid, row in zip(data.client_ids(), data.describe()):
        assert row == {"client_id": cid, "n_train": 16, "n_eval": 4, "task_counts": {TASKS[cid % 2]: 16}}
        assert {ex["task"] for ex in data.eval_examples(cid)} == {TASKS[cid % 2]}
    # clients sharing a family get different items
    assert set(questions(data.train_examples(0))) != set(questions(data.train_examples(2)))
    assert len(data.union_train_examples()) == 64


def test_by_task_more_tasks_than_clients_round_robin() -> None:
    data = FederatedData(tasks=TASKS[:3], num_clients=2, **SMALL)
    assert [set(r["task_counts"]) for r in data.describe()] == [{TASKS[0], TASKS[2]}, {TASKS[1]}]


def test_dirichlet_small_alpha_is_skewed_and_large_alpha_near_uniform() -> None:
    skewed = FederatedData(tasks=TASKS, num_clients=4, partition="dirichlet", alpha=0.01, train_size=64, eval_size=4)
    rows = skewed.describe()
    assert all(sum(r["task_counts"].values()) == 64 and len(r["task_counts"]) <= 2 for r in rows)
    assert sum(max(r["task_counts"].values()) >= 58 for r in rows) >= 3  # mostly a single family per client
    flat = FederatedData(tasks=TASKS, num_clients=4, partition="dirichlet", alpha=1e6, train_size=64, eval_size=4)
    for row in flat.describe():
        assert set(row["task_counts"]) == set(TASKS)
        assert all(4 <= c <= 28 for c in row["task_counts"].values()), row


def test_iid_even_split() -> None:
    data = FederatedData(tasks=TASKS[:3], num_clients=2, partition="iid", **SMALL)
    for row in data.describe():
        assert sorted(row["task_counts"].values()) == [5, 5, 6]


def test_same_seed_identical_different_seed_different() -> None:
    kw = {"tasks": TASKS[:2], "num_clients": 2, "partition": "dirichlet", **SMALL}
    a, b, c = FederatedData(seed=3, **kw), FederatedData(seed=3, **kw), FederatedData(seed=4, **kw)
    for cid in a.client_ids():
        assert a.train_examples(cid) == b.train_examples(cid)
        assert a.eval_examples(cid) == b.eval_examples(cid)
    assert questions(a.union_train_examples()) != questions(c.union_train_examples())
    # building order does not matter: client 1 first gives the same client 1
    d = FederatedData(seed=3, **kw)
    assert d.train_examples(1) == a.train_examples(1)


def test_train_eval_disjoint_even_for_tiny_task_space() -> None:
    data = FederatedData(tasks=["leg_counting"], task_kwargs=TINY_LEGS, num_clients=2, train_size=16, eval_size=8)
    for cid in data.client_ids():
        train_q, eval_q = set(questions(data.train_examples(cid))), questions(data.eval_examples(cid))
        assert len(eval_q) == 8 and len(set(eval_q)) == 8
        assert not train_q & set(eval_q)
    # clients have private, differently seeded train sets
    assert questions(data.train_examples(0)) != questions(data.train_examples(1))


def test_eval_exhaustion_raises() -> None:
    data = FederatedData(tasks=["leg_counting"], task_kwargs=TINY_LEGS, num_clients=1, train_size=16, eval_size=100)
    with pytest.raises(ValueError, match="leg_counting"):
        data.eval_examples(0)


def test_example_format_and_system_prompt() -> None:
    ex = FederatedData(**SMALL).train_examples(0)[0]
    assert set(ex) == {"prompt", "answer", "task", "rg_entry"}
    assert ex["prompt"][0] == {"role": "system", "content": DEFAULT_SYSTEM_PROMPT}
    assert ex["prompt"][1] == {"role": "user", "content": ex["rg_entry"]["question"]}
    assert isinstance(ex["answer"], str) and ex["answer"] == ex["rg_entry"]["answer"]
    assert ex["task"] == "basic_arithmetic"
    assert "<answer>" in DEFAULT_SYSTEM_PROMPT
    # None (the default) means the answer-tag prompt for reasoning-gym tasks; "" means none
    assert FederatedData(system_prompt=None, **SMALL).train_examples(0)[0]["prompt"][0]["role"] == "system"
    ex = FederatedData(system_prompt="", **SMALL).train_examples(0)[0]
    assert [m["role"] for m in ex["prompt"]] == ["user"]
    ex = FederatedData(system_prompt="Be terse.", **SMALL).eval_examples(1)[0]
    assert ex["prompt"][0] == {"role": "system", "content": "Be terse."}


@pytest.mark.parametrize("task", TASKS)
def test_rg_entry_json_round_trip_scores_one(task: str) -> None:
    data = FederatedData(tasks=[task], num_clients=1, train_size=8, eval_size=2)
    for ex in data.train_examples(0) + data.eval_examples(0):
        entry = json.loads(json.dumps(ex["rg_entry"]))
        assert entry == ex["rg_entry"]
        score = reasoning_gym.get_score_answer_fn(entry["metadata"]["source_dataset"])
        assert score(ex["answer"], entry) == 1.0


# ---------------------------------------------------------------- local files


@pytest.mark.parametrize("writer", [write_jsonl, write_parquet])
def test_one_file_per_client(tmp_path: Path, writer) -> None:
    ext = "jsonl" if writer is write_jsonl else "parquet"
    files = [writer(tmp_path / f"c{i}.{ext}", qa_rows(20, start=100 * i)) for i in range(2)]
    data = FederatedData(data_files=files, num_clients=2, eval_fraction=0.25, system_prompt="S")
    for cid in data.client_ids():
        train, evals = data.train_examples(cid), data.eval_examples(cid)
        assert (len(train), len(evals)) == (15, 5)
        assert {int(ex["answer"]) // 100 for ex in train + evals} == {cid}
        assert not set(questions(train)) & set(questions(evals))
        ex = train[0]
        assert ex["prompt"][0] == {"role": "system", "content": "S"} and ex["prompt"][1]["role"] == "user"
        assert ex["task"] == f"c{cid}" and ex["rg_entry"] is None
        assert "kind" in ex and "level" in ex  # extra columns become reward kwargs
    assert data.train_examples(0) == FederatedData(
        data_files=files, num_clients=2, eval_fraction=0.25, system_prompt="S"
    ).train_examples(0)


def test_json_array_file_and_chat_prompts(tmp_path: Path) -> None:
    chat = [{"role": "system", "content": "custom"}, {"role": "user", "content": "hi"}]
    rows = [{"prompt": chat, "answer": 1}] + [{"prompt": f"p{i}", "answer": i} for i in range(9)]
    path = tmp_path / "rows.json"
    path.write_text(json.dumps(rows))
    data = FederatedData(data_files=[str(path)], num_clients=1, eval_fraction=0.0)
    train = data.train_examples(0)
    assert len(train) == 10 and data.eval_examples(0) == []
    assert [ex["prompt"] for ex in train if not isinstance(ex["prompt"], str)] == [chat]  # used as is
    assert sorted(ex["prompt"] for ex in train if isinstance(ex["prompt"], str)) == [f"p{i}" for i in range(9)]
    assert all(isinstance(ex["answer"], str) for ex in train)


@pytest.mark.parametrize("writer", [write_jsonl, write_parquet])
def test_single_file_partitions(tmp_path: Path, writer) -> None:
    ext = "jsonl" if writer is write_jsonl else "parquet"
    path = writer(tmp_path / f"all.{ext}", qa_rows(60, tasks=("add", "mul", "sub")))
    iid = FederatedData(data_files=[path], num_clients=3, partition="iid", eval_fraction=0.1)
    assert [r["n_train"] + r["n_eval"] for r in iid.describe()] == [20, 20, 20]
    all_q = [q for c in iid.client_ids() for q in questions(iid.train_examples(c) + iid.eval_examples(c))]
    assert sorted(all_q) == sorted(f"q{i}?" for i in range(60))  # every row used exactly once
    by_task = FederatedData(data_files=[path], num_clients=3, partition="by_task", partition_by="kind")
    assert [set(r["task_counts"]) for r in by_task.describe()] == [{"add"}, {"mul"}, {"sub"}]
    shared = FederatedData(data_files=[path], num_clients=6, partition="by_task", partition_by="kind")
    rows = shared.describe()
    assert [set(r["task_counts"]) for r in rows] == [{"add"}, {"mul"}, {"sub"}] * 2
    assert not set(questions(shared.train_examples(0))) & set(questions(shared.train_examples(3)))
    dirichlet = FederatedData(data_files=[path], num_clients=2, partition="dirichlet", alpha=100.0, partition_by="kind")
    assert sum(r["n_train"] + r["n_eval"] for r in dirichlet.describe()) == 60
    assert all(set(r["task_counts"]) == {"add", "mul", "sub"} for r in dirichlet.describe())


# ---------------------------------------------------------------- errors


def test_file_errors_name_file_row_column(tmp_path: Path) -> None:
    missing = str(tmp_path / "nope.jsonl")
    with pytest.raises(ValueError, match="not found.*nope.jsonl"):
        FederatedData(data_files=[missing], num_clients=1)
    txt = tmp_path / "rows.txt"
    txt.write_text("prompt,answer\n")
    with pytest.raises(ValueError, match="rows.txt.*extension|extension.*rows.txt"):
        FederatedData(data_files=[str(txt)], num_clients=1)
    header_only = tmp_path / "rows.csv"
    header_only.write_text("prompt,answer\n")
    with pytest.raises(ValueError, match="rows.csv: no rows"):
        FederatedData(data_files=[str(header_only)], num_clients=1).setup()
    bad_col = write_jsonl(tmp_path / "badcol.jsonl", [{"question": "q", "answer": "a"}])
    with pytest.raises(ValueError, match=r"badcol.jsonl.*'prompt'.*columns found: \['question', 'answer'\]"):
        FederatedData(data_files=[bad_col], num_clients=1).train_examples(0)
    no_ans = write_parquet(tmp_path / "noans.parquet", [{"prompt": "q", "label": "a"}])
    with pytest.raises(ValueError, match=r"noans.parquet.*'answer'.*columns found: \['prompt', 'label'\]"):
        FederatedData(data_files=[no_ans], num_clients=1).train_examples(0)
    empty = write_jsonl(tmp_path / "empty.jsonl", [{"prompt": "ok", "answer": "1"}, {"prompt": "  ", "answer": "2"}])
    with pytest.raises(ValueError, match=r"empty.jsonl: row 2, column 'prompt': empty prompt"):
        FederatedData(data_files=[empty], num_clients=1).train_examples(0)
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"prompt": "a", "answer": "1"}\n{oops\n')
    with pytest.raises(ValueError, match="broken.jsonl: line 2"):
        FederatedData(data_files=[str(broken)], num_clients=1).train_examples(0)
    one = write_jsonl(tmp_path / "one.jsonl", qa_rows(1))
    with pytest.raises(ValueError, match="Client 1 has no train rows.*one.jsonl"):
        FederatedData(data_files=[one], num_clients=2, partition="iid").setup()
    with pytest.raises(ValueError, match="partition_by"):
        FederatedData(data_files=[one], num_clients=2, partition="by_task")
    with pytest.raises(ValueError, match="1 file or num_clients=3"):
        FederatedData(data_files=[one, one], num_clients=3)


@pytest.mark.parametrize(
    ("kwargs", "pattern"),
    [
        ({"num_clients": 0}, "num_clients"),
        ({"alpha": 0.0}, "alpha"),
        ({"alpha": -1.0}, "alpha"),
        ({"train_size": 0}, "train_size"),
        ({"eval_size": -1}, "eval_size"),
        ({"partition": "random"}, "partition"),
        ({"eval_fraction": 1.0}, "eval_fraction"),
        ({"seed": -1}, "seed"),
        ({"tasks": []}, "at least one"),
        (
            {"tasks": ["basic_arithmetc"]},
            r"'basic_arithmetc'.*Did you mean.*'basic_arithmetic'.*Valid tasks.*chain_sum",
        ),
        ({"task_kwargs": {"basic_arithmetic": {"bogus": 1}}}, r"'basic_arithmetic'.*bogus"),
        ({"task_kwargs": {"basic_arithmetic": {"min_terms": 5, "max_terms": 2}}}, r"'basic_arithmetic'.*max_terms"),
        ({"task_kwargs": {"leg_counting": {}}}, "not in tasks"),
        ({"task_kwargs": {"basic_arithmetic": {"seed": 1}}}, "seed"),
    ],
)
def test_argument_validation(kwargs: dict, pattern: str) -> None:
    with pytest.raises(ValueError, match=pattern):
        FederatedData(**kwargs)


def test_client_id_out_of_range() -> None:
    with pytest.raises(ValueError, match="client_id"):
        FederatedData(**SMALL).train_examples(2)


# ---------------------------------------------------------------- ClientSampler


def test_sampler_deterministic_and_epochs_are_permutations() -> None:
    a, b = ClientSampler(10, seed=1, client_id=0), ClientSampler(10, seed=1, client_id=0)
    seq = [a.next_batch(3) for _ in range(10)]
    assert seq == [b.next_batch(3) for _ in range(10)]
    flat = [i for batch in seq for i in batch]
    assert sorted(flat[:10]) == sorted(flat[10:20]) == list(range(10))
    assert flat[:10] != flat[10:20]  # reshuffled each epoch
    assert a.state_dict()["epoch"] == 3
    other = ClientSampler(10, seed=1, client_id=1)
    assert [other.next_batch(3) for _ in range(10)] != seq


def test_sampler_wraps_with_batch_larger_than_data() -> None:
    s = ClientSampler(3, seed=0, client_id=0)
    batch = s.next_batch(7)
    assert len(batch) == 7 and sorted(batch[:3]) == [0, 1, 2] and sorted(batch[3:6]) == [0, 1, 2]
    assert s.state_dict() == {"num_examples": 3, "seed": 0, "client_id": 0, "epoch": 2, "position": 1}


def test_sampler_resume_gives_identical_continuation() -> None:
    ref = ClientSampler(7, seed=5, client_id=2)
    ref.next_batch(4)
    ref.next_batch(5)
    state = json.loads(json.dumps(ref.state_dict()))
    expected = [ref.next_batch(3) for _ in range(6)]
    resumed = ClientSampler(7, seed=5, client_id=2)
    resumed.load_state_dict(state)
    assert [resumed.next_batch(3) for _ in range(6)] == expected
    with pytest.raises(ValueError, match="num_examples"):
        ClientSampler(8, seed=5, client_id=2).load_state_dict(state)
    with pytest.raises(ValueError):
        ClientSampler(0, seed=0, client_id=0)
    with pytest.raises(ValueError, match="batch_size"):
        resumed.next_batch(0)


def test_reasoning_gym_export_keeps_verifier(tmp_path: Path) -> None:
    entries = list(reasoning_gym.create_dataset("leg_counting", size=4, seed=9))
    rows = [{"prompt": e["question"], "answer": e["answer"], "metadata": e["metadata"]} for e in entries]
    path = write_jsonl(tmp_path / "export.jsonl", [json.loads(json.dumps(r, default=list)) for r in rows])
    data = FederatedData(data_files=[path], num_clients=1, eval_fraction=0.0)
    for ex in data.train_examples(0):
        assert reasoning_gym.get_score_answer_fn("leg_counting")(ex["answer"], ex["rg_entry"]) == 1.0
