"""The MMEB task registry (moca/eval/mmeb_tasks.py): every task is fully described and every recorded
instruction is a usable string with a named source."""

from moca.eval.mmeb_tasks import (CATEGORIES, INSTRUCTION_SOURCE_NOTES, MMEB_INSTRUCTION_SOURCES, MMEB_TASK_NAMES,
                                  MMEB_TASKS, mmeb_task_info)

MARK = "<|image_1|>"


def test_every_task_has_category_split_and_instruction():
    assert MMEB_TASK_NAMES == list(MMEB_TASKS) and len(set(MMEB_TASK_NAMES)) == 36
    for name, info in MMEB_TASKS.items():
        assert set(info) == {"category", "split", "instruction"}, name
        assert info["category"] in CATEGORIES, name
        assert info["split"] in ("IND", "OOD"), name
        ins = info["instruction"]
        # all 36 were found in public sources (see the module docstring); none is left None
        assert isinstance(ins, str) and ins.strip(), name
        # the image marker only ever opens the string, followed by one space and the instruction
        assert MARK not in ins[len(MARK):], name
        if ins.startswith(MARK):
            assert ins[len(MARK)] == " " and ins[len(MARK) + 1] != " ", name
        assert ins == ins.lstrip() and "\n" not in ins, name
    assert sum(v["split"] == "OOD" for v in MMEB_TASKS.values()) == 16


def test_every_instruction_names_its_source():
    assert set(MMEB_INSTRUCTION_SOURCES) == set(MMEB_TASKS)
    assert set(MMEB_INSTRUCTION_SOURCES.values()) <= set(INSTRUCTION_SOURCE_NOTES)
    for name, src in MMEB_INSTRUCTION_SOURCES.items():
        assert (src == "vlm2vec-train") == (MMEB_TASKS[name]["split"] == "IND"), name


def test_ood_instructions_agree_with_their_task_family():
    vqa = {MMEB_TASKS[n]["instruction"] for n, v in MMEB_TASKS.items() if v["category"] == "vqa"}
    assert len(vqa) == 1  # the four OOD VQA tasks use the same prefix as the six IND ones
    assert mmeb_task_info("imagenet-a")["instruction"] == mmeb_task_info("ImageNet-R")["instruction"]
    assert "classification" in mmeb_task_info("ImageNet-A")["instruction"]
    # Wiki-SS-NQ is a text query: no image marker
    assert not mmeb_task_info("wiki-ss-nq")["instruction"].startswith(MARK)
    assert mmeb_task_info("not-a-task") is None
