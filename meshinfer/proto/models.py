"""How models are named: :class:`ModelRef` (an id and a version) and reading a name back.

Pure data, shared by the protocol (tasks and their codec) and the engines
(:mod:`meshinfer.inference.base` re-exports :class:`ModelRef`, its historical home). A model is
written ``"id@version"`` (``str(ref)``), or ``"id"`` for version ``"1"``; so neither its id nor
its version may hold ``@`` (:func:`model_name_problem`), or ``"a@b@c"`` would name both ``a@b``
version ``c`` and ``a`` version ``b@c``; nor a control character (a node refuses a task
message naming such a model, :func:`~meshinfer.proto.messages.is_plain_text`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from meshinfer.proto.messages import is_plain_text

__all__ = ["MODEL_SEPARATOR", "ModelRef", "model_name_problem", "models_named"]


@dataclass(frozen=True, slots=True)
class ModelRef:
    """Which model: an id and a version (e.g. ``digits-mlp`` version ``1``)."""

    model_id: str
    version: str = "1"

    def __str__(self) -> str:
        return f"{self.model_id}@{self.version}"


#: What separates a model's id from its version when written down: in neither of them.
MODEL_SEPARATOR = "@"


def model_name_problem(model_id: str, version: str) -> str | None:
    """Why a model cannot be named ``model_id`` version ``version`` (either holds
    :data:`MODEL_SEPARATOR`: written ``"id@version"`` it would read back as another model; or a
    control character: no node would take a task message naming it), or None. Submissions are
    checked by it (:func:`~meshinfer.proto.tasks_codec.spec_from_dict`)."""
    for what, name in (("id", model_id), ("version", version)):
        if MODEL_SEPARATOR in name:
            return f'{what} {name!r:.140} holds "@", which separates a model\'s id from its version'
        if not is_plain_text(name):
            return f"{what} {name!r:.140} holds a control character"
    return None


def models_named(name: str, models: Sequence[ModelRef]) -> tuple[ModelRef, ...]:
    """The ``models`` that ``name`` names, written as submissions write models: ``"id@version"``,
    or ``"id"`` for version ``"1"``. One, unless the name is unknown (none) or ambiguous (an id
    holding ``@``: ``"a@b@1"`` is both ``a@b`` version 1 and ``a`` version ``b@1``)."""
    return tuple(
        ref for ref in models if name == str(ref) or (name == ref.model_id and ref.version == "1")
    )
