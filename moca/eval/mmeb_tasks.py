"""The 36 MMEB (v1) image tasks as data: name, category, in-distribution (IND) or out-of-distribution (OOD), and
the query instruction the benchmark uses.

Sources (facts only):

* Task names, the four categories and the 20 IND / 16 OOD split: the MMEB benchmark of VLM2Vec (Jiang et al.,
  "VLM2Vec: Training Vision-Language Models for Massive Multimodal Embedding Tasks", arXiv 2410.05160, Table 1
  and its task list; the same 36 names, in this order, in github.com/TIGER-AI-Lab/VLM2Vec
  ``experiments/report_score.py``). IND tasks are the 20 whose training split is MMEB-train.
* Instructions. ``<|image_1|>`` marks the query image; it is written as the marker, one space, then the
  instruction (the released eval rows put a newline after the marker instead). Each entry's source is named in
  ``MMEB_INSTRUCTION_SOURCES`` (keys of ``INSTRUCTION_SOURCE_NOTES``):

  - ``vlm2vec-train``: the 20 IND tasks. The first (canonical) template of each training task in
    github.com/TIGER-AI-Lab/VLM2Vec, branch ``v1``, ``archive/instruction_dict.py``. That file has no entry
    for the 16 OOD tasks, and the VLM2Vec code itself carries none (no branch of it holds these strings): the
    eval instructions live only inside the released MMEB-eval rows, so the OOD strings below come from public
    copies of those rows and from the paper.
  - ``eval-rows``: 11 OOD tasks (the four OOD VQA tasks, FashionIQ, Wiki-SS-NQ, OVEN, EDIS, RefCOCO,
    RefCOCO-Matching, Visual7W-Pointing). The exact query prefixes of the MMEB-eval rows as stripped per task
    by ``extract_query`` in github.com/xuanmingcui98/mm_embed, ``src/data/prompts.py`` (commit 2b2042a9,
    2025-11-21; its ``task_categories["vqa"]`` puts ScienceQA, VizWiz, GQA and TextVQA under the VQA prefix).
    The VLM2Vec paper's appendix tables 8-10 (arXiv 2410.05160, "Examples of datasets in MMEB") show the same
    wording, written as prose (a colon printed as a full stop), with two differences noted at the entries: the
    paper says "document screenshot" for Wiki-SS-NQ and "answers the given question" for Visual7W-Pointing,
    where the rows say "document image" and "answers the question". RefCOCO and RefCOCO-Matching share a
    wording and differ only in the mark after it (a full stop, then the quoted expression; a colon);
    Visual7W-Pointing's row puts the question in double quotes after the instruction. EDIS is a text query
    (paper, Table 9), yet its rows carry the image marker, as the IND WebQA template does; kept as found.
  - ``paper-appendix``: the 5 OOD classification tasks (Place365, ImageNet-A, ImageNet-R, ObjectNet,
    Country211). Wording as printed in the VLM2Vec paper's appendix Table 7 (arXiv 2410.05160), final full
    stop included. No named public copy of these eval rows was found, so whether the rows end in a full stop
    is not confirmed here (the IND templates are mixed: SUN397's ends in one, VOC2007's does not).

  The released MMEB-eval parquet already carries each task's instruction inside ``qry_text`` (and the
  target-side text inside ``tgt_text``), so the evaluation adds nothing: these strings are reference data
  (for ``moca data inspect`` and for building training data in the same wording), not inputs the evaluator
  prepends.

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
    ("Place365", "classification", "OOD", "<|image_1|> Identify the scene shown in the image."),
    ("ImageNet-A", "classification", "OOD", "<|image_1|> Represent the given image for classification."),
    ("ImageNet-R", "classification", "OOD", "<|image_1|> Represent the given image for classification."),
    ("ObjectNet", "classification", "OOD", "<|image_1|> Identify the object shown in the image."),
    ("Country211", "classification", "OOD",
     "<|image_1|> Identify the country depicted in the image."),
    ("OK-VQA", "vqa", "IND", "<|image_1|> Represent the given image with the following question: "),
    ("A-OKVQA", "vqa", "IND", "<|image_1|> Represent the given image with the following question: "),
    ("DocVQA", "vqa", "IND", "<|image_1|> Represent the given image with the following question: "),
    ("InfographicsVQA", "vqa", "IND", "<|image_1|> Represent the given image with the following question: "),
    ("ChartQA", "vqa", "IND", "<|image_1|> Represent the given image with the following question: "),
    ("Visual7W", "vqa", "IND", "<|image_1|> Represent the given image with the following question: "),
    ("ScienceQA", "vqa", "OOD", "<|image_1|> Represent the given image with the following question: "),
    ("VizWiz", "vqa", "OOD", "<|image_1|> Represent the given image with the following question: "),
    ("GQA", "vqa", "OOD", "<|image_1|> Represent the given image with the following question: "),
    ("TextVQA", "vqa", "OOD", "<|image_1|> Represent the given image with the following question: "),
    ("VisDial", "retrieval", "IND", "Represent the given dialogue about an image, which is used for image retrieval: "),
    ("CIRR", "retrieval", "IND",
     "<|image_1|> Given an image, find a similar everyday image with the described changes: "),
    ("VisualNews_t2i", "retrieval", "IND", "Retrieve an image of this news caption. "),
    ("VisualNews_i2t", "retrieval", "IND", "<|image_1|> Find a caption for the news in the given photo."),
    ("MSCOCO_t2i", "retrieval", "IND", "Find me an everyday image that matches the given caption: "),
    ("MSCOCO_i2t", "retrieval", "IND", "<|image_1|> Find an image caption describing the given everyday image."),
    ("NIGHTS", "retrieval", "IND", "<|image_1|> Find a day-to-day image that looks similar to the provided image."),
    ("WebQA", "retrieval", "IND", "<|image_1|> Find a Wikipedia image that answers this question: "),
    ("FashionIQ", "retrieval", "OOD",
     "<|image_1|> Find an image to match the fashion image and style note: "),
    # the paper's Table 9 words it "Find the document screenshot that can answer the given query."
    ("Wiki-SS-NQ", "retrieval", "OOD", "Find the document image that can answer the given query: "),
    ("OVEN", "retrieval", "OOD",
     "<|image_1|> Retrieve a Wikipedia image-description pair that provides evidence for the question of "
     "this image: "),
    # a text query whose rows still carry the image marker (see the module docstring)
    ("EDIS", "retrieval", "OOD", "<|image_1|> Find a news image that matches the provided caption: "),
    ("MSCOCO", "grounding", "IND",
     "<|image_1|> Select the portion of the image that isolates the object labeled as "),
    # the referring expression follows in double quotes
    ("RefCOCO", "grounding", "OOD",
     "<|image_1|> Select the portion of the image that follows the language expressions. "),
    ("RefCOCO-Matching", "grounding", "OOD",
     "<|image_1|> Select the portion of the image that follows the language expressions: "),
    # the question follows in double quotes; the paper's Table 10 words it "... answers the given question."
    ("Visual7W-Pointing", "grounding", "OOD",
     "<|image_1|> Select the portion of the image that answers the question "),
]

MMEB_TASKS: Dict[str, Dict[str, Optional[str]]] = {
    name: {"category": cat, "split": split, "instruction": ins} for name, cat, split, ins in _TASKS}
MMEB_TASK_NAMES: List[str] = [t[0] for t in _TASKS]

INSTRUCTION_SOURCE_NOTES: Dict[str, str] = {
    "vlm2vec-train": "github.com/TIGER-AI-Lab/VLM2Vec, branch v1, archive/instruction_dict.py "
                     "(first template)",
    "eval-rows": "MMEB-eval row prefixes as stripped per task by extract_query in "
                 "github.com/xuanmingcui98/mm_embed, src/data/prompts.py (commit 2b2042a9); "
                 "wording also in arXiv 2410.05160, appendix tables 8-10",
    "paper-appendix": "arXiv 2410.05160 (VLM2Vec), appendix Table 7, wording as printed",
}
_PAPER_APPENDIX = ("Place365", "ImageNet-A", "ImageNet-R", "ObjectNet", "Country211")
# where each task's instruction string comes from (a key of INSTRUCTION_SOURCE_NOTES)
MMEB_INSTRUCTION_SOURCES: Dict[str, str] = {
    name: ("vlm2vec-train" if split == "IND"
           else "paper-appendix" if name in _PAPER_APPENDIX else "eval-rows")
    for name, _cat, split, _ins in _TASKS}


def mmeb_task_info(name: str) -> Optional[Dict[str, Optional[str]]]:
    """{category, split, instruction} of an MMEB task by its published name (case-insensitive), or None."""
    if name in MMEB_TASKS:
        return MMEB_TASKS[name]
    low = {k.lower(): k for k in MMEB_TASKS}
    return MMEB_TASKS.get(low.get(name.lower(), ""))
