"""FedGRPO: federated advantages, expert scoring, the confidence graph, and reward-only rounds."""

from __future__ import annotations

import json
import math
import struct

import pytest
import torch
import yaml

from conftest import length_reward, make_data
from fedrl_lightning.algorithms.fedgrpo import FedGRPOModule
from fedrl_lightning.algorithms.fedgrpo.advantages import combine_expert_rewards, federated_advantages
from fedrl_lightning.algorithms.fedgrpo.data import FedGRPOData, question_text
from fedrl_lightning.algorithms.fedgrpo.experts import (
    Expert,
    ExpertPool,
    ExpertSpec,
    agreement_reward,
    normalize_answer,
)
from fedrl_lightning.algorithms.fedgrpo.reward import ExpertReward
from fedrl_lightning.algorithms.fedgrpo.selection import (
    ConfidenceSelector,
    OracleByDomainSelector,
    RandomSelector,
    hashed_ngram_embedding,
    knn_domain_posterior,
)
from fedrl_lightning.cli import FedRLCLI
from fedrl_lightning.comm import Channel
from fedrl_lightning.trainer import FederatedTrainer

NAN = float("nan")


def make_server(experts: ExpertReward | None = None, **overrides) -> FedGRPOModule:
    kwargs = dict(
        model="tiny-random",
        lora_r=4,
        lora_alpha=8,
        learning_rate=1e-2,
        experts=experts or ExpertReward(experts_per_question=2, generations_per_expert=2),
        prompts_per_step=2,
        micro_batch_size=4,
        max_completion_length=6,
        num_iterations=2,
        seed=0,
    )
    kwargs.update(overrides)
    return FedGRPOModule(**kwargs)


def make_fedgrpo_data(**overrides) -> FedGRPOData:
    kwargs = dict(experts=make_data(train_size=4, eval_size=0), questions_per_task=4, eval_per_task=1, aux_per_task=4)
    kwargs.update(overrides)
    return FedGRPOData(**kwargs)


# -- pure advantages, against hand-computed values ----------------------------------------------------------------


def test_pooled_advantage_is_reward_minus_mean_of_the_whole_group_without_std():
    # one question, G = 4 = 2 experts x 2: mean = (2 + 0 + 8 + 6) / 4 = 4
    rewards = torch.tensor([2.0, 0.0, 8.0, 6.0])
    adv, std = federated_advantages(rewards, group_size=4, block_size=2, baseline="pooled")
    assert adv.tolist() == [-2.0, -4.0, 4.0, 2.0]
    assert std.shape == (1,)


def test_per_expert_advantage_uses_each_blocks_own_mean():
    # block means 1 and 7: an expert grading on a higher scale no longer lifts its whole block
    rewards = torch.tensor([2.0, 0.0, 8.0, 6.0, 1.0, 1.0, 5.0, 3.0])
    adv, std = federated_advantages(rewards, group_size=4, block_size=2, baseline="per_expert")
    assert adv.tolist() == [1.0, -1.0, 1.0, -1.0, 0.0, 0.0, 1.0, -1.0]
    assert std.shape == (4,)
    pooled, _ = federated_advantages(rewards, group_size=4, block_size=2, baseline="pooled")
    assert pooled[4:].tolist() == [-1.5, -1.5, 2.5, 0.5]  # mean (1 + 1 + 5 + 3) / 4 = 2.5


def test_abstaining_expert_gets_zero_advantage_and_leaves_the_mean():
    adv, _ = federated_advantages(torch.tensor([1.0, NAN, 4.0, 7.0]), 4, 2, "pooled")
    assert adv.tolist() == [-3.0, 0.0, 0.0, 3.0]  # mean of 1, 4, 7 = 4


def test_group_scaled_pooled_advantage():
    adv, _ = federated_advantages(torch.tensor([0.0, 2.0]), 2, 1, "pooled", scale_rewards="group", eps=0.0)
    s = math.sqrt(2.0)  # Bessel std of (0, 2)
    assert adv.tolist() == pytest.approx([-1 / s, 1 / s])


def test_bad_baseline_or_block_is_an_error():
    with pytest.raises(ValueError, match="baseline"):
        federated_advantages(torch.zeros(4), 4, 2, "median")
    with pytest.raises(ValueError, match="block_size"):
        federated_advantages(torch.zeros(6), 6, 4)


def test_replicate_combination_is_the_confidence_weighted_mean_of_the_experts_that_answered():
    rewards = torch.tensor([[[8.0, 0.0, 4.0], [0.0, 2.0, NAN]], [[NAN, 1.0, 1.0], [NAN, 3.0, 5.0]]])
    weights = torch.tensor([[0.75, 0.25], [1.0, 1.0]])
    out = combine_expert_rewards(rewards, weights)
    assert out[0].tolist() == [6.0, 0.5, 4.0]  # 0.75*8 + 0.25*0; 0.25*2; expert 2 abstained on the third
    assert math.isnan(out[1, 0]) and out[1, 1:].tolist() == [2.0, 3.0]


# -- experts --------------------------------------------------------------------------------------------------------


def test_server_rows_carry_no_labels_and_each_expert_holds_only_its_domains():
    data = make_fedgrpo_data()
    data.setup()
    rows = data.train_examples(0)
    assert len(rows) == 8 and all(set(r) == {"prompt", "task"} for r in rows)
    assert all(set(r) == {"prompt"} for r in make_fedgrpo_data(task_metadata=False).train_examples(0))
    assert set(make_fedgrpo_data(reveal_answers=True).train_examples(0)[0]) >= {"answer", "rg_entry"}
    for k, domain in enumerate(["basic_arithmetic", "leg_counting"]):
        assert data.expert_domains(k) == [domain]
        key = data.answer_key(k)
        assert {v["task"] for v in key.values()} == {domain}
        assert {question_text(r["prompt"]) for r in rows if r["task"] == domain} <= set(key)


def test_ground_truth_expert_grades_with_its_labels_and_abstains_on_accuracy_without_them():
    data = make_fedgrpo_data()
    row = next(r for r in data.train_examples(0) if r["task"] == "basic_arithmetic")
    answer = data.answer_key(0)[question_text(row["prompt"])]["answer"]
    owner, stranger = Expert(0, ExpertSpec(), data.answer_key(0)), Expert(1, ExpertSpec(), data.answer_key(1))
    right, wrong = f"<answer>{answer}</answer>", "<answer>banana</answer>"
    assert owner.score(row["prompt"], [right, wrong]) == [8.0, 0.0]  # verifier x 8; the strict format earns 0
    # Without the label the verifier abstains (NaN) and only the format terms remain: 0 for both.
    assert stranger.score(row["prompt"], [right, wrong]) == [0.0, 0.0]
    formatted = "<think>\nhm\n</think>\n<answer>\n1\n</answer>"
    assert stranger.score(row["prompt"], [formatted]) == [2.0]  # format 1 x 1 + tag_count 1 x 1


def test_agreement_reward_compares_normalised_extracted_answers():
    assert normalize_answer(" 12.0. ") == "12" and normalize_answer("1,200") == "1200"
    assert agreement_reward(None, ["<answer>12</answer>", "it is 13", "x"], expert_answer=["12.0", "12", None]) == [
        1.0,
        0.0,
        None,
    ]


def test_model_expert_pays_agreement_with_its_small_models_greedy_answer():
    data = make_fedgrpo_data()
    expert = Expert(0, ExpertSpec(mode="model", model="tiny-random", max_new_tokens=4), {})
    prompt = data.train_examples(0)[0]["prompt"]
    generated = expert._columns([prompt])[0]["expert_answer"]  # the tiny model's greedy answer, extracted
    assert expert._columns([prompt])[0]["expert_answer"] == generated  # cached and greedy
    expert._answers[question_text(prompt)] = "so <answer>7</answer>"
    assert expert.score(prompt, ["<answer>7.0</answer>", "<answer>8</answer>"]) == [8.0, 0.0]


def test_model_expert_loads_a_lora_adapter_trained_elsewhere(tmp_path):
    trained = make_server()
    with torch.no_grad():
        for p in trained.trainable_parameters().values():
            p.add_(0.5)
    trained.save_adapter(tmp_path / "adapter")
    prompt = make_fedgrpo_data().train_examples(0)[0]["prompt"]
    plain = Expert(0, ExpertSpec(mode="model", model="tiny-random", max_new_tokens=6), {})
    tuned = Expert(
        0, ExpertSpec(mode="model", model="tiny-random", adapter=str(tmp_path / "adapter"), max_new_tokens=6), {}
    )
    ids = trained.tokenizer(
        trained.tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True), return_tensors="pt"
    )
    with torch.no_grad():
        expected = trained.model(**ids).logits[0, -1]
        got = tuned._small_model()[0](**ids).logits[0, -1]
        base = plain._small_model()[0](**ids).logits[0, -1]
    assert torch.allclose(got, expected, atol=1e-4) and not torch.allclose(got, base, atol=1e-4)


def test_reward_noise_is_seeded_and_changes_the_returned_floats():
    data = make_fedgrpo_data()
    prompt = data.train_examples(0)[0]["prompt"]

    def returned(sigma: float, seed: int) -> list[float]:
        pool = ExpertPool(noise_sigma=sigma, seed=seed)
        pool.connect(data, Channel())
        return pool.query(0, prompt, ["<answer>1</answer>"] * 3)

    clean = returned(0.0, 0)
    assert returned(1.0, 0) == returned(1.0, 0) != returned(1.0, 1)
    assert all(a != b for a, b in zip(returned(1.0, 0), clean))


def test_pool_counts_text_down_and_four_bytes_per_float_up():
    data, channel = make_fedgrpo_data(), Channel()
    pool = ExpertPool()
    pool.connect(data, channel)
    pool.round_idx = 3
    prompt = data.train_examples(0)[0]["prompt"]
    candidates = ["<answer>1</answer>", "two"]
    pool.query(1, prompt, candidates)
    down = len(json.dumps({"prompt": prompt, "candidates": candidates}, ensure_ascii=False).encode())
    assert channel.ledger() == [
        {"round": 3, "client": 1, "direction": "down", "bytes": down, "tensor_bytes": 0},
        {"round": 3, "client": 1, "direction": "up", "bytes": len(struct.pack("<2f", 0, 0)), "tensor_bytes": 0},
    ]


# -- selection ------------------------------------------------------------------------------------------------------


def _aux(domains_questions: dict[str, list[str]]) -> list[dict]:
    return [
        {"prompt": [{"role": "user", "content": q}], "task": d, "answer": "0"}
        for d, qs in domains_questions.items()
        for q in qs
    ]


def test_confidence_selector_picks_the_client_that_is_expert_in_the_questions_domain():
    aux = _aux(
        {
            "arithmetic": ["What is 3 + 4?", "What is 12 - 5?", "Compute 7 * 8."],
            "legs": ["How many legs do 2 cows and 3 spiders have?", "Count the legs: 4 ducks, 1 cat."],
        }
    )
    # Expert 2 is the only competent client in "legs"; expert 0 is best at arithmetic.
    competence = torch.tensor([[8.0, 0.0], [3.0, 0.5], [1.0, 8.0]])
    owners = {0: ["arithmetic"], 1: ["arithmetic"], 2: ["legs"]}
    labelled = ConfidenceSelector(confidence_weights=True)
    labelled.fit(competence, ["arithmetic", "legs"], aux, owners)
    chosen, weights = labelled.select({"prompt": "anything", "task": "legs"}, 1)
    assert chosen == [2] and weights == [1.0]
    chosen, weights = labelled.select({"prompt": "anything", "task": "arithmetic"}, 2)
    assert chosen == [0, 1] and weights == pytest.approx([8 / 11, 3 / 11])
    # Without a label, the nearest auxiliary questions decide the domain.
    unlabelled = ConfidenceSelector(neighbours=2)
    unlabelled.fit(competence, ["arithmetic", "legs"], aux, owners)
    assert unlabelled.select({"prompt": "How many legs do 5 spiders and 1 cow have?"}, 1)[0] == [2]
    assert unlabelled.select({"prompt": "What is 9 + 2?"}, 1)[0] == [0]


def test_knn_posterior_and_embedding_are_deterministic():
    keys = hashed_ngram_embedding(["aaaa", "bbbb", "aaab"])
    assert torch.allclose(keys.norm(dim=1), torch.ones(3))
    post = knn_domain_posterior(hashed_ngram_embedding(["aaaa"]), keys, torch.tensor([0, 1, 0]), 2, k=2)
    assert post.tolist() == [[1.0, 0.0]]


def test_confidence_ties_break_at_random_but_reproducibly():
    aux = _aux({"a": ["x"], "b": ["y"]})
    picks = []
    for seed in range(8):
        sel = ConfidenceSelector(seed=seed)
        sel.fit(torch.zeros(3, 2), ["a", "b"], aux, {0: [], 1: [], 2: []})
        picks.append(sel.select({"prompt": "x", "task": "a"}, 1)[0][0])
    assert len(set(picks)) > 1


def test_random_and_oracle_selectors():
    owners = {0: ["a"], 1: ["b"], 2: ["b"]}
    rand = RandomSelector(seed=0)
    rand.fit(torch.zeros(3, 2), ["a", "b"], [], owners)
    seen = [tuple(rand.select({"prompt": "q"}, 2)[0]) for _ in range(30)]
    assert all(len(set(s)) == 2 for s in seen) and len(set(seen)) > 1
    oracle = OracleByDomainSelector()
    oracle.fit(torch.zeros(3, 2), ["a", "b"], [], owners)
    assert oracle.select({"prompt": "q", "task": "a"}, 2)[0] == [0, 0]
    assert oracle.select({"prompt": "q", "task": "b"}, 2)[0] == [1, 2]
    with pytest.raises(ValueError, match="task"):
        oracle.select({"prompt": "q"}, 1)


def test_competence_graph_from_real_experts_routes_each_domain_to_its_owner():
    data = make_fedgrpo_data(task_metadata=False)
    data.setup()
    pool = ExpertPool()
    pool.connect(data, Channel())
    competence = pool.competence(data.aux_examples(), data.domains)
    assert competence.tolist() == [[8.0, 0.0], [0.0, 8.0]]  # each expert holds one family's labels
    selector = ConfidenceSelector(neighbours=3)
    selector.fit(competence, data.domains, data.aux_examples(), {0: ["basic_arithmetic"], 1: ["leg_counting"]})
    evals = data.eval_examples(0)
    routed = [selector.select({"prompt": ex["prompt"]}, 1)[0][0] for ex in evals]
    assert routed == [data.domains.index(ex["task"]) for ex in evals]


# -- reward-only rounds ----------------------------------------------------------------------------------------------


def _forbid_tensor_payloads(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a tensor payload crossed the channel in a FedGRPO round")

    monkeypatch.setattr(Channel, "send_down", refuse)
    monkeypatch.setattr(Channel, "send_up", refuse)


@pytest.mark.parametrize("scoring", ["partition", "replicate"])
def test_a_fedgrpo_round_moves_only_text_down_and_floats_up(tmp_path, monkeypatch, scoring):
    torch.manual_seed(0)
    # Per-client specs: a reward that varies even for a random policy, so the step has a signal to follow.
    specs = [ExpertSpec(reward_funcs=[length_reward]), ExpertSpec(reward_funcs=[length_reward], reward_weights=[2.0])]
    reward = ExpertReward(ExpertPool(specs), RandomSelector(seed=0), 2, 2, scoring)
    module = make_server(reward)
    before = {k: v.clone() for k, v in module.trainable_state().items()}
    trainer = FederatedTrainer(
        num_rounds=2,
        aggregation=None,
        eval_before_training=False,
        eval_every=0,
        output_dir=str(tmp_path),
        progress=False,
    )
    _forbid_tensor_payloads(monkeypatch)  # after the trainer's own channel exists: nothing may cross it either
    metrics = trainer.fit(module, make_fedgrpo_data(), ckpt_path=None)
    ledger = reward.channel.ledger()
    assert ledger and all(row["tensor_bytes"] == 0 for row in ledger)
    assert trainer.comm.ledger() == []  # no adapter ever moved
    for r in (0, 1, 2):  # step 0: the confidence graph; steps 1-2 (one per round): scoring
        directions = {row["direction"] for row in ledger if row["round"] == r}
        assert directions == {"down", "up"}, (r, ledger)
    # Up: exactly one float32 per candidate and scoring expert (2 prompts x G = 4; replicate: x M = 2).
    for r in (1, 2):
        up = sum(row["bytes"] for row in ledger if row["round"] == r and row["direction"] == "up")
        assert up == 4 * 2 * 4 * (2 if scoring == "replicate" else 1)
    assert metrics["client0/experts/bytes_up"] == up and metrics["client0/experts/bytes_down"] > 0
    assert {row["client"] for row in ledger} <= {0, 1}
    after = module.trainable_state()
    assert any(not torch.equal(before[k], after[k]) for k in before), "the server's policy did not train"
    record = reward.record()
    assert [s["step"] for s in record["steps"]] == [1, 2]
    assert sum(v for k, v in record["steps"][0]["selections"].items() if "->" not in k) == 2 * 2
    assert sum(v for k, v in metrics.items() if k.startswith("client0/experts/routed/expert")) == 2 * 2


def test_expert_reward_has_trls_signature_and_says_when_it_is_not_connected():
    reward = ExpertReward(experts_per_question=1, generations_per_expert=2)
    with pytest.raises(RuntimeError, match="not connected"):
        reward(prompts=["q", "q"], completions=["a", "b"])
    data = make_fedgrpo_data()
    data.setup()
    reward.connect(data)
    rows = [next(r for r in data.train_examples(0) if r["task"] == t) for t in ("basic_arithmetic", "leg_counting")]
    prompts = [r["prompt"] for r in rows for _ in range(2)]
    answer = data.answer_key(0)[question_text(rows[0]["prompt"])]["answer"]
    # TRL passes string completions for string prompts and message lists for chat prompts: both are graded.
    completions = [f"<answer>{answer}</answer>", [{"role": "assistant", "content": "<answer>banana</answer>"}]] * 2
    out = reward(prompts=prompts, completions=completions, task=[r["task"] for r in rows for _ in range(2)])
    assert len(out) == 4 and all(v is None or isinstance(v, float) for v in out)
    assert out[0] == 8.0 and out[1] == 0.0  # the owner of basic_arithmetic grades with its label
    with pytest.raises(ValueError, match="groups of G = 2"):
        reward(prompts=["q"] * 3, completions=["a"] * 3)
    with pytest.raises(ValueError, match="num_generations"):
        make_server(num_generations=4)


def test_expert_state_resumes_without_rebuilding_the_graph():
    data = make_fedgrpo_data()
    data.setup()
    reward = ExpertReward(experts_per_question=1, generations_per_expert=1, selector=RandomSelector(seed=3))
    reward.connect(data)
    prompts = [r["prompt"] for r in data.train_examples(0)[:4]]
    reward(prompts=prompts, completions=["x"] * 4)
    saved = reward.state_dict()
    again = ExpertReward(experts_per_question=1, generations_per_expert=1, selector=RandomSelector(seed=99))
    again.connect(data)
    again.load_state_dict(saved)
    assert reward(prompts=prompts, completions=["y"] * 4) == again(prompts=prompts, completions=["y"] * 4)
    assert again.channel.ledger() == reward.channel.ledger()  # the graph was not rebuilt (no second step 0)
    assert again.record() == reward.record() and again.step == 2


def _tiny_config(tmp_path, mode: str) -> str:
    spec = {"mode": mode} if mode == "ground_truth" else {"mode": mode, "model": "tiny-random", "max_new_tokens": 4}
    scoring = "partition" if mode == "ground_truth" else "replicate"
    config = {
        "trainer": {
            "num_rounds": 1,
            "aggregation": None,
            "eval_batch_size": 4,
            "output_dir": str(tmp_path / mode),
            "progress": False,
        },
        "model": {
            "class_path": "fedrl_lightning.algorithms.fedgrpo.FedGRPOModule",
            "init_args": {
                "model": "tiny-random",
                "lora_r": 4,
                "lora_alpha": 8,
                "learning_rate": 1e-2,
                "experts": {
                    "class_path": "fedrl_lightning.algorithms.fedgrpo.ExpertReward",
                    "init_args": {
                        "experts_per_question": 2,
                        "generations_per_expert": 2,
                        "scoring": scoring,
                        "selector": {"class_path": "fedrl_lightning.algorithms.fedgrpo.selection.ConfidenceSelector"},
                        "experts": {
                            "class_path": "fedrl_lightning.algorithms.fedgrpo.experts.ExpertPool",
                            "init_args": {"experts": spec, "noise_sigma": 0.1},
                        },
                    },
                },
                "prompts_per_step": 1,
                "micro_batch_size": 4,
                "max_completion_length": 6,
                "num_iterations": 2,
            },
        },
        "data": {
            "class_path": "fedrl_lightning.algorithms.fedgrpo.data.FedGRPOData",
            "init_args": {
                "experts": {
                    "class_path": "fedrl_lightning.data.FederatedData",
                    "init_args": {
                        "tasks": ["basic_arithmetic", "leg_counting"],
                        "num_clients": 2,
                        "train_size": 4,
                        "eval_size": 0,
                    },
                },
                "questions_per_task": 2,
                "eval_per_task": 1,
                "aux_per_task": 2,
            },
        },
    }
    path = tmp_path / f"{mode}.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


@pytest.mark.parametrize("mode", ["ground_truth", "model"])
def test_tiny_cli_run_completes(tmp_path, monkeypatch, mode):
    _forbid_tensor_payloads(monkeypatch)
    FedRLCLI(args=["fit", "-c", _tiny_config(tmp_path, mode)])
    out = tmp_path / mode
    assert (out / "metrics.csv").is_file()
    assert (out / "adapters" / "client0").is_dir()
    text = (out / "metrics.csv").read_text()
    assert "experts/bytes_up" in text and "eval/accuracy_mean" in text
