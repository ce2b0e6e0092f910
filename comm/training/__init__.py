"""COMM training: argument dataclasses, the Trainer subclass, the `comm-train` entry point and loss plots."""

from comm.training.arguments import CommTrainingArguments, DataArguments, ModelArguments, parse_arguments
from comm.training.train import TrainResult, main

__all__ = ["CommTrainingArguments", "DataArguments", "ModelArguments", "TrainResult", "main", "parse_arguments"]
