"""Tests for fedrl_lightning.rewards with the real math-verify and reasoning-gym verifiers."""

from __future__ import annotations

import functools
import logging
import math
import threading
from typing import Any

import pytest
import reasoning_gym
import torch

from fedrl_lightning.rewards import (
    accuracy_reward,
    answer_tag_reward,
    completion_text,
    compute_rewards,
    extract_answer,
    format_reward,
    len_reward,
    qa_exact_match,
    qa_reward,
    reasoning_gym_reward,
    reward_func_name,
    tag_count_reward,
)


def conv(text: str) -> list[dict[str, str]]:
    return [{"role": "assistant", "content": text}]


# --- text helpers -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("completion", "expected"),
    [
        ("plain", "plain"),
        (conv("hello"), "hello"),
        ([{"role": "assistant", "content": [{"type": "text", "text": "parts"}]}], "parts"),
        (None, ""),
    ],
)
def test_completion_text(completion: Any, expected: str) -> None:
    assert completion_text(completion) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("<think>7 or 8?</think><answer> 8 </answer>", "8"),
        ("<answer>1</answer> no, <answer>2</answer>", "2"),
        ("<answer>  </answer> so 5", "5"),  # blank tag is ignored
        ("The answer is 12.", "12"),
        ("It drops to -7 degrees", "-7"),
        ("x = −3", "-3"),  # unicode minus
        ("pages 3-4", "4"),  # a hyphen is not a minus sign
        ("roughly 3.25 m", "3.25"),
        ("a total of 1,234,567 people", "1234567"),
        ("There were 1,234, I think", "1234"),
        ("She ate 3/4 of the pie", "3/4"),
        ("half is $\\frac{1}{2}$.", "1/2"),
        ("minus $-\\dfrac{3}{4}$", "-3/4"),
        ("hence \\boxed{\\frac{3}{4}}", "\\frac{3}{4}"),
        ("no digits here\nfinal line  \n\n", "final line"),
        ("   \n ", None),
        ("", None),
    ],
)
def test_extract_answer(text: str, expected: str | None) -> None:
    assert extract_answer(text) == expected


# --- math accuracy -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("completion", "reference", "expected"),
    [
        ("The answer is 12", "12", 1.0),
        ("<answer>12</answer>", "12", 1.0),
        ("<think>6+6</think><answer>$12$</answer>", "12", 1.0),
        ("so \\boxed{12}", "12", 1.0),
        ("The answer is 13", "12", 0.0),
        ("I don't know", "12", 0.0),
        ("", "12", 0.0),
        ("<answer>0.75</answer>", "\\frac{3}{4}", 1.0),
        ("<answer>3/4</answer>", "0.75", 1.0),
        ("so it is $\\frac{1}{2}$.", "0.5", 1.0),
        ("<answer>2\\sqrt{2}</answer>", "\\sqrt{8}", 1.0),
        ("<answer>2</answer>", "2\\sqrt{2}", 0.0),
        ("it costs 1,234 dollars", "1234", 1.0),
        ("<answer>x+1</answer>", "1+x", 1.0),
        (conv("The answer is 12"), "12", 1.0),
        (conv("The answer is 11"), "12", 0.0),
        ("The answer is 12", "not a math answer", None),
        ("<answer>Paris</answer>", "Paris", None),
        ("The answer is 12", None, None),
        ("The answer is 12", ["11", "12"], 1.0),
        ("The answer is 12", ["Paris", "London"], None),
    ],
)
def test_accuracy_reward(completion: Any, reference: Any, expected: float | None) -> None:
    assert accuracy_reward(["q"], [completion], answer=[reference], task=["math"]) == [expected]


def test_accuracy_reward_off_main_thread() -> None:
    # math-verify's default SIGALRM timeout raises outside the main thread; the reward must disable it there.
    result: dict[str, Any] = {}

    def work() -> None:
        try:
            result["value"] = accuracy_reward(None, ["The answer is 12", "<answer>3</answer>"], answer=["12", "12"])
        except Exception as exc:  # surfaced through the assertion below
            result["error"] = exc

    thread = threading.Thread(target=work)
    thread.start()
    thread.join(timeout=30)
    assert "error" not in result, result.get("error")
    assert result["value"] == [1.0, 0.0]


# --- format rewards --------------------------------------------------------------------------------------------

STRICT = "<think>\nreasoning\n</think>\n<answer>\n12\n</answer>"


@pytest.mark.parametrize(
    ("completion", "fmt", "tags", "answer_tag"),
    [
        (STRICT, 1.0, 1.0, 1.0),
        (conv(STRICT), 1.0, 1.0, 1.0),
        ("  <think>a\nb</think>  <answer>12</answer>\n", 1.0, 0.0, 1.0),
        ("<think>\nreasoning\n</think>\nno answer tags", 0.0, 0.5, 0.0),
        ("preamble <think>x</think><answer>1</answer>", 0.0, 0.0, 1.0),
        ("<think>x</think><answer>1</answer> trailing", 0.0, 0.0, 1.0),
        ("just 12", 0.0, 0.0, 0.0),
        ("<answer> </answer>", 0.0, 0.0, 0.0),
        ("<answer>1</answer><answer>2</answer>", 0.0, 0.0, 0.0),
        ("<think>\n<think>\nx\n</think>\n<answer>\n1\n</answer>", 1.0, 0.75, 1.0),
    ],
)
def test_format_rewards(completion: Any, fmt: float, tags: float, answer_tag: float) -> None:
    assert format_reward(["q"], [completion]) == [fmt]
    assert tag_count_reward(["q"], [completion]) == [tags]
    assert answer_tag_reward(["q"], [completion]) == [answer_tag]


def test_len_reward_hand_computed() -> None:
    completions = [
        "13",  # len 2, wrong: lambda = 0.5 -> min(0, 0.5) = 0
        "It is 12",  # len 8, right: lambda = 0.5 - 6/20 = 0.2
        "Well, I guess it is 12",  # len 22, right: lambda = 0.5 - 20/20 = -0.5
    ]
    assert [len(c) for c in completions] == [2, 8, 22]
    rewards = len_reward(None, [conv(c) for c in completions], answer=["12"] * 3)
    assert rewards == pytest.approx([0.0, 0.2, -0.5])


def test_len_reward_edge_cases() -> None:
    assert len_reward(None, ["12", "13"], answer=["12", "12"]) == [0.0, 0.0]  # equal lengths
    assert len_reward(None, ["12", "long wrong 13"], answer=["words", "12"]) == [None, -0.5]
    assert len_reward(None, [], answer=[]) == []


# --- QA ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("completion", "reference", "em", "f1"),
    [
        ("<answer>The Beatles!</answer>", "beatles", 1.0, 1.0),
        ("beatles", ["Rolling Stones", "the  Beatles"], 1.0, 1.0),
        ("<answer>Paris, France</answer>", "Paris", 0.0, 2 / 3),  # P = 1/2, R = 1
        ("the cat sat", ["a cat", "dog"], 0.0, 2 / 3),  # best reference "cat": P = 1/2, R = 1
        ("<answer>new york city</answer>", "York", 0.0, 0.5),  # P = 1/3, R = 1
        ("Lyon", "Paris", 0.0, 0.0),
        (conv("<think>hmm</think><answer>an apple</answer>"), "Apple", 1.0, 1.0),
        ("anything", None, None, None),
        ("anything", [], None, None),
    ],
)
def test_qa_rewards(completion: Any, reference: Any, em: float | None, f1: float | None) -> None:
    assert qa_exact_match(None, [completion], answer=[reference]) == [em]
    assert qa_reward(None, [completion], answer=[reference]) == [pytest.approx(f1) if f1 is not None else None]


# --- reasoning-gym -----------------------------------------------------------------------------------------------


def test_reasoning_gym_basic_arithmetic() -> None:
    entries = list(reasoning_gym.create_dataset("basic_arithmetic", size=3, seed=0))
    right = [f"<think>compute</think><answer>{e['answer']}</answer>" for e in entries]
    assert reasoning_gym_reward(None, right, rg_entry=entries) == [1.0, 1.0, 1.0]
    untagged = [conv(f"Computing step by step, the result is {e['answer']}.") for e in entries]
    assert reasoning_gym_reward(None, untagged, rg_entry=entries) == [1.0, 1.0, 1.0]
    wrong = [f"<answer>{int(e['answer']) + 1}</answer>" for e in entries]
    assert all(r < 1.0 for r in reasoning_gym_reward(None, wrong, rg_entry=entries))


def test_reasoning_gym_spell_backward() -> None:
    entry = reasoning_gym.create_dataset("spell_backward", size=1, seed=0)[0]
    word = entry["answer"]
    completions = [
        f"<answer>{word}</answer>",
        f"Reading the letters from the end, the word is {word}.",  # last word, not a number
        f"Step 1: reverse\n{word}",  # last line
        "<answer>sun</answer>",
        None,
    ]
    rewards = reasoning_gym_reward(None, completions, rg_entry=[entry, entry, entry, entry, None])
    assert rewards[:3] == [1.0, 1.0, 1.0]
    assert rewards[3] < 1.0
    assert rewards[4] is None


@pytest.mark.parametrize(
    "task",
    ["basic_arithmetic", "leg_counting", "letter_counting", "spell_backward", "gsm_symbolic", "chain_sum", "countdown"],
)
def test_reasoning_gym_tasks(task: str) -> None:
    entry = reasoning_gym.create_dataset(task, size=1, seed=1)[0]
    rewards = reasoning_gym_reward(
        None, [f"<answer>{entry['answer']}</answer>", "<answer>zzz</answer>"], rg_entry=[entry, entry]
    )
    assert rewards[0] == 1.0
    assert rewards[1] < 1.0


# --- compute_rewards ---------------------------------------------------------------------------------------------


def fails_on_boom(prompts: list, completions: list, **kwargs: Any) -> list[float | None]:
    if any(completion_text(c) == "boom" for c in completions):
        raise RuntimeError("boom")
    return [1.0] * len(completions)


def wrong_length(prompts: list, completions: list, **kwargs: Any) -> list[float | None]:
    return [1.0]


class CallableReward:
    def __call__(self, prompts: list, completions: list, **kwargs: Any) -> list[float | None]:
        return [0.5] * len(completions)


def test_compute_rewards_values_and_nan() -> None:
    completions = [conv("<answer>12</answer>"), conv("The answer is 3")]
    columns = {"answer": ["12", "not math"], "task": ["math", "math"], "unused": [1, 2]}
    rewards, errors = compute_rewards([accuracy_reward, answer_tag_reward], ["q1", "q2"], completions, columns)
    assert rewards.shape == (2, 2) and rewards.dtype == torch.float32
    assert rewards[0].tolist() == [1.0, 1.0]
    assert math.isnan(rewards[1, 0].item()) and rewards[1, 1].item() == 0.0
    assert errors == {"accuracy_reward": 0, "answer_tag_reward": 0}


def test_compute_rewards_isolates_failing_sample(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="fedrl_lightning.rewards"):
        rewards, errors = compute_rewards([fails_on_boom, CallableReward()], ["a", "b", "c"], ["ok", "boom", "ok"], {})
    assert errors == {"fails_on_boom": 1, "CallableReward": 0}
    assert rewards[:, 0].isnan().tolist() == [False, True, False]
    assert rewards[[0, 2], 0].tolist() == [1.0, 1.0]
    assert rewards[:, 1].tolist() == [0.5, 0.5, 0.5]
    assert any("fails_on_boom" in r.getMessage() and r.levelno == logging.WARNING for r in caplog.records)


def test_compute_rewards_wrong_length_raises() -> None:
    with pytest.raises(ValueError, match="wrong_length"):
        compute_rewards([wrong_length], ["a", "b"], ["x", "y"], {})
    with pytest.raises(ValueError, match="column 'answer'"):
        compute_rewards([accuracy_reward], ["a", "b"], ["x", "y"], {"answer": ["1"]})


def test_compute_rewards_empty_batch() -> None:
    rewards, errors = compute_rewards([format_reward], [], [], {})
    assert rewards.shape == (0, 1)
    assert errors == {"format_reward": 0}


def test_reward_func_name() -> None:
    assert reward_func_name(accuracy_reward) == "accuracy_reward"
    assert reward_func_name(functools.partial(qa_reward, answer=["x"])) == "qa_reward"
    assert reward_func_name(CallableReward()) == "CallableReward"


def test_scaled_reward_multiplies_by_each_rows_scale_column():
    from fedrl_lightning.data import FederatedData
    from fedrl_lightning.rewards import ScaledReward, reward_func_name

    def base(prompts, completions, **kw):
        return [1.0, None, 0.5]

    scaled = ScaledReward(base)
    assert reward_func_name(scaled) == "scaled_base"
    assert scaled([None] * 3, ["a", "b", "c"], reward_scale=[10.0, 10.0, None]) == [10.0, None, 0.5]
    assert scaled([None] * 3, ["a", "b", "c"]) == [1.0, None, 0.5]  # no column: unscaled
    data = FederatedData(
        tasks=["basic_arithmetic"], num_clients=2, train_size=2, eval_size=1, client_columns={1: {"reward_scale": 10.0}}
    )
    assert all(ex["reward_scale"] == 10.0 for ex in data.train_examples(1) + data.eval_examples(1))
    assert all("reward_scale" not in ex for ex in data.train_examples(0))
    with pytest.raises(ValueError, match="client_columns"):
        FederatedData(tasks=["basic_arithmetic"], num_clients=2, client_columns={2: {"reward_scale": 1.0}})
    with pytest.raises(ValueError, match="reserved"):
        FederatedData(tasks=["basic_arithmetic"], num_clients=2, client_columns={0: {"answer": "x"}})


def _sleepy_reward(prompts, completions, **kwargs):
    import time

    time.sleep(60)
    return [1.0] * len(completions)


def _picky_reward(prompts, completions, **kwargs):
    if len(completions) > 1:
        raise RuntimeError("one at a time")
    return [float(len(completions[0]))]


def test_reward_timeout_is_enforced_while_the_call_runs_and_fails_only_its_samples():
    import time

    start = time.monotonic()
    rewards, errors = compute_rewards([_sleepy_reward, _picky_reward], ["p"] * 3, ["a", "bb", "ccc"], {}, timeout=1.0)
    elapsed = time.monotonic() - start
    assert elapsed < 1.0 + 2.0 + 3 * 1.0, elapsed  # the sleeper's 1 s limit, the picky one's per-sample retries
    assert torch.isnan(rewards[:, 0]).all() and errors["_sleepy_reward"] == 3
    assert rewards[:, 1].tolist() == [1.0, 2.0, 3.0] and errors["_picky_reward"] == 0  # retried per sample, in time
    start = time.monotonic()
    compute_rewards([_sleepy_reward], ["p"], ["a"], {}, timeout=0.5)
    assert time.monotonic() - start < 0.5 + 2.0
