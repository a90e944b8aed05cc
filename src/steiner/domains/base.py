"""What synthesis, path sampling and rewards need from a domain."""

from __future__ import annotations

import random
from typing import Any, Protocol

ALIVE, DEAD, ANSWER = "alive", "dead", "answer"


class Domain(Protocol):
    """A problem domain. ``state`` is whatever the domain tracks after a prefix of steps;
    ``state_key`` is its exact cluster key (None: cluster by sentence embeddings)."""

    name: str

    def start_state(self, problem: dict[str, Any]) -> Any: ...

    def apply_step(self, problem: dict[str, Any], state: Any, text: str) -> Any | None:
        """The state after a step written as ``text``; None when the step is invalid."""

    def state_key(self, state: Any) -> str | None: ...

    def state_from_key(self, problem: dict[str, Any], key: str) -> Any: ...

    def label(self, problem: dict[str, Any], state: Any) -> str | None:
        """ALIVE / DEAD / ANSWER when the domain can tell exactly; None leaves it to the
        teacher."""

    def propose_step(self, problem: dict[str, Any], state: Any, rng: random.Random) -> str | None:
        """The oracle teacher's noisy forward policy (answer hidden): a plausible next step,
        often a wrong one; None when no step is possible."""

    def step_between(self, problem: dict[str, Any], before: Any, after: Any) -> str:
        """A step text that leads from one state to another (keyed domains)."""

    def write_step(
        self,
        problem: dict[str, Any],
        before: Any,
        text: str,
        after: Any,
        status: str,
        back_to: Any | None = None,
    ) -> dict[str, str]:
        """Name, thought, summary and reflection of a step, with the answer known.

        ``back_to`` is the earlier state a backtrack returned to before this step: the name
        then says so. A DEAD step's reflection says to go back."""

    def final_answer(self, problem: dict[str, Any], texts: list[str]) -> str:
        """The final answer from the step texts of the successful branch."""

    def check_answer(self, problem: dict[str, Any], answer: str) -> bool: ...
