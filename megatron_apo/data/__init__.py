"""verl/DAPO-schema prompt data: parquet reading with row-level validation, prompt templates, tokenized
datasets with over-length filtering, a resumable shuffled sampler, and the demo's toy task."""

from megatron_apo.data.dataset import EncodedPrompt, PromptDataset, PromptSampler
from megatron_apo.data.parquet import DataReport, read_verl_parquet, write_verl_parquet
from megatron_apo.data.schema import InvalidDataError, PromptRow, RowIssue, parse_row
from megatron_apo.data.tokenizer import (
    HFTokenizer,
    SentencePieceTokenizer,
    Tokenizer,
    load_tokenizer,
    plain_prompt,
)
from megatron_apo.data.toy import make_toy_dataset, sample_valid_answers, toy_prompt_text, write_toy_parquet

__all__ = [
    "DataReport",
    "EncodedPrompt",
    "HFTokenizer",
    "InvalidDataError",
    "PromptDataset",
    "PromptRow",
    "PromptSampler",
    "RowIssue",
    "SentencePieceTokenizer",
    "Tokenizer",
    "load_tokenizer",
    "make_toy_dataset",
    "parse_row",
    "plain_prompt",
    "read_verl_parquet",
    "sample_valid_answers",
    "toy_prompt_text",
    "write_toy_parquet",
    "write_verl_parquet",
]
