"""Data: record formats, the seeds' folder layout, partitioners, prompt templates, tokenisation, built-in sets.

Records are plain dicts ``{instruction, input, output, category}`` (see :mod:`fedlora.data.formats`).
"""

from fedlora.data.commonsense import (
    LABEL_KEYWORDS,
    TASKS,
    MCQuestion,
    first_label,
    format_example,
    format_instruction,
    gold_label,
    hellaswag_clean,
    hellaswag_question,
    label_words,
    load_commonsense,
    load_task_questions,
    siqa_question,
)
from fedlora.data.errors import DataError
from fedlora.data.formats import (
    ACCEPTED_FORMATS,
    load_client_folder,
    load_records,
    normalize_record,
    normalize_records,
    write_client_folder,
)
from fedlora.data.sources import BUILTINS, LoadedRecords, load_builtin, load_records_spec
from fedlora.data.split import SCHEMES, Partition, category_counts, dirichlet, iid, partition, shards
from fedlora.data.templates import TEMPLATES, PromptTemplate, get_template, render, render_prompt
from fedlora.data.tokenize import IGNORE_INDEX, collate, tokenize_records

__all__ = [
    "ACCEPTED_FORMATS",
    "BUILTINS",
    "IGNORE_INDEX",
    "LABEL_KEYWORDS",
    "SCHEMES",
    "TASKS",
    "TEMPLATES",
    "DataError",
    "LoadedRecords",
    "MCQuestion",
    "Partition",
    "PromptTemplate",
    "category_counts",
    "collate",
    "dirichlet",
    "first_label",
    "format_example",
    "format_instruction",
    "get_template",
    "gold_label",
    "hellaswag_clean",
    "hellaswag_question",
    "iid",
    "label_words",
    "load_builtin",
    "load_client_folder",
    "load_commonsense",
    "load_records",
    "load_records_spec",
    "load_task_questions",
    "normalize_record",
    "normalize_records",
    "partition",
    "render",
    "render_prompt",
    "shards",
    "siqa_question",
    "tokenize_records",
    "write_client_folder",
]
