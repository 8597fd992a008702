"""No edit: the source image itself, as the baseline row of a comparison.

Its CLIP similarity to the target prompt is what an editor must beat (the "CLIP gain" of an edit is an editor's
score minus this one), its background metrics are perfect by construction, and its ground-truth metrics say how far
the unedited source is from the true edit. No network runs (0 UNet calls).
"""

from __future__ import annotations

from editlab.editors.base import Editor, EditRequest, EditResult, register


@register("identity")
class IdentityEditor(Editor):
    needs = frozenset()  # reads no text: a baseline on every benchmark

    def _edit(self, request: EditRequest) -> EditResult:
        return EditResult(edited=request.image.copy(), reconstruction=request.image.copy())
