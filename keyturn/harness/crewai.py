"""A scripted model for running a CrewAI crew offline: the example crew, keyturn's tests, and
your own crew's tests against ``keyturn dev``.

    llm = ScriptedLLM(script=[
        ToolCall("keyturn_sql", {"target": "orders-db", "sql": "SELECT ..."}),
        FinalAnswer("The order was fixed: {observation}"),
    ])

It answers in CrewAI's ReAct text format (``Action`` / ``Action Input``, then ``Final
Answer``), one step per call. ``{observation}`` in a final answer is the last tool result the
crew showed it, so the answer can carry what really happened (``UPDATE 1``, a deny reason).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from crewai.llms.base_llm import BaseLLM
from pydantic import PrivateAttr

OBSERVATION = "Observation:"


@dataclass(frozen=True)
class ToolCall:
    tool: str
    arguments: dict[str, Any]
    thought: str = "I should use a tool."


@dataclass(frozen=True)
class FinalAnswer:
    template: str  # may contain {observation}


def last_observation(messages: str | list[Any]) -> str:
    """The text after the last ``Observation:`` the crew put in the conversation."""
    texts = (
        [messages] if isinstance(messages, str) else [str(m.get("content", "")) for m in messages]
    )
    for text in reversed(texts):
        if OBSERVATION in text:
            return text.rsplit(OBSERVATION, 1)[1].strip()
    return ""


class ScriptedLLM(BaseLLM):
    """Plays ``script`` step by step; past its end it keeps giving the last final answer."""

    script: list[ToolCall | FinalAnswer]
    _turn: int = PrivateAttr(default=0)

    def __init__(self, script: list[ToolCall | FinalAnswer], **fields: Any) -> None:
        super().__init__(script=script, **{"model": "keyturn-scripted", **fields})

    def call(
        self,
        messages: Any,
        tools: Any = None,
        callbacks: Any = None,
        available_functions: Any = None,
        from_task: Any = None,
        from_agent: Any = None,
        response_model: Any = None,
    ) -> str:
        step = self.script[min(self._turn, len(self.script) - 1)]
        self._turn += 1
        if isinstance(step, ToolCall):
            return (
                f"Thought: {step.thought}\nAction: {step.tool}\n"
                f"Action Input: {json.dumps(step.arguments)}"
            )
        answer = step.template.replace("{observation}", last_observation(messages))
        return f"Thought: I now know the final answer\nFinal Answer: {answer}"

    def get_input_tokens_count(
        self, messages: Any, tools: Any = None, response_model: Any = None
    ) -> int:
        """A scripted model has no tokenizer; a character count is all a crew needs."""
        texts = (
            [messages] if isinstance(messages, str) else [str(m.get("content")) for m in messages]
        )
        return sum(len(t) for t in texts) // 4 + 1

    def supports_function_calling(self) -> bool:
        return False  # ReAct text: the crew parses our Action lines itself
