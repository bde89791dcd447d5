"""The annotation format of long-form video classification (COIN, LVU), registered as ``lfvila_video_cls``.

Official LF-VILA jsonl (``src/datasets/video_classification_dataset.py``): one row per video, ``{"video_id": stem,
"recipe_type": int}``; ``recipe_type`` is the class for every dataset (COIN's task id, LVU's relationship / scene /
way-of-speaking class); the video is ``video_root/<video_id>.mp4`` (other extensions as fallback). A sample has a
``label`` and no text at all (``question`` None, no segments): the loader's ``"video"`` mode
(:func:`lfvila.data.loader.sample_mode`), which decodes 32 frames over the whole video (train jittered, eval uniform,
the official rule) and makes no text tensors. Importing :mod:`lfvila.data.formats` registers it.
"""

from __future__ import annotations

from lfvila.data.formats import ClassLabelled, register
from lfvila.data.row_parsing import as_str, get_field


@register("lfvila_video_cls")
class LFVILAVideoClassificationFormat(ClassLabelled):
    """Official LF-VILA video classification jsonl: ``video_id``, ``recipe_type`` (int class -> ``label``, checked
    against ``num_classes`` when given: COIN 180, LVU relationship 4, scene 6, way of speaking 5)."""

    lines = True
    needs_text = False

    def _parse(self, raw):
        video_id = as_str(get_field(raw, "video_id"), "video_id")
        label = self._label(raw, "recipe_type")
        path, stems = self._video(video_id, "video_id")
        return self._make(video_id, path, stems, label=label)
