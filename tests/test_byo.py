"""A TRL user's own data and rewards: datasets objects, Hub names, CSV, partition by a column, TRL reward calls."""

from __future__ import annotations

import csv
import math
import re
from pathlib import Path
from typing import Any

import datasets
import pytest
import torch

from conftest import make_module
from fedrl_lightning.client import evaluate
from fedrl_lightning.data import FederatedData
from fedrl_lightning.rewards import TrainerState, accuracy_reward, compute_rewards, format_reward, qa_reward
from fedrl_lightning.rollout.hf import HFRollout

ROOT = Path(__file__).resolve().parents[1]
BYO_HEADING = "## Bring your own model, data and rewards"


# Copied from TRL's documentation (GRPOTrainer, "Using a custom reward function"), unchanged.
def reward_len(completions, **kwargs):
    return [-abs(20 - len(completion)) for completion in completions]


def format_reward_func(completions, **kwargs):
    pattern = r"^<think>.*?</think><answer>.*?</answer>$"
    matches = [re.match(pattern, content) for content in completions]
    return [1.0 if match else 0.0 for match in matches]


class Recorder:
    """A reward function that keeps the keyword arguments of every call and scores 0."""

    __name__ = "recorder"

    def __init__(self) -> None:
        self.calls: list[dict[str, Any]] = []

    def __call__(self, **kwargs: Any) -> list[float]:
        self.calls.append(kwargs)
        return [0.0] * len(kwargs["completions"])


def sources_dataset(n: int = 8) -> datasets.Dataset:
    return datasets.Dataset.from_dict(
        {
            "prompt": [f"What is {i} + {i}? The answer is" for i in range(n)]
            + [f"Spell {w} backwards:" for w in "abcdefgh"[:n]],
            "answer": [str(2 * i) for i in range(n)] + list("abcdefgh"[:n]),
            "source": ["math"] * n + ["words"] * n,
            "level": list(range(2 * n)),
        }
    )


def score_batch(module, examples: list[dict]):
    rollout = HFRollout().generate(module, [ex["prompt"] for ex in examples], module.sampling)
    return rollout, module.score(rollout, examples, module.num_generations)


# ---------------------------------------------------------------- (a) TRL rewards, string prompts


def test_trl_doc_rewards_equal_calling_them_by_hand_on_string_prompts() -> None:
    torch.manual_seed(0)
    recorder = Recorder()
    module = make_module(reward_funcs=[reward_len, format_reward_func, recorder])
    data = FederatedData(dataset=sources_dataset(), num_clients=1, partition="iid", eval_fraction=0.0)
    examples = data.train_examples(0)[:2]
    assert all(isinstance(ex["prompt"], str) for ex in examples)  # no chat template, no system prompt added
    rollout, rewards = score_batch(module, examples)
    texts = rollout.completions
    assert torch.isfinite(rewards).all()
    assert rewards[:, 0].tolist() == [float(r) for r in reward_len(texts)]
    assert rewards[:, 1].tolist() == format_reward_func(texts)
    call = recorder.calls[-1]
    assert call["completions"] == texts and all(isinstance(c, str) for c in call["completions"])
    assert call["prompts"] == [ex["prompt"] for ex in examples for _ in range(module.num_generations)]
    assert call["answer"] == [ex["answer"] for ex in examples for _ in range(module.num_generations)]
    assert {"source", "level", "task"} <= call.keys()  # every dataset column, as a keyword argument
    lengths = rollout.completion_mask.sum(dim=1).tolist()
    assert [len(ids) for ids in call["completion_ids"]] == lengths
    assert all(isinstance(t, int) for ids in call["completion_ids"] for t in ids)
    assert call["trainer_state"] == TrainerState(global_step=0)
    score_batch(module, examples)
    assert recorder.calls[-1]["trainer_state"].global_step == 1  # advances once per scored step
    # the format reward on completions that follow the format
    good = ["<think>a</think><answer>4</answer>", "<answer>4</answer>"]
    got, errors = compute_rewards([format_reward_func, reward_len], ["p", "q"], good, {})
    assert (
        got[:, 0].tolist() == [1.0, 0.0]
        and got[:, 1].tolist() == [-14.0, -2.0]
        and errors
        == {
            "format_reward_func": 0,
            "reward_len": 0,
        }
    )


def test_builtin_rewards_read_both_completion_formats() -> None:
    texts = ["<think>x</think><answer>12</answer>", "Paris", "no"]
    messages = [[{"role": "assistant", "content": t}] for t in texts]
    columns = {"answer": ["12", "Paris", "3"]}
    funcs = [accuracy_reward, format_reward, qa_reward]
    as_text, _ = compute_rewards(funcs, ["p"] * 3, texts, columns)
    as_messages, _ = compute_rewards(funcs, [[{"role": "user", "content": "p"}]] * 3, messages, columns)
    assert torch.equal(as_text.nan_to_num(-1), as_messages.nan_to_num(-1))


def test_evaluate_gives_rewards_the_prompts_format() -> None:
    torch.manual_seed(0)
    recorder = Recorder()
    module = make_module(reward_funcs=[recorder], accuracy_func=reward_len)
    data = FederatedData(dataset=sources_dataset(), num_clients=1, partition="iid", eval_fraction=0.25)
    result = evaluate(module, HFRollout(), data.eval_examples(0), batch_size=2)
    assert math.isfinite(result["reward"]) and result["accuracy"] == 0.0  # reward_len is never >= 1
    call = recorder.calls[-1]
    assert all(isinstance(c, str) for c in call["completions"]) and "completion_ids" in call
    assert call["trainer_state"] == module.trainer_state


# ---------------------------------------------------------------- (b) a Dataset partitioned by a column


def test_dataset_partition_by_column_gives_each_client_one_source() -> None:
    data = FederatedData(dataset=sources_dataset(), num_clients=2, partition_by="source", eval_fraction=0.25)
    owned = []
    for cid in data.client_ids():
        rows = data.train_examples(cid) + data.eval_examples(cid)
        assert len(data.train_examples(cid)) == 6 and len(data.eval_examples(cid)) == 2
        owned.append({ex["source"] for ex in rows})
        assert all(ex["task"] == ex["source"] for ex in rows)
    assert owned == [{"math"}, {"words"}]  # sorted values dealt round-robin
    # iid ignores partition_by; dirichlet deals each value's rows over the clients
    iid = FederatedData(dataset=sources_dataset(), num_clients=2, partition="iid", partition_by="source")
    assert sum(r["n_train"] + r["n_eval"] for r in iid.describe()) == 16
    flat = FederatedData(
        dataset=sources_dataset(), num_clients=2, partition="dirichlet", alpha=1e6, partition_by="source"
    )
    assert all(set(r["task_counts"]) == {"math", "words"} for r in flat.describe())
    with pytest.warns(DeprecationWarning, match="partition_by"):
        old = FederatedData(dataset=sources_dataset(), num_clients=2, task_column="source", eval_fraction=0.25)
    assert old.train_examples(1) == data.train_examples(1)


def test_dataset_dict_uses_its_test_split_as_the_held_out_eval() -> None:
    train = sources_dataset()
    test = datasets.Dataset.from_dict(
        {
            "prompt": ["What is 9 + 9?", "Spell z backwards:"],
            "answer": ["18", "z"],
            "source": ["math", "words"],
            "level": [0, 0],
        }
    )
    data = FederatedData(
        dataset=datasets.DatasetDict({"train": train, "test": test}), num_clients=2, partition_by="source"
    )
    assert [len(data.train_examples(c)) for c in data.client_ids()] == [8, 8]  # all train rows train
    assert [[ex["prompt"] for ex in data.eval_examples(c)] for c in data.client_ids()] == [
        ["What is 9 + 9?"],
        ["Spell z backwards:"],
    ]
    only_train = FederatedData(
        dataset=datasets.DatasetDict({"train": train, "test": test}), dataset_split="train", num_clients=1
    )
    assert len(only_train.eval_examples(0)) == 2  # eval_fraction 0.1 of 16 rows


def test_system_prompt_is_opt_in_for_user_data() -> None:
    ds = sources_dataset(2)
    assert isinstance(FederatedData(dataset=ds, num_clients=1).train_examples(0)[0]["prompt"], str)
    prompt = FederatedData(dataset=ds, num_clients=1, system_prompt="Be brief.").train_examples(0)[0]["prompt"]
    assert [m["role"] for m in prompt] == ["system", "user"] and prompt[0]["content"] == "Be brief."
    rg = FederatedData(train_size=2, eval_size=1, num_clients=1).train_examples(0)[0]["prompt"]
    assert rg[0]["role"] == "system" and "<answer>" in rg[0]["content"]  # reasoning-gym keeps its default


@pytest.mark.parametrize(
    ("kwargs", "pattern"),
    [
        ({"num_clients": 2}, "needs partition_by"),
        ({"partition_by": "nope", "num_clients": 2}, r"missing partition_by column 'nope'"),
        ({"prompt_column": "question"}, r"missing prompt column 'question'"),
        ({"data_files": ["x.jsonl"]}, "not both"),
        ({"dataset_config": "main"}, "Hub dataset name"),
    ],
)
def test_dataset_argument_errors(kwargs: dict, pattern: str) -> None:
    with pytest.raises(ValueError, match=pattern):
        FederatedData(**{"dataset": sources_dataset(2), "num_clients": 1, **kwargs})


def test_prompt_only_dataset_with_answer_column_none() -> None:
    ds = datasets.Dataset.from_dict({"prompt": ["Tell me a joke.", "Write a haiku."]})
    with pytest.raises(ValueError, match="answer_column=None"):
        FederatedData(dataset=ds, num_clients=1)
    train = FederatedData(dataset=ds, num_clients=1, answer_column=None, eval_fraction=0.0).train_examples(0)
    assert sorted(ex["prompt"] for ex in train) == ["Tell me a joke.", "Write a haiku."]
    assert all(ex["answer"] is None and ex["task"] == "dataset" for ex in train)


def test_column_named_like_a_reward_argument_is_refused() -> None:
    ds = datasets.Dataset.from_dict({"prompt": ["a"], "answer": ["1"], "completions": ["x"]})
    with pytest.raises(ValueError, match="completions.*clash"):
        FederatedData(dataset=ds, num_clients=1)


# ---------------------------------------------------------------- (c) a Hub name, offline and not cached


def test_hub_dataset_offline_without_cache_fails_with_one_line_naming_it(monkeypatch, tmp_path: Path) -> None:
    for key in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.setenv(key, "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf" / "datasets"))
    data = FederatedData(dataset="openai/gsm8k", dataset_config="main", num_clients=2, partition="iid")
    with pytest.raises(ValueError) as info:
        data.setup()
    message = str(info.value)
    assert "openai/gsm8k" in message and "\n" not in message and "offline" in message
    assert info.value.__cause__ is None and info.value.__suppress_context__


# ---------------------------------------------------------------- (d) a CSV file


def test_csv_file_partitioned_by_column(tmp_path: Path) -> None:
    path = tmp_path / "rows.csv"
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["prompt", "answer", "source"])
        writer.writerows([f"What is {i} + 1?", i + 1, "math" if i % 2 else "easy"] for i in range(12))
    data = FederatedData(data_files=[str(path)], num_clients=2, partition_by="source", eval_fraction=0.0)
    assert [{ex["source"] for ex in data.train_examples(c)} for c in data.client_ids()] == [{"easy"}, {"math"}]
    ex = data.train_examples(1)[0]
    assert isinstance(ex["prompt"], str) and ex["answer"] == str(int(ex["prompt"].split()[2]) + 1)


# ---------------------------------------------------------------- (e) conversational prompts


def test_conversational_prompts_give_message_list_completions() -> None:
    torch.manual_seed(0)
    recorder = Recorder()
    module = make_module(reward_funcs=[recorder])
    chats = [[{"role": "user", "content": f"What is {i} + 2?"}] for i in range(4)]
    ds = datasets.Dataset.from_dict({"prompt": chats, "answer": [str(i + 2) for i in range(4)]})
    examples = FederatedData(dataset=ds, num_clients=1, eval_fraction=0.0).train_examples(0)[:2]
    assert examples[0]["prompt"] in chats  # used as is
    rollout, _ = score_batch(module, examples)
    completions = recorder.calls[-1]["completions"]
    assert completions == [[{"role": "assistant", "content": text}] for text in rollout.completions]


# ---------------------------------------------------------------- the README example, on the tiny model


def readme_example() -> str:
    """The first Python block of the README's "Bring your own model, data and rewards" section."""
    text = (ROOT / "README.md").read_text()
    assert BYO_HEADING in text, f"no {BYO_HEADING!r} section in README.md"
    return text.split(BYO_HEADING, 1)[1].split("```python\n", 1)[1].split("```", 1)[0]


def test_readme_example_trains_two_clients_two_rounds_by_source(tmp_path: Path) -> None:
    code = readme_example()
    # the only differences from the copy-paste example: the tiny model and the output directory
    for old, new in (
        ('model="embedded"', 'model="tiny-random"'),
        ('output_dir="runs/byo"', f'output_dir="{tmp_path}"'),
    ):
        assert code.count(old) == 1, old
        code = code.replace(old, new)
    torch.manual_seed(0)
    namespace: dict[str, Any] = {"__name__": "readme_example"}
    exec(compile(code, "README example", "exec"), namespace)
    data = namespace["data"]
    assert [{ex["source"] for ex in data.train_examples(c)} for c in data.client_ids()] == [
        {"arithmetic"},
        {"geography"},
    ]
    with (tmp_path / "metrics.csv").open() as f:
        rows = list(csv.DictReader(f))
    rounds = [row for row in rows if row.get("client0/reward") and row.get("client1/reward")]
    assert {int(float(row["round"])) for row in rounds} == {1, 2}
    for row in rounds:
        for cid in (0, 1):
            for name in ("reward", "rewards/reward_len/mean", "rewards/format_reward_func/mean"):
                assert math.isfinite(float(row[f"client{cid}/{name}"])), (cid, name)


def test_trainer_state_gives_rewards_the_round_client_and_run_step(tmp_path: Path) -> None:
    from fedrl_lightning.aggregation import FedAvg
    from fedrl_lightning.trainer import FederatedTrainer

    recorder = Recorder()
    data = FederatedData(dataset=sources_dataset(), partition_by="source", num_clients=2, seed=0)
    module = make_module(reward_funcs=[recorder])
    trainer = FederatedTrainer(
        num_rounds=2,
        local_steps=2,
        aggregation=FedAvg(),
        output_dir=str(tmp_path),
        progress=False,
        eval_before_training=False,
        eval_every=0,
    )
    trainer.fit(module, data)
    training = [c["trainer_state"] for c in recorder.calls if c["trainer_state"].round is not None]
    seen = [(s.round, s.client_id, s.global_step) for s in training]
    # Each client's steps in a round are the run's local steps (round - 1) * 2 + 0 and + 1.
    assert seen == [(r, cid, (r - 1) * 2 + s) for r in (1, 2) for cid in (0, 1) for s in (0, 1)]
