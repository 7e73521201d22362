"""FedGRPO's training reward: a reward function with TRL's signature whose grades are bought from expert clients.

``ExpertReward(prompts, completions, task=None, **kwargs) -> list[float | None]`` is called like any TRL reward on
a batch of groups (each prompt repeated G = g x M times, contiguously). For each question the selector picks M
experts; in ``partition`` scoring expert b grades its own block of g candidates (the released code), in ``replicate``
every selected expert grades all G and their floats are combined by the selector's confidence weights [CHOICE].
Only question text goes down and float32 rewards come up (``ExpertPool``); the bytes are counted in the reward's own
``channel``, under the server step that bought them (step 0: the confidence graph, built on the first call).

It holds no reference to the trainer: ``connect(data)`` hands it the experts' side of ``FedGRPOData`` (the module
calls it once the data is set up), and its state (competence table, routing counts, ledger, selector RNG) is part of
the server's client state, so a resumed run neither rebuilds the graph nor repeats a selection.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import Tensor

from fedrl_lightning.algorithms.fedgrpo.advantages import SCORINGS, combine_expert_rewards
from fedrl_lightning.algorithms.fedgrpo.data import Example, FedGRPOData
from fedrl_lightning.algorithms.fedgrpo.experts import ExpertPool
from fedrl_lightning.algorithms.fedgrpo.selection import ConfidenceSelector, ExpertSelector
from fedrl_lightning.comm import Channel
from fedrl_lightning.rewards._text import completion_text


class ExpertReward:
    """Rewards from the M experts each question is routed to.

    Args:
        experts: the expert pool (specs per client, reward noise).
        selector: ``ConfidenceSelector`` (default), ``RandomSelector`` or ``OracleByDomainSelector``.
        experts_per_question: M.
        generations_per_expert: g; a question's group is G = g x M candidates.
        scoring: ``partition`` or ``replicate``.
    """

    __name__ = "expert_reward"  # the name TRL and ``compute_rewards`` log a reward function under

    def __init__(
        self,
        experts: ExpertPool | None = None,
        selector: ExpertSelector | None = None,
        experts_per_question: int = 2,
        generations_per_expert: int = 4,
        scoring: Literal["partition", "replicate"] = "partition",
    ) -> None:
        if experts_per_question < 1 or generations_per_expert < 1:
            raise ValueError(
                f"experts_per_question and generations_per_expert must be >= 1, got "
                f"{experts_per_question} and {generations_per_expert}"
            )
        if scoring not in SCORINGS:
            raise ValueError(f"scoring must be one of {SCORINGS}, got {scoring!r}")
        self.pool, self.selector = experts or ExpertPool(), selector or ConfidenceSelector()
        self.experts_per_question, self.generations_per_expert, self.scoring = (
            experts_per_question,
            generations_per_expert,
            scoring,
        )
        self.channel = Channel()
        self.data: FedGRPOData | None = None
        self.competence: Tensor | None = None
        self._fitted_on: Tensor | None = None
        self.step = 0  # server steps scored so far
        self.routing: dict[int, dict[str, int]] = {}  # step -> "expert<k>" / "<task>->expert<k>" -> questions

    @property
    def group_size(self) -> int:
        """G = g x M: the candidates per question."""
        return self.generations_per_expert * self.experts_per_question

    def connect(self, data: FedGRPOData) -> None:
        """Reach the experts of ``data`` (each with its own labels); the graph is built on the first call."""
        if not isinstance(data, FedGRPOData):
            raise TypeError(f"ExpertReward needs FedGRPOData as the data module, got {type(data).__name__}")
        self.data = data
        self.pool.connect(data, self.channel)

    def __call__(
        self, prompts: list[Any], completions: list[Any], task: list[str | None] | None = None, **kwargs: Any
    ) -> list[float | None]:
        """One reward per completion (None where no selected expert could grade it)."""
        if self.data is None:
            raise RuntimeError("ExpertReward is not connected to FedGRPOData (FedGRPOModule.setup_data connects it)")
        g, m = self.generations_per_expert, self.experts_per_question
        big_g = g * m
        if len(completions) % big_g or len(prompts) != len(completions):
            raise ValueError(
                f"ExpertReward scores groups of G = {big_g} completions per prompt; got {len(prompts)} prompts and "
                f"{len(completions)} completions"
            )
        self._build_graph()
        self.step += 1
        self.pool.round_idx = self.step
        counts = self.routing.setdefault(self.step, {})
        out: list[float] = []
        for start in range(0, len(completions), big_g):
            example: Example = {"prompt": prompts[start], "task": task[start] if task is not None else None}
            candidates = [completion_text(c) for c in completions[start : start + big_g]]
            chosen, weights = self.selector.select(example, m)
            for k in chosen:
                counts[f"expert{k}"] = counts.get(f"expert{k}", 0) + 1
                if example["task"] is not None:
                    key = f"{example['task']}->expert{k}"
                    counts[key] = counts.get(key, 0) + 1
            if self.scoring == "partition":
                for b, k in enumerate(chosen):
                    out += self.pool.query(k, example["prompt"], candidates[b * g : (b + 1) * g])
            else:
                per_expert = torch.tensor([self.pool.query(k, example["prompt"], candidates) for k in chosen])
                out += combine_expert_rewards(per_expert[None], torch.tensor([weights]))[0].tolist()
        return [None if v != v else float(v) for v in out]  # NaN (an abstaining expert) -> None, as TRL expects

    def _build_graph(self) -> None:
        """The confidence graph, once per run: the auxiliary set down, K x D competence floats up (step 0)."""
        assert self.data is not None
        owners = {k: self.data.expert_domains(k) for k in self.data.expert_ids()}
        if self.competence is None:
            self.pool.round_idx = 0
            self.competence = self.pool.competence(self.data.aux_examples(), self.data.domains)
        if self._fitted_on is not self.competence:  # a restored table refits the selector once
            self.selector.fit(self.competence, self.data.domains, self.data.aux_examples(), owners)
            self._fitted_on = self.competence

    def bytes_at(self, step: int) -> dict[str, int]:
        """Bytes down and up on the expert wire at one server step."""
        return self.channel.totals(step)

    def record(self) -> dict[str, Any]:
        """The domains, the competence table and the routing per step (what ``benchmarks/fedgrpo.py`` reports)."""
        return {
            "domains": self.data.domains if self.data is not None else [],
            "competence": None if self.competence is None else self.competence.tolist(),
            "steps": [{"step": s, "selections": dict(sorted(c.items()))} for s, c in sorted(self.routing.items())],
        }

    def state_dict(self) -> dict[str, Any]:
        return {
            "competence": None if self.competence is None else self.competence.tolist(),
            "step": self.step,
            "routing": {s: dict(c) for s, c in self.routing.items()},
            "channel": self.channel.state_dict(),
            "selector": getattr(self.selector, "state_dict", dict)(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not state:  # before the first step: nothing to restore
            return
        self.competence = None if state["competence"] is None else torch.tensor(state["competence"])
        self.step, self.routing = state["step"], {int(s): dict(c) for s, c in state["routing"].items()}
        self.channel.load_state_dict(state["channel"])
        if hasattr(self.selector, "load_state_dict") and state.get("selector"):
            self.selector.load_state_dict(state["selector"])
