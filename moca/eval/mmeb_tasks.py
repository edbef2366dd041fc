"""The 36 MMEB (v1) image tasks as data: name, category, in-distribution (IND) or out-of-distribution (OOD), and
the query instruction the benchmark uses.

Sources (facts only):

* Task names, the four categories and the 20 IND / 16 OOD split: the MMEB benchmark of VLM2Vec (Jiang et al.,
  "VLM2Vec: Training Vision-Language Models for Massive Multimodal Embedding Tasks", arXiv 2410.05160, Table 1
  and its task list; the same 36 names, in this order, in github.com/TIGER-AI-Lab/VLM2Vec
  ``experiments/report_score.py``). IND tasks are the 20 whose training split is MMEB-train.
* Instructions: the first (canonical) template of each training task in github.com/TIGER-AI-Lab/VLM2Vec,
  branch ``v1``, ``archive/instruction_dict.py`` (20 IND tasks). ``<|image_1|>`` marks the query image. For the
  16 OOD tasks that file holds no entry: ``instruction`` is None here. The released MMEB-eval parquet already
  carries each task's instruction inside ``qry_text`` (and the target-side text inside ``tgt_text``), so the
  evaluation adds nothing: these strings are reference data (for ``moca data inspect`` and for building
  training data in the same wording), not inputs the evaluator prepends.

The paper's MMEB tables report precision@1 per task, the mean per category (classification 10 tasks, VQA 10,
retrieval 12, visual grounding 4), the IND and OOD means and the overall mean of the 36.
"""

from __future__ import annotations

from typing import Dict, List, Optional

CATEGORIES = ("classification", "vqa", "retrieval", "grounding")
CATEGORY_TITLES = {"classification": "Classification", "vqa": "VQA", "retrieval": "Retrieval",
                   "grounding": "Grounding"}

# (name, category, split, instruction or None)
_TASKS = [
    ("ImageNet-1K", "classification", "IND", "<|image_1|> Represent the given image for classification."),
    ("N24News", "classification", "IND",
     "<|image_1|> Represent the given news image with the following caption for domain classification: "),
    ("HatefulMemes", "classification", "IND",
     "<|image_1|> Represent the given image for binary classification to determine whether it constitutes "
     "hateful speech or not."),
    ("VOC2007", "classification", "IND", "<|image_1|> Identify the object shown in the image"),
    ("SUN397", "classification", "IND", "<|image_1|> Identify the scene shown in the image."),
    ("Place365", "classification", "OOD", None),
    ("ImageNet-A", "classification", "OOD", None),
    ("ImageNet-R", "classification", "OOD", None),
    ("ObjectNet", "classification", "OOD", None),
    ("Country211", "classification", "OOD", None),
    ("OK-VQA", "vqa", "IND", "<|image_1|> Represent the given image with the following question: "),
    ("A-OKVQA", "vqa", "IND", "<|image_1|> Represent the given image with the following question: "),
    ("DocVQA", "vqa", "IND", "<|image_1|> Represent the given image with the following question: "),
    ("InfographicsVQA", "vqa", "IND", "<|image_1|> Represent the given image with the following question: "),
    ("ChartQA", "vqa", "IND", "<|image_1|> Represent the given image with the following question: "),
    ("Visual7W", "vqa", "IND", "<|image_1|> Represent the given image with the following question: "),
    ("ScienceQA", "vqa", "OOD", None),
    ("VizWiz", "vqa", "OOD", None),
    ("GQA", "vqa", "OOD", None),
    ("TextVQA", "vqa", "OOD", None),
    ("VisDial", "retrieval", "IND", "Represent the given dialogue about an image, which is used for image retrieval: "),
    ("CIRR", "retrieval", "IND",
     "<|image_1|> Given an image, find a similar everyday image with the described changes: "),
    ("VisualNews_t2i", "retrieval", "IND", "Retrieve an image of this news caption. "),
    ("VisualNews_i2t", "retrieval", "IND", "<|image_1|> Find a caption for the news in the given photo."),
    ("MSCOCO_t2i", "retrieval", "IND", "Find me an everyday image that matches the given caption: "),
    ("MSCOCO_i2t", "retrieval", "IND", "<|image_1|> Find an image caption describing the given everyday image."),
    ("NIGHTS", "retrieval", "IND", "<|image_1|> Find a day-to-day image that looks similar to the provided image."),
    ("WebQA", "retrieval", "IND", "<|image_1|> Find a Wikipedia image that answers this question: "),
    ("FashionIQ", "retrieval", "OOD", None),
    ("Wiki-SS-NQ", "retrieval", "OOD", None),
    ("OVEN", "retrieval", "OOD", None),
    ("EDIS", "retrieval", "OOD", None),
    ("MSCOCO", "grounding", "IND",
     "<|image_1|> Select the portion of the image that isolates the object labeled as "),
    ("RefCOCO", "grounding", "OOD", None),
    ("RefCOCO-Matching", "grounding", "OOD", None),
    ("Visual7W-Pointing", "grounding", "OOD", None),
]

MMEB_TASKS: Dict[str, Dict[str, Optional[str]]] = {
    name: {"category": cat, "split": split, "instruction": ins} for name, cat, split, ins in _TASKS}
MMEB_TASK_NAMES: List[str] = [t[0] for t in _TASKS]


def mmeb_task_info(name: str) -> Optional[Dict[str, Optional[str]]]:
    """{category, split, instruction} of an MMEB task by its published name (case-insensitive), or None."""
    if name in MMEB_TASKS:
        return MMEB_TASKS[name]
    low = {k.lower(): k for k in MMEB_TASKS}
    return MMEB_TASKS.get(low.get(name.lower(), ""))
