"""Training data: loading, validation, tokenization with assistant-only labels, mixtures and collation."""

from comm.data.collator import CommDataCollator
from comm.data.datasets import (
    IGNORE_INDEX,
    DataSpec,
    EncodedSample,
    Sample,
    SampleEncoder,
    SupervisedDataset,
    build_dataset,
    load_samples,
    mixture_indices,
    parse_data_specs,
)
from comm.data.issues import DataError, DataIssue, IssueKind, IssueLog

__all__ = [
    "IGNORE_INDEX",
    "CommDataCollator",
    "DataError",
    "DataIssue",
    "DataSpec",
    "EncodedSample",
    "IssueKind",
    "IssueLog",
    "Sample",
    "SampleEncoder",
    "SupervisedDataset",
    "build_dataset",
    "load_samples",
    "mixture_indices",
    "parse_data_specs",
]
