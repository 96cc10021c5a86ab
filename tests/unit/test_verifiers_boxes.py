"""IoU and one-to-one matching against pycocotools and brute force; grounding and detection."""
import itertools
import random

import numpy as np
import pytest
from pycocotools import mask as mask_utils

from dualrpo_mcore.verifiers.boxes import iou, max_weight_matching, parse_boxes
from dualrpo_mcore.verifiers.tasks.detection import VTRIUNE_SCHEDULE, match_boxes, threshold_at
from dualrpo_mcore.verifiers.scoring import score, score_with_info


def _rand_box(rng, scale):
    x, y = rng.uniform(0, scale), rng.uniform(0, scale)
    return (x, y, x + rng.uniform(0.01, scale / 2), y + rng.uniform(0.01, scale / 2))


def _xywh(b):
    return [b[0], b[1], b[2] - b[0], b[3] - b[1]]


def _coco_iou(preds, golds):
    return mask_utils.iou([_xywh(b) for b in preds], [_xywh(b) for b in golds], [0] * len(golds))


@pytest.mark.parametrize("scale", [1000.0, 1.0])  # pixel coordinates and normalised ones
def test_iou_matches_pycocotools(scale):
    rng = random.Random(0)
    for _ in range(300):
        a, b = _rand_box(rng, scale), _rand_box(rng, scale)
        ref = _coco_iou([a], [b])[0, 0]
        assert iou(a, b) == pytest.approx(ref, rel=1e-9, abs=1e-12)
    # identical, touching and disjoint boxes
    assert iou((0, 0, 1, 1), (0, 0, 1, 1)) == 1.0
    assert iou((0, 0, 1, 1), (1, 0, 2, 1)) == 0.0


def _brute_force_best(w):
    n, m = len(w), len(w[0])
    best = 0.0
    if n <= m:
        for cols in itertools.permutations(range(m), n):
            best = max(best, sum(w[i][c] for i, c in enumerate(cols)))
    else:
        for rows in itertools.permutations(range(n), m):
            best = max(best, sum(w[r][j] for j, r in enumerate(rows)))
    return best


def test_hungarian_is_optimal_vs_brute_force():
    rng = random.Random(1)
    for _ in range(200):
        n, m = rng.randint(1, 5), rng.randint(1, 5)
        w = [[rng.choice([0.0, rng.random()]) for _ in range(m)] for _ in range(n)]
        pairs = max_weight_matching(w)
        assert len({i for i, _ in pairs}) == len(pairs) == len({j for _, j in pairs})
        assert sum(w[i][j] for i, j in pairs) == pytest.approx(_brute_force_best(w))


def _greedy_coco_tp(ious, thr):
    """COCO evaluation's matching for equal scores: each detection in order takes the best
    still-unmatched ground truth with IoU >= thr."""
    taken, tp = set(), 0
    for row in ious:
        best, best_j = thr, -1
        for j, v in enumerate(row):
            if j not in taken and v >= best:
                best, best_j = v, j
        if best_j >= 0:
            taken.add(best_j)
            tp += 1
    return tp


@pytest.mark.parametrize("scale", [1000.0, 1.0])
def test_matching_agrees_with_coco_ious_and_beats_greedy(scale):
    rng = random.Random(2)
    for _ in range(150):
        golds = [_rand_box(rng, scale) for _ in range(rng.randint(1, 5))]
        preds = [_rand_box(rng, scale) for _ in range(rng.randint(1, 5))]
        # perturbed copies give real matches
        preds += [tuple(v + rng.uniform(-0.02, 0.02) * scale for v in g) for g in golds[:2]]
        preds = [p if p[2] > p[0] and p[3] > p[1] else golds[0] for p in preds]
        thr = rng.choice([0.3, 0.5, 0.75])
        ref = np.asarray(_coco_iou(preds, golds))
        pairs = match_boxes(preds, golds, thr)
        for i, j, v in pairs:
            assert v == pytest.approx(ref[i, j], rel=1e-9, abs=1e-12) and v >= thr
        # the best one-to-one count above threshold, by brute force on COCO's IoUs
        hits = [[1.0 if ref[i, j] >= thr else 0.0 for j in range(len(golds))] for i in range(len(preds))]
        assert len(pairs) == round(_brute_force_best(hits))
        assert len(pairs) >= _greedy_coco_tp(ref.tolist(), thr)


def test_parse_boxes_formats():
    assert parse_boxes("[1, 2, 3, 4]")[0][0] == [1.0, 2.0, 3.0, 4.0]
    assert parse_boxes('{"bbox_2d": [1,2,3,4], "label": "dog"}') == [([1, 2, 3, 4], "dog")]
    assert parse_boxes("```json\n[{'bbox_2d': [1,2,3,4], 'label': 'cat'}]\n```")[0][1] == "cat"
    assert parse_boxes("box (1,2),(3,4)")[0][0] == [1.0, 2.0, 3.0, 4.0]
    assert parse_boxes("[1234]") == []
    assert len(parse_boxes("[1,2,3,4] " * 1000, limit=7)) == 7


def test_grounding_continuous_threshold_coords():
    gold = [0, 0, 10, 10]
    assert score({"verifier": "grounding", "answer": gold}, "<answer>[0, 0, 10, 5]</answer>") == 0.5
    spec = {"verifier": "grounding", "answer": gold, "params": {"threshold": 0.5}}
    assert score(spec, "[0, 0, 10, 5]") == 1.0
    assert score(spec, "[0, 0, 10, 4.9]") == 0.0
    # prediction in 0-1000 normalised coordinates, answer in pixels of a 200x100 image
    spec = {"verifier": "grounding", "answer": [0, 0, 100, 100],
            "params": {"coords": "norm1000", "answer_coords": "abs", "image_size": [200, 100]}}
    assert score(spec, "[0, 0, 500, 1000]") == pytest.approx(1.0)
    assert score(spec, "[0, 0, 250, 1000]") == pytest.approx(0.5)
    xywh = {"verifier": "grounding", "answer": [0, 0, 10, 10], "params": {"box_format": "xywh"}}
    assert score(xywh, "[5, 0, 10, 10]") == pytest.approx(50 / 150)


@pytest.mark.parametrize("resp", ["", "no box", "[5, 5, 1, 1]", "[0, 0, 0, 0]", "[nan, 0, 1, 1]",
                                  "[0, 0, 1e999, 5]", "[[[[", "{'bbox_2d': 'x'}"])
def test_grounding_malformed(resp):
    assert score({"verifier": "grounding", "answer": [0, 0, 10, 10]}, resp) == 0.0


def test_detection_f1_mean_iou_labels_and_schedule():
    gold = [{"bbox_2d": [0, 0, 10, 10], "label": "dog"}, {"bbox_2d": [20, 20, 30, 30], "label": "cat"}]
    spec = {"verifier": "detection", "answer": gold, "params": {"iou_threshold": 0.5}}
    right = '<answer>[{"bbox_2d":[0,0,10,10],"label":"dog"},{"bbox_2d":[20,20,30,30],"label":"cat"}]</answer>'
    assert score(spec, right) == 1.0
    wrong_label = right.replace('"cat"', '"dog"')
    assert score(spec, wrong_label) == pytest.approx(0.5)  # tp=1, 2 preds, 2 gts
    no_labels = {**spec, "params": {"iou_threshold": 0.5, "use_labels": False}}
    assert score(no_labels, wrong_label) == 1.0
    extra = '[[0,0,10,10],[20,20,30,30],[50,50,60,60]]'
    assert score(no_labels, extra) == pytest.approx(2 * 2 / 5)
    miou = {"verifier": "detection", "answer": [[0, 0, 10, 10], [20, 20, 30, 30]],
            "params": {"metric": "mean_iou", "iou_threshold": 0.5}}
    assert score(miou, "[[0,0,10,9],[20,20,30,30],[50,50,60,60]]") == pytest.approx((0.9 + 1.0) / 3)
    # V-Triune dynamic IoU: IoU 0.9 passes the early 0.85 stage, not the later 0.95 / 0.99 ones
    dyn = {"verifier": "detection", "answer": [[0, 0, 10, 10]]}
    assert threshold_at(None) == 0.85 and threshold_at(0.2) == 0.95 and threshold_at(0.9) == 0.99
    assert VTRIUNE_SCHEDULE[-1] == (1.0, 0.99)
    assert score(dyn, "[[0,0,10,9]]", progress=0.05) == 1.0
    assert score(dyn, "[[0,0,10,9]]", progress=0.5) == 0.0
    sched = {**dyn, "params": {"schedule": [[0.5, 0.5], [1.0, 0.95]]}}
    assert score(sched, "[[0,0,10,6]]", progress=0.4) == 1.0
    assert score(sched, "[[0,0,10,6]]", progress=0.6) == 0.0
    # empty ground truth: an empty prediction is right
    assert score({"verifier": "detection", "answer": []}, "<answer>[]</answer>") == 1.0
    assert score({"verifier": "detection", "answer": []}, "[[0,0,1,1]]") == 0.0


def test_detection_box_cap_counts_extras():
    spec = {"verifier": "detection", "answer": [[0, 0, 10, 10]],
            "params": {"iou_threshold": 0.5, "max_boxes": 3}}
    resp = "[[0,0,10,10]" + ",[50,50,60,60]" * 10 + "]"
    reward, info = score_with_info(spec, resp)
    assert info["status"] == "ok"
    assert reward == pytest.approx(2 * 1 / (4 + 1))  # 3 parsed + 1 counted beyond the cap
    big = "[" + ",".join(f"[{i},{i},{i + 5},{i + 5}]" for i in range(5000)) + "]"
    assert 0.0 <= score({"verifier": "detection", "answer": [[0, 0, 5, 5]]}, big) <= 1.0
