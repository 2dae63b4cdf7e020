"""Whether a diffusers pipeline folder holds the models a pipeline class takes, by class.

A folder of another pipeline whose components have the names a pipeline class needs (Flux's
for Sana: ``text_encoder``, ``vae``, ``transformer``...) loads, then fails every call with a
tensor's shape. Its ``model_index.json`` names each component's class, and the class's
``__init__`` annotations name what it takes: comparing the two sees it before any load.
Called with diffusers (and so torch) imported; importing this module imports neither.
"""

from __future__ import annotations

import importlib
import inspect
import types
import typing
from typing import Any


def components_of_other_classes(
    index: dict[str, Any], pipeline_class: Any, given: set[str]
) -> list[tuple[str, str, str]]:
    """The model components of a pipeline folder (``index``: its ``model_index.json``) whose
    class is unrelated to the one ``pipeline_class`` takes for them: (name, the folder's
    class, the classes it takes).

    Only models (torch modules) are compared: tokenizers, image processors and schedulers
    stand in for one another, or are renamed (a fast tokenizer for a slow one), too often to
    tell a wrong one. A class either side cannot name (a custom module's) is let through.
    """
    import torch

    try:
        parameters = inspect.signature(pipeline_class.__init__, eval_str=True).parameters
    except Exception:  # an annotation that does not resolve: compare the rest as written
        parameters = inspect.signature(pipeline_class.__init__).parameters
    wrong = []
    for name, parameter in parameters.items():
        entry = index.get(name)
        if name in given or not (
            isinstance(entry, list) and len(entry) == 2 and all(isinstance(e, str) for e in entry)
        ):
            continue
        wanted = _annotated_classes(parameter.annotation)
        if not wanted or not all(issubclass(w, torch.nn.Module) for w in wanted):
            continue
        found = _library_class(*entry)
        if not (isinstance(found, type) and issubclass(found, torch.nn.Module)):
            continue
        if not any(issubclass(found, w) or issubclass(w, found) for w in wanted):
            wrong.append((name, entry[1], " or ".join(w.__name__ for w in wanted)))
    return wrong


def _annotated_classes(annotation: Any) -> list[type]:
    """The classes an ``__init__`` annotation names (``X``, ``X | None``, ``Optional[X]``,
    ``Union[X, Y]``); none when it names anything else (a string, ``list[float]``)."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        members = [a for a in typing.get_args(annotation) if a is not type(None)]
    else:
        members = [annotation]
    if members and all(isinstance(m, type) and not typing.get_args(m) for m in members):
        return members
    return []


def _library_class(library: str, name: str) -> Any:
    """The class ``model_index.json`` names (``["transformers", "CLIPTextModel"]``), or None
    when it comes from elsewhere (a module of the checkpoint's own) or cannot be imported."""
    if library not in ("diffusers", "transformers"):
        return None
    try:
        return getattr(importlib.import_module(library), name, None)
    except Exception:  # a class whose own imports fail: the load will say so
        return None
