"""Evaluation: COCO box/mask AP through our conversion on hand-computed cases, mIoU on a hand-built confusion
matrix, and the reduction across ranks (slow: two gloo processes)."""
import contextlib
import io
import math
import socket

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from pycocotools.coco import COCO

from mambazoo.dense.evaluation import CocoEvaluator, ConfusionMatrix, detections_to_coco
from mambazoo.dense.synthetic import mask_to_rle

pytestmark = pytest.mark.usefixtures("one_torch_thread")

HEIGHT, WIDTH = 40, 60


def _mask(x0: int, y0: int, x1: int, y1: int) -> torch.Tensor:
    mask = torch.zeros(HEIGHT, WIDTH)
    mask[y0:y1, x0:x1] = 1
    return mask


def _ground_truth(boxes: list[tuple[int, int, int, int]]) -> COCO:
    annotations = [dict(id=i + 1, image_id=7, category_id=5, bbox=[x0, y0, x1 - x0, y1 - y0], iscrowd=0,
                        area=(x1 - x0) * (y1 - y0), segmentation=mask_to_rle(_mask(x0, y0, x1, y1).numpy()))
                   for i, (x0, y0, x1, y1) in enumerate(boxes)]
    coco = COCO()
    coco.dataset = dict(images=[dict(id=7, height=HEIGHT, width=WIDTH)], annotations=annotations,
                        categories=[dict(id=5, name="thing")])
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def _prediction(boxes: list[tuple[int, int, int, int]], scores: list[float]) -> dict:
    masks = [_mask(*box)[None] * 0.9 for box in boxes]
    return dict(boxes=torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4), scores=torch.tensor(scores),
                labels=torch.ones(len(boxes), dtype=torch.int64),
                masks=torch.stack(masks) if masks else torch.zeros(0, 1, HEIGHT, WIDTH))


def test_detections_convert_to_coco_results() -> None:
    results = detections_to_coco(_prediction([(2, 3, 12, 23)], [0.8]), image_id=7, category_ids=[5])
    assert len(results) == 1
    result = results[0]
    assert result["bbox"] == [2.0, 3.0, 10.0, 20.0] and result["category_id"] == 5 and result["image_id"] == 7
    assert result["segmentation"] == mask_to_rle(_mask(2, 3, 12, 23).numpy())
    assert result["score"] == pytest.approx(0.8)


def test_coco_ap_of_a_hand_computed_ranking() -> None:
    # Two objects; detections by score: hit A, a false positive, hit B. Precision/recall: (1, .5), (.5, .5),
    # (2/3, 1). Interpolated precision is 1 for recall <= .5 (51 of COCO's 101 recall points) and 2/3 above
    # (50 points), at every IoU threshold since the hits are exact: AP = (51 + 50 * 2/3) / 101.
    objects = [(2, 2, 20, 20), (30, 10, 55, 35)]
    evaluator = CocoEvaluator(_ground_truth(objects), category_ids=[5])
    evaluator.update([_prediction([objects[0], (22, 30, 28, 38), objects[1]], [0.9, 0.8, 0.7])], [7])
    metrics = evaluator.summarize()
    expected = (51 + 50 * 2 / 3) / 101
    for iou_type in ("bbox", "segm"):
        assert metrics[f"{iou_type}_AP"] == pytest.approx(expected, abs=1e-12)
        assert metrics[f"{iou_type}_AP50"] == pytest.approx(expected, abs=1e-12)
        assert math.isnan(metrics[f"{iou_type}_APl"])  # no object larger than 96² pixels
    assert "Average Precision" in evaluator.summary_text


def test_coco_ap_counts_iou_thresholds() -> None:
    # One object, one detection with IoU 0.64: a hit at thresholds .50, .55, .60 and a miss at .65 ... .95, so
    # AP = 3/10, AP50 = 1, AP75 = 0 (boxes and masks alike: the masks are the boxes).
    evaluator = CocoEvaluator(_ground_truth([(10, 10, 30, 30)]), category_ids=[5])
    evaluator.update([_prediction([(10, 10, 26, 26)], [0.9])], [7])  # IoU = 16² / 20² = 0.64
    metrics = evaluator.summarize()
    for iou_type in ("bbox", "segm"):
        assert metrics[f"{iou_type}_AP"] == pytest.approx(0.3, abs=1e-12)
        assert metrics[f"{iou_type}_AP50"] == pytest.approx(1.0) and metrics[f"{iou_type}_AP75"] == 0.0


def test_coco_evaluator_without_detections_and_bad_types() -> None:
    evaluator = CocoEvaluator(_ground_truth([(10, 10, 30, 30)]), category_ids=[5])
    evaluator.update([_prediction([], [])], [7])
    metrics = evaluator.summarize()  # a 20x20 object (small): 0 where COCO has objects, NaN where it has none
    assert metrics["bbox_AP"] == metrics["segm_APs"] == 0.0 and np.isnan(metrics["bbox_APm"])
    with pytest.raises(ValueError, match="iou_types must be"):
        CocoEvaluator(None, [5], iou_types=("keypoints",))


def test_miou_of_a_hand_built_confusion_matrix() -> None:
    target = torch.tensor([[0, 0, 1], [1, 2, 255]])
    prediction = torch.tensor([[0, 1, 1], [2, 2, 0]])
    matrix = ConfusionMatrix(4, class_names=["bg", "a", "b", "unused"])
    matrix.update(prediction, target)
    assert matrix.matrix.tolist() == [[1, 1, 0, 0], [0, 1, 1, 0], [0, 0, 1, 0], [0, 0, 0, 0]]
    metrics = matrix.compute()
    # IoU = TP / (TP + FP + FN): bg 1/2, a 1/(2+2-1) = 1/3, b 1/(1+2-1) = 1/2; "unused" absent -> NaN, skipped
    assert metrics["IoU.bg"] == 0.5 and metrics["IoU.a"] == pytest.approx(1 / 3) and metrics["IoU.b"] == 0.5
    assert math.isnan(metrics["IoU.unused"])
    assert metrics["mIoU"] == pytest.approx((0.5 + 1 / 3 + 0.5) / 3)
    assert metrics["aAcc"] == pytest.approx(3 / 5) and metrics["mAcc"] == pytest.approx((1 / 2 + 1 / 2 + 1) / 3)
    with pytest.raises(ValueError, match=r"target labels must be in 0..3 or 255, got 0..7"):
        matrix.update(prediction, torch.tensor([[0, 0, 7], [1, 2, 255]]))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _reduce_worker(rank: int, port: int, queue) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    matrix = ConfusionMatrix(3)
    matrix.update(torch.tensor([rank, 2]), torch.tensor([rank, rank]))
    matrix.all_reduce()
    objects = [(2, 2, 20, 20), (30, 10, 55, 35)]
    evaluator = CocoEvaluator(_ground_truth(objects), category_ids=[5])
    evaluator.update([_prediction([objects[rank]], [0.9 - rank * 0.1])], [7])
    evaluator.synchronize()
    queue.put((rank, matrix.matrix.tolist(), evaluator.summarize()["bbox_AP"]))
    dist.destroy_process_group()


@pytest.mark.slow
def test_evaluators_reduce_across_ranks() -> None:
    context = mp.get_context("spawn")
    queue = context.Queue()
    port = _free_port()
    processes = [context.Process(target=_reduce_worker, args=(rank, port, queue)) for rank in range(2)]
    for process in processes:
        process.start()
    results = sorted(queue.get(timeout=120) for _ in processes)
    for process in processes:
        process.join(timeout=60)
    # rank 0 counts (0 -> 0), (0 -> 2); rank 1 counts (1 -> 1), (1 -> 2)
    assert results[0][1] == results[1][1] == [[1, 0, 1], [0, 1, 1], [0, 0, 0]]
    assert results[0][2] == results[1][2] == pytest.approx(1.0)  # both objects found once the ranks are merged
