"""FedGRPO's data: the server's question stream (prompts only) and the expert clients' private labels.

The server trains on questions it cannot grade. Each question belongs to a domain (a reasoning-gym task family).
[CHOICE] The labels of domain d's questions live only at the experts whose private data covers d: an expert's
``answer_key`` maps the question text of every server and auxiliary question of its domains to its reference
answer and verifier entry. The trainer sees one client, the server (id 0), whose training rows carry the chat
prompt and, with ``task_metadata``, the domain label, nothing else. ``reveal_answers`` gives the server the labels
instead (the centralized-GRPO baseline on the same questions).

Held-out rows (``eval_examples``) keep their answers: they are the experimenter's measurement, never a training
signal. Auxiliary rows (``aux_examples``) are a small public labelled set per domain that builds the confidence graph.
"""

from __future__ import annotations

from typing import Any

import lightning

from fedrl_lightning.data import FederatedData

Example = dict[str, Any]
SERVER_ID = 0
"""The trainer's only client: the server holding the policy."""


def question_text(prompt: Any) -> str:
    """The user's question in a prompt (the last user message of a chat prompt, or the string itself)."""
    if isinstance(prompt, str):
        return prompt
    users = [m.get("content", "") for m in prompt if m.get("role") == "user"]
    return str(users[-1] if users else prompt[-1].get("content", ""))


class FedGRPOData(lightning.LightningDataModule):
    """The server's questions over the experts' domains, and each expert's private labels.

    Args:
        experts: the expert clients' private data (reasoning-gym tasks); expert k's domains are the task families
            present in its train split (``partition: by_task`` makes each expert own some families).
        questions_per_task: server training questions per domain.
        eval_per_task: held-out server questions per domain (evaluation only).
        aux_per_task: public auxiliary labelled questions per domain (the confidence graph).
        task_metadata: the server's rows carry the ``task`` label (domain posterior from metadata); False hides it
            and the selector falls back to nearest neighbours over auxiliary questions.
        reveal_answers: the server's rows carry ``answer`` and ``rg_entry`` (centralized GRPO on the same questions).
        seed: seed of the server and auxiliary question pools (streams distinct from the experts' data).
    """

    def __init__(
        self,
        experts: FederatedData,
        questions_per_task: int = 32,
        eval_per_task: int = 16,
        aux_per_task: int = 8,
        task_metadata: bool = True,
        reveal_answers: bool = False,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if experts.data_files is not None:
            raise ValueError("FedGRPOData needs reasoning-gym tasks for the experts (data_files is not supported)")
        for name, value in (("questions_per_task", questions_per_task), ("aux_per_task", aux_per_task)):
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if eval_per_task < 0:
            raise ValueError(f"eval_per_task must be >= 0, got {eval_per_task}")
        self.experts, self.task_metadata, self.reveal_answers = experts, task_metadata, reveal_answers
        n = len(experts.tasks)
        common = dict(
            tasks=experts.tasks,
            task_kwargs=experts.task_kwargs,
            num_clients=1,
            partition="iid",
            system_prompt=experts.system_prompt,
        )
        # Offsets keep the server's and the auxiliary item streams apart from the experts' (seeded with small ints).
        self._server = FederatedData(
            train_size=questions_per_task * n, eval_size=eval_per_task * n, seed=1_000_003 + seed, **common
        )
        self._aux = FederatedData(train_size=aux_per_task * n, eval_size=0, seed=2_000_003 + seed, **common)

    # -- the trainer's view: one client, the server --------------------------------------------------------------

    @property
    def num_clients(self) -> int:
        return 1

    def client_ids(self) -> list[int]:
        return [SERVER_ID]

    def setup(self, stage: str | None = None) -> None:
        self.experts.setup(stage)
        self._server.setup(stage)
        self._aux.setup(stage)

    def train_examples(self, client_id: int) -> list[Example]:
        """The server's training rows: the prompt (and the domain label with ``task_metadata``), no answers."""
        _check_server(client_id)
        keep = {"prompt"} | ({"task"} if self.task_metadata else set())
        if self.reveal_answers:
            keep |= {"task", "answer", "rg_entry"}
        return [{k: v for k, v in ex.items() if k in keep} for ex in self._server.train_examples(0)]

    def eval_examples(self, client_id: int) -> list[Example]:
        """Held-out server questions with their answers (the experimenter's measurement)."""
        _check_server(client_id)
        return self._server.eval_examples(0)

    def union_train_examples(self) -> list[Example]:
        return self.train_examples(SERVER_ID)

    def describe(self) -> list[dict[str, Any]]:
        return self._server.describe()

    # -- the experts' side ---------------------------------------------------------------------------------------

    @property
    def domains(self) -> list[str]:
        """The domains (task families), in a fixed order: the columns of the competence matrix."""
        return list(self.experts.tasks)

    def expert_ids(self) -> list[int]:
        return self.experts.client_ids()

    def expert_domains(self, expert_id: int) -> list[str]:
        """The domains present in expert ``expert_id``'s private train split."""
        counts = self.experts.describe()[expert_id]["task_counts"]
        return [d for d in self.domains if counts.get(d, 0) > 0]

    def private_examples(self, expert_id: int) -> list[Example]:
        """Expert ``expert_id``'s private train split (with answers); never given to the server."""
        return self.experts.train_examples(expert_id)

    def answer_key(self, expert_id: int) -> dict[str, Example]:
        """Question text -> ``{"answer", "rg_entry", "task"}`` for the server and auxiliary questions of its domains."""
        own = set(self.expert_domains(expert_id))
        rows = self._server.train_examples(0) + self._aux.train_examples(0)
        return {
            question_text(ex["prompt"]): {k: ex[k] for k in ("answer", "rg_entry", "task")}
            for ex in rows
            if ex["task"] in own
        }

    def aux_examples(self) -> list[Example]:
        """The public auxiliary set: prompt, answer, task (and verifier entry), a few per domain."""
        return self._aux.train_examples(0)


def _check_server(client_id: int) -> None:
    if client_id != SERVER_ID:
        raise ValueError(f"FedGRPOData has one trainer client, the server ({SERVER_ID}); got client {client_id}")
