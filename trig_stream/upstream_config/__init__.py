"""``trig-stream import-config``: turn a TRIG upstream YAML config into a trig-stream TOML config.

Upstream drives one experiment with one YAML file: top-level ``name``, ``task``, where the
prompts come from (``dataset_name`` or a legacy ``prompt_path`` with ``image_path``), the
models to generate with (``generation.models``, upstream aliases), folders of images to judge
(``evaluation.image_dirs``), the metrics of each dimension (``dimensions.<DIM>.metrics``,
usually the ``trig_api`` VLM judge through YAML anchors), and the relation analysis
(``relation``, with its ``thresholds`` and ``insight_thresholds``).

The conversion maps what has a counterpart here:

* aliases with a diffusers preset become ``diffusers`` generators (one GPU each), ``dalle3``
  the ``openai_images`` generator, ``<alias>_dtm_dim`` a ``dtm_rewrite`` generator around the
  alias, and every image folder an ``image_folder`` generator;
* each distinct ``trig_api`` metric (model, endpoint, top logprobs) becomes an ``openai``
  judge with the upstream-exact scorer; an API key is never copied, only the name of the
  variable to export it in;
* the prompt source, the result folder and the DTM thresholds map to ``[dataset]``,
  ``[run] output_dir`` and ``[relation]``.

Everything else is reported, never dropped in silence: each key left out, and each setting
that needs a look before running, is a warning line on the terminal and a comment at the top
of the TOML. The TOML is validated like any config before it is returned.

The package, in the order a conversion runs:

* :mod:`.command`: the ``import-config`` command (arguments, warnings, output file);
* :mod:`.convert`: the public API (:func:`import_config`, :class:`Conversion`) and the
  converter, which maps ``[run]``, ``[dataset]`` and ``[relation]`` itself;
* :mod:`.generators`: ``generation.models`` and ``evaluation.image_dirs`` as generators;
* :mod:`.judges`: the ``trig_api`` metrics of ``dimensions`` as judges;
* :mod:`.toml_writer`: names, keys and values in their TOML form.

Everything public is importable from here.
"""

from __future__ import annotations

from trig_stream.upstream_config.command import (
    EXIT_OK,
    add_import_config_command,
    run_import_config,
)
from trig_stream.upstream_config.convert import (
    CORRELATIONS,
    DTM_TASKS,
    INSIGHT_THRESHOLDS,
    RELATION_THRESHOLDS,
    REPORT_ONLY_RELATION_KEYS,
    TOP_LEVEL_KEYS,
    UPSTREAM_DATASETS,
    UPSTREAM_SPLITS,
    Conversion,
    convert_upstream_config,
    import_config,
    load_upstream_yaml,
)
from trig_stream.upstream_config.judges import (
    DEFAULT_JUDGE_MODEL,
    JUDGE_METRIC,
    KEYLESS,
    MAX_TOP_LOGPROBS,
    UPSTREAM_ENDPOINT,
    UPSTREAM_TOP_LOGPROBS,
)

__all__ = [
    "CORRELATIONS",
    "DEFAULT_JUDGE_MODEL",
    "DTM_TASKS",
    "EXIT_OK",
    "INSIGHT_THRESHOLDS",
    "JUDGE_METRIC",
    "KEYLESS",
    "MAX_TOP_LOGPROBS",
    "RELATION_THRESHOLDS",
    "REPORT_ONLY_RELATION_KEYS",
    "TOP_LEVEL_KEYS",
    "UPSTREAM_DATASETS",
    "UPSTREAM_ENDPOINT",
    "UPSTREAM_SPLITS",
    "UPSTREAM_TOP_LOGPROBS",
    "Conversion",
    "add_import_config_command",
    "convert_upstream_config",
    "import_config",
    "load_upstream_yaml",
    "run_import_config",
]
