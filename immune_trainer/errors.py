"""Exceptions raised by immune_trainer.

Every error a user can cause (bad data, bad configuration, a corrupted report, a model whose
structure we cannot read) is one of these, with a message that names the problem and how to fix it.
They subclass the built-in exception a user would expect (ValueError, RuntimeError), so existing
``except ValueError`` code keeps working.
"""

from __future__ import annotations


class ImmuneTrainerError(Exception):
    """Base class of every error raised on purpose by immune_trainer."""


class DataError(ImmuneTrainerError, ValueError):
    """A dataset is malformed: missing columns, empty, too long for max_length, mismatched pairs."""


class ConfigError(ImmuneTrainerError, ValueError):
    """A configuration value is invalid or inconsistent (unknown defense, phi outside a scorer's range...)."""


class ReportError(ImmuneTrainerError, ValueError):
    """An immunization report cannot be read: corrupted JSON, unknown schema version, missing fields."""


class ModelStructureError(ImmuneTrainerError, ValueError):
    """The model's decoder layers, attention or MLP blocks could not be found."""


class AssetError(ImmuneTrainerError, RuntimeError):
    """An embedded asset could not be fetched, verified or extracted."""


class DivergenceError(ImmuneTrainerError, RuntimeError):
    """A loss term became NaN or infinite during training."""


class OutputError(ImmuneTrainerError, OSError):
    """An output location cannot be written."""
