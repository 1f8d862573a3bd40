"""Prompt templates: a record's instruction and input become the prompt; its output is the response.

- ``alpaca``: Stanford Alpaca's template, as the FedIT / FLoRA / FLoRIST seeds use it (alpaca-lora's
  ``templates/alpaca.json``), with and without an input.
- ``commonsense``: the layout of LLM-Adapters, whose models were trained on commonsense_170k and scored with it
  (its ``commonsense_evaluate.py``): the same words as Alpaca, but every line after the preamble is indented by
  16 spaces and the no-input preamble ends with a space. LLM-Adapters' ``finetune.py`` builds the same text
  except for whitespace-only separator lines and a ``# noqa: E501`` that leaked into its string; we keep the
  evaluation layout so that training and scoring see one prompt.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from fedlora.data.errors import DataError


@dataclass(frozen=True)
class PromptTemplate:
    """Two format strings with ``{instruction}`` (and ``{input}``); the response follows the prompt directly."""

    name: str
    with_input: str
    without_input: str
    description: str = ""

    def prompt(self, instruction: str, input: str = "") -> str:
        if input:
            return self.with_input.format(instruction=instruction, input=input)
        return self.without_input.format(instruction=instruction)


_INDENT = " " * 16

TEMPLATES: dict[str, PromptTemplate] = {
    "alpaca": PromptTemplate(
        name="alpaca",
        with_input=(
            "Below is an instruction that describes a task, paired with an input that provides further context. "
            "Write a response that appropriately completes the request.\n\n"
            "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
        ),
        without_input=(
            "Below is an instruction that describes a task. Write a response that appropriately completes the "
            "request.\n\n### Instruction:\n{instruction}\n\n### Response:\n"
        ),
        description="Stanford Alpaca (FedIT / FLoRA / FLoRIST seeds)",
    ),
    "commonsense": PromptTemplate(
        name="commonsense",
        with_input=(
            "Below is an instruction that describes a task, paired with an input that provides further context. "
            "Write a response that appropriately completes the request.\n\n"
            f"{_INDENT}### Instruction:\n{_INDENT}{{instruction}}\n\n"
            f"{_INDENT}### Input:\n{_INDENT}{{input}}\n\n"
            f"{_INDENT}### Response:\n{_INDENT}"
        ),
        without_input=(
            "Below is an instruction that describes a task. Write a response that appropriately completes the "
            f"request. \n\n{_INDENT}### Instruction:\n{_INDENT}{{instruction}}\n\n"
            f"{_INDENT}### Response:\n{_INDENT}"
        ),
        description="LLM-Adapters (commonsense_170k)",
    ),
}


def get_template(template: str | PromptTemplate) -> PromptTemplate:
    """A template by name (or the template itself); an unknown name lists the valid ones."""
    if isinstance(template, PromptTemplate):
        return template
    if template not in TEMPLATES:
        raise DataError(f"unknown prompt template {template!r}; valid: {', '.join(TEMPLATES)}")
    return TEMPLATES[template]


def render_prompt(instruction: str, input: str = "", template: str | PromptTemplate = "alpaca") -> str:
    """The prompt alone (what a model is given at evaluation time)."""
    return get_template(template).prompt(instruction, input or "")


def render(record: Mapping[str, Any], template: str | PromptTemplate = "alpaca") -> tuple[str, str]:
    """``(prompt, response)`` of a normalised record; the training text is ``prompt + response``.

    ``input`` and ``output`` may be absent (empty input selects the no-input variant; absent output gives "").
    """
    tmpl = get_template(template)
    instruction = record.get("instruction")
    if not isinstance(instruction, str):
        raise DataError(f"cannot render a record without a string 'instruction' (keys: {sorted(record)})")
    return tmpl.prompt(instruction, record.get("input") or ""), record.get("output") or ""
