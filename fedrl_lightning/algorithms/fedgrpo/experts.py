"""FedGRPO expert clients: score the server's candidate answers with private means and return only floats.

An expert receives a question and candidate answers as text and returns one float per candidate. In
``ground_truth`` mode it grades with its own reward functions against the labels it holds (default: the task's
verifier, ``format_reward`` and ``tag_count_reward`` weighted 8/1/1, as FedGRPO's ``accuracy format tag_count``);
without a label for the question its accuracy term abstains. In ``model`` mode it has no labels: its own small
model answers the question greedily and ``agreement_reward`` pays candidates whose extracted answer equals that
answer (default weights 8/1 with ``format_reward``, as FedGRPO's ``model_reward format``).

``ExpertPool`` is the wire: every message is serialized (JSON text down, little-endian float32 up) and its bytes
are recorded in ``ExpertReward``'s ``Channel`` under (round, expert id, direction); the expert works on the
deserialized copy. No tensor crosses in either direction.
"""

from __future__ import annotations

import json
import math
import re
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch

from fedrl_lightning.algorithms.fedgrpo.data import Example, FedGRPOData, question_text
from fedrl_lightning.comm import Channel
from fedrl_lightning.losses import weighted_reward_sum
from fedrl_lightning.models import load_causal_lm
from fedrl_lightning.rewards import compute_rewards, format_reward, reasoning_gym_reward, tag_count_reward
from fedrl_lightning.rewards._text import completion_text, extract_answer
from fedrl_lightning.rollout.hf import encode_prompts

RewardFunc = Callable[..., list]
_NUMERIC = re.compile(r"^-?\d+(?:\.\d+)?$")


def normalize_answer(text: str | None) -> str | None:
    """A comparable form of an extracted answer: trimmed, lower-case, no trailing period, numbers canonical."""
    if text is None:
        return None
    text = text.strip().strip("$").rstrip(".").strip().lower().replace(",", "")
    if _NUMERIC.match(text):
        value = float(text)
        return str(int(value)) if value.is_integer() else repr(value)
    return text or None


def agreement_reward(
    prompts: list[Any], completions: list[Any], expert_answer: list[str | None] | None = None, **kwargs: Any
) -> list[float | None]:
    """1.0 if a completion's extracted answer equals the expert model's answer, else 0.0 (None without one).

    Example:
        >>> agreement_reward(None, ["so <answer>12</answer>", "it is 13"], expert_answer=["12.0", "12"])
        [1.0, 0.0]
    """
    if expert_answer is None:
        return [None] * len(completions)
    out: list[float | None] = []
    for completion, reference in zip(completions, expert_answer, strict=True):
        ref = normalize_answer(reference)
        if ref is None:
            out.append(None)
            continue
        out.append(float(normalize_answer(extract_answer(completion_text(completion))) == ref))
    return out


@dataclass
class ExpertSpec:
    """How one expert client scores candidates.

    Attributes:
        mode: ``ground_truth`` (its labels and reward functions) or ``model`` (agreement with its small model).
        reward_funcs: reward functions (dotted paths in YAML); None = the mode's default.
        reward_weights: one weight per function; None = 8/1/1 (ground truth) or 8/1 (model).
        model: ``model`` mode: ``embedded``, ``tiny-random`` or a local model path (loaded offline).
        adapter: ``model`` mode: a LoRA adapter directory trained on the expert's data (e.g. ``adapters/client<k>``
            of a local-only ``fedrl fit`` run), loaded on top of ``model``; None = the plain model.
        max_new_tokens: ``model`` mode: tokens of the small model's greedy answer.
    """

    mode: Literal["ground_truth", "model"] = "ground_truth"
    reward_funcs: list[RewardFunc] | None = None
    reward_weights: list[float] | None = None
    model: str | None = None
    adapter: str | None = None
    max_new_tokens: int = 64

    def resolved(self) -> tuple[list[RewardFunc], torch.Tensor]:
        """The reward functions and weights this spec scores with."""
        if self.mode not in ("ground_truth", "model"):
            raise ValueError(f"expert mode must be 'ground_truth' or 'model', got {self.mode!r}")
        if self.mode == "model" and not self.model:
            raise ValueError("an expert in 'model' mode needs model: (embedded, tiny-random or a local path)")
        if self.reward_funcs:
            funcs = list(self.reward_funcs)
        elif self.mode == "ground_truth":
            funcs = [reasoning_gym_reward, format_reward, tag_count_reward]
        else:
            funcs = [agreement_reward, format_reward]
        default = [8.0, 1.0, 1.0] if self.mode == "ground_truth" else [8.0, 1.0]
        weights = self.reward_weights or (default if len(default) == len(funcs) else [1.0] * len(funcs))
        if len(weights) != len(funcs):
            raise ValueError(f"expert reward_weights has {len(weights)} entries for {len(funcs)} reward_funcs")
        return funcs, torch.tensor(weights, dtype=torch.float32)


class Expert:
    """One expert client: its reward spec, the labels it holds, and (``model`` mode) its small model.

    Args:
        expert_id: the client id.
        spec: how it scores.
        answer_key: question text -> ``{"answer", "rg_entry", "task"}`` it holds (``ground_truth`` mode).
        models: a shared cache of loaded small models, keyed by (model, adapter).
    """

    def __init__(
        self, expert_id: int, spec: ExpertSpec, answer_key: dict[str, Example], models: dict | None = None
    ) -> None:
        self.expert_id, self.spec = expert_id, spec
        self.reward_funcs, self.reward_weights = spec.resolved()
        self.answer_key = answer_key
        self._models = models if models is not None else {}
        self._answers: dict[str, str] = {}

    def score(self, prompt: Any, candidates: list[str]) -> list[float]:
        """One reward per candidate for the question in ``prompt``; NaN where no reward function applies."""
        n = len(candidates)
        row = self._columns([prompt])[0]
        columns = {k: [v] * n for k, v in row.items()}
        completions = [[{"role": "assistant", "content": c}] for c in candidates]
        per_func, _ = compute_rewards(self.reward_funcs, [prompt] * n, completions, columns)
        return weighted_reward_sum(per_func, self.reward_weights).tolist()

    def competence(self, aux: list[Example], domains: list[str]) -> list[float]:
        """Per domain: how well this expert tells a right answer from a wrong one on the auxiliary questions.

        [RECONSTRUCTION] For each auxiliary question the expert scores two candidates, the reference answer and the
        reference answer of another question of the same domain (a wrong answer), and reports
        ``max(0, mean reward(right) - mean reward(wrong))`` per domain. An expert holding the domain's labels
        scores the accuracy weight (8 by default); one without them 0; a small model scores in proportion to its
        accuracy.
        """
        self._columns([ex["prompt"] for ex in aux])  # batch the small model's answers
        out = []
        for domain in domains:
            rows = [ex for ex in aux if ex["task"] == domain]
            right, wrong = [], []
            for i, ex in enumerate(rows):
                others = [o["answer"] for o in rows[i + 1 :] + rows[:i] if o["answer"] != ex["answer"]]
                cands = [f"<answer>{ex['answer']}</answer>"] + ([f"<answer>{others[0]}</answer>"] if others else [])
                scores = [0.0 if math.isnan(s) else s for s in self.score(ex["prompt"], cands)]
                right.append(scores[0])
                wrong += scores[1:]
            mean = lambda xs: sum(xs) / len(xs) if xs else 0.0  # noqa: E731
            out.append(max(0.0, mean(right) - mean(wrong)))
        return out

    # -- private means ------------------------------------------------------------------------------------------

    def _columns(self, prompts: list[Any]) -> list[dict[str, Any]]:
        """The reward-function columns this expert brings to each question (its label, or its model's answer)."""
        if self.spec.mode == "ground_truth":
            empty = {"answer": None, "rg_entry": None, "task": None}
            return [self.answer_key.get(question_text(p), empty) for p in prompts]
        missing = list(dict.fromkeys(question_text(p) for p in prompts if question_text(p) not in self._answers))
        if missing:
            todo = {question_text(p): p for p in prompts}
            self._answers.update(zip(missing, self._generate([todo[q] for q in missing])))
        return [{"expert_answer": extract_answer(self._answers[question_text(p)])} for p in prompts]

    @torch.no_grad()
    def _generate(self, prompts: list[Any], batch_size: int = 16) -> list[str]:
        model, tokenizer = self._small_model()
        texts: list[str] = []
        for start in range(0, len(prompts), batch_size):
            enc = encode_prompts(tokenizer, prompts[start : start + batch_size])
            out = model.generate(
                **enc,
                max_new_tokens=self.spec.max_new_tokens,
                do_sample=False,
                temperature=None,
                top_p=None,
                top_k=None,
                pad_token_id=tokenizer.pad_token_id,
            )
            texts += tokenizer.batch_decode(out[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
        return texts

    def _small_model(self) -> tuple[Any, Any]:
        key = (self.spec.model, self.spec.adapter)
        if key not in self._models:
            model, tokenizer = load_causal_lm(self.spec.model)
            if self.spec.adapter:
                from peft import PeftModel

                model = PeftModel.from_pretrained(model, self.spec.adapter).merge_and_unload()
            self._models[key] = (model.eval(), tokenizer)
        return self._models[key]


class ExpertPool:
    """The expert clients and the wire to them: text down, float32 up, every byte in the channel's ledger.

    Args:
        experts: one spec per expert client, or a single spec for all of them; None = ``ground_truth`` defaults.
        noise_sigma: [CHOICE] privacy option: each expert adds Gaussian noise N(0, sigma^2) to every reward it
            returns (its own seeded generator); 0 disables it. No accountant is attached: sigma is relative to the
            reward scale (8/1/1 gives rewards in [0, 10]).
        seed: seed of the experts' noise generators.
    """

    def __init__(self, experts: list[ExpertSpec] | ExpertSpec | None = None, noise_sigma: float = 0.0, seed: int = 0):
        if noise_sigma < 0:
            raise ValueError(f"noise_sigma must be >= 0, got {noise_sigma}")
        self.specs = experts
        self.noise_sigma, self.seed = noise_sigma, seed
        self.experts: dict[int, Expert] = {}
        self.channel: Channel | None = None
        self.round_idx = 0
        self._noise: dict[int, torch.Generator] = {}

    def connect(self, data: FedGRPOData, channel: Channel) -> None:
        """Set up one ``Expert`` per expert client of ``data`` with its own labels; count bytes in ``channel``."""
        ids = data.expert_ids()
        specs = self.specs if isinstance(self.specs, list) else [self.specs or ExpertSpec()] * len(ids)
        if len(specs) != len(ids):
            raise ValueError(
                f"{len(specs)} expert specs for {len(ids)} expert clients: give one spec or one per client"
            )
        models: dict = {}
        self.experts = {k: Expert(k, spec, data.answer_key(k), models) for k, spec in zip(ids, specs)}
        self._noise = {k: torch.Generator().manual_seed(self.seed * 1_000_003 + k) for k in ids}
        self.channel = channel

    def expert_ids(self) -> list[int]:
        return sorted(self.experts)

    def query(self, expert_id: int, prompt: Any, candidates: list[str]) -> list[float]:
        """Send a question and candidates to one expert; returns its rewards as they arrive at the server."""
        message = self._down(expert_id, {"prompt": prompt, "candidates": candidates})
        rewards = self.experts[expert_id].score(message["prompt"], message["candidates"])
        return self._up(expert_id, self._noisy(expert_id, rewards))

    def competence(self, aux: list[Example], domains: list[str]) -> torch.Tensor:
        """(K, D) competence table: the auxiliary set goes down once, each expert returns D floats."""
        rows = []
        for k in self.expert_ids():
            message = self._down(k, {"aux": aux, "domains": domains})
            rows.append(self._up(k, self.experts[k].competence(message["aux"], message["domains"])))
        return torch.tensor(rows, dtype=torch.float32)

    def _noisy(self, expert_id: int, rewards: list[float]) -> list[float]:
        if self.noise_sigma == 0:
            return rewards
        noise = torch.randn(len(rewards), generator=self._noise[expert_id]) * self.noise_sigma
        return [r + float(e) for r, e in zip(rewards, noise)]

    def _down(self, expert_id: int, message: dict[str, Any]) -> dict[str, Any]:
        blob = json.dumps(message, ensure_ascii=False).encode("utf-8")
        self._record(expert_id, "down", len(blob))
        return json.loads(blob)

    def _up(self, expert_id: int, values: list[float]) -> list[float]:
        blob = struct.pack(f"<{len(values)}f", *values)
        self._record(expert_id, "up", len(blob))
        return list(struct.unpack(f"<{len(values)}f", blob))

    def _record(self, expert_id: int, direction: Literal["down", "up"], num_bytes: int) -> None:
        if self.channel is None:
            raise RuntimeError("ExpertPool is not connected: ExpertReward.connect connects it")
        self.channel.record(self.round_idx, expert_id, direction, num_bytes)
