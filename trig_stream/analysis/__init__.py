"""The relation analysis of TRIG scores: pair statistics, relation codes and the DTM.

Data flows one way: judgements (from a run's journal, from upstream TRIG files, or live from
the engine) are arranged per pair, analysed (:mod:`~trig_stream.analysis.relations`,
:mod:`~trig_stream.analysis.stats`), then exported (:mod:`~trig_stream.analysis.exports`,
:mod:`~trig_stream.analysis.report`) or drawn (:mod:`~trig_stream.analysis.plots`, which needs
the ``plots`` extra). :class:`RelationTracker` keeps an analysis current while a run streams.

Importing this package loads numpy only; polars and matplotlib are loaded by the modules that
write files and draw.
"""

from trig_stream.analysis.live import RelationTracker
from trig_stream.analysis.relations import (
    DTM,
    AnalysisError,
    AnalysisKey,
    ModelAnalysis,
    OutputWriteError,
    PairColumns,
    PairStats,
    analyse_judgements,
    analyse_model,
    build_dtm,
    negate_dominance,
)
from trig_stream.analysis.stats import CorrelationMethod, RelationCode

__all__ = [
    "DTM",
    "AnalysisError",
    "AnalysisKey",
    "CorrelationMethod",
    "ModelAnalysis",
    "OutputWriteError",
    "PairColumns",
    "PairStats",
    "RelationCode",
    "RelationTracker",
    "analyse_judgements",
    "analyse_model",
    "build_dtm",
    "negate_dominance",
]
