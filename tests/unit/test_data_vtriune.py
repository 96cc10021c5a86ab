"""Orsta rows as published: parquet with HF Image features and jsonl, read by the loader directly or
converted to a file elsewhere; their ability names, degenerate boxes, prompt instructions and image
sizing; and the image-token count the trainer and the rollout engine agree on for an upscaled image."""
import io
import json

import pytest
from PIL import Image

from dualrpo_mcore.data.config import DataConfig, SourceConfig
from dualrpo_mcore.data.loader import PromptLoader
from dualrpo_mcore.data.vtriune import convert_file, task_of
from dualrpo_mcore.data.vtriune_prompts import (CLOSEFORM_SECOND, FREEFORM_SECOND, VTRIUNE_IMAGE_RESIZE,
                                                VTRIUNE_INSTRUCTIONS)
from dualrpo_mcore.verifiers.scoring import score_with_info

RATIO_KEYS = ("iou_max_label_first", "iou_max_iou_first", "iou_completeness", "map", "map50", "map75")
DET_RATIO = {"iou_max_label_first": 1.0, "iou_max_iou_first": 0.0, "iou_completeness": 0.3, "map": 0.0,
             "map50": 0.0, "map75": 0.0}
VTRIUNE_ON = dict(instructions=dict(VTRIUNE_INSTRUCTIONS), image_resize=dict(VTRIUNE_IMAGE_RESIZE))


def _png(w, h, colour=(30, 120, 200)):
    buf = io.BytesIO()
    Image.new("RGB", (w, h), colour).save(buf, format="PNG")
    return buf.getvalue()


def _row(i, ability, verifier, gt, image, *, fmt=0.1, normalized=None, ratio=None):
    parm = {"det_verifier_normalized": normalized, "det_reward_ratio": ratio}
    return {"data_source": f"src{i}", "images": [image], "ability": ability,
            "prompt": [{"role": "user", "content": f"<image>Question {i}?"}],
            "reward_model": {"answer": "", "ground_truth": gt, "accuracy_ratio": 1.0, "format_ratio": fmt,
                             "verifier": verifier, "verifier_parm": parm},
            "extra_info": {"id": f"r{i}", "image_path": None}}


DEGENERATE_GT = "<answer>[{'bbox_2d': [100, 100, 100, 300], 'label': 'cat'}]</answer>"
DET_GT = ("<answer>[{'bbox_2d': [100, 100, 500, 600], 'label': 'dog'}, "
          "{'bbox_2d': [100, 100, 100, 300], 'label': 'cat'}]</answer>")


def _orsta_rows(image):
    return [_row(0, "math", "mathverify", "\\boxed{4}", image),
            _row(1, "cv_detection", "detection", DET_GT, image, normalized=True, ratio=DET_RATIO),
            _row(2, "cv_grounding", "detection", DEGENERATE_GT, image, normalized=False, ratio=DET_RATIO),
            _row(3, "puzzle", "mathverify", "\\boxed{B}", image, fmt=0.0)]


def _orsta_parquet(path, rows):
    import datasets

    f32 = datasets.Value("float32")
    feats = datasets.Features({
        "data_source": datasets.Value("string"), "images": datasets.Sequence(datasets.Image()),
        "prompt": [{"content": datasets.Value("string"), "role": datasets.Value("string")}],
        "ability": datasets.Value("string"),
        "reward_model": {"answer": datasets.Value("string"), "ground_truth": datasets.Value("string"),
                         "accuracy_ratio": f32, "format_ratio": f32, "verifier": datasets.Value("string"),
                         "verifier_parm": {"det_verifier_normalized": datasets.Value("bool"),
                                           "det_reward_ratio": {k: f32 for k in RATIO_KEYS}}},
        "extra_info": {"id": datasets.Value("string"), "image_path": datasets.Value("string")}})
    datasets.Dataset.from_list(rows, features=feats).to_parquet(str(path))
    return str(path)


def _loader(path, **kw):
    return PromptLoader(DataConfig(sources=[SourceConfig(path=str(path))], shuffle=False, **kw))


def test_orsta_parquet_loads_as_published_with_their_rewards(tmp_path):
    rows = _orsta_rows({"bytes": _png(400, 300), "path": None})
    path = _orsta_parquet(tmp_path / "train_math_mmmath_4.parquet", rows)
    math, det, ground, puzzle = _loader(path, **VTRIUNE_ON).next_prompts(4)
    assert [p.task for p in (math, det, ground, puzzle)] == ["math", "detection", "grounding", "puzzle"]
    assert math.reward["verifier"] == "vtriune_math" and math.reward["answer"] == "\\boxed{4}"
    assert math.reward["params"]["format_ratio"] == pytest.approx(0.1)
    # their sizing: 400x300 is enlarged to 512x512 of area, then the processor's grid
    assert math.images[0].size == (591, 443) and math.image_grid_thw.tolist() == [[1, 32, 42]]
    # the instruction pool: think/answer sentences when format_ratio > 0, plain ones when it is 0
    assert any(math.messages[-1]["content"][-1]["text"].endswith(s) for s in CLOSEFORM_SECOND)
    assert any(puzzle.messages[-1]["content"][-1]["text"].endswith(s) for s in FREEFORM_SECOND)
    assert det.messages[-1]["content"][-1]["text"] == "Question 1?"  # detection prompts carry their own format
    # normalised boxes: the size the model saw comes from the processed grid
    assert det.reward["params"]["image_hw"] == [32 * 14, 42 * 14] and det.reward["params"]["det_verifier_normalized"]
    # a degenerate ground-truth box is kept, as their sanitation keeps it
    assert ground.reward["verifier"] == "vtriune_detection" and "[100, 100, 100, 300]" in ground.reward["answer"]
    response = "<think>\nsee\n</think>\n<answer>\n\\boxed{4}\n</answer>"
    assert score_with_info(math.reward, response, progress=0.5) == (1.0, {"status": "ok", "detail": ""})
    hit = "<think>\nx\n</think>\n<answer>\n[{'bbox_2d': [59, 45, 294, 269], 'label': 'dog'}]\n</answer>"
    reward, info = score_with_info(det.reward, hit, progress=0.05)
    assert info["status"] == "ok" and 0.4 < reward < 1.0  # one of two boxes, mapped to the 0..1000 grid


def test_instructions_are_seeded_per_row_and_absent_when_off(tmp_path):
    path = _orsta_parquet(tmp_path / "o.parquet", _orsta_rows({"bytes": _png(64, 48), "path": None}))
    a = [p.messages[-1]["content"][-1]["text"] for p in _loader(path, **VTRIUNE_ON).next_prompts(8)]
    b = [p.messages[-1]["content"][-1]["text"] for p in _loader(path, **VTRIUNE_ON).next_prompts(8)]
    assert a == b and a[0] != a[4]  # same seed, same prompts; a new epoch draws again
    plain = _loader(path).next_prompts(4)
    assert [p.messages[-1]["content"][-1]["text"] for p in plain] == [f"Question {i}?" for i in range(4)]
    assert plain[0].images[0].size == (64, 48)  # no sizing either


def test_native_profile_drops_degenerate_boxes(tmp_path):
    path = _orsta_parquet(tmp_path / "o.parquet", _orsta_rows({"bytes": _png(64, 48), "path": None}))
    loader = _loader(path, reward_profile="native")
    prompts = loader.next_prompts(3)
    assert prompts[0].reward["components"][0]["verifier"] == "math"
    det = prompts[1].reward["components"][0]
    assert det["verifier"] == "detection" and [b["bbox_2d"] for b in det["answer"]] == [[100, 100, 500, 600]]
    assert prompts[2].row == 3  # the grounding row holds only a degenerate box: native cannot score it
    assert list(loader.bad) == [f"{path}:2"]


def _orsta_jsonl(folder, rows, name="orsta.jsonl"):
    (folder / "img").mkdir(parents=True, exist_ok=True)
    (folder / "img" / "a.png").write_bytes(_png(400, 300))
    with open(folder / name, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    return folder / name


def test_orsta_jsonl_with_relative_paths_loads_and_converts_elsewhere(tmp_path):
    rows = _orsta_rows("img/a.png")
    rows[3].pop("images")
    rows[3]["extra_info"]["image_path"] = "img/a.png"  # an export without the images column
    src = _orsta_jsonl(tmp_path / "data", rows)
    direct = _loader(src).next_prompts(4)
    assert all(p.images[0].size == (400, 300) for p in direct)
    for out in (tmp_path / "elsewhere" / "conv.parquet", tmp_path / "other" / "conv.jsonl"):
        out.parent.mkdir()
        n, errors = convert_file(str(src), str(out))
        assert (n, errors) == (4, [])
        moved = _loader(out).next_prompts(4)
        assert [p.reward for p in moved] == [p.reward for p in direct]
        assert [p.task for p in moved] == ["math", "detection", "grounding", "puzzle"]
        assert all(p.images[0].size == (400, 300) for p in moved)


def test_converted_file_keeps_image_hw_of_the_resized_image(tmp_path):
    src = _orsta_jsonl(tmp_path, _orsta_rows("img/a.png")[:2])
    out = tmp_path / "conv.jsonl"
    convert_file(str(src), str(out), image_resize=VTRIUNE_IMAGE_RESIZE)
    spec = json.loads(json.loads(out.read_text().splitlines()[1])["reward"])
    assert spec["params"]["image_hw"] == [448, 588]


@pytest.mark.parametrize("ability,file_name,task", [
    ("cv_detection", None, "detection"), ("cv_grounding", None, "grounding"), ("visual_counting", None, "counting"),
    ("OCR", None, "ocr"), ("math_reasoning", None, "math"), ("science", None, "science"),
    (None, "train_chart_chartqapro_498.parquet", "chart"), ("vqa", "train_puzzle_puzzlevqa_2648_x2.parquet", "puzzle"),
    ("vqa", "data.parquet", "other")])
def test_every_ability_names_one_of_the_eight_tasks(ability, file_name, task):
    assert task_of(ability, file_name=file_name) == task


def test_config_checks_the_per_task_tables():
    with pytest.raises(ValueError, match="reward_profile"):
        DataConfig(reward_profile="theirs")
    with pytest.raises(ValueError, match="unknown task 'cooking'"):
        DataConfig(instructions={"cooking": "vtriune_cot"})
    with pytest.raises(ValueError, match="instructions\\['math'\\]"):
        DataConfig(instructions={"math": "be brief"})
    with pytest.raises(ValueError, match="image_resize\\['ocr'\\]"):
        DataConfig(image_resize={"ocr": [100, 10]})


def test_paper_recipe_reads_orsta_with_their_rewards_prompts_and_sizing(tmp_path):
    from dualrpo_mcore.trainer.recipes import build_recipe

    (tmp_path / "train_math_mmmath_3539.parquet").write_bytes(b"")
    data = build_recipe("qwen2_5_vl_7b_paper", str(tmp_path), "/models/7b", str(tmp_path / "r")).data
    assert data.sources[0].path == str(tmp_path / "train_math_mmmath_3539.parquet")
    assert data.reward_profile == "vtriune"
    assert data.instructions == VTRIUNE_INSTRUCTIONS and data.image_resize == VTRIUNE_IMAGE_RESIZE


def test_trainer_and_engine_count_the_same_tokens_for_an_upscaled_image(tmp_path):
    """The loader enlarges the image before processing and hands the enlarged pixels to the engine,
    so SGLang (here its fake, which runs Qwen2-VL's smart resize on what it receives under the
    trainer's pixel bounds) expands the image to the trainer's token count."""
    from fakes import sglang_fake

    from dualrpo_mcore.data import synth
    from dualrpo_mcore.data.tokenizer import build_model_files
    from dualrpo_mcore.rollout import RolloutRequest, SamplingParams
    from dualrpo_mcore.rollout.sglang_engine import SGLangEngine

    model = tmp_path / "model"
    facts = build_model_files(synth.corpus_texts(num_per_task=4), str(model), vocab_size=512,
                              min_pixels=3136, max_pixels=28 * 28 * 1280)
    path = _orsta_parquet(tmp_path / "o.parquet", _orsta_rows({"bytes": _png(400, 300), "path": None})[:1])
    cfg = DataConfig(sources=[SourceConfig(path=path)], processor_dir=str(model), **VTRIUNE_ON)
    prompt = next(PromptLoader(cfg))
    img = facts["image_token_id"]
    trainer_count = prompt.input_ids.tolist().count(img)
    assert trainer_count == 336 == prompt.image_grid_thw.prod().item() // 4  # 588x448, not 392x308's 154
    engine = SGLangEngine(str(model), image_token_id=img, min_pixels=cfg.min_pixels, max_pixels=cfg.max_pixels,
                          engine_factory=sglang_fake.factory(image_token_id=img))
    params = SamplingParams(n=1, max_new_tokens=2, seed=0)
    engine.generate([RolloutRequest.from_prompt(prompt)], params)  # raises if the counts disagree
    assert engine._engine.image_tokens(prompt.images[0]) == trainer_count
    original = Image.open(io.BytesIO(_png(400, 300)))
    assert engine._engine.image_tokens(original) == 154  # what the engine would count without the shared resize
    unresized = RolloutRequest(prompt.input_ids.tolist(), images=[original], uid="raw")
    with pytest.raises(RuntimeError, match="counted"):
        engine.generate([unresized], params)
