"""Training data: loading, validation, tokenization with assistant-only labels, mixtures and collation."""

from comm.data.collator import CommDataCollator
from comm.data.dataset import ImageDecodeError, SupervisedDataset, build_dataset
from comm.data.issues import DataError, DataIssue, IssueKind, IssueLog
from comm.data.mixture import DataSpec, mixture_indices, parse_data_specs
from comm.data.samples import Sample, load_samples
from comm.data.tokenization import IGNORE_INDEX, EncodedSample, SampleEncoder

__all__ = [
    "IGNORE_INDEX",
    "CommDataCollator",
    "DataError",
    "DataIssue",
    "DataSpec",
    "EncodedSample",
    "ImageDecodeError",
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
