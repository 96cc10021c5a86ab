"""The real SGLang engine on one GPU: a tiny random Qwen2.5-VL checkpoint (tokenizer + processor built
locally, no hub), weights replaced through the bucketed update path after a release/resume cycle,
then sampled responses whose rollout log-probs are compared with the transformers model's
teacher-forced log softmax(logits / T). Skipped without CUDA or without sglang (never run in CI here:
sglang needs CUDA and is not installable on the CPU machines)."""
import importlib.util

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="SGLang needs a CUDA GPU (none visible)"),
    pytest.mark.skipif(importlib.util.find_spec("sglang") is None,
                       reason="sglang is not installed (pip install dualrpo-mcore[sglang])"),
]

TEMPERATURE = 0.8
TOL = 2e-2  # fp32 weights but different attention / matmul kernels than transformers' eager path


def _checkpoint(tmp_path, seed):
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    from dualrpo_mcore.data.tokenizer import build_model_files, corpus_words

    facts = build_model_files(corpus_words() * 20, str(tmp_path), vocab_size=512)
    text = dict(vocab_size=facts["vocab_size"], hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                rope_parameters={"rope_type": "default", "rope_theta": 1e4, "mrope_section": [4, 6, 6]},
                bos_token_id=facts["bos_token_id"], eos_token_id=facts["eos_token_id"],
                pad_token_id=facts["pad_token_id"])
    vision = dict(depth=2, hidden_size=64, intermediate_size=128, num_heads=4, patch_size=14, temporal_patch_size=2,
                  in_channels=3, spatial_merge_size=2, window_size=112, fullatt_block_indexes=[1], out_hidden_size=128)
    cfg = Qwen2_5_VLConfig(text_config=text, vision_config=vision, image_token_id=facts["image_token_id"],
                           video_token_id=facts["video_token_id"], vision_start_token_id=facts["vision_start_token_id"],
                           vision_end_token_id=facts["vision_end_token_id"], tie_word_embeddings=False)
    torch.manual_seed(seed)
    Qwen2_5_VLForConditionalGeneration(cfg).float().save_pretrained(str(tmp_path))
    return facts


def test_sglang_release_resume_sync_and_logprobs(tmp_path):
    from PIL import Image
    from transformers import Qwen2_5_VLForConditionalGeneration

    from dualrpo_mcore.data.tokenizer import load_processor
    from dualrpo_mcore.models.qwen2_5_vl import mapping
    from dualrpo_mcore.rollout import RolloutRequest, SamplingParams
    from dualrpo_mcore.rollout.sglang_engine import SGLangEngine

    facts = _checkpoint(tmp_path, seed=0)
    trained = Qwen2_5_VLForConditionalGeneration.from_pretrained(str(tmp_path)).float().eval()
    with torch.no_grad():  # the "trainer's" new weights: the engine must pick them up
        for p in trained.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    engine = SGLangEngine(str(tmp_path), image_token_id=facts["image_token_id"], dtype="float32",
                          mem_fraction_static=0.2, bucket_bytes=1 << 20)
    try:
        free_before = torch.cuda.mem_get_info()[0]
        engine.release_memory()
        assert torch.cuda.mem_get_info()[0] > free_before  # memory really went back
        named = [(mapping.normalize_hf_name(n), t.cuda()) for n, t in trained.state_dict().items()]
        engine.resume_memory(weights=iter(named))

        proc = load_processor(str(tmp_path))
        image = Image.new("RGB", (112, 84), (120, 30, 200))
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "How many?"}]}]
        text = proc.apply_chat_template(messages, add_generation_prompt=True)
        enc = proc(text=[text], images=[image], return_tensors="pt")
        req = RolloutRequest(enc["input_ids"][0], enc["pixel_values"], enc["image_grid_thw"], images=[image], uid="g")
        out = engine.generate([req], SamplingParams(n=4, temperature=TEMPERATURE, max_new_tokens=16, seed=0))
        assert len(out) == 1 and len(out[0]) == 4
        for s in out[0]:
            ids = torch.tensor([req.input_ids + s.token_ids])
            with torch.no_grad():
                logits = trained(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=req.pixel_values,
                                 image_grid_thw=req.image_grid_thw,
                                 mm_token_type_ids=(ids == facts["image_token_id"]).int()).logits[0]
            plen = len(req.input_ids)
            ref = torch.log_softmax(logits[plen - 1:-1].double() / TEMPERATURE, -1)
            ref = ref.gather(-1, torch.tensor(s.token_ids)[:, None])[:, 0]
            assert (ref - torch.tensor(s.logprobs, dtype=torch.float64)).abs().max() < TOL
    finally:
        engine.shutdown()
